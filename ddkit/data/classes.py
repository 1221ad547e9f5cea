"""Read a shard set one class at a time, so a per-class preparation holds one class's images, not the split.

:func:`ddkit.data.shard_dataset` writes samples in a seeded random order (every shard holds a mix of all
classes) and ``dataset.json`` records no per-class positions. :class:`ClassReader` builds that index once
from the tars themselves: one pass over the member headers (the PNG data is skipped by seeking; only the
few-byte ``.cls`` members are read), keeping each sample's shard, PNG offset and size in numpy arrays
(~20 bytes per sample: 25 MB for ImageNet-1K's 1.28 M). A class is then read with one seek per image and
decoded with :func:`ddkit.data.shards.decode_sample`, the decoder :func:`ddkit.data.load_tensors` uses, in
sample-key order, so ``reader.images(k)`` equals ``images[labels == k]`` of :func:`load_tensors` byte for
byte. Sample keys and extensions split as WebDataset's ``base_plus_ext`` does (the first dot of the
member's file name), so the reader sees the samples ``webdataset.tarfile_samples`` yields.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ddkit.data.shards import INDEX, decode_sample, read_index, shard_paths
from ddkit.dist import usable_cpus
from ddkit.errors import DataError


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> (``dir/key``, ``ext.more``): WebDataset's ``base_plus_ext`` rule."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def _scan(path: Path) -> Iterator[tuple[str, int, int, int]]:
    """(key, PNG data offset, PNG size, label) of every sample in one tar, in file order.

    Raises:
        DataError: an unreadable tar, or a sample without ``png``/``cls`` or with a non-integer class.
    """
    found: dict[str, dict[str, int]] = {}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                rec = found.setdefault(key, {})
                if ext == "png":
                    rec["off"], rec["size"] = m.offset_data, m.size
                elif ext == "cls":
                    raw = tf.extractfile(m).read()
                    try:
                        rec["label"] = int(raw)
                    except ValueError:
                        raise DataError(f"{path}:{key}: class {raw[:20]!r} is not an integer") from None
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: corrupt or unreadable shard ({type(e).__name__}: {e})") from None
    for key, rec in found.items():
        if "off" not in rec or "label" not in rec:
            raise DataError(f"{path}:{key}: sample lacks png/cls (has {', '.join(sorted(rec))})")
        yield key, rec["off"], rec["size"], rec["label"]


class ClassReader:
    """One split of a shard set, read class by class (module docstring).

    Args:
        shard_dir: a shard set written by :func:`ddkit.data.shard_dataset`.
        split: ``"train"`` or ``"test"``.

    Raises:
        DataError: missing/corrupt index or shard, a shard holding another number of samples than
            ``dataset.json`` records, or a class count that differs from ``dataset.json``'s ``counts``.
    """

    def __init__(self, shard_dir: str | Path, split: str) -> None:
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        self.split = split
        self.paths = shard_paths(self.shard_dir, split, self.index)
        self.resolution, self.channels = int(self.index["resolution"]), int(self.index["channels"])
        rows: list[tuple[str, int, int, int, int]] = []
        expected = self.index.get("shard_counts", {})
        for s, p in enumerate(self.paths):
            got = [(key, s, off, size, label) for key, off, size, label in _scan(p)]
            want = expected.get(p.name)
            if want is not None and len(got) != want:
                raise DataError(
                    f"{p}: {len(got)} samples but {INDEX} records {want} (truncated or replaced shard)"
                )
            rows.extend(got)
        rows.sort(key=lambda r: r[0])  # sample-key order, as load_tensors
        self.shard = np.array([r[1] for r in rows], dtype=np.int32)
        self.offset = np.array([r[2] for r in rows], dtype=np.int64)
        self.size = np.array([r[3] for r in rows], dtype=np.int64)
        self.label = np.array([r[4] for r in rows], dtype=np.int64)
        self._check_counts()

    def _check_counts(self) -> None:
        classes = list(self.index["classes"])
        counts = (
            np.bincount(self.label, minlength=len(classes)) if len(self.label) else np.zeros(len(classes))
        )
        if len(counts) > len(classes):
            raise DataError(
                f"{self.shard_dir / INDEX}: a sample has class {len(counts) - 1}, the index lists "
                f"{len(classes)} classes"
            )
        want = self.index["counts"].get(self.split, {})
        for k, name in enumerate(classes):
            if name in want and int(want[name]) != int(counts[k]):
                raise DataError(
                    f"{self.shard_dir / INDEX}: class {name!r} has {int(counts[k])} {self.split} "
                    f"samples in the shards, the index records {want[name]}"
                )

    @property
    def num_classes(self) -> int:
        return len(self.index["classes"])

    def count(self, k: int) -> int:
        """Samples of class ``k`` in the split."""
        return int((self.label == k).sum())

    def images(self, k: int, limit: int | None = None):
        """Class ``k``'s images, the first ``limit`` (all when None) in sample-key order.

        Returns:
            uint8 [n, C, H, W] (0..255), n = min(count, limit).

        Raises:
            DataError: an undecodable or wrong-sized image (names shard and key).
        """
        rows = np.flatnonzero(self.label == k)
        return self._read(k, rows if limit is None else rows[:limit])

    def images_at(self, k: int, positions) -> object:
        """Class ``k``'s images at ``positions`` (indices into :meth:`images`' order, any order): only those
        are read, e.g. a random draw of IPC out of 1,300 ImageNet images.

        Returns:
            uint8 [len(positions), C, H, W].

        Raises:
            IndexError: a position outside ``[0, count(k))``; DataError: as :meth:`images`.
        """
        rows = np.flatnonzero(self.label == k)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(rows)):
            raise IndexError(f"class {k}: positions outside [0, {len(rows)})")
        return self._read(k, rows[pos])

    def _read(self, k: int, rows: np.ndarray):
        """uint8 [len(rows), C, H, W]: the samples at ``rows`` (indices into the split's sample table)."""
        import torch

        if len(rows) == 0:
            return torch.zeros(0, self.channels, self.resolution, self.resolution, dtype=torch.uint8)

        def read(i: int) -> np.ndarray:
            path = self.paths[int(self.shard[i])]
            with open(path, "rb") as f:
                f.seek(int(self.offset[i]))
                png = f.read(int(self.size[i]))
            sample = {"__url__": str(path), "__key__": f"#{i}", "png": png, "cls": str(k).encode()}
            return decode_sample(sample, self.resolution, self.channels)[0]

        if self.resolution >= 64 and len(rows) > 1:  # PNG decoding releases the GIL (as load_tensors)
            with ThreadPoolExecutor(min(8, usable_cpus())) as pool:
                arrays = list(pool.map(read, rows.tolist()))
        else:
            arrays = [read(i) for i in rows.tolist()]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def classes(
        self, ks: list[int] | range | None = None, limit: int | None = None
    ) -> Iterator[tuple[int, object]]:
        """``(k, self.images(k, limit))`` for each class of ``ks`` (default: all, in class order)."""
        for k in ks if ks is not None else range(self.num_classes):
            yield k, self.images(k, limit)


__all__ = ["ClassReader"]
