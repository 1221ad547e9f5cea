"""What a checkpoint or quality table was made on, and the check that it is used on the same classes.

A DiT conditions each class on a backbone label; a checkpoint fine-tuned on MNIST has learnt "label 3 is
the digit 3". Used on Fashion-MNIST it samples digits labelled as clothes, and a quality table measured on
MNIST quotes MNIST's accuracies for the other dataset (issue 23). So every checkpoint ddkit writes
(``made_on`` in a training checkpoint, :mod:`ddkit.models.checkpoint`; in ``ddkit.json`` beside a shipped
diffusers folder, :mod:`ddkit.assets`) and every quality table (``made_on`` in the YAML that
``bench/quality.py`` writes) records the shard set it was made on: :func:`record`. :func:`check_classes`
stops a run that would use one on other classes unless ``model.class_map`` says explicitly how the classes
map (:mod:`ddkit.data.classmap`). Weights without a record (``facebook/DiT-XL-2-256``, an original-DiT
``.pt``, a checkpoint of an older ddkit) pass: the class map alone decides, as before.

The record: ``{"dataset": data.dataset, "classes": [names], "class_ids": [ids], "labels": [backbone label
per class]}`` (``labels`` only for checkpoints: the label each class was conditioned on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError, WeightsError

#: The file beside a diffusers DiT folder's ``config.json`` whose ``made_on`` key is its record.
FOLDER_RECORD = "ddkit.json"


def record(index: dict[str, Any], labels: Sequence[int] | None = None) -> dict[str, Any]:
    """The ``made_on`` record of something made on the shard set whose ``dataset.json`` is ``index``.

    Args:
        index: :func:`ddkit.data.read_index`'s dict (``dataset``, ``classes``, optional ``class_ids``).
        labels: the backbone label each dataset class was conditioned on (a checkpoint), or None (a table).
    """
    classes = [str(c) for c in index["classes"]]
    rec: dict[str, Any] = {
        "dataset": str(index.get("dataset")),
        "classes": classes,
        "class_ids": [str(c) for c in (index.get("class_ids") or classes)],
    }
    if labels is not None:
        rec["labels"] = [int(y) for y in labels]
    return rec


def folder_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``made_on`` record in ``folder/ddkit.json``, or None when there is no such file or key.

    Raises:
        WeightsError: the file is not a JSON object or ``made_on`` has no ``classes`` list (names the file).
    """
    path = Path(folder) / FOLDER_RECORD
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable record ({type(e).__name__}: {e})") from None
    made_on = meta.get("made_on") if isinstance(meta, dict) else None
    if made_on is not None:
        check_record(made_on, str(path))
    return made_on


def check_record(made_on: Any, where: str, error: type[Exception] = WeightsError) -> None:
    """Raise ``error`` (one line naming ``where``) unless ``made_on`` is a record (module docstring): a
    mapping with a ``classes`` list, and ``labels`` / ``class_ids`` lists of the same length if present."""
    ok = isinstance(made_on, dict) and isinstance(made_on.get("classes"), list)
    n = len(made_on["classes"]) if ok else 0
    for key in ("labels", "class_ids"):
        ok = ok and (made_on.get(key) is None or (isinstance(made_on[key], list) and len(made_on[key]) == n))
    if not ok:
        got = repr(made_on)
        got = got if len(got) <= 80 else got[:80] + "…"
        raise error(f"{where}: 'made_on' must be {{dataset, classes[, class_ids, labels]}}, got {got}")


def check_classes(
    made_on: dict[str, Any] | None,
    index: dict[str, Any],
    class_map: str,
    *,
    labels: Sequence[int] | None = None,
    what: str = "checkpoint",
    where: str = "",
) -> None:
    """Check that weights or a table made on ``made_on`` may be used on the shard set ``index``. Pure.

    Passes when: ``made_on`` is None (no record: :mod:`ddkit.data.classmap` alone decides, as for the
    ImageNet DiT on ImageNet subsets); ``class_map`` is not ``"auto"`` (the user mapped the classes
    explicitly); the class names are the same, in the same order; or, given the ``labels`` this run
    conditions each class on and a record with ``labels``, no label means another class in the record than
    here (by name or class id: an ImageNet subset on a checkpoint fine-tuned on other ImageNet classes; a
    label the record does not cover keeps its pretrained meaning).

    Args:
        made_on: the record (module docstring) or None.
        index: this run's ``dataset.json`` (:func:`ddkit.data.read_index`).
        class_map: ``model.class_map``.
        labels: the backbone label of each of ``index``'s classes in this run
            (:func:`ddkit.data.classmap.backbone_labels`), or None (a quality table: names must match).
        what, where: the thing checked and its path, for the message.

    Raises:
        ConfigError: one line naming both datasets (with their first classes) and ``model.class_map``.
    """
    if made_on is None or class_map != "auto":
        return
    classes = [str(c) for c in index["classes"]]
    if [str(c) for c in made_on["classes"]] == classes:
        return
    if labels is not None and "labels" in made_on and _same_meaning(made_on, index, labels):
        return
    at = f"{where}: " if where else ""
    raise ConfigError(
        f"{at}{what} made on {_describe(made_on)}, the data is {_describe(index)}: set model.class_map "
        "(identity, imagenet or a JSON file) to use it on other classes"
    )


def _same_meaning(made_on: dict[str, Any], index: dict[str, Any], labels: Sequence[int]) -> bool:
    names, ids = made_on["classes"], made_on.get("class_ids") or made_on["classes"]
    meaning = {int(y): (str(n), str(i)) for y, n, i in zip(made_on["labels"], names, ids, strict=False)}
    classes = index["classes"]
    cids = index.get("class_ids") or classes
    for y, name, cid in zip(labels, classes, cids, strict=True):
        m = meaning.get(int(y))
        # A label the record does not cover keeps what the weights it was fine-tuned from meant (a DiT-XL/2
        # fine-tuned on 10 ImageNet classes still samples the other 990): only a conflict refuses.
        if m is not None and str(name) != m[0] and str(cid) != m[1]:
            return False
    return True


def _describe(rec: dict[str, Any]) -> str:
    classes = [str(c) for c in rec["classes"]]
    head = ", ".join(classes[:3]) + (", …" if len(classes) > 3 else "")
    return f"{rec.get('dataset')} ({len(classes)} classes: {head})"
