"""ddkit checkpoints (``RUN/<stage>/ckpt/last.pt``): atomic save, CPU load, path resolution.

A checkpoint is a dict with keys ``model``, ``ema`` (Backbone state dicts: ``dit.*`` diffusers keys plus
``gammas.<i>.*``), ``optimizer`` (AdamW state), ``step`` (optimizer steps done), ``rng`` and ``memories``
(lists with one entry per rank: ``{"generator", "torch", "numpy", "python"[, "cuda"]}`` RNG states and the
minimax memories or None), ``log_acc`` (per rank: loss sums not logged yet), ``data_pos``
(``{"epoch", "batch"}``: the next batch to consume), ``config`` (resolved ExperimentConfig as dict),
``model_config`` (ModelConfig dict), ``trainable`` ("all" | "difffit"), ``trainable_names``, ``stage`` and
``world_size`` (see :mod:`ddkit.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddkit.errors import WeightsError

CKPT_NAME = "last.pt"


def checkpoint_path(stage_dir: str | Path) -> Path:
    """``stage_dir/ckpt/last.pt``."""
    return Path(stage_dir) / "ckpt" / CKPT_NAME


def resolve_checkpoint(path: str | Path) -> Path | None:
    """A ddkit checkpoint file for ``path`` (the file itself, ``dir/ckpt/last.pt`` or ``dir/last.pt``), or
    None when ``path`` does not point at one."""
    p = Path(path)
    if p.is_file():
        return p
    for cand in (checkpoint_path(p), p / CKPT_NAME):
        if cand.is_file():
            return cand
    return None


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` atomically (temp file + rename, :func:`ddkit.io.atomic_torch_save`)."""
    from ddkit.io import atomic_torch_save

    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU (``map_location="cpu"``).

    Raises:
        WeightsError: missing, unreadable or not a ddkit checkpoint (names the path).
    """
    return as_checkpoint(read_torch_file(path), path)


def as_checkpoint(state: Any, path: str | Path) -> dict[str, Any]:
    """``state`` (what ``path`` held) when it is a ddkit checkpoint.

    Raises:
        WeightsError: it lacks the keys ``model`` and ``model_config`` (names the path).
    """
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise WeightsError(f"{path}: not a ddkit checkpoint (needs keys 'model' and 'model_config')")
    return state


def read_torch_file(path: str | Path) -> Any:
    """``torch.load`` onto the CPU, whatever the file holds.

    Raises:
        WeightsError: missing or unreadable (names the path).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: checkpoint not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightsError(
            f"{p}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return state
