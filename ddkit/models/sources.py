"""Loading diffusers weights from the first of several places, with one error that says what each found.

A Hugging Face id such as ``facebook/DiT-XL-2-256`` keeps its DiT in ``transformer/`` and its VAE in
``vae/``; a plain id (``stabilityai/sd-vae-ft-ema``) or a local folder keeps them at its root. The loaders
(:func:`ddkit.models.load_backbone`, :func:`ddkit.models.vae.load_vae`) try each place in turn, offline.
When none loads, the error names every attempt and why it failed, and tells apart weights that are not
there (download or copy them) from weights that are there but cannot be read (a torn download, a corrupt
file: replace them), since the two need different fixes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ddkit.errors import WeightsError

T = TypeVar("T")


def load_first(src: str, subfolders: Sequence[str], load: Callable[[str], T], what: str) -> T:
    """``load(subfolder)`` for each of ``subfolders`` of ``src`` in order (``""``: its root); the first
    result.

    Args:
        src: a local folder or a Hugging Face id (as given to ``from_pretrained``).
        subfolders: where to look, in order.
        load: loads from one subfolder; any exception counts as a failed attempt.
        what: the weights' name in messages (``"DiT weights"``, ``"VAE weights"``).

    Raises:
        WeightsError: every attempt failed. One line: ``found but unreadable`` when some attempt's
            ``config.json`` is present locally (naming those attempts and their errors, then the others),
            else ``not found locally`` naming each attempt and why. Its ``attempts`` lists every
            (subfolder, exception); its ``__cause__`` is the first unreadable attempt's exception (else the
            first attempt's).
    """
    failed: list[tuple[str, Exception]] = []
    for sub in subfolders:
        try:
            return load(sub)
        except Exception as e:  # diffusers: OSError, ValueError, safetensors and pickle errors
            failed.append((sub, e))
    found = [(s, e) for s, e in failed if config_present(src, s)]
    missing = [(s, e) for s, e in failed if not config_present(src, s)]
    tried = "; ".join(f"{_where(s)}: {why(e)}" for s, e in (found or missing))
    if found:
        msg = f"{src}: {what} found but unreadable (replace the files): {tried}"
        if missing:
            msg += f" (also tried {', '.join(_where(s) for s, _ in missing)}: not found)"
    else:
        msg = f"{src}: {what} not found locally (no network; put them in the HF cache or a dir): {tried}"
    err = WeightsError(msg)
    err.attempts = failed
    raise err from (found or failed)[0][1]


def config_present(src: str, subfolder: str = "") -> bool:
    """Whether ``src``'s ``[subfolder/]config.json`` is on this machine: in the folder ``src``, else in the
    local Hugging Face cache (``huggingface_hub.try_to_load_from_cache``; never the network)."""
    rel = f"{subfolder}/config.json" if subfolder else "config.json"
    p = Path(src).expanduser()
    if p.is_dir():
        return (p / rel).is_file()
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(src, rel)
    except Exception:  # not a valid repo id: nothing of it can be cached
        return False
    return isinstance(hit, str)


def why(e: BaseException) -> str:
    """One line for an exception: its type and the first line of its message, then those of the exception
    it was raised from when there is one (diffusers' "Unable to load weights" hides the safetensors or
    pickle error that says what is wrong with the file)."""
    root = e
    while (nxt := root.__cause__ or root.__context__) is not None and nxt is not root:
        root = nxt
    return _line(e) if root is e else f"{_line(e)} ({_line(root)})"


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _where(subfolder: str) -> str:
    return f"{subfolder}/" if subfolder else "./"
