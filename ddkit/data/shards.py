"""Write a dataset as WebDataset tar shards (``ddkit data shard``) and read the shard set back.

A shard set directory (``DataConfig.shards``)::

    dataset.json  classes.json  config.yaml  train-000000.tar ...  test-000000.tar ...  DONE

Each sample of a tar holds ``<key>.png`` (uint8, 1 or 3 channels, at the configured resolution),
``<key>.cls`` (subset class index as ASCII), ``<key>.json`` (source file, subset index, ImageNet index,
class id) and, with ``--encode-latents``, ``<key>.moments.npy`` (float32 [2*Cz, h, w]: the VAE posterior
mean then log-variance, as diffusers' ``DiagonalGaussianDistribution``). Keys are ``<split>-<position>``;
samples are written in a seeded random order so each shard holds a class-balanced mix (a shuffle buffer
over a few shards then mixes classes well).

The whole set is written into a temporary sibling directory and renamed when complete
(:func:`ddkit.io.atomic_dir`), so a failure (bad image, missing file, Ctrl-C) leaves nothing behind and a
complete set is recognised by its ``DONE`` marker and skipped on rerun.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddkit import __version__
from ddkit import progress as progress_bar
from ddkit.data.registry import Listing, get_reader, list_dataset
from ddkit.dist import usable_cpus
from ddkit.errors import DataError
from ddkit.io import (
    atomic_dir,
    atomic_write_json,
    is_done,
    mark_done,
    read_json,
    sha256_file,
    write_run_config,
)

FORMAT_VERSION = 1
SPLITS = ("train", "test")
INDEX = "dataset.json"
CLASSES = "classes.json"
MOMENTS_KEY = "moments.npy"
REQUIRED_KEYS = (
    "dataset", "classes", "class_ids", "imagenet_index", "resolution", "channels", "mean", "std",
    "counts", "shards", "sha256", "latents",
)  # fmt: skip
# Config fields a complete shard set must match to be reused (anything else is a different dataset).
_FINGERPRINT = ("dataset", "resolution", "channels", "test_fraction", "split_seed")


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def read_index(shard_dir: str | Path) -> dict[str, Any]:
    """The parsed ``dataset.json`` of a shard set.

    Keys (at least): ``dataset`` (str), ``classes`` (list[str], class-index order), ``class_ids``
    (list[str]), ``imagenet_index`` (list[int] | None), ``resolution`` (int, pixels), ``channels`` (int),
    ``mean``/``std`` (list[float] per channel, [0, 1] units), ``counts`` ({split: {class name: images}}),
    ``totals`` ({split: images}), ``shards`` ({split: [tar file names]}), ``shard_counts`` ({file:
    samples}), ``sha256`` ({file: hex}), ``latents`` (bool) and ``latent`` (dict | None: ``vae``,
    ``channels``, ``size``, ``scale``).

    Raises:
        DataError: no/corrupt ``dataset.json`` or a required key missing (message names the file).
    """
    path = Path(shard_dir) / INDEX
    idx = read_json(path)
    if not isinstance(idx, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in idx:
            raise DataError(f"{path}: missing key '{key}'")
    return idx


def shard_paths(shard_dir: str | Path, split: str, idx: dict | None = None) -> list[Path]:
    """Absolute paths of the tar shards of ``split``. Raises DataError for an unknown split or a missing tar."""
    shard_dir = Path(shard_dir)
    idx = idx or read_index(shard_dir)
    if split not in idx["shards"]:
        raise DataError(f"{shard_dir / INDEX}: no split '{split}' (have: {', '.join(idx['shards'])})")
    paths = [shard_dir / name for name in idx["shards"][split]]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: shard missing")
    return paths


def verify_shards(shard_dir: str | Path) -> dict[str, Any]:
    """Recompute every shard's sha256 and compare with ``dataset.json``.

    Returns:
        The index. Raises DataError naming the first shard that is missing or differs.
    """
    shard_dir = Path(shard_dir)
    idx = read_index(shard_dir)
    for name, digest in idx["sha256"].items():
        p = shard_dir / name
        if not p.is_file():
            raise DataError(f"{p}: shard missing")
        if sha256_file(p) != digest:
            raise DataError(f"{p}: sha256 mismatch (corrupt or modified shard)")
    return idx


def iter_samples(urls: Iterable[str | Path]) -> Iterator[dict[str, Any]]:
    """Raw WebDataset samples (dicts of bytes) of the given tars, in file order.

    Raises:
        DataError: naming the shard, when a tar cannot be opened or is corrupt/truncated.
    """
    import webdataset as wds

    src = ({"url": str(u)} for u in urls)
    return wds.tarfile_samples(src, handler=raise_shard_error)


def counted_samples(urls: Iterable[str | Path], expected: dict[str, int]) -> Iterator[dict[str, Any]]:
    """:func:`iter_samples` shard by shard, checking each yields the count recorded in ``dataset.json``.

    A tar cut at a member boundary reads without error; without this check it would silently shrink the
    epoch (or, in the loader, be refilled with repeats). Raises DataError naming the shard.
    """
    for u in urls:
        n = 0
        for s in iter_samples([u]):
            n += 1
            yield s
        want = expected.get(Path(u).name)
        if want is not None and n != want:
            raise DataError(f"{u}: {n} samples but {INDEX} records {want} (truncated or replaced shard)")


def raise_shard_error(exn: Exception) -> bool:
    """WebDataset handler: re-raise any read error as a one-line DataError naming the shard."""
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), None)
    first = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
    raise DataError(
        f"{url or 'shard'}: corrupt or unreadable shard ({type(exn).__name__}: {first})"
    ) from None


def decode_sample(sample: dict[str, Any], resolution: int, channels: int) -> tuple[np.ndarray, int]:
    """PNG -> uint8 [H, W, C] and ``cls`` -> int, checking the size against the index.

    Raises:
        DataError: undecodable PNG, missing fields or a wrong resolution; names shard and key.
    """
    from PIL import Image

    where = f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}"
    if "png" not in sample or "cls" not in sample:
        raise DataError(
            f"{where}: sample lacks png/cls (has {', '.join(k for k in sample if not k.startswith('__'))})"
        )
    try:
        with Image.open(io.BytesIO(sample["png"])) as im:
            arr = np.asarray(im, dtype=np.uint8)
        label = int(sample["cls"])
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: undecodable sample ({str(e).splitlines()[0]})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape != (resolution, resolution, channels):
        raise DataError(
            f"{where}: wrong resolution {tuple(arr.shape)}, index says {(resolution, resolution, channels)}"
        )
    return arr, label


def decode_moments(sample: dict[str, Any]) -> np.ndarray:
    """``moments.npy`` -> float32 [2*Cz, h, w]. Raises DataError naming shard and key when absent/corrupt."""
    where = f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}"
    if MOMENTS_KEY not in sample:
        raise DataError(f"{where}: no VAE latents in this shard set (shard with --encode-latents)")
    try:
        return np.load(io.BytesIO(sample[MOMENTS_KEY]), allow_pickle=False).astype(np.float32, copy=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: corrupt latent moments ({str(e).splitlines()[0]})") from None


def load_tensors(shard_dir: str | Path, split: str):
    """The whole split in memory, sorted by sample key (deterministic).

    Args:
        shard_dir: a shard set written by :func:`shard_dataset`.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(images, labels)``: ``uint8 [N, C, H, W]`` (0..255) and ``int64 [N]`` (subset class index).

    Raises:
        DataError: missing/corrupt index or shard, or fewer/more samples than the index records.
    """
    import torch

    shard_dir = Path(shard_dir)
    idx = read_index(shard_dir)
    urls = shard_paths(shard_dir, split, idx)
    res, ch = int(idx["resolution"]), int(idx["channels"])

    def decode(s: dict[str, Any]) -> tuple[str, np.ndarray, int]:
        return (s["__key__"], *decode_sample(s, res, ch))

    samples = counted_samples(urls, idx.get("shard_counts", {}))
    if res >= 64:
        # PNG decoding releases the GIL: threads pay off for large images (ImageNet subsets at 256)
        with ThreadPoolExecutor(min(8, usable_cpus())) as pool:
            keyed = list(pool.map(decode, samples, chunksize=1))
    else:
        keyed = [decode(s) for s in samples]
    expected = int(idx.get("totals", {}).get(split, sum(idx["counts"][split].values())))
    if len(keyed) != expected:
        raise DataError(
            f"{shard_dir}: split '{split}' has {len(keyed)} samples, {INDEX} says {expected} (truncated shard?)"
        )
    keyed.sort(key=lambda t: t[0])
    if not keyed:
        return torch.zeros(0, ch, res, res, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    images = torch.from_numpy(np.stack([k[1] for k in keyed])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([k[2] for k in keyed], dtype=torch.int64)
    return images, labels


def is_complete(shard_dir: str | Path) -> bool:
    """True when ``shard_dir`` is a finished shard set (``DONE`` and ``dataset.json`` present)."""
    d = Path(shard_dir)
    return is_done(d) and (d / INDEX).is_file()


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def shard_dataset(cfg: Any, out: str | Path | None = None, *, progress: bool = False) -> Path:
    """Write ``cfg.dataset`` as WebDataset shards for train and test, plus ``dataset.json``,
    ``classes.json`` and ``config.yaml``; skip when ``out`` already holds a matching complete set.

    Args:
        cfg: a :class:`ddkit.config.DataConfig` (dataset, root, resolution, channels, shard_size,
            encode_latents, test_fraction, split_seed).
        out: output directory; default ``cfg.shards``.
        progress: show a rich progress bar (CLI).

    Returns:
        The shard directory.

    Raises:
        DataError: unknown dataset, missing root, unreadable image, a class with no images, wrong
            resolution, or ``out`` holding something else (message names the file/key).
        WeightsError: ``cfg.encode_latents`` cannot be loaded offline.
    """
    out = Path(out if out is not None else cfg.shards).expanduser()
    get_reader(cfg.dataset)
    if is_complete(out):
        _check_reusable(read_index(out), cfg, out)
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not a complete shard set; remove it or choose another --out")
    listing = list_dataset(cfg)
    encoder = None
    if cfg.encode_latents:
        from ddkit.models.vae import moments_encoder

        encoder = moments_encoder(cfg.encode_latents)
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        index = _write(listing, cfg, tmp, encoder, progress)
        atomic_write_json(tmp / INDEX, index)
        atomic_write_json(tmp / CLASSES, index["classes"])
        write_run_config(tmp, cfg)
        mark_done(tmp, {"samples": index["totals"]})
    return out


def _check_reusable(idx: dict[str, Any], cfg: Any, out: Path) -> None:
    have = idx.get("config", {})
    for key in _FINGERPRINT:
        want = getattr(cfg, key)
        if key in have and have[key] != want:
            raise DataError(
                f"{out / INDEX}: {key} is {have[key]!r} but data.{key}={want!r}; delete {out} or choose another --out"
            )
    if cfg.encode_latents and not idx.get("latents"):
        raise DataError(
            f"{out / INDEX}: written without latents but --encode-latents was given; delete {out} to rebuild"
        )
    if cfg.encode_latents:
        from ddkit.models.vae import check_latent_vae

        check_latent_vae(idx.get("latent"), cfg.encode_latents, str(out / INDEX))


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    # compress_level 3: ~3x faster to write than the default 6, a few % larger; decoding cost is the same
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _chunks(seq: list[int], n: int) -> Iterator[list[int]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


@dataclass
class _Tally:
    """What writing the shards counts: images per split and class, samples per tar, train pixel moments."""

    counts: dict[str, dict[str, int]]
    channels: int
    shard_counts: dict[str, int] = field(default_factory=dict)
    shards: dict[str, list[str]] = field(default_factory=dict)
    latent_info: dict[str, Any] | None = None
    n_pix: int = 0
    pix_sum: np.ndarray | None = None
    pix_sq: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.pix_sum = np.zeros(self.channels, np.float64)
        self.pix_sq = np.zeros(self.channels, np.float64)

    def add(self, tar: str, split: str, name: str, arr: np.ndarray) -> None:
        """One sample of class ``name`` written to ``tar``; train images (uint8 [H, W, C]) feed the moments."""
        self.shard_counts[tar] = self.shard_counts.get(tar, 0) + 1
        self.counts[split][name] += 1
        if split == "train":
            flat = arr.reshape(-1, self.channels).astype(np.float64) / 255.0
            self.pix_sum += flat.sum(0)
            self.pix_sq += (flat * flat).sum(0)
            self.n_pix += flat.shape[0]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and (population) std of the train pixels, [0, 1] units, rounded to 6 places."""
        m = self.pix_sum / max(self.n_pix, 1)
        var = np.maximum(self.pix_sq / max(self.n_pix, 1) - m * m, 0.0)
        return [round(float(v), 6) for v in m], [round(float(v), 6) for v in np.sqrt(var)]


def _write(
    listing: Listing,
    cfg: Any,
    tmp: Path,
    encoder: Callable[[list[np.ndarray]], tuple[np.ndarray, dict[str, Any]]] | None,
    progress: bool,
) -> dict[str, Any]:
    """Write both splits' tars into ``tmp``; return the ``dataset.json`` record."""

    tally = _Tally({s: {name: 0 for name in listing.classes} for s in SPLITS}, listing.channels)
    total = sum(len(listing.splits[s]) for s in SPLITS)
    # image decoding + resizing (PIL releases the GIL) overlaps with PNG encoding of the previous chunk
    workers = min(8, usable_cpus())
    with progress_bar.bar(f"sharding {cfg.dataset}", total, enabled=progress) as update:
        with ThreadPoolExecutor(workers) as pool:
            for split in SPLITS:
                _write_split(listing, cfg, tmp, split, encoder, pool, tally, update)
    return _index_record(listing, cfg, tmp, tally)


def _write_split(listing, cfg, tmp: Path, split: str, encoder, pool, tally: _Tally, update) -> None:
    """One split's samples, in a seeded random order, into ``tmp/<split>-NNNNNN.tar``."""
    import webdataset as wds

    ch = listing.channels
    items = listing.splits[split]
    order = np.random.default_rng([cfg.split_seed, SPLITS.index(split)]).permutation(len(items)).tolist()
    pattern_dir = str(tmp).replace("%", "%%")  # ShardWriter formats the whole path with %
    writer = wds.ShardWriter(
        f"{pattern_dir}/{split}-%06d.tar",
        maxcount=cfg.shard_size,
        maxsize=1e15,
        verbose=0,
        # fixed mtime and pre-encoded bytes: identical inputs give identical tars (same sha256)
        mtime=0,  # an int: a float mtime costs a PAX header per file
        encoder=False,
    )
    try:
        pos = 0
        for chunk in _chunks(order, 64):
            arrays = list(pool.map(lambda it: it.load(), [items[i] for i in chunk]))
            for i, a in zip(chunk, arrays, strict=True):
                if a.shape != (cfg.resolution, cfg.resolution, ch):
                    raise DataError(
                        f"{items[i].source}: wrong resolution {a.shape}, expected {(cfg.resolution, cfg.resolution, ch)}"
                    )
            moments = None
            if encoder is not None:
                moments, tally.latent_info = encoder(arrays)
            for j, (i, arr) in enumerate(zip(chunk, arrays, strict=True)):
                it = items[i]
                sample = {
                    "__key__": f"{split}-{pos:07d}",
                    "png": _png(arr),
                    "cls": str(it.label).encode("ascii"),
                    "json": _meta(listing, it, split),
                }
                if moments is not None:
                    sample[MOMENTS_KEY] = _npy(moments[j])
                writer.write(sample)
                tally.add(Path(writer.fname).name, split, listing.classes[it.label], arr)
                pos += 1
            update(len(chunk))
    finally:
        writer.close()
    tally.shards[split] = sorted(p.name for p in tmp.glob(f"{split}-*.tar"))
    for name in tally.shards[split]:
        tally.shard_counts.setdefault(name, 0)


def _index_record(listing: Listing, cfg: Any, tmp: Path, tally: _Tally) -> dict[str, Any]:
    """The ``dataset.json`` of a written set (keys: :func:`read_index`)."""

    if listing.mean is not None:
        mean, std, stats = list(listing.mean), list(listing.std or ()), "official"
    else:
        mean, std = tally.mean_std()
        stats = "computed on train"
    counts, shards = tally.counts, tally.shards
    all_shards = [n for s in SPLITS for n in shards[s]]
    return {
        "format_version": FORMAT_VERSION,
        "ddkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": cfg.dataset,
        "root": listing.root,
        "classes": listing.classes,
        "class_ids": listing.class_ids,
        "imagenet_index": listing.imagenet_index,
        "num_classes": len(listing.classes),
        "resolution": cfg.resolution,
        "channels": listing.channels,
        "mean": mean,
        "std": std,
        "stats": stats,
        "counts": counts,
        "totals": {s: sum(counts[s].values()) for s in SPLITS},
        "shards": shards,
        "shard_counts": tally.shard_counts,
        "shard_size": cfg.shard_size,
        "sha256": {n: sha256_file(tmp / n) for n in all_shards},
        "latents": tally.latent_info is not None,
        "latent": tally.latent_info,
        "sample_keys": {
            "image": "png",
            "label": "cls",
            "meta": "json",
            "latent_moments": MOMENTS_KEY if tally.latent_info else None,
        },
        "config": {k: getattr(cfg, k) for k in _FINGERPRINT},
    }


def _meta(listing: Listing, it: Any, split: str) -> bytes:
    return json.dumps(
        {
            "source": it.source,
            "split": split,
            "subset_index": it.label,
            "imagenet_index": listing.imagenet_index[it.label] if listing.imagenet_index else None,
            "class_id": listing.class_ids[it.label],
            "class_name": listing.classes[it.label],
        }
    ).encode("utf-8")


def human_size(n: float) -> str:
    """Bytes as a short human string (for ``ddkit data info``)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


__all__ = [
    "read_index", "shard_paths", "verify_shards", "load_tensors", "shard_dataset", "is_complete",
    "iter_samples", "decode_sample", "decode_moments", "human_size",
]  # fmt: skip
