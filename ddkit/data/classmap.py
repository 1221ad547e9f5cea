"""Which backbone class each dataset class is conditioned on (``model.class_map``): one rule for training,
generation and D^3HR, so a class is fine-tuned, inverted and sampled under the same label.

An ImageNet-pretrained DiT (``facebook/DiT-XL-2-256``) knows the 1,000 ImageNet-1k classes. An ImageNet
subset (Imagewoof, Imagenette, Tiny-ImageNet, an ImageFolder of wnids) maps each class to its own ImageNet
index (``imagenet_index`` in ``dataset.json``, as MinimaxDiffusion and D^3HR do). A dataset that is not an
ImageNet subset, CIFAR-100 above all, has no such index: with ``class_map: identity`` its class ``k`` is
conditioned on ImageNet class ``k`` (CIFAR-100's apple on tench, aquarium_fish on goldfish, ...), which
is what the challenge configs choose explicitly; fine-tuning then re-purposes those 100 labels. A file can
name other labels.

``model.class_map`` values:

* ``auto`` (default): ``imagenet`` when the dataset has an ``imagenet_index`` and the backbone's class count
  differs from the dataset's; ``identity`` when the counts are equal; otherwise an error asking for a choice;
* ``imagenet``: the dataset's ``imagenet_index`` (an error when it has none);
* ``identity``: dataset class ``k`` -> backbone class ``k``;
* a path to a JSON file: a list of backbone indices in dataset class order, or a mapping from class name or
  class id (wnid) to backbone index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError

MODES = ("auto", "imagenet", "identity")


def backbone_labels(index: dict[str, Any], num_backbone_classes: int, class_map: str = "auto") -> list[int]:
    """The backbone class index of every dataset class, in dataset class order.

    Args:
        index: the shard index (``dataset.json``): ``classes``, optional ``class_ids`` and ``imagenet_index``.
        num_backbone_classes: the backbone's ``num_classes`` (1000 for ImageNet DiTs).
        class_map: ``model.class_map`` (see module docstring).

    Returns:
        ``list[int]`` of length ``len(index["classes"])``, each in ``[0, num_backbone_classes)``.

    Raises:
        ConfigError: one line naming ``model.class_map``: no ``imagenet_index`` for ``imagenet``, an unusable
            file, a label out of range, or ``auto`` with more backbone classes than dataset classes and no
            ImageNet index (the CIFAR-100 case: pick ``identity`` or a file).
    """
    classes = list(index["classes"])
    k, n = len(classes), num_backbone_classes
    mapping = index.get("imagenet_index")
    if class_map == "auto":
        if mapping and n != k:
            class_map = "imagenet"
        elif n == k:
            class_map = "identity"
        else:
            raise ConfigError(
                f"model.class_map: the dataset has {k} classes and no ImageNet index, the backbone {n}; choose "
                "'identity' (class k -> backbone class k, e.g. CIFAR-100 on ImageNet classes 0-99) or a JSON file"
            )
    if class_map == "imagenet":
        if not mapping:
            raise ConfigError("model.class_map: 'imagenet' but dataset.json has no imagenet_index (not an ImageNet subset)")
        labels = [int(m) for m in mapping]
    elif class_map == "identity":
        labels = list(range(k))
    else:
        labels = _from_file(Path(class_map), classes, list(index.get("class_ids") or classes))
    bad = [(c, y) for c, y in zip(classes, labels, strict=True) if not 0 <= y < n]
    if bad:
        raise ConfigError(
            f"model.class_map: {class_map}: class {bad[0][0]!r} maps to {bad[0][1]}, outside the backbone's {n} classes"
        )
    return labels


def _from_file(path: Path, classes: list[str], ids: list[str]) -> list[int]:
    if not path.is_file():
        raise ConfigError(f"model.class_map: {path}: not 'auto', 'imagenet', 'identity' or an existing JSON file")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.class_map: {path}: not readable JSON ({e})") from None
    if isinstance(obj, list):
        if len(obj) != len(classes) or not all(isinstance(v, int) for v in obj):
            raise ConfigError(f"model.class_map: {path}: expected {len(classes)} integers, one per dataset class")
        return list(obj)
    if isinstance(obj, dict):
        missing = [c for c, i in zip(classes, ids, strict=True) if c not in obj and i not in obj]
        if missing:
            raise ConfigError(f"model.class_map: {path}: no entry for class {missing[0]!r} ({len(missing)} missing)")
        return [int(obj[c] if c in obj else obj[i]) for c, i in zip(classes, ids, strict=True)]
    raise ConfigError(f"model.class_map: {path}: expected a JSON list or object, got {type(obj).__name__}")
