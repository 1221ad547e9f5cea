"""Where a generation lives and what it makes: its directory and weights, its classes and each image's seed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ddkit.config import ExperimentConfig
from ddkit.io import is_done
from ddkit.methods.registry import build

SHARD_FILE = "images.pt"


def image_seed(seed: int, class_index: int, index: int) -> int:
    """64-bit seed of image ``index`` of class ``class_index`` (blake2b of the triple; sharding-free)."""
    h = hashlib.blake2b(f"ddkit/{seed}/{class_index}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def gen_dir_for(cfg: ExperimentConfig, method: str) -> Path:
    return Path(cfg.run_dir) / f"gen-{method}"


def checkpoint_for(cfg: ExperimentConfig, method: str) -> str:
    """The weights ``method`` samples (:meth:`ddkit.methods.base.GenerationMethod.checkpoint`).

    Raises:
        ConfigError: an unknown method.
    """

    return build(method, cfg).checkpoint()


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
