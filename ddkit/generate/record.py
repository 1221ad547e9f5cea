"""The generation record: the one plan every shard, requeue, merge and bundle of a generation shares.

The record holds what makes two shards parts of one set: the method, steps, candidates per class (``ipc``),
images kept per class (``kept_ipc``), the over-generation ``ratio``, precision, sampler chain, the digests
of what the method prepared, the seed, the weights' name and the stage fingerprint. It is written and read
here only:

* the first rank (or attempt) to plan publishes ``gen_dir/record.json``, first writer wins
  (:func:`ddkit.io.publish_json_once`); every other rank and every restart **adopts it whole**: it plans
  inside its steps, samples its ``ipc`` and ``ratio`` (:func:`bounds`);
* every shard's ``DONE`` carries the record it sampled under (:func:`shard_done`);
* the merge refuses shards whose records differ, naming the keys (:func:`check_shards`), and the merged
  manifest and the generator bundle carry it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddkit import budget
from ddkit.errors import DataError
from ddkit.fingerprint import START
from ddkit.io import mark_done, publish_json_once, read_done, read_record

RECORD = "record.json"
#: Keys a rank adopts from a published record (the layout and the chains); the rest must simply agree.
PLAN_KEYS = ("steps", "ipc", "kept_ipc", "ratio")


def make(sampler, the_plan, fingerprint: str | None) -> dict[str, Any]:
    """The record of a generation about to sample ``the_plan`` (:class:`ddkit.budget.Plan`) with ``sampler``
    (:class:`ddkit.generate.Sampler`); ``fingerprint``: the stage's (:mod:`ddkit.stages`), None outside one."""
    return {
        "method": sampler.method.name,
        "steps": int(the_plan.steps),
        "ipc": int(the_plan.ipc),
        "kept_ipc": int(the_plan.kept_ipc or the_plan.ipc),
        "ratio": float(the_plan.ratio),
        "precision": sampler.precision.precision,
        "sampler": sampler.sampler,
        "cfg_scale": float(sampler.cfg_scale),
        "start_timestep": sampler.start_timestep,
        "seed": int(sampler.settings.seed),
        "checkpoint": sampler.checkpoint,
        "classes": len(sampler.classes),
        **sampler.method.record(),
        "fingerprint": fingerprint,
    }


def read(gen_dir: str | Path) -> dict[str, Any] | None:
    """The published record of ``gen_dir``, or None before any rank planned."""
    path = Path(gen_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def publish(gen_dir: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Publish ``record`` unless one is there (first writer wins); the record every rank then adopts."""
    return publish_json_once(Path(gen_dir) / RECORD, record)


def differences(a: dict[str, Any], b: dict[str, Any], keys=None) -> list[str]:
    """``"key: a != b"`` for each key (default: all of either) whose values differ."""
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def bounds(gcfg, record: dict[str, Any] | None, ratios: tuple[float, ...]):
    """The planner's search box and ratios: the config's, or, once a record is published, its plan (its
    steps as the most a rank may plan, its ``ipc`` and ``ratio`` exactly), so every rank and restart samples
    the same layout and chains.

    Returns:
        (:class:`ddkit.budget.Bounds`, ratios).
    """

    steps_max, ipc_max, ipc_min = gcfg.steps_max, gcfg.ipc_max, gcfg.ipc_min
    if record is not None:
        steps_max, ipc_max, ipc_min = record["steps"], record["kept_ipc"], record["kept_ipc"]
        ratios = (float(record["ratio"]),)
    return budget.Bounds(min(gcfg.steps_min, steps_max), steps_max, ipc_min, ipc_max, gcfg.dsr_min_steps_quality), ratios


def shard_done(record: dict[str, Any], images: int, finished: float) -> dict[str, Any]:
    """A shard's ``DONE`` contents: its image count, finish time (budget seconds) and the record."""
    return {"images": images, "finished": finished, "record": record}


def check_shards(shard_dirs: list[Path]) -> dict[str, Any] | None:
    """The one record every shard in ``shard_dirs`` sampled under (None for shards of an older ddkit).

    Raises:
        DataError: two shards' records differ (one line naming the shards and the keys).
    """
    first, where = None, None
    for d in shard_dirs:
        rec = (read_done(d) or {}).get("record")
        if rec is None:
            continue
        if first is None:
            first, where = rec, d
            continue
        diff = differences(first, rec)
        if diff:
            raise DataError(f"{d}: sampled under another record than {where.name} ({'; '.join(diff[:3])}); "
                            "rerun that shard or the generation")
    return first


def mark_done_stamped(out_dir: str | Path, info: dict[str, Any], first: dict[str, Any] | None) -> None:
    """Mark ``out_dir`` done; when the stage was entered by :func:`ddkit.stages.enter` (its
    ``fingerprint.json``) with the fingerprint the record carries, stamp that fingerprint and its inputs, so
    whichever process merges (a rank, an array's merge job, ``ddkit generate --merge``) leaves a DONE that
    ``ddkit run`` and the next command skip."""

    start = read_record(Path(out_dir) / START) or {}
    fp = (first or {}).get("fingerprint")
    if fp is not None and start.get("fingerprint") == fp:
        mark_done(out_dir, info, fingerprint=fp, inputs=start.get("inputs") or {})
    else:
        mark_done(out_dir, info)
