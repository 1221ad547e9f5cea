"""Where a generation lives and what it makes: its directory and weights, its classes, each image's seed,
and the plan bounds that shards already done impose on a requeued rank."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ddkit.config import ExperimentConfig
from ddkit.io import is_done

SHARD_FILE = "images.pt"


def image_seed(seed: int, class_index: int, index: int) -> int:
    """64-bit seed of image ``index`` of class ``class_index`` (blake2b of the triple; sharding-free)."""
    h = hashlib.blake2b(f"ddkit/{seed}/{class_index}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def gen_dir_for(cfg: ExperimentConfig, method: str) -> Path:
    return Path(cfg.run_dir) / f"gen-{method}"


def checkpoint_for(cfg: ExperimentConfig, method: str) -> str:
    """The weights a method samples from: ``generate.checkpoint``, else ``RUN/minimax`` for minimax (and
    for mgd3 with ``generate.modes.weights: minimax``), else ``model.pretrained`` or ``RUN/pretrain``."""
    if cfg.generate.checkpoint:
        return cfg.generate.checkpoint
    if uses_minimax(method, cfg.generate.modes.weights):
        return str(Path(cfg.run_dir) / "minimax")
    return cfg.model.pretrained or str(Path(cfg.run_dir) / "pretrain")


def uses_minimax(method: str, modes_weights: str) -> bool:
    """Whether ``method`` (``<base>[+select]``) samples from this run's minimax checkpoint, given
    ``generate.modes.weights`` (``"pretrained"`` or ``"minimax"``)."""
    base = method.split("+", 1)[0]
    return base == "minimax" or (base == "mgd3" and modes_weights == "minimax")


def class_layout(cfg: ExperimentConfig, num_backbone_classes: int) -> tuple[list[str], list[int]]:
    """(class names, backbone label per class) from the shard index (``model.class_map``, see
    :mod:`ddkit.data.classmap`), or ``0..K-1`` without shards.

    Raises:
        ConfigError: no usable class map (one line naming ``model.class_map``).
    """
    idx_file = Path(cfg.data.shards) / "dataset.json"
    if idx_file.is_file():
        from ddkit.data import read_index
        from ddkit.data.classmap import backbone_labels

        index = read_index(cfg.data.shards)
        names = list(index["classes"])
        return names, backbone_labels(index, num_backbone_classes, cfg.model.class_map)
    names = [str(i) for i in range(num_backbone_classes)]
    return names, list(range(num_backbone_classes))


def shard_dirs(gen_dir: Path) -> list[Path]:
    """The ``shard-<rank>`` directories in ``gen_dir``, sorted by name."""
    return sorted(p for p in gen_dir.glob("shard-*") if p.is_dir())


def all_shards_done(gen_dir: Path, world_size: int) -> bool:
    return all(is_done(gen_dir / f"shard-{r}") for r in range(world_size))


def plan_bounds(gcfg, gen_dir: Path, ratios: tuple[float, ...] = (1.0,)):
    """The planner's search box and over-generation ratios: the config's, capped at the plan (steps, kept
    IPC, ratio) of shards already done in ``gen_dir`` (recorded in their DONE), so the remaining ranks
    sample the same layout and chains.

    Returns:
        (:class:`ddkit.budget.Bounds`, ratios).
    """
    from ddkit import budget

    steps_max, ipc_max = gcfg.steps_max, gcfg.ipc_max
    for d in shard_dirs(gen_dir):
        if is_done(d):
            plan = json.loads((d / "DONE").read_text() or "{}").get("plan")
            if plan:
                kept = plan.get("kept_ipc") or plan["ipc"]
                steps_max, ipc_max = min(steps_max, plan["steps"]), min(ipc_max, kept)
                ratios = (float(plan.get("ratio", 1.0)),)
    bounds = budget.Bounds(
        min(gcfg.steps_min, steps_max), steps_max, min(gcfg.ipc_min, ipc_max), ipc_max, gcfg.dsr_min_steps_quality
    )
    return bounds, ratios
