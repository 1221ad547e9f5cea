"""The ``eccv2024`` format: ``submission.zip`` = ``cifar100.pt`` and/or ``tinyimagenet.pt`` + ``manifest.json``.

Only the two challenge datasets can be packaged in this format: any other dataset (the MNIST demo) is
refused with one line pointing at ``--format folder`` / ``webdataset``, which work for every dataset. A
scorer-shaped file for MNIST would carry constants the scorer has never heard of, so it is not written.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from ddkit.distilled import Distilled
from ddkit.errors import PackageError
from ddkit.io import atomic_file, make_readable
from ddkit.package.checks import check_submission
from ddkit.package.manifest import (
    MANIFEST,
    _entry,
    _index_candidates,
    _index_class_ids,
    _manifest,
    _sha256_bytes,
)
from ddkit.package.scorer import ECCV2024, IPC, ScorerSpec, canonical_order, to_scorer_tensor


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


__all__ = ["challenge_dataset", "scorer_tensor", "write_eccv2024"]
