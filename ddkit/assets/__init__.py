"""Model files shipped inside the package, named in configs as ``ddkit:NAME``.

``ddkit:mnist-dit-t4`` is the demo's pretrained DiT-T/4 (a diffusers ``save_pretrained`` folder:
``config.json`` + ``diffusion_pytorch_model.safetensors``), made by ``tools/make_demo_checkpoint.py``. It
plays the part ``facebook/DiT-XL-2-256`` plays in the real workflow: the demo fine-tunes, generates and
evaluates from it instead of pretraining on the user's CPU (issue 13: 2,400 steps took 4.7 h under
emulated bf16 on an AVX2-only CPU and ~21 min in fp32).
"""

from __future__ import annotations

from pathlib import Path

from ddkit.errors import WeightsError

PREFIX = "ddkit:"


def asset_path(ref: str) -> str:
    """The local path of ``ref`` when it names a shipped asset, else ``ref`` unchanged.

    ``ddkit:NAME`` is a shipped model folder; ``ddkit:NAME/FILE`` a file shipped with it (the measured
    quality table ``ddkit:mnist-dit-t4/quality.yaml`` that ``generate.quality`` reads).

    Raises:
        WeightsError: ``ddkit:NAME`` names no shipped model, or ``ddkit:NAME/FILE`` no file in it (lists what
            there is).
    """
    if not str(ref).startswith(PREFIX):
        return ref
    name, _, rest = str(ref)[len(PREFIX):].partition("/")
    here = Path(__file__).resolve().parent
    path = here / name

    if not name or not (path / "config.json").is_file():
        known = sorted(p.name for p in here.iterdir() if (p / "config.json").is_file())
        raise WeightsError(f"{ref}: no such shipped model (shipped: {', '.join(known) or 'none'})")
    if rest:
        if ".." in Path(rest).parts or not (path / rest).is_file():
            files = sorted(p.name for p in path.iterdir() if p.is_file())
            raise WeightsError(f"{ref}: no such file shipped with {PREFIX}{name} (files: {', '.join(files)})")
        return str(path / rest)
    return str(path)
