"""Datasets -> WebDataset shards -> tensors and streaming loaders.

- :data:`DATASETS`: registry name -> :class:`DatasetReader` (``mnist5k``, ``imagefolder``, ``cifar100``,
  ``tinyimagenet``, ``imagewoof``, ``imagenette``, ``imageidc``).
- :func:`shard_dataset`: write train/test shards, ``dataset.json`` and ``classes.json`` (``ddkit data shard``).
- :func:`read_index`: the parsed ``dataset.json``; :func:`verify_shards`: sha256 check.
- :func:`load_tensors`: a whole split in memory (uint8 [N, C, H, W], int64 [N]).
- :class:`ClassReader`: one class of a split at a time (memory bounded by one class).
- :func:`make_loader`: rank/worker-split, deterministically shuffled stream of batches in [-1, 1].
"""

from ddkit.data.classes import ClassReader
from ddkit.data.loader import ShardLoader, make_loader
from ddkit.data.registry import DATASETS, DatasetReader, Item, Listing, get_reader, imagenet_wnids
from ddkit.data.shards import is_complete, load_tensors, read_index, shard_dataset, verify_shards

__all__ = [
    "ClassReader",
    "DATASETS",
    "DatasetReader",
    "Item",
    "Listing",
    "ShardLoader",
    "get_reader",
    "imagenet_wnids",
    "is_complete",
    "load_tensors",
    "make_loader",
    "read_index",
    "shard_dataset",
    "verify_shards",
]
