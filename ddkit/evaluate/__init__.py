"""Evaluation of distilled sets: networks, protocols, augmentation, training loops and the report.

- :func:`evaluate` (``ddkit evaluate``): train students on distilled sets and on the ``random_real`` /
  ``full`` baselines with the same seeds; write ``results.json`` and ``table.md``; print a rich table.
- :mod:`ddkit.evaluate.networks`: ``build(name, channels, num_classes, resolution)`` — ConvNet-D,
  ResNetAP-10, ResNet-18 (timm).
- :mod:`ddkit.evaluate.protocols`: the ``eccv2024``, ``idc`` and ``rded`` presets (:data:`PROTOCOLS`).
- :mod:`ddkit.evaluate.augment`: DSA, IDC transforms, CutMix.
- :mod:`ddkit.evaluate.trainer`: ``train_student`` (one loop per protocol over shared epoch / step / test
  parts) / ``train_teacher`` / ``test_accuracy``.
- :mod:`ddkit.evaluate.runner`: :func:`evaluate` itself (set-up, loading the distilled sets, the baselines).
- :mod:`ddkit.evaluate.runs`: every set's repeats, cached in ``runs.jsonl``, the missing ones trained under one
  progress bar (batched in groups or one by one); the ``random_real`` draw; ``TrainSet``.
- :mod:`ddkit.evaluate.batched`: ``train_students`` — K students as one ``vmap``-ped model, each with its own
  seed, data order, augmentation draws and data (``evaluate.batched``).
- :mod:`ddkit.evaluate.teacher`: the rded teacher, trained once per real set and cached.
- :mod:`ddkit.evaluate.results`: per-set summaries, DD-Ranking, the scorer's printout, ``results.json`` and
  the tables.
"""

from ddkit.evaluate.protocols import PROTOCOLS, get_protocol
from ddkit.evaluate.runner import evaluate, load_distilled, random_real_subset

__all__ = ["PROTOCOLS", "evaluate", "get_protocol", "load_distilled", "random_real_subset"]
