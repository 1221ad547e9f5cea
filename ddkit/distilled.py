"""A distilled set as generation writes it: the one reader, for ``ddkit package`` and ``ddkit evaluate``.

The generation contract (``RUN/gen-<method>/dataset.pt``, written by :func:`ddkit.generate.merge` and
:mod:`ddkit.methods.selected`)::

    {"images": uint8 [N, C, H, W], "labels": int64 [N], "classes": list[str], "ipc": int}

with every class holding ``ipc`` images, class-major. ``manifest.json`` and ``config.yaml`` beside it (the
config may also sit one level up, in the run dir) describe how it was made.

:func:`load_distilled` reads it, checks it and returns a :class:`Distilled` in class-major order. Given the
real data's shard index (``dataset.json``, as ``ddkit evaluate`` does) it also checks the set against the
real data (channels, resolution, class names) and accepts two more forms: float images in [0, 1] units in
the dict, and a bare float tensor ``[K x IPC, C, H, W]`` normalised with the index's mean/std and
class-major with labels implied (the challenge scorer's ``cifar100.pt`` format), which it de-normalises to
[0, 1] units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddkit.errors import DistilledSetError
from ddkit.io import read_json, sha256_file

MANIFEST = "manifest.json"
DATASET_FILE = "dataset.pt"


@dataclass
class Distilled:
    """A generated distilled set as read by :func:`load_distilled`.

    ``images`` uint8 [N, C, H, W] (float32 [N, C, H, W] in [0, 1] units only for the float forms that
    need a real index, see the module docstring), ``labels`` int64 [N] class-major, ``classes`` the class
    names in label order, ``ipc`` images per class, ``file`` the file read (``gen_dir / "dataset.pt"``
    when None).
    """

    gen_dir: Path
    images: Any
    labels: Any
    classes: list[str]
    ipc: int
    manifest: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    file: Path | None = None

    @property
    def dataset(self) -> str | None:
        return (self.config.get("data") or {}).get("dataset")


def resolve_gen_dir(path: str | Path, method: str | None = None) -> Path:
    """Find the generation directory holding ``dataset.pt``.

    Args:
        path: a gen dir (``RUN/gen-minimax``), a run dir holding ``gen-*`` dirs, or a ``dataset.pt`` file.
        method: pick ``RUN/gen-<method>`` when the run has several.

    Raises:
        DistilledSetError: nothing found, or several gen dirs and no ``method``.
    """
    p = Path(path)
    if p.is_file() and p.name == "dataset.pt":
        return p.parent
    if (p / "dataset.pt").is_file():
        return p
    if not p.is_dir():
        raise DistilledSetError(f"{p}: not found (expected a run dir, a gen-<method> dir or a dataset.pt)")
    if method is not None:
        d = p / f"gen-{method}"
        if not (d / "dataset.pt").is_file():
            raise DistilledSetError(f"{d / 'dataset.pt'}: not found (run `ddkit generate --method {method}` first)")
        return d
    found = sorted(d for d in p.glob("gen-*") if (d / "dataset.pt").is_file())
    if not found:
        raise DistilledSetError(f"{p}: no gen-<method>/dataset.pt below it (run `ddkit generate` first)")
    if len(found) > 1:
        if (p / "gen-minimax" / "dataset.pt").is_file():
            return p / "gen-minimax"
        names = ", ".join(d.name.removeprefix("gen-") for d in found)
        raise DistilledSetError(f"{p}: several generated sets ({names}); choose one with --method")
    return found[0]


def load_distilled(
    path: str | Path, method: str | None = None, *, index: dict[str, Any] | None = None, balanced: bool = True
) -> Distilled:
    """Load and validate a distilled set, putting it in class-major order (a stable sort keeps the
    within-class order the generator chose).

    Args:
        path: a run dir, a gen dir, a ``dataset.pt``, or any torch file holding the contract's dict (or, with
            ``index``, a bare scorer tensor).
        method: which ``gen-<method>`` when a run dir holds several.
        index: the real data's shard index (``dataset.json``: ``classes``, ``channels``, ``resolution``,
            ``mean``, ``std``); when given, the set must match it (``classes`` may then be left out of the
            dict) and the float forms of the module docstring are accepted.
        balanced: hold the set to the generation contract (equal images per class, class-major). False (for
            ``ddkit evaluate``, which trains on any set, e.g. another tool's): any counts, the file's order
            kept, ``ipc`` = the ``ipc`` key or the largest class count.

    Raises:
        DistilledSetError (a :class:`~ddkit.errors.DataError` and a :class:`~ddkit.errors.PackageError`):
            missing or unreadable file, missing keys, wrong dtypes or shapes, labels out of range, unequal
            images per class (naming the class and both counts), an ``ipc`` key the labels contradict, or a
            set that does not match ``index``. One line naming the file.
    """
    import torch

    p = Path(path)
    f = p if p.is_file() else resolve_gen_dir(p, method) / DATASET_FILE
    try:
        data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        why = str(e).splitlines()[0][:120] if str(e) else ""
        raise DistilledSetError(f"{f}: not a readable torch file ({type(e).__name__}: {why})") from None
    if torch.is_tensor(data) and index is not None:
        images, labels, classes, ipc_key = _from_scorer_tensor(f, data, index)
    elif isinstance(data, dict):
        images, labels, classes, ipc_key = _from_dict(f, data, index)
    else:
        raise DistilledSetError(f"{f}: expected a dict with images/labels/classes/ipc, got {type(data).__name__}")
    ipc = _equal_ipc(f, labels, classes, ipc_key, balanced)
    if balanced:
        order = torch.sort(labels, stable=True).indices
        images, labels = images[order].contiguous(), labels[order].contiguous()
    gen_dir = f.parent
    manifest = read_json(gen_dir / MANIFEST) if (gen_dir / MANIFEST).is_file() else {}
    config: dict[str, Any] = {}
    for cand in (gen_dir / "config.yaml", gen_dir.parent / "config.yaml"):
        if cand.is_file():
            config = yaml.safe_load(cand.read_text()) or {}
            break
    return Distilled(gen_dir, images, labels, classes, ipc, manifest, config, sha256_file(f), f)


def _from_dict(f: Path, data: dict[str, Any], index: dict[str, Any] | None):
    """The contract's dict -> ``(images, labels int64, classes, ipc key or None)``, checked."""
    import torch

    needed = ("images", "labels") if index is not None else ("images", "labels", "classes")
    missing = [k for k in needed if k not in data]
    if missing:
        raise DistilledSetError(f"{f}: missing key(s) {', '.join(missing)} (have: {', '.join(map(str, data))})")
    images, labels = data["images"], data["labels"]
    floats_ok = index is not None and torch.is_tensor(images) and images.is_floating_point()
    if not torch.is_tensor(images) or images.dim() != 4 or not (images.dtype == torch.uint8 or floats_ok):
        want = "uint8 (or float in [0, 1])" if index is not None else "uint8"
        raise DistilledSetError(f"{f}: images must be a {want} tensor [N,C,H,W], got {_describe(images)}")
    if not torch.is_tensor(labels) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DistilledSetError(f"{f}: labels must be an int tensor [N={images.shape[0]}], got {_describe(labels)}")
    classes = [str(c) for c in data["classes"]] if "classes" in data else None
    if index is not None:
        _check_against_index(f, images, classes, index)
        classes = [str(c) for c in index["classes"]]
        if images.is_floating_point():
            images = images.float()
    return images, labels.long(), classes, data.get("ipc")


def _from_scorer_tensor(f: Path, data, index: dict[str, Any]):
    """A bare normalised float tensor, class-major -> ``(images float32 in [0, 1], labels, classes, None)``."""
    import torch

    classes = [str(c) for c in index["classes"]]
    k = len(classes)
    if data.ndim != 4:
        raise DistilledSetError(f"{f}: expected images [N, C, H, W], got shape {list(data.shape)}")
    if k == 0 or data.shape[0] % k:
        raise DistilledSetError(f"{f}: {data.shape[0]} images is not a multiple of the {k} classes (class-major layout)")
    if not data.is_floating_point():
        raise DistilledSetError(f"{f}: a bare tensor must hold normalised float images, got {data.dtype}")
    _check_against_index(f, data, None, index)
    mean = torch.tensor(index["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(index["std"], dtype=torch.float32).view(1, -1, 1, 1)
    labels = torch.arange(k).repeat_interleave(data.shape[0] // k)
    return data.float() * std + mean, labels, classes, None


def _check_against_index(f: Path, images, classes: list[str] | None, index: dict[str, Any]) -> None:
    c, r = int(index["channels"]), int(index["resolution"])
    if images.shape[1] != c:
        raise DistilledSetError(f"{f}: images have {images.shape[1]} channels, the real set has {c}")
    if tuple(images.shape[2:]) != (r, r):
        raise DistilledSetError(f"{f}: images are {images.shape[2]}x{images.shape[3]} px, the real set is {r}x{r}")
    real = [str(c) for c in index["classes"]]
    if classes is not None and classes != real:
        raise DistilledSetError(
            f"{f}: classes {classes[:3]}... ({len(classes)}) differ from the real set's {real[:3]}... ({len(real)})"
        )


def _equal_ipc(f: Path, labels, classes: list[str], ipc_key: Any, balanced: bool = True) -> int:
    """Images per class, the same for every class (the generation contract); unbalanced: the largest count."""
    import torch

    k = len(classes)
    if labels.numel() == 0:
        raise DistilledSetError(f"{f}: no images")
    if k == 0 or int(labels.min()) < 0 or int(labels.max()) >= k:
        raise DistilledSetError(f"{f}: labels outside [0, {k}) for {k} classes")
    counts = torch.bincount(labels, minlength=k)
    if not balanced:
        return int(ipc_key) if ipc_key else int(counts.max())
    ipc = int(torch.mode(counts).values)  # the most common count names the odd class out
    bad = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != ipc]
    if bad:
        i, c = bad[0]
        raise DistilledSetError(f"{f}: unequal IPC: class {i} ({classes[i]}) has {c} images, most classes have {ipc}")
    if ipc_key is not None and int(ipc_key) != ipc:
        raise DistilledSetError(f"{f}: ipc key says {int(ipc_key)} but the labels give {ipc} per class")
    return ipc


def _describe(x: Any) -> str:
    import torch

    if torch.is_tensor(x):
        return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    return type(x).__name__


__all__ = ["DATASET_FILE", "Distilled", "load_distilled", "resolve_gen_dir"]
