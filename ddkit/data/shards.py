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
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

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
    encoder = _latent_encoder(cfg.encode_latents) if cfg.encode_latents else None
    with atomic_dir(out, overwrite=out.exists()) as tmp:
        index = _write(listing, cfg, tmp, encoder, progress)
        atomic_write_json(tmp / INDEX, index)
        atomic_write_json(tmp / CLASSES, index["classes"])
        write_run_config(tmp, cfg)
        mark_done(tmp, {"samples": index["totals"]})
        _share(tmp)
    return out


def _share(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600; a dataset is shared (cluster users), so apply the umask instead."""
    umask = _umask()
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~umask)
    os.chmod(folder, 0o777 & ~umask)


def _umask() -> int:
    # read, not os.umask(0)/os.umask(old): that briefly changes a process-wide setting under other threads
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


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


def _write(
    listing: Listing,
    cfg: Any,
    tmp: Path,
    encoder: Callable[[list[np.ndarray]], tuple[np.ndarray, dict[str, Any]]] | None,
    progress: bool,
) -> dict[str, Any]:
    import webdataset as wds

    from ddkit import __version__

    ch = listing.channels
    counts = {s: {name: 0 for name in listing.classes} for s in SPLITS}
    shard_counts: dict[str, int] = {}
    shards: dict[str, list[str]] = {}
    pix_sum = np.zeros(ch, np.float64)
    pix_sq = np.zeros(ch, np.float64)
    n_pix = 0
    latent_info: dict[str, Any] | None = None
    total = sum(len(listing.splits[s]) for s in SPLITS)
    pattern_dir = str(tmp).replace("%", "%%")  # ShardWriter formats the whole path with %
    bar, task = _progress(progress, total, f"sharding {cfg.dataset}")
    # image decoding + resizing (PIL releases the GIL) overlaps with PNG encoding of the previous chunk
    workers = min(8, usable_cpus())
    try:
        with ThreadPoolExecutor(workers) as pool:
            for split in SPLITS:
                items = listing.splits[split]
                order = (
                    np.random.default_rng([cfg.split_seed, SPLITS.index(split)])
                    .permutation(len(items))
                    .tolist()
                )
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
                            moments, latent_info = encoder(arrays)
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
                            name = Path(writer.fname).name
                            shard_counts[name] = shard_counts.get(name, 0) + 1
                            counts[split][listing.classes[it.label]] += 1
                            if split == "train":
                                flat = arr.reshape(-1, ch).astype(np.float64) / 255.0
                                pix_sum += flat.sum(0)
                                pix_sq += (flat * flat).sum(0)
                                n_pix += flat.shape[0]
                            pos += 1
                        if bar is not None:
                            bar.advance(task, len(chunk))
                finally:
                    writer.close()
                shards[split] = sorted(p.name for p in tmp.glob(f"{split}-*.tar"))
                for name in shards[split]:
                    shard_counts.setdefault(name, 0)
    finally:
        if bar is not None:
            bar.stop()
    if listing.mean is not None:
        mean, std, stats = list(listing.mean), list(listing.std or ()), "official"
    else:
        m = pix_sum / max(n_pix, 1)
        mean = [round(float(v), 6) for v in m]
        std = [round(float(v), 6) for v in np.sqrt(np.maximum(pix_sq / max(n_pix, 1) - m * m, 0.0))]
        stats = "computed on train"
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
        "channels": ch,
        "mean": mean,
        "std": std,
        "stats": stats,
        "counts": counts,
        "totals": {s: sum(counts[s].values()) for s in SPLITS},
        "shards": shards,
        "shard_counts": shard_counts,
        "shard_size": cfg.shard_size,
        "sha256": {n: sha256_file(tmp / n) for n in all_shards},
        "latents": latent_info is not None,
        "latent": latent_info,
        "sample_keys": {
            "image": "png",
            "label": "cls",
            "meta": "json",
            "latent_moments": MOMENTS_KEY if latent_info else None,
        },
        "config": {k: getattr(cfg, k) for k in _FINGERPRINT},
    }


def _meta(listing: Listing, it: Any, split: str) -> bytes:
    import json

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


def _progress(enabled: bool, total: int, what: str):
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar.start()
    return bar, bar.add_task(what, total=total)


def _latent_encoder(vae_path: str) -> Callable[[list[np.ndarray]], tuple[np.ndarray, dict[str, Any]]]:
    """Load a diffusers ``AutoencoderKL`` offline and return ``encode(list of uint8 [H,W,C]) ->
    (float32 [B, 2*Cz, h, w] = posterior mean ++ log-variance, latent info)``.

    Images are scaled to [-1, 1] (SD-VAE convention, DiT ``train.py``); grey images are repeated to the
    VAE's input channels. Raises WeightsError naming the path when the weights cannot be loaded offline.
    """
    import torch

    from ddkit.models.vae import encoder_digest, load_vae, vae_source

    vae = load_vae(vae_path)
    digest = encoder_digest(vae)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = vae.to(device).eval()
    in_ch = int(vae.config.in_channels)
    scale = float(getattr(vae.config, "scaling_factor", None) or 0.18215)

    @torch.no_grad()
    def encode(arrays: list[np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if x.shape[1] != in_ch:
            if x.shape[1] == 1:
                x = x.repeat(1, in_ch, 1, 1)
            else:
                raise DataError(f"{vae_path}: VAE expects {in_ch} input channels, images have {x.shape[1]}")
        dist = vae.encode(x.to(device)).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1).float().cpu().numpy()
        info = {
            "vae": vae_source(vae_path),
            "encoder_sha256": digest,
            "channels": int(dist.mean.shape[1]),
            "size": int(dist.mean.shape[-1]),
            "scale": scale,
            "moments": "mean ++ logvar along channels (diffusers DiagonalGaussianDistribution)",
        }
        return moments, info

    return encode


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
