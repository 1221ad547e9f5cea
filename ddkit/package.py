"""Submission packages: the ECCV 2024 DD Challenge archive, plain folders, WebDataset shards, and checks.

The challenge scorer (DataDistillation/ECCV2024-Dataset-Distillation-Challenge, ``evaluate.py``) does, for
each of ``cifar100`` and ``tinyimagenet`` in turn::

    data = torch.load(os.path.join(submit_dir, f"{name}.pt"))       # a bare tensor, nothing else
    assert data.shape == (10 * num_classes, 3, H, W)                  # IPC 10 is hard-coded
    labels = [i for i in range(num_classes) for _ in range(10)]       # labels implied, class-major

and trains ConvNet-3 on ``data`` without normalising it, testing on data normalised with the dataset's
constants (:data:`ECCV2024`). So a submission is a flat archive holding ``cifar100.pt`` and
``tinyimagenet.pt``: float32 tensors ``[classes x 10, 3, H, W]``, class-major, already normalised. The
scorer reads both files unconditionally; a one-dataset archive is therefore flagged as partial.

Only the two challenge datasets can be packaged in ``eccv2024`` format: any other dataset (the MNIST demo)
is refused with one line pointing at ``--format folder`` / ``webdataset``, which work for every dataset.
A scorer-shaped file for MNIST would carry constants the scorer has never heard of, so it is not written.

Layouts written here:

- ``eccv2024``: ``submission.zip`` = ``cifar100.pt`` and/or ``tinyimagenet.pt`` + ``manifest.json``;
- ``folder``: ``DIR/<k:03d>_<class>/<i:04d>.png`` + ``DIR/manifest.json``;
- ``webdataset``: ``DIR/distilled-000000.tar`` (keys ``<k:04d>_<i:04d>``, fields ``png`` and ``cls``) +
  ``DIR/classes.json`` + ``DIR/manifest.json``;
- ``eccv2024-generator``: see :func:`package_generator` (image, weights, entry point).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddkit import __version__
from ddkit.errors import PackageError
from ddkit.io import atomic_dir, atomic_file, hardware_info, read_json, sha256_file

IPC = 10  # the scorer's hard-coded images per class (evaluate.py: assert data.shape[0] == 10 * num_classes)
MANIFEST = "manifest.json"
FORMATS = ("eccv2024", "folder", "webdataset", "eccv2024-generator")

# CIFAR-100 fine labels in the index order of the official python pickle (meta["fine_label_names"]),
# which is alphabetical; the scorer's test labels use this order.
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel "
    "can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur "
    "dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion "
    "lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree "
    "pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea "
    "seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table "
    "tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm"
).split()
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ScorerSpec:
    """What the scorer expects for one dataset (``evaluate.py`` and its README's normalisation)."""

    name: str
    num_classes: int
    size: int  # H = W, pixels
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_classes * IPC, 3, self.size, self.size)


ECCV2024: dict[str, ScorerSpec] = {
    "cifar100": ScorerSpec("cifar100", 100, 32, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ScorerSpec("tinyimagenet", 200, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# ----------------------------------------------------------------------------------------------------------
# Reading a generated run
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Distilled:
    """A generated distilled set as read from ``RUN/gen-<method>/dataset.pt``.

    ``images`` uint8 [N, C, H, W], ``labels`` int64 [N] (class-major after :func:`load_distilled`),
    ``classes`` the class names in label order, ``ipc`` images per class.
    """

    gen_dir: Path
    images: Any
    labels: Any
    classes: list[str]
    ipc: int
    manifest: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def dataset(self) -> str | None:
        return (self.config.get("data") or {}).get("dataset")


def resolve_gen_dir(path: str | Path, method: str | None = None) -> Path:
    """Find the generation directory holding ``dataset.pt``.

    Args:
        path: a gen dir (``RUN/gen-minimax``), a run dir holding ``gen-*`` dirs, or a ``dataset.pt`` file.
        method: pick ``RUN/gen-<method>`` when the run has several.

    Raises:
        PackageError: nothing found, or several gen dirs and no ``method``.
    """
    p = Path(path)
    if p.is_file() and p.name == "dataset.pt":
        return p.parent
    if (p / "dataset.pt").is_file():
        return p
    if not p.is_dir():
        raise PackageError(f"{p}: not found (expected a run dir, a gen-<method> dir or a dataset.pt)")
    if method is not None:
        d = p / f"gen-{method}"
        if not (d / "dataset.pt").is_file():
            raise PackageError(f"{d / 'dataset.pt'}: not found (run `ddkit generate --method {method}` first)")
        return d
    found = sorted(d for d in p.glob("gen-*") if (d / "dataset.pt").is_file())
    if not found:
        raise PackageError(f"{p}: no gen-<method>/dataset.pt below it (run `ddkit generate` first)")
    if len(found) > 1:
        if (p / "gen-minimax" / "dataset.pt").is_file():
            return p / "gen-minimax"
        names = ", ".join(d.name.removeprefix("gen-") for d in found)
        raise PackageError(f"{p}: several generated sets ({names}); choose one with --method")
    return found[0]


def load_distilled(path: str | Path, method: str | None = None) -> Distilled:
    """Load and validate a generated set, putting it in class-major order.

    ``dataset.pt`` = ``{"images": uint8 [N,C,H,W], "labels": int64 [N], "classes": list[str], "ipc": int}``
    (the generation contract); ``manifest.json`` and ``config.yaml`` beside it are read when present
    (``config.yaml`` may also sit one level up, in the run dir).

    Raises:
        PackageError: missing keys, wrong dtypes, labels out of range, or unequal images per class (naming
            the class and both counts).
    """
    import torch
    import yaml

    gen_dir = resolve_gen_dir(path, method)
    f = gen_dir / "dataset.pt"
    try:
        data = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt files
        raise PackageError(f"{f}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise PackageError(f"{f}: expected a dict with images/labels/classes/ipc, got {type(data).__name__}")
    missing = [k for k in ("images", "labels", "classes") if k not in data]
    if missing:
        raise PackageError(f"{f}: missing key(s) {', '.join(missing)}")
    images, labels, classes = data["images"], data["labels"], [str(c) for c in data["classes"]]
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4:
        raise PackageError(f"{f}: images must be a uint8 tensor [N,C,H,W], got {_describe(images)}")
    if not torch.is_tensor(labels) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise PackageError(f"{f}: labels must be an int tensor [N={images.shape[0]}], got {_describe(labels)}")
    labels = labels.long()
    k = len(classes)
    if k == 0 or int(labels.min()) < 0 or int(labels.max()) >= k:
        raise PackageError(f"{f}: labels outside [0, {k}) for {k} classes")
    counts = torch.bincount(labels, minlength=k)
    ipc = int(torch.mode(counts).values)  # the most common count names the odd class out
    bad = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != ipc]
    if bad:
        i, c = bad[0]
        raise PackageError(f"{f}: unequal IPC: class {i} ({classes[i]}) has {c} images, most classes have {ipc}")
    if "ipc" in data and int(data["ipc"]) != ipc:
        raise PackageError(f"{f}: ipc key says {int(data['ipc'])} but the labels give {ipc} per class")
    # Class-major (all of class 0, then class 1, ...) is what the scorer's implied labels assume; a stable
    # sort keeps the within-class order the generator chose.
    order = torch.sort(labels, stable=True).indices
    images, labels = images[order].contiguous(), labels[order].contiguous()
    manifest = _read_optional_json(gen_dir / MANIFEST)
    config: dict[str, Any] = {}
    for cand in (gen_dir / "config.yaml", gen_dir.parent / "config.yaml"):
        if cand.is_file():
            config = yaml.safe_load(cand.read_text()) or {}
            break
    return Distilled(gen_dir, images, labels, classes, ipc, manifest, config, sha256_file(f))


# ----------------------------------------------------------------------------------------------------------
# Tensor conversion
# ----------------------------------------------------------------------------------------------------------
def resize_uint8(images, size: int):
    """Resize uint8 [N,C,H,W] to [N,C,size,size] (antialiased bilinear, as PIL's resize), back to uint8.

    Generation at 256 px (DiT-XL/2) is brought back to the challenge's 32 / 64 px here. Quantising to uint8
    before normalising makes the submission exactly what a PNG round trip of the images would give.
    """
    import torch
    import torch.nn.functional as F

    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def normalize(images, mean, std):
    """uint8 [N,C,H,W] -> float32 ``(x / 255 - mean) / std`` per channel (the scorer's test-time transform)."""
    import torch

    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((images.float() / 255.0) - m) / s


def to_scorer_tensor(images, spec: ScorerSpec):
    """uint8 [classes x IPC, 3, H, W] (class-major) -> the scorer's float32 [classes x IPC, 3, size, size].

    The result is a fresh contiguous tensor: ``torch.save`` of a view would store its whole parent storage.
    """
    return normalize(resize_uint8(images, spec.size), spec.mean, spec.std).contiguous().clone()


def canonical_order(
    classes: list[str], spec: ScorerSpec, class_ids: list[str] | None = None, looked: str = "nowhere"
) -> list[int]:
    """Permutation putting the run's classes into the scorer's class order.

    CIFAR-100: the official fine-label order (:data:`CIFAR100_CLASSES`; names compared ignoring case,
    spaces vs underscores). Tiny-ImageNet: wnids sorted (the ImageFolder order of ``train/``), taken from
    the names when they are wnids or from ``class_ids`` (the shard index).

    Returns:
        ``perm`` with ``perm[j]`` = the run's class index that goes to scorer class ``j``.

    Raises:
        PackageError: wrong number of classes, or names not the dataset's.
    """
    if len(classes) != spec.num_classes:
        raise PackageError(f"{spec.name}: the run has {len(classes)} classes, the scorer expects {spec.num_classes}")
    if spec.name == "cifar100":
        norm = [c.strip().lower().replace(" ", "_") for c in classes]
        pos = {c: i for i, c in enumerate(norm)}
        unknown = [c for c in norm if c not in set(CIFAR100_CLASSES)]
        if unknown:
            raise PackageError(f"cifar100: class name {unknown[0]!r} is not a CIFAR-100 fine label")
        return [pos[c] for c in CIFAR100_CLASSES]
    ids = class_ids if class_ids is not None and len(class_ids) == len(classes) else classes
    if all(_WNID.match(c) for c in ids):
        return sorted(range(len(ids)), key=lambda i: ids[i])
    raise PackageError(
        f"{spec.name}: cannot verify the class order: classes are not wnids and no shard index "
        f"(dataset.json with class_ids) was found; looked in {looked}"
    )


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------
def package_run(
    gen_dir: str | Path | list[str | Path],
    *,
    fmt: str = "eccv2024",
    out: str | Path | None = None,
    dataset: str | None = None,
    method: str | None = None,
    image: str | Path | None = None,
) -> Path:
    """Package one or more generated runs; return the written archive or directory.

    Args:
        gen_dir: a run dir, a gen dir or a ``dataset.pt`` (a list: one per challenge dataset, ``eccv2024``
            and ``eccv2024-generator`` only, e.g. the CIFAR-100 and the Tiny-ImageNet run together).
        fmt: one of :data:`FORMATS`.
        out: destination; default ``RUN/submission.zip``, ``RUN/distilled``, ``RUN/distilled-wds`` or
            ``RUN/generator``.
        dataset: force the challenge dataset name (``cifar100`` / ``tinyimagenet``) instead of the run's
            ``data.dataset``; only with a single run.
        method: which ``gen-<method>`` when a run dir holds several.
        image: the Apptainer image to put in a generator bundle.

    Raises:
        PackageError: unknown format, a non-challenge dataset in a challenge format, or any check failing on
            the written output (the output is then not left behind).
    """
    runs = list(gen_dir) if isinstance(gen_dir, (list, tuple)) else [gen_dir]
    if fmt not in FORMATS:
        raise PackageError(f"--format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if not runs:
        raise PackageError("no run given")
    if dataset is not None and len(runs) > 1:
        raise PackageError("--dataset applies to a single run; each of several runs names its own dataset")
    if fmt == "eccv2024-generator":
        return package_generator(runs, out=out, dataset=dataset, method=method, image=image)
    sets = [load_distilled(r, method) for r in runs]
    if fmt == "eccv2024":
        out = Path(out) if out else sets[0].gen_dir.parent / "submission.zip"
        return write_eccv2024(sets, out, dataset=dataset)
    if len(sets) > 1:
        raise PackageError(f"--format {fmt}: one run at a time")
    if fmt == "folder":
        return write_folder(sets[0], Path(out) if out else sets[0].gen_dir.parent / "distilled")
    return write_webdataset(sets[0], Path(out) if out else sets[0].gen_dir.parent / "distilled-wds")


def challenge_dataset(d: Distilled, override: str | None = None) -> ScorerSpec:
    """The :class:`ScorerSpec` for a run (``override`` > ``package.dataset`` > ``data.dataset``).

    Raises:
        PackageError: the dataset is not one of the challenge's.
    """
    name = override or (d.config.get("package") or {}).get("dataset") or d.dataset
    if name not in ECCV2024:
        raise PackageError(
            f"{d.gen_dir}: dataset {name!r} is not a challenge dataset ({', '.join(ECCV2024)}); "
            "use --format folder or --format webdataset"
        )
    return ECCV2024[name]


def scorer_tensor(d: Distilled, spec: ScorerSpec):
    """The scorer's tensor for one generated set: float32 [classes x 10, 3, size, size] and the class permutation.

    Classes are put in the scorer's order (:func:`canonical_order`), each cut to its first 10 images (a
    run with more images per class keeps the generator's first 10; one with fewer is refused), resized and
    normalised (:func:`to_scorer_tensor`).

    Raises:
        PackageError: not 3 channels, IPC below 10, or classes that are not the dataset's.
    """
    if d.images.shape[1] != 3:
        raise PackageError(f"{d.gen_dir}: {d.images.shape[1]}-channel images; {spec.name} needs 3")
    if d.ipc < IPC:
        raise PackageError(f"{d.gen_dir}: IPC {d.ipc}; the scorer (evaluate.py) asserts exactly {IPC} images per class")
    looked = ", ".join(str(p) for p in _index_candidates(d)) or "nowhere (the run config has no data.shards)"
    perm = canonical_order(d.classes, spec, _index_class_ids(d), looked)
    blocks = d.images.view(len(d.classes), d.ipc, *d.images.shape[1:])
    picked = blocks[perm, :IPC].reshape(-1, *d.images.shape[1:])
    return to_scorer_tensor(picked, spec), perm


SCORES_FILE = "scores.txt"


def official_scores(perf: dict[str, float]) -> str:
    """The scorer's ``scores.txt`` content: ``correct: <score>``, one line, no newline (``evaluate.py``:
    ``score = 0; score += perf`` for cifar100 then tinyimagenet; ``score /= 2``;
    ``output_file.write("correct: {}".format(score))``).

    Args:
        perf: dataset name -> the scorer's per-dataset performance (mean over its 3 rounds of
            correct / test images, a fraction in [0, 1]). With both challenge datasets the score is their
            mean, summed in the scorer's order; with one dataset (``ddkit evaluate`` judges one at a time) it
            is that dataset's performance, the mean over what was evaluated.

    Raises:
        PackageError: empty ``perf``, or more than one dataset when they are not the two challenge ones.
    """
    if not perf:
        raise PackageError("scores: no challenge performance to write")
    order = [n for n in ECCV2024 if n in perf] if set(perf) <= set(ECCV2024) else None
    if order is None and len(perf) > 1:
        raise PackageError(f"scores: datasets {sorted(perf)} are not the challenge's {sorted(ECCV2024)}")
    score = 0
    for name in order or list(perf):
        score += perf[name]
    score /= len(perf)
    return f"correct: {score}"


def write_official_scores(path: str | Path, perf: dict[str, float]) -> Path:
    """Write :func:`official_scores` to ``path`` atomically; returns the path."""
    from ddkit.io import atomic_write_text

    atomic_write_text(Path(path), official_scores(perf))
    return Path(path)


def combine_scores(eval_dirs: list[str | Path], out: str | Path) -> Path:
    """The two-dataset ``scores.txt`` from ``ddkit evaluate`` outputs (one per challenge dataset): each
    ``results.json`` gives its dataset (``meta.dataset``) and the scorer performance of its submission
    (``meta.scorer``, see :mod:`ddkit.evaluate.runner`). Writes ``out`` (a file) and returns it.

    Raises:
        PackageError: a directory without an eccv2024 result, or the same dataset twice.
    """
    perf: dict[str, float] = {}
    for d in eval_dirs:
        meta = (read_json(Path(d) / "results.json") or {}).get("meta", {})
        name, value = meta.get("dataset"), meta.get("scorer")
        if name is None or value is None:
            raise PackageError(f"{d}/results.json: no eccv2024 scorer result (meta.dataset / meta.scorer)")
        if name in perf:
            raise PackageError(f"{d}: a second evaluation of {name}")
        perf[name] = float(value)
    return write_official_scores(out, perf)


def check_tensor_file(path: str | Path, spec: ScorerSpec, *, tolerance: float = 0.02) -> Verdict:
    """Check one scorer file (``cifar100.pt`` / ``tinyimagenet.pt``) on disk; see :func:`check_submission`."""
    return _check_tensor(spec, Path(path).read_bytes(), {}, tolerance)


def write_eccv2024(sets: list[Distilled], out: str | Path, *, dataset: str | None = None) -> Path:
    """Write the flat challenge archive ``out`` (zip) atomically and check it before it lands.

    Each set is reordered to the scorer's class order, cut to the scorer's IPC of 10 (a run with more
    images per class keeps its first 10 per class; one with fewer is refused), resized to the scorer's
    size and normalised with its constants (:func:`to_scorer_tensor`).

    Raises:
        PackageError: IPC below 10, two runs for the same dataset, wrong classes, or a failed check.
    """
    import torch

    out = Path(out)
    members: dict[str, bytes] = {}
    entries: dict[str, Any] = {}
    for d in sets:
        spec = challenge_dataset(d, dataset)
        if spec.filename in members:
            raise PackageError(f"{d.gen_dir}: a second run for {spec.name}")
        tensor, perm = scorer_tensor(d, spec)
        buf = io.BytesIO()
        torch.save(tensor, buf)
        members[spec.filename] = buf.getvalue()
        entries[spec.filename] = _entry(d, spec, perm)
    manifest = _manifest("eccv2024", entries, {n: _sha256_bytes(b) for n, b in members.items()})
    with atomic_file(out) as tmp:
        # .pt files are themselves zip archives of raw float32: deflate gains little and costs seconds.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for name, blob in members.items():
                z.writestr(name, blob)
            z.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                       compress_type=zipfile.ZIP_DEFLATED)
        make_readable(tmp)
        report = check_submission(tmp, allow_partial=len(members) < len(ECCV2024))
        if not report.ok:
            raise PackageError(f"{out}: the written archive fails its check: {report.first_failure()}")
    return out


def saved_images(d: Distilled) -> Distilled:
    """The set as image files hold it: as generated, except D^3HR sets generated at 256 px, which are resized
    to 224 with PIL LANCZOS as the D^3HR reference saves them (:func:`ddkit.methods.d3hr.reference_save_resize`)."""
    import dataclasses

    from ddkit.methods import d3hr

    method = d.manifest.get("method") or d.gen_dir.name.removeprefix("gen-")
    if method != "d3hr" or tuple(d.images.shape[-2:]) != (256, 256):
        return d
    return dataclasses.replace(d, images=d3hr.reference_save_resize(d.images, d3hr.SAVE_SIZE))


def write_folder(d: Distilled, out: str | Path) -> Path:
    """Write ``out/<k:03d>_<class>/<i:04d>.png`` (uint8, as :func:`saved_images`) plus ``manifest.json``,
    atomically."""

    d = saved_images(d)
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        files: dict[str, str] = {}
        for k, cls in enumerate(d.classes):
            sub = tmp / f"{k:03d}_{_safe(cls)}"
            sub.mkdir()
            for i, img in enumerate(d.images[d.labels == k]):
                p = sub / f"{i:04d}.png"
                _to_pil(img).save(p)
                files[str(p.relative_to(tmp))] = sha256_file(p)
        _finish_written(d, "folder", tmp, files, out)
    return out


def write_webdataset(d: Distilled, out: str | Path) -> Path:
    """Write the set (as :func:`saved_images`) as WebDataset shards (``png`` + ``cls`` per sample),
    ``classes.json``, ``manifest.json``."""
    import webdataset as wds

    d = saved_images(d)
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        counters = [0] * len(d.classes)
        with wds.ShardWriter(str(tmp / "distilled-%06d.tar"), maxcount=10000, verbose=0) as sink:
            for img, lab in zip(d.images, d.labels.tolist(), strict=True):
                buf = io.BytesIO()
                _to_pil(img).save(buf, format="PNG")
                sink.write({"__key__": f"{lab:04d}_{counters[lab]:04d}", "png": buf.getvalue(), "cls": lab})
                counters[lab] += 1
        (tmp / "classes.json").write_text(json.dumps(d.classes) + "\n")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        _finish_written(d, "webdataset", tmp, files, out)
    return out


def _to_pil(img):
    """uint8 [C, H, W] tensor -> PIL image (L for one channel, RGB for three)."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _finish_written(d: Distilled, fmt: str, tmp: Path, files: dict[str, str], out: Path) -> None:
    """Write the manifest of a folder/webdataset output in ``tmp`` and check it before it is renamed."""
    entry = _entry(d, None, list(range(len(d.classes))))
    (tmp / MANIFEST).write_text(
        json.dumps(_manifest(fmt, {fmt: entry}, files), indent=2, sort_keys=True, default=str) + "\n"
    )
    report = check_submission(tmp)
    if not report.ok:
        raise PackageError(f"{out}: the written {fmt} output fails its check: {report.first_failure()}")


# ----------------------------------------------------------------------------------------------------------
# Generator bundle (generative track)
# ----------------------------------------------------------------------------------------------------------
GENERATE_SH = r"""#!/bin/sh
# Generative-track entry point: generate --dataset {cifar100,tinyimagenet} --out DIR --time-limit 600
# Runs ddkit.challenge inside the bundled Apptainer image; the bundle is bound read-only at /bundle.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=""
prev=""
for a in "$@"; do
  if [ "$prev" = "--out" ]; then OUT="$a"; fi
  case "$a" in --out=*) OUT="${a#--out=}" ;; esac
  prev="$a"
done
[ -n "$OUT" ] || { echo "generate: --out DIR is required" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
IMAGE="${DDKIT_IMAGE:-$HERE/ddkit.sif}"
command -v apptainer >/dev/null 2>&1 || { echo "generate: apptainer not found on PATH" >&2; exit 127; }
[ -f "$IMAGE" ] || { echo "generate: image $IMAGE not found (build it: ddkit container build)" >&2; exit 2; }
exec apptainer exec --nv --cleanenv --env HF_HUB_OFFLINE=1 --env DDKIT_BUNDLE=/bundle \
  --bind "$HERE:/bundle:ro" --bind "$OUT:$OUT" \
  "$IMAGE" python -m ddkit.challenge --bundle /bundle "$@"
"""


def package_generator(
    runs: list[str | Path],
    *,
    out: str | Path | None = None,
    dataset: str | None = None,
    method: str | None = None,
    image: str | Path | None = None,
) -> Path:
    """Write the generative-track bundle: entry point, per-dataset configs and weights, the image.

    Layout: ``generate`` (sh entry point, see :data:`GENERATE_SH`), ``configs/<dataset>.yaml`` (the run's
    resolved config with every weight path rewritten relative to the bundle), ``data/<dataset>/``
    (the shard index ``dataset.json`` + ``classes.json``: class names and ImageNet mapping, no images),
    ``weights/<dataset>/...`` (only what sampling reads, Hugging Face ids resolved to local files:
    the sampled backbone, the decoding VAE, the scheduler config and D^3HR's statistics; see
    :mod:`ddkit.bundle`), ``ddkit.sif`` (copied from ``image`` when given, otherwise built later with
    ``ddkit container build --out BUNDLE/ddkit.sif``), ``manifest.json``. The bundle is checked
    (:func:`ddkit.bundle.check_bundle`, the image aside) before it is renamed into place.

    Raises:
        PackageError: a run that is not a challenge dataset; weights, statistics or a shard index that
            cannot be found (an HF id missing from the local cache names the key and the id); a bundle
            that fails its check.
    """
    import yaml

    from ddkit.bundle import check_bundle, pack_weights

    sets = [load_distilled(r, method) for r in runs]
    out = Path(out) if out else sets[0].gen_dir.parent / "generator"
    with atomic_dir(out, overwrite=True) as tmp:
        entries: dict[str, Any] = {}
        for d in sets:
            spec = challenge_dataset(d, dataset)
            cfg = json.loads(json.dumps(d.config))  # deep copy
            run_method = d.manifest.get("method") or d.gen_dir.name.removeprefix("gen-")
            cfg.setdefault("generate", {})["method"] = run_method  # the bundle samples the way the run did
            sources = pack_weights(d, cfg, tmp, spec.name)
            # Generation takes the class list and the backbone class mapping from the shard index.
            index = _find_index(d)
            if index is None:
                raise PackageError(f"{d.gen_dir}: shard index (data.shards/dataset.json) not found; the generator "
                                   "needs its class list and ImageNet mapping")
            ddir = tmp / "data" / spec.name
            ddir.mkdir(parents=True)
            for name in ("dataset.json", "classes.json"):
                if (index / name).is_file():
                    shutil.copy2(index / name, ddir / name)
            cfg.setdefault("data", {})["shards"] = f"data/{spec.name}"
            cfg.setdefault("package", {})["dataset"] = spec.name
            (tmp / "configs").mkdir(exist_ok=True)
            (tmp / "configs" / f"{spec.name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            entries[spec.name] = {**sources, "method": d.manifest.get("method"), "generation": d.manifest}
        (tmp / "generate").write_text(GENERATE_SH)
        (tmp / "generate").chmod(0o755)
        if image is not None:
            if not Path(image).is_file():
                raise PackageError(f"{image}: image not found (ddkit container build first)")
            shutil.copy2(image, tmp / "ddkit.sif")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        man = _manifest("eccv2024-generator", entries, files)
        man["image"] = "ddkit.sif" if image is not None else None
        man["entry_point"] = "./generate --dataset {cifar100,tinyimagenet} --out DIR --time-limit 600"
        (tmp / MANIFEST).write_text(json.dumps(man, indent=2, sort_keys=True, default=str) + "\n")
        report = check_bundle(tmp, man, require_image=False)
        if not report.ok:
            raise PackageError(f"{out}: the written generator bundle fails its check: {report.first_failure()}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Checking
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """One line of ``ddkit package --check``."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"{'OK  ' if self.ok else 'FAIL'} {self.name}: {self.message}"


@dataclass
class CheckReport:
    """All verdicts for one submission; ``ok`` when none failed."""

    path: Path
    kind: str
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.verdicts) and all(v.ok for v in self.verdicts)

    def first_failure(self) -> str:
        bad = [v for v in self.verdicts if not v.ok]
        return f"{bad[0].name}: {bad[0].message}" if bad else ""

    def lines(self) -> list[str]:
        return [v.line() for v in self.verdicts]


def check_submission(path: str | Path, *, allow_partial: bool = False, tolerance: float = 0.02) -> CheckReport:
    """Validate a submission against the scorer's rules; one :class:`Verdict` per file.

    Accepts an ``eccv2024`` zip or the unpacked directory (``cifar100.pt`` / ``tinyimagenet.pt`` at its
    root), a single scorer ``.pt`` file, a ``folder`` directory or a ``webdataset`` directory (told apart by their ``manifest.json``).

    For each scorer file: present at the archive root; loads with ``torch.load(weights_only=True)``; a bare
    tensor (not a dict); float32; shape ``[classes x 10, 3, H, W]`` (a first dimension not divisible by the
    class count means unequal IPC); no NaN/Inf; de-normalised values ``x * std + mean`` within ``[0, 1]``
    +/- ``tolerance``; some negative values and a wide de-normalised span (an un-normalised
    ``[0, 1]`` or ``[-1, 1]`` tensor passes the range test but not these: span >= 0.75); sha256 equal to the manifest's.

    Args:
        allow_partial: accept an archive with only one of the two datasets (the scorer would fail on the
            other; ``ddkit package`` of a single run writes such an archive).
        tolerance: slack on the de-normalised range, in [0, 1] pixel units.

    Raises:
        PackageError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise PackageError(f"{path}: not found")
    if path.is_file() and path.suffix == ".pt":
        spec = ECCV2024.get(path.stem)
        if spec is None:
            return CheckReport(path, "eccv2024", [Verdict(path.name, False, "the scorer loads only "
                                                          "cifar100.pt and tinyimagenet.pt")])
        return CheckReport(path, "eccv2024", [_check_tensor(spec, path.read_bytes(), {}, tolerance)])
    if path.is_dir():
        man = _read_optional_json(path / MANIFEST)
        if man.get("format") in ("folder", "webdataset"):
            return _check_folder(path, man) if man["format"] == "folder" else _check_wds(path, man)
        if man.get("format") == "eccv2024-generator":
            from ddkit.bundle import check_bundle

            return check_bundle(path, man)
        blobs = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and p.suffix in (".pt", ".json")}
        nested = [str(p.relative_to(path)) for p in path.rglob("*.pt") if p.parent != path]
    else:
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if not n.endswith("/")]
                blobs = {n: z.read(n) for n in names if "/" not in n}
                nested = [n for n in names if "/" in n]
        except zipfile.BadZipFile:
            return CheckReport(path, "eccv2024", [Verdict(path.name, False, "not a zip archive")])
    report = CheckReport(path, "eccv2024")
    wanted = {s.filename for s in ECCV2024.values()}
    # A scorer file only below a folder is the classic zip-the-folder mistake; other nested files are ignored.
    misplaced = [n for n in nested if Path(n).name in wanted and Path(n).name not in blobs]
    if misplaced:
        report.verdicts.append(Verdict("archive", False, f"{misplaced[0]} is inside a folder: the scorer reads "
                                       "cifar100.pt and tinyimagenet.pt at the archive root"))
    man = json.loads(blobs[MANIFEST]) if MANIFEST in blobs else {}
    present = [s for s in ECCV2024.values() if s.filename in blobs]
    for spec in ECCV2024.values():
        if spec.filename not in blobs:
            if allow_partial and present:
                report.verdicts.append(Verdict(spec.filename, True, "absent (partial submission: the scorer "
                                               "also loads this file)"))
            else:
                report.verdicts.append(Verdict(spec.filename, False, "missing: the scorer loads it"))
            continue
        report.verdicts.append(_check_tensor(spec, blobs[spec.filename], man, tolerance))
    for n in sorted(blobs):
        if n.endswith(".pt") and n not in {s.filename for s in ECCV2024.values()}:
            report.verdicts.append(Verdict(n, True, "ignored by the scorer"))
    return report


def _check_tensor(spec: ScorerSpec, blob: bytes, man: dict[str, Any], tol: float) -> Verdict:
    import torch

    name = spec.filename
    try:
        data = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        return Verdict(name, False, f"torch.load fails ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    if not torch.is_tensor(data):
        what = f"a dict with keys {sorted(map(str, data))[:4]}" if isinstance(data, dict) else type(data).__name__
        return Verdict(name, False, f"{what}: the scorer needs a bare tensor (torch.save(tensor, path))")
    if data.dtype != torch.float32:
        return Verdict(name, False, f"dtype {str(data.dtype).removeprefix('torch.')}, expected float32")
    shape = tuple(data.shape)
    if len(shape) != 4 or shape[1:] != spec.shape[1:]:
        return Verdict(name, False, f"shape {list(shape)}, expected {list(spec.shape)}")
    n, k = shape[0], spec.num_classes
    if n % k:
        return Verdict(name, False, f"unequal IPC: {n} images are not a multiple of {k} classes")
    if n != k * IPC:
        return Verdict(name, False, f"IPC {n // k}: the scorer asserts exactly {IPC} per class ({list(spec.shape)})")
    counts = ((man.get("datasets") or {}).get(name) or {}).get("class_counts")
    if counts and len(set(counts)) != 1:
        return Verdict(name, False, f"unequal IPC in the manifest's class_counts (min {min(counts)}, max {max(counts)})")
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        return Verdict(name, False, f"{bad} NaN/Inf values")
    m = torch.tensor(spec.mean).view(1, 3, 1, 1)
    s = torch.tensor(spec.std).view(1, 3, 1, 1)
    den = data * s + m
    lo, hi = float(den.min()), float(den.max())
    if lo < -tol or hi > 1 + tol:
        return Verdict(name, False, f"de-normalised values span [{lo:.3f}, {hi:.3f}], outside [0, 1] +/- {tol}: "
                       f"not normalised with mean {spec.mean} std {spec.std}")
    if float(data.min()) >= 0:
        return Verdict(name, False, "no negative values: looks un-normalised (the scorer expects (x - mean) / std)")
    # A real photo set spans nearly all of [0, 1]; [-1, 1] pixels de-normalise to about [0.24, 0.77].
    if hi - lo < 0.75:
        return Verdict(name, False, f"de-normalised values span only [{lo:.3f}, {hi:.3f}]: pixels in [-1, 1] or "
                       "[0, 1] rather than normalised?")
    want = (man.get("files") or {}).get(name)
    if want and want != _sha256_bytes(blob):
        return Verdict(name, False, "sha256 differs from manifest.json")
    return Verdict(name, True, f"float32 {list(shape)}, {k} classes x IPC {IPC}, de-normalised range "
                   f"[{lo:.3f}, {hi:.3f}]")


def _check_folder(path: Path, man: dict[str, Any]) -> CheckReport:
    from PIL import Image

    report = CheckReport(path, "folder")
    counts: dict[str, int] = {}
    sizes: set[tuple[int, int, str]] = set()
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        pngs = sorted(sub.glob("*.png"))
        counts[sub.name] = len(pngs)
        for p in pngs:
            try:
                with Image.open(p) as im:
                    im.load()
                    sizes.add((*im.size, im.mode))
            except Exception as e:  # noqa: BLE001
                report.verdicts.append(Verdict(str(p.relative_to(path)), False, f"unreadable PNG ({e})"))
    report.verdicts.append(_counts_verdict("classes", counts, man))
    report.verdicts.append(Verdict("images", len(sizes) == 1, f"sizes/modes {sorted(sizes)}"))
    report.verdicts.append(_hash_verdict(path, man))
    return report


def _check_wds(path: Path, man: dict[str, Any]) -> CheckReport:
    import tarfile

    report = CheckReport(path, "webdataset")
    classes = _read_optional_json(path / "classes.json") or []
    counts = {c: 0 for c in classes} if isinstance(classes, list) else {}
    for tar in sorted(path.glob("*.tar")):
        try:
            with tarfile.open(tar) as t:
                for m in t.getmembers():
                    if m.name.endswith(".cls"):
                        k = int(t.extractfile(m).read().decode().strip())
                        key = classes[k] if 0 <= k < len(classes) else str(k)
                        counts[key] = counts.get(key, 0) + 1
        except (tarfile.TarError, ValueError) as e:
            report.verdicts.append(Verdict(tar.name, False, f"unreadable shard ({e})"))
    report.verdicts.append(_counts_verdict("classes", counts, man))
    report.verdicts.append(_hash_verdict(path, man))
    return report


def _counts_verdict(name: str, counts: dict[str, int], man: dict[str, Any]) -> Verdict:
    vals = set(counts.values())
    if not counts or 0 in vals:
        empty = [c for c, n in counts.items() if n == 0]
        return Verdict(name, False, f"no images for class {empty[0]!r}" if empty else "no classes found")
    if len(vals) != 1:
        lo = min(counts, key=counts.get)
        hi = max(counts, key=counts.get)
        return Verdict(name, False, f"unequal IPC: {lo!r} has {counts[lo]}, {hi!r} has {counts[hi]}")
    return Verdict(name, True, f"{len(counts)} classes x IPC {vals.pop()}")


def _hash_verdict(path: Path, man: dict[str, Any]) -> Verdict:
    files = man.get("files") or {}
    for rel, want in files.items():
        p = path / rel
        if not p.is_file():
            return Verdict("sha256", False, f"{rel} listed in manifest.json is missing")
        if sha256_file(p) != want:
            return Verdict("sha256", False, f"{rel} differs from manifest.json")
    return Verdict("sha256", bool(files), f"{len(files)} files match manifest.json" if files else "no manifest")


# ----------------------------------------------------------------------------------------------------------
def _entry(d: Distilled, spec: ScorerSpec | None, perm: list[int]) -> dict[str, Any]:
    gm = d.manifest
    classes = [d.classes[i] for i in perm]
    ipc = IPC if spec else d.ipc
    e: dict[str, Any] = {
        "source": str(d.gen_dir / "dataset.pt"),
        "source_sha256": d.sha256,
        "source_ipc": d.ipc,
        "ipc": ipc,
        "class_order": classes,
        "class_counts": [ipc] * len(classes),
        # the generation manifest's steps, without its per-image list (kept under generation_manifest)
        "steps": ({k: v for k, v in gm["steps"].items() if k != "per_image"} if isinstance(gm.get("steps"), dict)
                  else gm.get("steps")),
        "method": gm.get("method") or d.gen_dir.name.removeprefix("gen-"),
        "budget": {k: v for k, v in gm.items() if "budget" in k or "time" in k or "wall" in k},
        "generation_hardware": gm.get("hardware"),
        "config": d.config,
        "generation_manifest": gm,
    }
    if spec is not None:
        e.update(dataset=spec.name, shape=list(spec.shape), dtype="float32", size=spec.size,
                 normalization={"mean": list(spec.mean), "std": list(spec.std),
                                "transform": "(uint8 / 255 - mean) / std, per channel"},
                 resized_from=list(d.images.shape[-2:]) if d.images.shape[-1] != spec.size else None)
    else:
        e.update(dataset=d.dataset, shape=list(d.images.shape[1:]), dtype="uint8", normalization=None)
    return e


def _manifest(fmt: str, entries: dict[str, Any], files: dict[str, str]) -> dict[str, Any]:
    return {
        "ddkit_version": __version__,
        "format": fmt,
        "created_unix": time.time(),
        "datasets": entries,
        "files": files,
        "packaging_hardware": hardware_info(),
        "scorer": "DataDistillation/ECCV2024-Dataset-Distillation-Challenge evaluate.py" if fmt.startswith(
            "eccv2024") else None,
    }


def _find_index(d: Distilled) -> Path | None:
    """The run's shard directory holding ``dataset.json`` (``data.shards``, absolute or run-relative)."""
    return next((b for b in _index_candidates(d) if (b / "dataset.json").is_file()), None)


def _index_candidates(d: Distilled) -> list[Path]:
    shards = (d.config.get("data") or {}).get("shards")
    return [Path(shards).absolute(), (d.gen_dir.parent / shards).absolute()] if shards else []


def _index_class_ids(d: Distilled) -> list[str] | None:
    base = _find_index(d)
    if base is None:
        return None
    ids = read_json(base / "dataset.json").get("class_ids")
    return [str(c) for c in ids] if ids else None


def make_readable(p: Path) -> None:
    """mkstemp files are 0600; a submission is read by other users (organisers, a scorer account)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    p.chmod(0o644 & ~umask)


def _read_optional_json(p: Path) -> Any:
    return read_json(p) if p.is_file() else {}


def _sha256_bytes(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"


def _describe(x: Any) -> str:
    import torch

    if torch.is_tensor(x):
        return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    return type(x).__name__


__all__ = [
    "CIFAR100_CLASSES", "ECCV2024", "FORMATS", "IPC", "CheckReport", "Distilled", "ScorerSpec", "Verdict",
    "canonical_order", "check_submission", "check_tensor_file", "make_readable", "scorer_tensor", "load_distilled", "normalize", "package_generator", "package_run",
    "resize_uint8", "resolve_gen_dir", "to_scorer_tensor", "write_eccv2024", "write_folder", "write_webdataset",
    "saved_images", "official_scores", "write_official_scores", "combine_scores", "SCORES_FILE",
]
