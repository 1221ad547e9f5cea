"""``ddkit evaluate``: judge distilled sets against the random-real and full-data baselines in one run.

Every training set (each distilled set, ``random_real`` at the same IPC, ``full``) is trained ``repeats``
times with the seeds ``seed + r`` (the same seeds for every set), tested on the real test split, and
reported as mean ± std (population std, as D^3HR's ``np.std``). Finished runs are appended to
``runs.jsonl`` keyed by everything that determines them, so an interrupted evaluation resumes and a rerun
with the same settings only re-reads.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddkit.config import EvaluateConfig, to_dict
from ddkit.errors import DataError
from ddkit.evaluate.protocols import ECCV2024Protocol, Protocol, RDEDProtocol, get_protocol
from ddkit.evaluate.trainer import RunResult, student_precision, train_student, train_teacher

BASELINES = ("random_real", "full")


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


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_distilled(path: str | Path, index: dict[str, Any], name: str | None = None) -> TrainSet:
    """A distilled set as a :class:`TrainSet`, checked against the real data's index: an adapter over
    :func:`ddkit.distilled.load_distilled` (which lists the accepted forms and the checks).

    Returns:
        :class:`TrainSet` with images float32 ``[N, C, H, W]`` in [0, 1] units, class-major, named ``name``
        or after the file (its directory for ``dataset.pt``).

    Raises:
        DataError: (a :class:`~ddkit.errors.DistilledSetError`) one line naming the file.
    """
    from ddkit.distilled import load_distilled as read_distilled

    d = read_distilled(path, index=index)
    p = d.file or d.gen_dir / "dataset.pt"
    x01 = d.images.float() / 255.0 if d.images.dtype == torch.uint8 else d.images.float()
    default = p.parent.name if p.name == "dataset.pt" else p.stem
    return TrainSet(name or default, "distilled", x01.contiguous(), d.labels, int(d.ipc), d.sha256, str(p))


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
def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_runs(path: Path) -> dict[str, dict]:
    from ddkit.io import read_jsonl

    return {r["key"]: r for r in read_jsonl(path) if "key" in r}


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
        progress: show a rich progress bar per run and print the table.

    Returns:
        ``{set name: {"mean", "std", "runs", "ipc", "protocol", "network", "epochs", "images", "last_mean",
        "last_std", "last_runs", "seconds"}}`` with accuracies in percent (``mean``: the scorer's final
        accuracy for eccv2024, the best test accuracy for idc/rded, as their sources report).

    Raises:
        DataError: unreadable real shards or distilled sets (one line naming the file).
        ConfigError: unknown protocol or network.
    """
    from ddkit.data import load_tensors, read_index
    from ddkit.io import append_jsonl, atomic_write_json, hardware_info, mark_done, write_run_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocol = get_protocol(cfg.protocol)
    network = cfg.network or protocol.network
    device = resolve_device(cfg.device)
    index = read_index(real)
    classes = list(index["classes"])
    k = len(classes)
    mean, std = list(index["mean"]), list(index["std"])
    write_run_config(out, cfg)

    sets = [load_distilled(p, index, name) for name, p in distilled.items()]
    ipc = cfg.ipc or (sets[0].ipc if sets else 10)
    check_real_counts(index, cfg, ipc, str(real))
    test_u8, test_y = load_tensors(real, "test")
    train_u8, train_y = load_tensors(real, "train")
    test_x = test_u8  # uint8; converted per batch by the trainer
    n_test = int(test_y.shape[0])
    real_fp = _key({"real": str(Path(real).resolve()), "sha": index.get("sha256", {})})
    shape = (int(index["channels"]), int(index["resolution"]), int(index["resolution"]))
    bs0 = cfg.batch_size or protocol.batch_size_for(ipc, k)
    # A rerun keeps the recorded choice (its cached runs are keyed by it); see ddkit.hardware.choose_precision.
    prec_path = out / "precision.json"
    prev = json.loads(prec_path.read_text()) if prec_path.is_file() else None
    precision = student_precision(cfg.precision, network, shape, k, bs0, device, previous=prev)
    atomic_write_json(prec_path, precision.to_dict())
    cfg = dataclasses.replace(cfg, precision=precision.precision)  # run keys and students use the resolved one
    for b in cfg.baselines:
        if b == "random_real":
            sets.append(
                TrainSet(
                    "random_real", "random_real", None, None, ipc, f"random_real:{real_fp}:{ipc}:{cfg.seed}"
                )
            )
        elif b == "full":
            n_full = int(train_y.shape[0])
            sets.append(TrainSet("full", "full", train_u8, train_y, max(1, n_full // k), f"full:{real_fp}"))

    teacher = None
    teacher_fp = None
    if isinstance(protocol, RDEDProtocol):
        teacher, teacher_fp = _teacher(
            protocol, network, train_u8, train_y, cfg, index, out, device, progress, real_fp
        )

    runs_path = out / "runs.jsonl"
    done = _read_runs(runs_path)
    results: dict[str, dict] = {}
    scorer_lines: list[str] = []
    scorer_perf: float | None = None  # the scorer's performance of the first distilled set (the submission)
    console = _console()
    for s in sets:
        if s.kind == "full":
            epochs = cfg.full_epochs or (cfg.epochs or protocol.epochs_for(s.ipc))
        else:
            epochs = cfg.epochs or protocol.epochs_for(s.ipc)
        bs = cfg.batch_size or protocol.batch_size_for(s.ipc, k)
        finals, bests, secs = [], [], []
        n_images = 0
        for r in range(cfg.repeats):
            seed = cfg.seed + r
            key = _key(
                {
                    "set": s.fingerprint,
                    "protocol": to_dict(protocol),
                    "network": network,
                    "epochs": epochs,
                    "batch": bs,
                    "seed": seed,
                    "precision": cfg.precision,
                    "teacher": teacher_fp,
                }
            )
            if s.kind == "random_real":
                xs, ys = random_real_subset(train_u8, train_y, ipc, seed, k)
            else:
                xs, ys = s.images, s.labels
            n_images = int(xs.shape[0])
            if key in done:
                res = done[key]["result"]
            else:
                student = functools.partial(
                    train_student, protocol, network, xs, ys, test_x, test_y, mean=mean, std=std,
                    num_classes=k, epochs=epochs, batch_size=bs, seed=seed, device=device,
                    precision=cfg.precision, teacher=teacher,
                )
                total = epochs + 1 if isinstance(protocol, ECCV2024Protocol) and protocol.extra_epoch else epochs
                desc = f"{s.name} run {r + 1}/{cfg.repeats}"
                res = _with_progress(desc, total, student, progress).to_dict()
                append_jsonl(runs_path, {"key": key, "set": s.name, "repeat": r, "seed": seed, "result": res})
            finals.append(float(res["final"]))
            bests.append(float(res["best"]))
            secs.append(float(res["seconds"]))
            if isinstance(protocol, ECCV2024Protocol):
                # The scorer prints each round's accuracy as a fraction: print(acc_test).
                line = str(_fraction(res["final"], n_test))
                scorer_lines.append(line)
                if progress:
                    console.print(line, highlight=False)
        main = finals if isinstance(protocol, ECCV2024Protocol) else bests
        results[s.name] = {
            "mean": float(np.mean(main)),
            "std": float(np.std(main)),
            "runs": main,
            "ipc": s.ipc,
            "protocol": protocol.name,
            "network": network,
            "epochs": epochs,
            "images": n_images,
            "last_mean": float(np.mean(finals)),
            "last_std": float(np.std(finals)),
            "last_runs": finals,
            "seconds": float(np.sum(secs)),
            "kind": s.kind,
        }
        if isinstance(protocol, ECCV2024Protocol):
            # The scorer sums the per-round fractions and divides by the number of rounds.
            score = 0.0
            for f in finals:
                score += _fraction(f, n_test)
            line = f"Performance on {s.name} dataset is {score / len(finals)}"
            if scorer_perf is None and s.kind == "distilled":
                scorer_perf = score / len(finals)
            scorer_lines.append(line)
            if progress:
                console.print(line, highlight=False)

    if "random_real" in results and "full" in results:
        _dd_ranking(results)
    meta = {
        "protocol": to_dict(protocol),
        "network": network,
        "ipc": ipc,
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        "device": str(device),
        "precision": precision.to_dict(),
        "real": str(real),
        "order": list(results),  # results.json is key-sorted; this is the table's order
        "dataset": index.get("dataset"),
        "scorer": scorer_perf,
        "classes": classes,
        "hardware": hardware_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    from ddkit.io import atomic_write_text

    atomic_write_json(out / "results.json", {"sets": results, "meta": meta})
    atomic_write_text(out / "table.md", table_markdown(results, protocol, network))
    if scorer_lines:
        # scores.txt as the official scorer writes it (one line, ddkit.package.official_scores); its printout
        # (per-round fractions, per-set lines) goes to scorer_log.txt.
        atomic_write_text(out / "scorer_log.txt", "\n".join(scorer_lines) + "\n")
    if scorer_perf is not None:
        from ddkit.package import SCORES_FILE, write_official_scores

        write_official_scores(out / SCORES_FILE, {str(index.get("dataset")): scorer_perf})
    if progress:
        console.print(rich_table(results, protocol, network))
    mark_done(out, {"sets": list(results)})
    return results


def _fraction(percent: float, n: int) -> float:
    """The scorer's accuracy ``correct / n`` recovered exactly from a percentage of ``n`` test images."""
    return round(percent * n / 100.0) / n if n else 0.0


_CONSOLE = None


def _console():
    """One shared stdout console, so progress bars and printed lines interleave cleanly."""
    global _CONSOLE
    from rich.console import Console

    if _CONSOLE is None:
        _CONSOLE = Console()
    return _CONSOLE


def _with_progress(desc: str, total: int, run: Callable[..., RunResult], progress: bool) -> RunResult:
    """Call ``run(on_epoch=...)`` under a rich progress bar of ``total`` epochs (or bare without progress)."""
    if not progress:
        return run()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("epochs"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
        console=_console(),
        disable=not _console().is_terminal,  # no bars (and no blank lines) when piped or logged
    ) as bar:
        task = bar.add_task(desc, total=total)
        return run(on_epoch=lambda e: bar.update(task, completed=e))


def _teacher(
    protocol: RDEDProtocol, network, train_u8, train_y, cfg, index, out: Path, device, progress, real_fp
):
    """Train (or reload from ``out/teacher-<key>.pt``) the rded teacher on the full real train split."""
    from ddkit.evaluate.networks import build
    from ddkit.io import atomic_torch_save

    tnet = protocol.teacher_network or network
    epochs = cfg.teacher_epochs or protocol.teacher_epochs
    fp = _key(
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
    x = train_u8
    kwargs = dict(
        mean=index["mean"],
        std=index["std"],
        num_classes=k,
        epochs=epochs,
        seed=cfg.seed,
        device=device,
        precision=cfg.precision,
    )
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
            disable=not _console().is_terminal,
        ) as bar:
            task = bar.add_task(f"teacher {tnet}", total=epochs)
            model = train_teacher(
                protocol, tnet, x, train_y, on_epoch=lambda e: bar.update(task, completed=e), **kwargs
            )
    else:
        model = train_teacher(protocol, tnet, x, train_y, **kwargs)
    atomic_torch_save({k_: v.cpu() for k_, v in model.state_dict().items()}, path)
    return model, fp


def _dd_ranking(results: dict[str, dict]) -> None:
    """Add DD-Ranking's hard-label recovery and improvement over random to each distilled set, per repeat:
    ``HLR = acc(full) - acc(set)``, ``IOR = acc(set) - acc(random_real)`` (percentage points; mean and
    population std over repeats). Source: NUS-HPC-AI-Lab/DD-Ranking ``ddranking/metrics/hard_label.py``
    (``compute_metrics``). Their composite LRS/ARS scores are not computed here."""
    full, rnd = results["full"]["runs"], results["random_real"]["runs"]
    for r in results.values():
        if r["kind"] != "distilled":
            continue
        n = min(len(full), len(rnd), len(r["runs"]))
        hlr = [full[i] - r["runs"][i] for i in range(n)]
        ior = [r["runs"][i] - rnd[i] for i in range(n)]
        r["dd_ranking"] = {
            "hlr_mean": float(np.mean(hlr)),
            "hlr_std": float(np.std(hlr)),
            "ior_mean": float(np.mean(ior)),
            "ior_std": float(np.std(ior)),
        }


def _rows(
    results: dict[str, dict], protocol: Protocol, with_runs: bool = True
) -> tuple[list[str], list[list[str]]]:
    two = not isinstance(protocol, ECCV2024Protocol)
    dd = any("dd_ranking" in r for r in results.values())
    head = ["Set", "IPC", "Images", "Epochs", "Best acc. (%)" if two else "Acc. (%)"]
    if two:
        head.append("Last acc. (%)")
    if with_runs:
        head.append("Runs")
    if dd:
        head += ["IOR (pp)", "HLR (pp)"]
    rows = []
    for name, r in results.items():
        row = [name, str(r["ipc"]), str(r["images"]), str(r["epochs"]), f"{r['mean']:.2f} ± {r['std']:.2f}"]
        if two:
            row.append(f"{r['last_mean']:.2f} ± {r['last_std']:.2f}")
        if with_runs:
            row.append(", ".join(f"{v:.1f}" for v in r["runs"]))
        if dd:
            d = r.get("dd_ranking")
            row += [f"{d['ior_mean']:+.2f}", f"{d['hlr_mean']:+.2f}"] if d else ["", ""]
        rows.append(row)
    return head, rows


def table_markdown(results: dict[str, dict], protocol: Protocol, network: str) -> str:
    """The results as a Markdown table (what ``table.md`` holds)."""
    head, rows = _rows(results, protocol)
    lines = [
        f"Protocol `{protocol.name}`, {network}; accuracy on the real test split, mean ± std over repeats.",
        "",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rich_table(results: dict[str, dict], protocol: Protocol, network: str):
    """The results as a :class:`rich.table.Table`."""
    from rich.table import Table

    head, rows = _rows(results, protocol, with_runs=False)
    t = Table(title=f"ddkit evaluate — {protocol.name}, {network}")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    return t
