"""Training runs: each set's repeats, trained once and cached in ``runs.jsonl``.

Repeat ``r`` of every training set trains with the seed ``seed + r`` (the same seeds for every set; the
``random_real`` baseline also draws its images with it). A finished run is appended to ``OUT/runs.jsonl``
under a key hashing everything that determines it (the set's fingerprint, protocol, network, epochs, batch,
seed, resolved precision, teacher), so an interrupted evaluation resumes and a rerun with the same settings
only re-reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddkit.config import EvaluateConfig, to_dict
from ddkit.errors import DataError
from ddkit.evaluate.protocols import ECCV2024Protocol, Protocol
from ddkit.evaluate.trainer import RunResult, train_student
from ddkit.progress import bar

if TYPE_CHECKING:
    from ddkit.evaluate.runner import TrainSet


def run_key(obj: dict) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as key-sorted JSON (non-JSON values as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def random_real_subset(images: torch.Tensor, labels: torch.Tensor, ipc: int, seed: int, num_classes: int):
    """``ipc`` real training images per class drawn without replacement with ``torch.Generator(seed)``.

    ``images`` any dtype ``[N, ...]``, ``labels`` int64 ``[N]`` -> ``(images[idx], labels[idx])``, class-major.

    Raises:
        DataError: a class has fewer than ``ipc`` images.
    """
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < ipc:
            raise DataError(f"random_real: class {c} has {len(pool)} training images, fewer than IPC {ipc}")
        idx.append(pool[torch.randperm(len(pool), generator=g)[:ipc]])
    idx_t = torch.cat(idx)
    return images[idx_t], labels[idx_t]


@dataclass
class Bench:
    """What every training run of one evaluation shares: the protocol, the student network, the settings
    and the real data (train split for ``random_real`` and the teacher, test split to score students)."""

    protocol: Protocol
    network: str
    cfg: EvaluateConfig  # with the resolved precision (never "auto")
    index: dict[str, Any]  # the real shard set's index (classes, channels, resolution, mean, std)
    ipc: int  # images per class of random_real
    train_u8: torch.Tensor  # real train split, uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # real test split, uint8 [M, C, H, W]; converted per batch by the trainer
    test_y: torch.Tensor  # int64 [M]
    device: torch.device
    teacher: torch.nn.Module | None = None  # rded's soft-label teacher
    teacher_fp: str | None = None  # its cache key (part of every run's key)

    @property
    def num_classes(self) -> int:
        return len(self.index["classes"])

    def epochs_for(self, s: TrainSet) -> int:
        """``evaluate.epochs`` (``full_epochs`` for the full baseline), else the protocol's for its IPC."""
        cfg, protocol = self.cfg, self.protocol
        if s.kind == "full":
            return cfg.full_epochs or (cfg.epochs or protocol.epochs_for(s.ipc))
        return cfg.epochs or protocol.epochs_for(s.ipc)

    def batch_for(self, s: TrainSet) -> int:
        """``evaluate.batch_size``, else the protocol's for the set's IPC and the class count."""
        return self.cfg.batch_size or self.protocol.batch_size_for(s.ipc, self.num_classes)


class RunCache:
    """``runs.jsonl``: the finished runs by key (read once, at construction); new runs are appended."""

    def __init__(self, path: Path) -> None:
        from ddkit.io import read_jsonl

        self.path = path
        self.done = {r["key"]: r for r in read_jsonl(path) if "key" in r}

    def repeats(self, bench: Bench, s: TrainSet, progress: bool) -> Iterator[tuple[dict, int]]:
        """Each repeat of ``s`` in order: ``(RunResult.to_dict(), training images)``, read from the cache or
        trained (under a progress bar when ``progress``) and appended to it."""
        from ddkit.io import append_jsonl

        cfg = bench.cfg
        epochs, bs = bench.epochs_for(s), bench.batch_for(s)
        for r in range(cfg.repeats):
            seed = cfg.seed + r
            key = run_key(
                {
                    "set": s.fingerprint,
                    "protocol": to_dict(bench.protocol),
                    "network": bench.network,
                    "epochs": epochs,
                    "batch": bs,
                    "seed": seed,
                    "precision": cfg.precision,
                    "teacher": bench.teacher_fp,
                }
            )
            if s.kind == "random_real":
                xs, ys = random_real_subset(bench.train_u8, bench.train_y, bench.ipc, seed, bench.num_classes)
            else:
                xs, ys = s.images, s.labels
            if key in self.done:
                res = self.done[key]["result"]
            else:
                desc = f"{s.name} run {r + 1}/{cfg.repeats}"
                res = _train(bench, xs, ys, epochs, bs, seed, desc, progress).to_dict()
                append_jsonl(self.path, {"key": key, "set": s.name, "repeat": r, "seed": seed, "result": res})
            yield res, int(xs.shape[0])


def _train(
    bench: Bench, xs, ys, epochs: int, batch_size: int, seed: int, desc: str, progress: bool
) -> RunResult:
    """One student on ``(xs, ys)`` under a progress bar of its epochs (none without ``progress``)."""
    protocol = bench.protocol
    total = epochs + 1 if isinstance(protocol, ECCV2024Protocol) and protocol.extra_epoch else epochs
    with bar(desc, total, enabled=progress, fields="epochs") as update:
        return train_student(
            protocol, bench.network, xs, ys, bench.test_x, bench.test_y, mean=list(bench.index["mean"]),
            std=list(bench.index["std"]), num_classes=bench.num_classes, epochs=epochs, batch_size=batch_size,
            seed=seed, device=bench.device, precision=bench.cfg.precision, teacher=bench.teacher,
            on_epoch=lambda _epochs_done: update(),
        )  # fmt: skip
