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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddkit.config import EvaluateConfig, to_dict
from ddkit.data import ClassReader, load_tensors
from ddkit.errors import DataError
from ddkit.evaluate.batched import Student, group_size, supports, train_students
from ddkit.evaluate.protocols import ECCV2024Protocol, Protocol
from ddkit.evaluate.trainer import RunResult, train_student
from ddkit.io import append_jsonl, read_jsonl
from ddkit.progress import bar


@dataclass
class TrainSet:
    """One thing to train on. ``images``: ``[N, C, H, W]`` uint8, or float32 in [0, 1] units; ``labels`` int64 ``[N]``."""

    name: str
    kind: str  # "distilled" | "random_real" | "full"
    images: torch.Tensor | None
    labels: torch.Tensor | None
    ipc: int
    fingerprint: str  # identifies the data (file sha256, or how it was drawn)
    source: str = ""


def run_key(obj: dict) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as key-sorted JSON (non-JSON values as ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def random_real_positions(counts: list[int], ipc: int, seed: int) -> list[torch.Tensor]:
    """random_real's draw: per class, ``ipc`` positions among its ``counts[c]`` train images (in the split's
    sample order) without replacement, classes in order from one ``torch.Generator(seed)``.

    Returns:
        int64 [ipc] per class.

    Raises:
        DataError: a class has fewer than ``ipc`` images.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, n in enumerate(counts):
        if n < ipc:
            raise DataError(f"random_real: class {c} has {n} training images, fewer than IPC {ipc}")
        out.append(torch.randperm(n, generator=g)[:ipc])
    return out


def random_real_subset(images: torch.Tensor, labels: torch.Tensor, ipc: int, seed: int, num_classes: int):
    """:func:`random_real_positions`' draw from tensors in memory: ``images`` any dtype ``[N, ...]``,
    ``labels`` int64 ``[N]`` -> ``(images[idx], labels[idx])``, class-major.

    Raises:
        DataError: a class has fewer than ``ipc`` images.
    """
    pools = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    pos = random_real_positions([len(p) for p in pools], ipc, seed)
    idx = torch.cat([pool[q] for pool, q in zip(pools, pos, strict=True)])
    return images[idx], labels[idx]


class RealTrain:
    """An evaluation's real train split, read only as far as it is needed: ``random_real``'s draws class by
    class (only the drawn images, :class:`ddkit.data.ClassReader`), the whole split only for what trains on
    all of it (the ``full`` baseline, the rded teacher), once.

    Args:
        shards: the real shard directory.
    """

    def __init__(self, shards: str | Path) -> None:
        self.shards = shards
        self._reader = None
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split: uint8 [N, C, H, W], int64 [N] (loaded on the first call)."""
        if self._tensors is None:
            self._tensors = load_tensors(self.shards, "train")
        return self._tensors

    def random_subset(self, ipc: int, seed: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`random_real_subset` of the split, byte-identical, reading only the drawn images unless the
        split is in memory already.

        Raises:
            DataError: a class has fewer than ``ipc`` images, or unreadable shards.
        """
        if self._tensors is not None:
            return random_real_subset(*self._tensors, ipc, seed, num_classes)
        if self._reader is None:
            self._reader = ClassReader(self.shards, "train")
        pos = random_real_positions([self._reader.count(c) for c in range(num_classes)], ipc, seed)
        xs = torch.cat([self._reader.images_at(c, q.numpy()) for c, q in enumerate(pos)])
        ys = torch.cat([torch.full((len(q),), c, dtype=torch.int64) for c, q in enumerate(pos)])
        return xs, ys


@dataclass
class Bench:
    """What every training run of one evaluation shares: the protocol, the student network, the settings
    and the real data (train split for ``random_real`` and the teacher, test split to score students)."""

    protocol: Protocol
    network: str
    cfg: EvaluateConfig  # with the resolved precision (never "auto")
    index: dict[str, Any]  # the real shard set's index (classes, channels, resolution, mean, std)
    ipc: int  # images per class of random_real
    train: RealTrain  # the real train split, read as far as needed
    test_x: torch.Tensor  # real test split, uint8 [M, C, H, W]; converted per batch by the trainer
    test_y: torch.Tensor  # int64 [M]
    device: torch.device
    teacher: torch.nn.Module | None = None  # rded's soft-label teacher
    teacher_fp: str | None = None  # its cache key (part of every run's key)

    @property
    def batched(self) -> bool:
        """Students train batched: ``evaluate.batched`` (None: on CUDA only) and a protocol/network/precision
        that supports it."""
        wanted = self.device.type == "cuda" if self.cfg.batched is None else self.cfg.batched
        return bool(wanted) and supports(self.protocol, self.network, self.cfg.precision)

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


@dataclass
class _Run:
    """One repeat of one training set: its key, data, seed and (once cached or trained) its result."""

    name: str
    repeat: int
    seed: int
    key: str
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    batch: int
    result: dict | None = None

    def student_epochs(self, bench: Bench) -> int:
        """Epochs this run trains (the eccv2024 scorer runs one more than it names): the progress unit."""
        p = bench.protocol
        return self.epochs + 1 if isinstance(p, ECCV2024Protocol) and p.extra_epoch else self.epochs


class RunCache:
    """``runs.jsonl``: the finished runs by key (read once, at construction); new runs are appended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = {r["key"]: r for r in read_jsonl(path) if "key" in r}

    def runs(self, bench: Bench, sets: list[TrainSet], progress: bool) -> list[list[tuple[dict, int]]]:
        """Every repeat of every set: per set, in repeat order, ``(RunResult.to_dict(), training images)``.

        Cached runs are read; the missing ones are trained (batched in groups when ``bench.batched``, see
        :mod:`ddkit.evaluate.batched`, else one by one) under one progress bar over all their epochs, and
        each group's runs are appended to ``runs.jsonl`` as soon as it finishes.
        """
        planned = [self._plan(bench, s) for s in sets]
        todo = [r for runs in planned for r in runs if r.result is None]
        total = sum(r.student_epochs(bench) for r in todo)
        with bar("evaluate", total, enabled=progress, fields="{task.fields[now]}", now="") as update:
            for group in _groups(bench, todo):
                update(0, now=_describe(group))
                for r, res in zip(group, _train(bench, group, update), strict=True):
                    r.result = res.to_dict()
                    self._append(r)
        return [[(r.result, int(r.x.shape[0])) for r in runs] for runs in planned]

    def _plan(self, bench: Bench, s: TrainSet) -> list[_Run]:
        cfg = bench.cfg
        epochs, bs = bench.epochs_for(s), bench.batch_for(s)
        out = []
        for r in range(cfg.repeats):
            seed = cfg.seed + r
            what = {
                "set": s.fingerprint,
                "protocol": to_dict(bench.protocol),
                "network": bench.network,
                "epochs": epochs,
                "batch": bs,
                "seed": seed,
                "precision": cfg.precision,
                "teacher": bench.teacher_fp,
            }
            if bench.batched:  # sequential runs keep the keys they always had
                what["batched"] = True
            key = run_key(what)
            if s.kind == "random_real":
                xs, ys = bench.train.random_subset(bench.ipc, seed, bench.num_classes)
            else:
                xs, ys = s.images, s.labels
            done = self.done.get(key)
            out.append(_Run(s.name, r, seed, key, xs, ys, epochs, bs, done["result"] if done else None))
        return out

    def _append(self, r: _Run) -> None:
        append_jsonl(
            self.path, {"key": r.key, "set": r.name, "repeat": r.repeat, "seed": r.seed, "result": r.result}
        )
        self.done[r.key] = {"key": r.key, "result": r.result}


def _groups(bench: Bench, todo: list[_Run]) -> list[list[_Run]]:
    """The runs to train together, in first-appearance order: batched, runs sharing epochs, batch and set
    shape, at most :func:`ddkit.evaluate.batched.group_size` of them; else one run per group."""
    if not bench.batched:
        return [[r] for r in todo]
    groups: dict[tuple, list[list[_Run]]] = {}
    for r in todo:
        chunks = groups.setdefault((r.epochs, r.batch, tuple(r.x.shape)), [[]])
        if len(chunks[-1]) >= group_size(r.batch, int(r.x.shape[0])):
            chunks.append([])
        chunks[-1].append(r)
    return [c for chunks in groups.values() for c in chunks]


def _describe(group: list[_Run]) -> str:
    names = list(dict.fromkeys(r.name for r in group))
    head = ", ".join(names[:3]) + (f" +{len(names) - 3}" if len(names) > 3 else "")
    return f"{head} ({len(group)} student{'s' if len(group) > 1 else ''})"


def _train(bench: Bench, group: list[_Run], update) -> list[RunResult]:
    """Train ``group`` (one run, or runs sharing epochs/batch/shape when batched); ``update(n)`` advances
    the evaluation's bar by ``n`` student-epochs."""
    r0 = group[0]
    common = dict(
        mean=list(bench.index["mean"]), std=list(bench.index["std"]), num_classes=bench.num_classes,
        epochs=r0.epochs, batch_size=r0.batch, device=bench.device, precision=bench.cfg.precision,
    )  # fmt: skip
    if bench.batched:
        students = [Student(r.x, r.y, r.seed) for r in group]
        return train_students(bench.protocol, bench.network, students, bench.test_x, bench.test_y,
                              on_epoch=update, **common)  # fmt: skip
    return [
        train_student(
            bench.protocol,
            bench.network,
            r0.x,
            r0.y,
            bench.test_x,
            bench.test_y,
            seed=r0.seed,
            teacher=bench.teacher,
            on_epoch=lambda _epochs_done: update(),
            **common,
        )  # fmt: skip
    ]
