"""The ``rded`` protocol's soft-label teacher: trained once on the full real train split, then reloaded.

The teacher is saved as ``OUT/teacher-<key>.pt`` (its state dict on the CPU) under a key hashing the real
data, its network, epochs, seed, protocol and resolved precision; that key is also part of every student
run's key, so students trained against another teacher are never reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddkit.config import to_dict
from ddkit.evaluate.networks import build
from ddkit.evaluate.protocols import RDEDProtocol
from ddkit.evaluate.runs import Bench, run_key
from ddkit.evaluate.trainer import train_teacher
from ddkit.io import atomic_torch_save
from ddkit.progress import bar


def teacher_for(bench: Bench, out: Path, progress: bool, real_fp: str) -> tuple[torch.nn.Module, str]:
    """Train (or reload from ``out/teacher-<key>.pt``) the rded teacher on the full real train split.

    Args:
        bench: the evaluation's shared settings; ``bench.protocol`` is an :class:`RDEDProtocol`.
        out: the evaluation directory.
        progress: show a progress bar over the teacher's epochs.
        real_fp: the real data's fingerprint (shard directory and shard hashes).

    Returns:
        ``(teacher in eval mode on bench.device, its key)``.
    """

    protocol: RDEDProtocol = bench.protocol  # type: ignore[assignment]
    cfg, index, device = bench.cfg, bench.index, bench.device
    tnet = protocol.teacher_network or bench.network
    epochs = cfg.teacher_epochs or protocol.teacher_epochs
    fp = run_key(
        {
            "real": real_fp,
            "net": tnet,
            "epochs": epochs,
            "seed": cfg.seed,
            "protocol": to_dict(protocol),
            "precision": cfg.precision,
        }
    )
    path = out / f"teacher-{fp}.pt"
    k = len(index["classes"])
    if path.is_file():
        model = build(tnet, int(index["channels"]), k, int(index["resolution"]))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.to(device).eval(), fp
    kwargs = dict(
        mean=index["mean"],
        std=index["std"],
        num_classes=k,
        epochs=epochs,
        seed=cfg.seed,
        device=device,
        precision=cfg.precision,
    )
    with bar(f"teacher {tnet}", epochs, enabled=progress) as update:
        model = train_teacher(
            protocol, tnet, *bench.train.tensors(), on_epoch=lambda _epochs_done: update(), **kwargs
        )
    atomic_torch_save({k_: v.cpu() for k_, v in model.state_dict().items()}, path)
    return model, fp
