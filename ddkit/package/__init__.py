"""Submission packages: the ECCV 2024 DD Challenge archive, plain folders, WebDataset shards, and checks.

A package is made from a generated run's ``dataset.pt`` (read by :func:`ddkit.distilled.load_distilled`).
Layouts written here, one module each:

- ``eccv2024`` (:mod:`.eccv2024`, over the scorer's rules in :mod:`.scorer`): ``submission.zip`` =
  ``cifar100.pt`` and/or ``tinyimagenet.pt`` + ``manifest.json``;
- ``folder`` (:mod:`.writers`): ``DIR/<k:03d>_<class>/<i:04d>.png`` + ``DIR/manifest.json``;
- ``webdataset`` (:mod:`.writers`): ``DIR/distilled-000000.tar`` (keys ``<k:04d>_<i:04d>``, fields ``png``
  and ``cls``) + ``DIR/classes.json`` + ``DIR/manifest.json``;
- ``eccv2024-generator`` (:mod:`.bundle`): see :func:`package_generator` (image, weights, entry point).

:func:`package_run` (:mod:`.run`) picks the format; :mod:`.manifest` writes every format's
``manifest.json``; :mod:`.checks` holds ``ddkit package --check``.
"""

from __future__ import annotations

from ddkit.distilled import Distilled, load_distilled, resolve_gen_dir
from ddkit.io import make_readable
from ddkit.package.bundle import GENERATE_SH, package_generator
from ddkit.package.checks import CheckReport, Verdict, check_submission, check_tensor_file
from ddkit.package.eccv2024 import challenge_dataset, scorer_tensor, write_eccv2024
from ddkit.package.manifest import MANIFEST
from ddkit.package.run import FORMATS, package_run
from ddkit.package.scorer import (
    CIFAR100_CLASSES,
    ECCV2024,
    IPC,
    SCORES_FILE,
    ScorerSpec,
    canonical_order,
    combine_scores,
    normalize,
    official_scores,
    resize_uint8,
    to_scorer_tensor,
    write_official_scores,
)
from ddkit.package.writers import saved_images, write_folder, write_webdataset

__all__ = [
    "CIFAR100_CLASSES", "ECCV2024", "FORMATS", "GENERATE_SH", "IPC", "MANIFEST", "CheckReport", "Distilled",
    "ScorerSpec", "Verdict", "canonical_order", "challenge_dataset", "check_submission", "check_tensor_file",
    "make_readable", "scorer_tensor", "load_distilled", "normalize", "package_generator", "package_run",
    "resize_uint8", "resolve_gen_dir", "to_scorer_tensor", "write_eccv2024", "write_folder", "write_webdataset",
    "saved_images", "official_scores", "write_official_scores", "combine_scores", "SCORES_FILE",
]  # fmt: skip
