"""Generative-track entry point: ``generate --dataset {cifar100,tinyimagenet} --out DIR --time-limit 600``.

The organisers run the bundle's ``generate`` script (:data:`ddkit.package.GENERATE_SH`), which runs
``python -m ddkit.challenge --bundle /bundle ...`` inside the Apptainer image. This module reads the bundle's
``configs/<dataset>.yaml`` (weight paths relative to the bundle), generates with
:func:`ddkit.generate.generate` under the time limit (measured from this process's start, model loading
included, minus the time writing the file will take, measured first in DIR: :func:`write_reserve`), and
writes ``DIR/<dataset>.pt`` in the scorer's format (:func:`ddkit.package.scorer_tensor`), checked before
it lands.

Exit status: 0 written and checked; 1 the written file fails its check; 2 any ddkit error (one line).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import time
from pathlib import Path

from ddkit import dist
from ddkit.config import ExperimentConfig, from_dict, load_config, to_dict
from ddkit.errors import DdkitError, PackageError
from ddkit.generate import generate
from ddkit.io import atomic_file
from ddkit.writecost import measure

# The budget clock starts when Python has imported this module, the earliest point ddkit controls.
# CLOCK_MONOTONIC on Linux, the same clock as time.perf_counter.
_T0 = time.monotonic()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, choices=("cifar100", "tinyimagenet"))
    p.add_argument("--out", required=True, type=Path, help="directory that receives <dataset>.pt")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds, model loading included")
    p.add_argument("--bundle", type=Path, default=Path(os.environ.get("DDKIT_BUNDLE", ".")),
                   help="generator bundle (configs/, weights/); default $DDKIT_BUNDLE or .")
    p.add_argument("--config", type=Path, default=None, help="config instead of BUNDLE/configs/<dataset>.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    p.add_argument("--keep-work", action="store_true", help="keep OUT/.ddkit-<dataset> (the generation run)")
    return p.parse_args(argv)


def write_reserve(spec, out: Path) -> float:
    """Seconds needed after generation, measured now in ``out`` with the real writers
    (:func:`ddkit.writecost.measure`): reading ``dataset.pt`` (uint8), then writing and reading back the
    scorer's float32 tensor (``spec.shape``: CIFAR-100 12 MB, Tiny-ImageNet 98 MB)."""

    f32 = 4 * math.prod(spec.shape)
    return measure(out, f32).seconds(tensor_bytes=(f32 // 4, f32, f32))


def challenge_config(args: argparse.Namespace, work: Path, reserve: float = 0.0):
    """The experiment config for one challenge run.

    Weight, statistics and shard-index paths in the bundle config are relative to the bundle; the run dir is ``work``; the time limit
    is ``--time-limit`` minus ``reserve`` (seconds, :func:`write_reserve`); IPC is pinned to the scorer's 10.

    Raises:
        ConfigError: the config is missing or invalid.
    """
    from ddkit.package import IPC
    from ddkit.package.contents import BUNDLE_PATHS

    path = args.config or args.bundle / "configs" / f"{args.dataset}.yaml"
    d = to_dict(load_config(path, tuple(args.sets)))
    for dotted in BUNDLE_PATHS:  # weights, statistics, modes, shard index, quality table
        *parents, leaf = dotted.split(".")
        sec = functools.reduce(dict.__getitem__, parents, d)
        val = sec.get(leaf)
        if val and not Path(val).is_absolute() and (args.bundle / val).exists():
            sec[leaf] = str((args.bundle / val).resolve())
    d["run_dir"] = str(work)
    d["generate"].update(time_limit=max(1.0, args.time_limit - reserve), ipc_min=IPC, ipc_max=IPC)
    return from_dict(ExperimentConfig, d, str(path))


def budget_start() -> float:
    """``time.monotonic()`` at which the budget started (:func:`ddkit.dist.budget_start`): ``DDKIT_T0`` if
    set, else the process start (interpreter start-up counts), at the latest this module's import time."""

    return dist.budget_start(min(_T0, dist.process_start_monotonic()))


def run(args: argparse.Namespace, t0: float | None = None) -> Path:
    """Generate and write ``OUT/<dataset>.pt``; return its path. ``t0``: the budget's start on
    ``time.monotonic()`` (default :func:`budget_start`, the process start).

    Raises:
        DdkitError: generation or packaging failed (budget, weights, wrong classes...).
        PackageError: the written tensor fails the scorer check.
    """
    import torch

    from ddkit.package import ECCV2024, check_tensor_file, load_distilled, make_readable, scorer_tensor

    spec = ECCV2024[args.dataset]
    out = args.out.resolve()
    work = out / f".ddkit-{args.dataset}"
    cfg = challenge_config(args, work, reserve=write_reserve(spec, out))
    t0 = budget_start() if t0 is None else t0
    gen_dir = generate(cfg, time_limit=cfg.generate.time_limit, t0=t0, progress=False)
    d = load_distilled(gen_dir)
    tensor, _ = scorer_tensor(d, spec)
    target = out / spec.filename
    with atomic_file(target) as tmp:
        torch.save(tensor, tmp)
        make_readable(tmp)
        verdict = check_tensor_file(tmp, spec)
        if not verdict.ok:
            raise PackageError(f"{target}: {verdict.message}")
    if not getattr(args, "keep_work", False):
        # OUT should hold only what the scorer reads.
        shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """Console entry point; see the module docstring for exit codes. As the process's own entry point
    (``argv`` None) the budget starts at the process start; called with ``argv`` from a running program
    (tests, a driver) it starts now."""

    t0 = None if argv is None else time.monotonic()
    args = parse_args(argv)
    try:
        target = run(args, t0=t0)
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except DdkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {target} in {time.monotonic() - _T0:.1f} s (limit {args.time_limit:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
