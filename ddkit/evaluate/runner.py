"""``ddkit evaluate``: judge distilled sets against the random-real and full-data baselines in one run.

Every training set (each distilled set, ``random_real`` at the same IPC, ``full``) is trained ``repeats``
times with the seeds ``seed + r`` (the same seeds for every set), tested on the real test split, and
reported as mean ± std (population std, as D^3HR's ``np.std``). Finished runs are appended to
``runs.jsonl`` keyed by everything that determines them, so an interrupted evaluation resumes and a rerun
with the same settings only re-reads.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ddkit.config import EvaluateConfig, to_dict
from ddkit.data import load_tensors, read_index
from ddkit.dist import device_for
from ddkit.distilled import load_distilled as read_distilled
from ddkit.errors import DataError
from ddkit.evaluate.protocols import Protocol, RDEDProtocol, get_protocol
from ddkit.evaluate.results import Report
from ddkit.evaluate.runs import Bench, RealTrain, RunCache, TrainSet, random_real_subset, run_key
from ddkit.evaluate.teacher import teacher_for
from ddkit.evaluate.trainer import student_precision
from ddkit.io import atomic_write_json, hardware_info, mark_done, write_run_config

__all__ = ["BASELINES", "TrainSet", "check_real_counts", "evaluate", "load_distilled", "random_real_subset"]

BASELINES = ("random_real", "full")


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load_distilled(path: str | Path, index: dict[str, Any], name: str | None = None) -> TrainSet:
    """A distilled set as a :class:`TrainSet`, checked against the real data's index: an adapter over
    :func:`ddkit.distilled.load_distilled` (which lists the accepted forms and the checks).

    Returns:
        :class:`TrainSet` with images float32 ``[N, C, H, W]`` in [0, 1] units, class-major, named ``name``
        or after the file (its directory for ``dataset.pt``).

    Raises:
        DataError: (a :class:`~ddkit.errors.DistilledSetError`) one line naming the file.
    """

    d = read_distilled(path, index=index, balanced=False)  # a student trains on any set, in its own order
    p = d.file or d.gen_dir / "dataset.pt"
    x01 = d.images.float() / 255.0 if d.images.dtype == torch.uint8 else d.images.float()
    default = p.parent.name if p.name == "dataset.pt" else p.stem
    return TrainSet(name or default, "distilled", x01.contiguous(), d.labels, int(d.ipc), d.sha256, str(p))


def check_real_counts(index: dict[str, Any], cfg: EvaluateConfig, ipc: int, where: str) -> None:
    """Check, from the shard index alone (no image is read), that the real data can feed the baselines:
    a non-empty test split and, for ``random_real``, ``ipc`` training images in every class. Called before
    any training, so a doomed evaluation stops at once.

    Raises:
        DataError: one line naming the shard directory, the class and the counts.
    """
    counts = index.get("counts") or {}
    if not sum((counts.get("test") or {}).values()):
        raise DataError(f"{where}: the real test split is empty; nothing to score students on")
    if "random_real" not in cfg.baselines:
        return
    train = counts.get("train") or {}
    short = [(c, int(train.get(c, 0))) for c in index["classes"] if int(train.get(c, 0)) < ipc]
    if short:
        c, n = short[0]
        raise DataError(
            f"{where}: random_real at IPC {ipc} needs {ipc} training images per class but {len(short)} "
            f"class(es) have fewer ({c!r}: {n}); lower evaluate.ipc or drop random_real from evaluate.baselines"
        )


# ----------------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------------
def evaluate(
    distilled: dict[str, str | Path],
    real: str | Path,
    cfg: EvaluateConfig,
    *,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, dict]:
    """Train and test students on each distilled set and on the baselines; write the report.

    Args:
        distilled: display name -> ``dataset.pt`` / directory holding one / bare normalised tensor ``.pt``.
        real: shard directory of the real dataset (``ddkit data shard``); its train split feeds the baselines
            (and the rded teacher), its test split scores every student.
        cfg: :class:`ddkit.config.EvaluateConfig` (protocol, network, epochs, repeats, baselines, seed, ...).
        out_dir: where ``results.json``, ``table.md``, ``runs.jsonl``, ``config.yaml`` and ``DONE`` go.
        progress: show one progress bar over the whole evaluation (with its ETA) and print the table.

    Returns:
        ``{set name: {"mean", "std", "runs", "ipc", "protocol", "network", "epochs", "images", "last_mean",
        "last_std", "last_runs", "seconds"}}`` with accuracies in percent (``mean``: the scorer's final
        accuracy for eccv2024, the best test accuracy for idc/rded, as their sources report).

    Raises:
        DataError: unreadable real shards or distilled sets (one line naming the file).
        ConfigError: unknown protocol or network.
    """

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocol = get_protocol(cfg.protocol)
    network = cfg.network or protocol.network
    device = device_for(requested=cfg.device)
    index = read_index(real)
    write_run_config(out, cfg)

    sets = [load_distilled(p, index, name) for name, p in distilled.items()]
    ipc = cfg.ipc or (sets[0].ipc if sets else 10)
    check_real_counts(index, cfg, ipc, str(real))
    test_u8, test_y = load_tensors(real, "test")
    train = RealTrain(real)
    real_fp = run_key({"real": str(Path(real).resolve()), "sha": index.get("sha256", {})})
    precision = _precision(out, cfg, protocol, network, index, ipc, device)
    cfg = dataclasses.replace(
        cfg, precision=precision.precision
    )  # run keys and students use the resolved one
    sets += _baselines(cfg, ipc, train, len(index["classes"]), real_fp)
    bench = Bench(protocol, network, cfg, index, ipc, train, test_u8, test_y, device)
    if isinstance(protocol, RDEDProtocol):
        bench.teacher, bench.teacher_fp = teacher_for(bench, out, progress, real_fp)

    cache = RunCache(out / "runs.jsonl")
    report = Report(protocol, network, int(test_y.shape[0]), progress)
    for s, runs in zip(sets, cache.runs(bench, sets, progress), strict=True):
        report.add(s, bench.epochs_for(s), runs)
    report.rank()
    report.write(out, _meta(bench, precision, real, report), index.get("dataset"))
    mark_done(out, {"sets": list(report.results)})
    return report.results


def _precision(out: Path, cfg: EvaluateConfig, protocol: Protocol, network: str, index: dict[str, Any],
               ipc: int, device: torch.device):  # fmt: skip
    """``evaluate.precision`` resolved once per evaluation and recorded in ``out/precision.json``.

    A rerun keeps the recorded choice (its cached runs are keyed by it); see
    :func:`ddkit.hardware.choose_precision`. Returns a :class:`ddkit.hardware.PrecisionChoice`.
    """

    k = len(index["classes"])
    shape = (int(index["channels"]), int(index["resolution"]), int(index["resolution"]))
    bs0 = cfg.batch_size or protocol.batch_size_for(ipc, k)
    prec_path = out / "precision.json"
    prev = json.loads(prec_path.read_text()) if prec_path.is_file() else None
    precision = student_precision(cfg.precision, network, shape, k, bs0, device, previous=prev)
    atomic_write_json(prec_path, precision.to_dict())
    return precision


def _baselines(cfg: EvaluateConfig, ipc: int, train: RealTrain, k: int, real_fp: str) -> list[TrainSet]:
    """The baseline training sets named in ``cfg.baselines``, in that order: ``random_real`` (drawn per
    repeat, see :func:`ddkit.evaluate.runs.random_real_subset`) and ``full`` (the real train split)."""
    sets = []
    for b in cfg.baselines:
        if b == "random_real":
            sets.append(
                TrainSet(
                    "random_real", "random_real", None, None, ipc, f"random_real:{real_fp}:{ipc}:{cfg.seed}"
                )
            )
        elif b == "full":
            train_u8, train_y = train.tensors()  # the one baseline that trains on the whole split
            sets.append(TrainSet("full", "full", train_u8, train_y, max(1, len(train_y) // k), f"full:{real_fp}"))
    return sets


def _meta(bench: Bench, precision, real: str | Path, report: Report) -> dict[str, Any]:
    """``results.json``'s ``meta``: the settings, the precision record, the table's order, the hardware."""

    cfg, index = bench.cfg, bench.index
    return {
        "protocol": to_dict(bench.protocol),
        "network": bench.network,
        "ipc": bench.ipc,
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        "batched": bench.batched,  # students trained batched (ddkit.evaluate.batched), else one by one
        "device": str(bench.device),
        "precision": precision.to_dict(),
        "real": str(real),
        "order": list(report.results),  # results.json is key-sorted; this is the table's order
        "dataset": index.get("dataset"),
        "scorer": report.scorer_perf,  # the scorer's performance of the first distilled set (the submission)
        "classes": list(index["classes"]),
        "hardware": hardware_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
