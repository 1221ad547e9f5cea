"""ddkit checkpoints (``RUN/<stage>/ckpt/last.pt``): atomic save, CPU load, path resolution.

A checkpoint is a dict with keys ``model``, ``ema`` (Backbone state dicts: ``dit.*`` diffusers keys plus
``gammas.<i>.*``), ``optimizer`` (AdamW state), ``step`` (optimizer steps done), ``rng`` and ``memories``
(lists with one entry per rank: ``{"generator", "torch", "numpy", "python"[, "cuda"]}`` RNG states and the
minimax memories or None), ``log_acc`` (per rank: loss sums not logged yet), ``data_pos``
(``{"epoch", "batch"}``: the next batch to consume), ``config`` (resolved ExperimentConfig as dict),
``model_config`` (ModelConfig dict), ``trainable`` ("all" | "difffit"), ``trainable_names``, ``stage`` and
``world_size`` (see :mod:`ddkit.train`), ``precision`` (the run's
:class:`ddkit.hardware.PrecisionChoice` as dict), ``scaler`` (the ``GradScaler`` state) and ``made_on``
(the dataset and classes it was trained on, :func:`ddkit.models.provenance.record`). Older checkpoints may
lack the later keys (``log_acc``, ``precision``, ``scaler``, ``made_on``); readers treat them as absent.

Besides the file itself this module holds the training state's two ends: :func:`training_state` (and the
per-rank :func:`rank_state`) build the dict a stage saves, :func:`resume_state` and :func:`rank_entry` read
it back, and :func:`seed_rank` / :func:`rng_state` / :func:`set_rng_state` are the one list of RNG streams
a rank seeds, saves and restores.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ddkit.config import to_dict
from ddkit.errors import WeightsError
from ddkit.io import atomic_torch_save

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


# ----------------------------------------------------------------------------------------------------------
# What a training stage starts from
# ----------------------------------------------------------------------------------------------------------
def resume_state(resume: str, ckpt_path: Path, stage: str) -> dict[str, Any] | None:
    """The checkpoint a training stage resumes from, or None for a fresh start.

    Args:
        resume: ``"auto"`` (``ckpt_path`` when it exists), ``"never"``, or a path
            (:func:`resolve_checkpoint`).
        ckpt_path: the stage's own ``ckpt/last.pt``.
        stage: ``"pretrain"`` or ``"minimax"``; a path must hold this stage's checkpoint (or an unnamed one).

    Raises:
        WeightsError: the path holds no checkpoint, an unreadable one, or another stage's.
    """
    if resume == "auto":
        return load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if resume == "never":
        return None
    found = resolve_checkpoint(resume)
    if found is None:
        raise WeightsError(f"--resume {resume}: checkpoint not found")
    state = load_checkpoint(found)
    if state.get("stage") not in (None, stage):
        raise WeightsError(f"--resume {resume}: a {state.get('stage')} checkpoint, not {stage}")
    return state


def rank_entry(state: dict[str, Any], key: str, rank: int, world_size: int) -> Any:
    """This rank's entry of a per-rank list (``rng``, ``memories``, ``log_acc``), or None when the
    checkpoint was written by another number of ranks (it cannot continue bit-exactly) or lacks ``key``."""
    entries = state.get(key) or []
    return entries[rank] if len(entries) == world_size else None


# ----------------------------------------------------------------------------------------------------------
# Writing: the per-rank parts and the whole training state
# ----------------------------------------------------------------------------------------------------------
def rank_state(generator, device, memory, acc, acc_n: int) -> dict[str, Any]:
    """What differs between ranks: RNG states (:func:`rng_state`), the minimax memories
    (:class:`ddkit.methods.minimax.MinimaxMemory` or None) and the loss sums not logged yet (``acc``
    float64 [6] on any device, over ``acc_n`` steps)."""
    return {
        "rng": rng_state(generator, device),
        "memories": memory.state_dict() if memory is not None else None,
        "log_acc": {"sums": acc.cpu(), "n": acc_n},
    }


def training_state(
    *,
    model: Any,
    ema: Any,
    optimizer: Any,
    scaler: Any,
    step: int,
    data_pos: tuple[int, int],
    ranks: list[dict[str, Any]],
    config: Any,
    model_config: Any,
    trainable: str,
    trainable_names: list[str],
    stage: str,
    world_size: int,
    precision: Any,
    made_on: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A checkpoint (the module docstring's keys) from the training objects.

    Args:
        model, ema: Backbones; optimizer: AdamW; scaler: ``torch.amp.GradScaler``; step: optimizer steps done.
        data_pos: (epoch, batch-in-epoch) of the next batch.
        ranks: one :func:`rank_state` per rank, in rank order.
        config, model_config: ``ExperimentConfig`` and ``ModelConfig`` (stored as dicts).
        trainable, trainable_names, stage, world_size: stored as given.
        precision: :class:`ddkit.hardware.PrecisionChoice` (stored as dict).
        made_on: the training data's record (:func:`ddkit.models.provenance.record`); None leaves it out.
    """

    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": [r["rng"] for r in ranks],
        "data_pos": {"epoch": data_pos[0], "batch": data_pos[1]},
        "memories": [r["memories"] for r in ranks],
        "log_acc": [r["log_acc"] for r in ranks],
        "config": to_dict(config),
        "model_config": to_dict(model_config),
        "trainable": trainable,
        "trainable_names": trainable_names,
        "stage": stage,
        "world_size": world_size,
        "precision": precision.to_dict(),
        "scaler": scaler.state_dict(),
        **({"made_on": made_on} if made_on is not None else {}),
    }


# ----------------------------------------------------------------------------------------------------------
# RNG streams: the one list a rank seeds, saves and restores
# ----------------------------------------------------------------------------------------------------------
def seed_rank(seed: int, device) -> Any:
    """Seed this rank's RNG streams with ``seed`` (the reference's per-rank ``seed * world + rank``):
    torch's global (CPU and CUDA), numpy's (``seed % 2**32``) and Python's; return a new
    ``torch.Generator`` on ``device`` seeded alike, which draws t, ε, flips, label dropout and VAE samples."""
    import numpy as np

    generator = torch.Generator(device).manual_seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return generator


def rng_state(generator, device) -> dict[str, Any]:
    """The RNG states :func:`set_rng_state` restores: ``generator`` (the rank's device generator),
    ``torch`` (CPU global), ``numpy``, ``python``, and ``cuda`` (this device's) when ``device`` is CUDA."""
    import numpy as np

    s = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(generator, s: dict[str, Any], device) -> None:
    """Restore :func:`rng_state`'s ``s`` into ``generator`` and the global streams (``cuda`` only when
    both the state and ``device`` have it)."""
    import numpy as np

    generator.set_state(s["generator"])
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], device)
