"""The ECCV 2024 DD Challenge scorer's rules: what it loads, how it normalises, how it scores.

The challenge scorer (DataDistillation/ECCV2024-Dataset-Distillation-Challenge, ``evaluate.py``) does, for
each of ``cifar100`` and ``tinyimagenet`` in turn::

    data = torch.load(os.path.join(submit_dir, f"{name}.pt"))       # a bare tensor, nothing else
    assert data.shape == (10 * num_classes, 3, H, W)                  # IPC 10 is hard-coded
    labels = [i for i in range(num_classes) for _ in range(10)]       # labels implied, class-major

and trains ConvNet-3 on ``data`` without normalising it, testing on data normalised with the dataset's
constants (:data:`ECCV2024`; the values are :mod:`ddkit.data.registry`'s). So a submission is a flat archive
holding ``cifar100.pt`` and ``tinyimagenet.pt``: float32 tensors ``[classes x 10, 3, H, W]``, class-major,
already normalised. The scorer reads both files unconditionally; a one-dataset archive is therefore flagged
as partial.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ddkit.data.registry import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD
from ddkit.errors import PackageError
from ddkit.io import atomic_write_text, read_json

IPC = 10  # the scorer's hard-coded images per class (evaluate.py: assert data.shape[0] == 10 * num_classes)

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
    "cifar100": ScorerSpec("cifar100", 100, 32, CIFAR100_MEAN, CIFAR100_STD),
    "tinyimagenet": ScorerSpec("tinyimagenet", 200, 64, IMAGENET_MEAN, IMAGENET_STD),
}


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


__all__ = [
    "CIFAR100_CLASSES", "ECCV2024", "IPC", "SCORES_FILE", "ScorerSpec", "canonical_order", "combine_scores",
    "normalize", "official_scores", "resize_uint8", "to_scorer_tensor", "write_official_scores",
]  # fmt: skip
