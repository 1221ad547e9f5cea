"""Shard records: one rank's ``shard-<rank>/images.pt`` + ``DONE`` (:func:`save_shard`), and the merge of
every rank's into ``dataset.pt``, ``manifest.json``, ``grid.png``, ``budget.png`` and ``DONE`` (:func:`merge`).

A shard record holds its images (uint8, with class, index and steps per image) and what the budget plot
and manifest report: the plan, the calibrated cost, the batch events and the phases, in seconds since the
budget start.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddkit.errors import BudgetError, DataError
from ddkit.figures import write_budget_plot, write_grid
from ddkit.generate import record as rec
from ddkit.generate.layout import SHARD_FILE, shard_dirs
from ddkit.io import atomic_torch_save, atomic_write_json, hardware_info, is_done, mark_done
from ddkit.rows import gather_rows


def shard_record(sampler, runner, samples: dict[str, list], job, plan_at: float) -> dict[str, Any]:
    """The record of this rank's generation (without ``phases`` and ``finished``, added by :func:`save_shard`).

    Args:
        sampler: the :class:`ddkit.generate.Sampler`; runner: the :class:`ddkit.budget.Runner` after the
            last batch; samples: :func:`ddkit.generate.run_budget`'s spool and lists; job: this rank; plan_at: the
            clock time of the plan.

    Returns:
        ``images`` uint8 [N, C, H, W], ``labels`` / ``index`` / ``steps`` int64 [N], the run's settings, the
        plan, ``cost`` (seconds per step and per batch), ``events``, and times relative to the budget start.
    """
    import torch

    images, cost, t0 = samples["images"].rows(), runner.cost, job.t0
    gcfg = sampler.settings
    return {
        "images": images,
        "labels": torch.tensor(samples["labels"], dtype=torch.long),
        "index": torch.tensor(samples["index"], dtype=torch.long),
        "steps": torch.tensor(samples["steps"], dtype=torch.long),
        "rank": job.rank,
        "world_size": job.world,
        "classes": sampler.classes,
        "method": sampler.method.name,
        "sampler": sampler.sampler,
        "start_timestep": sampler.start_timestep,
        "cfg_scale": sampler.cfg_scale,
        "checkpoint": sampler.checkpoint,
        "seed": gcfg.seed,
        "time_limit": gcfg.time_limit,
        "plan": runner.plan.to_dict(),
        "cost": {
            "step_seconds": cost.step_seconds,
            "batch_seconds": cost.batch_seconds,
            "batch_size": cost.batch_size,
            "image_step_seconds": cost.image_step_seconds,
        },
        "events": [vars(e) for e in runner.events],
        "dropped_batches": list(runner.dropped),
        "speed_factor": runner.speed_factor,
        "shortened_batches": runner.shortened,
        "plan_time": plan_at - t0,
        "deadline": runner.deadline - t0,
        "margin_seconds": runner.margin_seconds,
        "reserve_seconds": runner.reserve_seconds,
        "hardware": hardware_info(),
        "precision": sampler.precision.to_dict(),
    }


def save_shard(
    shard_dir: Path, sampler, runner, samples: dict[str, list], job, *, plan_at: float, phases: dict, clock,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Write ``shard_dir/images.pt`` (:func:`shard_record` + ``phases`` + ``finished`` + ``record``) and its
    ``DONE``, which carries the generation record it sampled under (:mod:`ddkit.generate.record`). A rank
    whose shard was already done (``job.mine_done``) writes nothing.

    Returns:
        The shard record.
    """
    mark = clock()
    shard = shard_record(sampler, runner, samples, job, plan_at)
    phases["save"] = clock() - mark  # the save itself is measured into the DONE marker below
    shard["phases"] = dict(phases)
    shard["finished"] = clock() - job.t0
    shard["record"] = record
    if not job.mine_done:
        shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(shard, shard_dir / SHARD_FILE)
        mark_done(shard_dir, rec.shard_done(record, int(shard["images"].shape[0]), clock() - job.t0))
    return shard


# ----------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------
def _load_shards(gen_dir: Path) -> list[dict[str, Any]]:
    """Every rank's shard record, in rank order.

    Raises:
        DataError: no shards, a shard missing or not done (names it), or shards from different runs.
    """
    import torch

    dirs = shard_dirs(gen_dir)
    if not dirs:
        raise DataError(f"{gen_dir}: no shard-<rank> directories to merge")
    # mmap: a shard's images stay on disk; the merge copies only the kept rows (_class_major)
    first = torch.load(dirs[0] / SHARD_FILE, weights_only=False, mmap=True) if is_done(dirs[0]) else None
    if first is None:
        raise DataError(f"{dirs[0]}: shard not done (no DONE marker); rerun generation for it")
    world = int(first["world_size"])
    rec.check_shards([gen_dir / f"shard-{r}" for r in range(world) if is_done(gen_dir / f"shard-{r}")])
    shards = []
    for r in range(world):
        d = gen_dir / f"shard-{r}"
        if not is_done(d):
            raise DataError(f"{d}: shard missing or not done (world size {world}); rerun that rank")
        s = first if d == dirs[0] else torch.load(d / SHARD_FILE, weights_only=False, mmap=True)
        if s["world_size"] != world or s["classes"] != first["classes"]:
            raise DataError(f"{d / SHARD_FILE}: from a different run (world size or classes differ)")
        shards.append(s)
    return shards


def _class_major(shards: list[dict[str, Any]], scratch_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``dataset.pt``'s dict, what the manifest needs: ``keep`` (indices into the concatenated shards),
    ``labels``, ``index``, ``steps`` and per-class ``counts``). Each class keeps its ``ipc`` = smallest
    per-class count lowest image indices.

    The shards' images are never concatenated: :func:`ddkit.io.gather_rows` copies the kept rows from each
    (memory-mapped) shard into a file-backed tensor in ``scratch_dir``, so the merge adds one chunk of
    anonymous memory at any set size."""
    import torch

    classes = list(shards[0]["classes"])
    K = len(classes)
    labels = torch.cat([s["labels"] for s in shards])
    index = torch.cat([s["index"] for s in shards])
    steps = torch.cat([s["steps"] for s in shards])
    counts = torch.bincount(labels, minlength=K)[:K].tolist() if K else []
    ipc = min(counts) if counts else 0
    # Class-major, and within a class by image index (two stable sorts); keep the first ipc of each class.
    order = torch.argsort(index, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    count_t = torch.tensor(counts, dtype=torch.long)
    class_start = torch.cumsum(count_t, 0) - count_t
    rank_in_class = torch.arange(len(order)) - class_start[labels[order]]
    keep_t = order[rank_in_class < ipc]
    dataset = {
        "images": gather_rows([s["images"] for s in shards], keep_t, scratch_dir),
        "labels": labels[keep_t].contiguous(),
        "classes": classes,
        "ipc": ipc,
    }
    kept_steps = steps[keep_t] if len(keep_t) else steps
    return dataset, {"keep": keep_t.tolist(), "labels": labels, "index": index, "kept_steps": kept_steps,
                     "counts": counts}  # fmt: skip


def _images_possible(shards: list[dict[str, Any]]) -> int:
    """Images the ranks' plans could have made in their windows at the calibrated cost (the denominator of
    ``budget_use_images``)."""
    possible = 0
    for s in shards:
        p, c = s["plan"], s["cost"]
        per_batch = c["step_seconds"] * p["steps"] + c["batch_seconds"]
        window = max(0.0, float(s["deadline"]) - s["plan_time"] - s["margin_seconds"])
        possible += int(window // per_batch) * c["batch_size"] if per_batch > 0 else 0
    return possible


def _manifest(shards, dataset, cut, plots_s: float, elapsed: float | None) -> dict[str, Any]:
    first, ipc, keep = shards[0], dataset["ipc"], cut["keep"]
    labels, index, kept_steps = cut["labels"], cut["index"], cut["kept_steps"]
    limit = float(first["time_limit"])
    finished = max(float(s["finished"]) for s in shards)
    made = int(sum(s["images"].shape[0] for s in shards))
    possible = _images_possible(shards)
    return {
        "method": first["method"],
        "sampler": first.get("sampler"),
        "start_timestep": first.get("start_timestep"),
        "cfg_scale": first.get("cfg_scale"),
        "checkpoint": first["checkpoint"],
        "ipc": ipc,
        "num_classes": len(dataset["classes"]),
        "classes": dataset["classes"],
        "images": len(keep),
        "images_generated": made,
        "images_dropped_for_balance": made - len(keep),
        "steps": {
            "planned": first["plan"]["steps"],
            "min": int(kept_steps.min()) if len(kept_steps) else None,
            "max": int(kept_steps.max()) if len(kept_steps) else None,
            "per_image": [int(v) for v in kept_steps],
        },
        "seeds": {
            "base": first["seed"],
            "rule": "image (class c, index i) uses torch.Generator seeded by ddkit.generate.image_seed(base, c, i)",
            "per_image": [[int(labels[j]), int(index[j])] for j in keep],
        },
        "plan": first["plan"],
        "cost": first["cost"],
        "time_limit": limit,
        "phases": {f"rank{s['rank']}": s["phases"] for s in shards} | {"merge_plots": plots_s},
        "rank_finished_seconds": [float(s["finished"]) for s in shards],
        "elapsed_seconds": elapsed if elapsed is not None else finished,  # budget seconds
        "budget_share_used": (elapsed if elapsed is not None else finished) / limit,
        "budget_use_images": made / possible if possible else None,
        "images_possible": possible,
        "dropped_batches": {f"rank{s['rank']}": s["dropped_batches"] for s in shards},
        "world_size": int(first["world_size"]),
        "record": first.get("record"),
        "hardware": first["hardware"],
        "precision": first.get("precision"),
    }


def merge(
    gen_dir: str | Path, *, t0: float | None = None, clock: Callable[[], float] = time.monotonic
) -> Path:
    """Merge every ``shard-<k>/images.pt`` into one class-major, class-balanced ``dataset.pt``.

    The IPC is the smallest per-class count over all shards; each class keeps its lowest image indices
    (surplus dropped deterministically). Also writes ``manifest.json``, ``grid.png``, ``budget.png`` and
    ``DONE``.

    Args:
        gen_dir: the generation directory.
        t0: the budget start on ``clock`` when merging in the generating process (adds the merge to the
            budget share); None for a separate ``--merge`` step.

    Returns:
        Path of ``dataset.pt`` = ``{"images": uint8 [N,C,H,W], "labels": int64 [N], "classes": list[str],
        "ipc": int}`` with N = ipc × K, class-major.

    Raises:
        DataError: no shards, a shard missing or not done (names it), or shards from different runs.
        BudgetError: the budget ended before every class had one image (after writing the manifest).
    """
    gen_dir = Path(gen_dir)
    shards = _load_shards(gen_dir)
    dataset, cut = _class_major(shards, gen_dir)
    ipc = dataset["ipc"]
    out = gen_dir / "dataset.pt"
    atomic_torch_save(dataset, out)

    mark = clock()
    write_grid(gen_dir / "grid.png", dataset["images"], dataset["labels"], dataset["classes"], ipc)
    write_budget_plot(gen_dir / "budget.png", shards)
    plots_s = clock() - mark
    elapsed = (clock() - t0) if t0 is not None else None
    manifest = _manifest(shards, dataset, cut, plots_s, elapsed)
    atomic_write_json(gen_dir / "manifest.json", manifest)
    if ipc == 0:

        raise BudgetError(
            f"{gen_dir}: the budget ended before every class had one image ({manifest['images_generated']} "
            f"images made; counts per class {cut['counts']}); raise generate.time_limit or lower generate.steps_min"
        )
    rec.mark_done_stamped(gen_dir, {"ipc": ipc, "images": len(cut["keep"])}, first=shards[0].get("record"))
    return out
