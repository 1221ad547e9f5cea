"""How every stage grows with the class count: wall time and peak RSS at 10, 100 and 1,000 classes.

A tiny latent stand-in (``ddkit.models.tiny``'s pipeline at ``--latent`` x ``--latent`` latents, random
weights; images 8x larger) over synthetic ``imagefolder`` data with ``--train-per-class`` /
``--test-per-class`` random PNGs per class. For each class count every stage runs in its own process, so
its peak RSS is its own (VmHWM, reset after imports and setup; ``+MB`` is that peak minus the RSS
before the stage: what the stage itself added):

- ``shard``: ``ddkit.data.shard_dataset`` of the folder;
- ``minimax``: ``--train-steps`` minimax fine-tuning steps (DiffFit, memory 64 per class) with labels from
  all K classes, so the per-class memories grow with K (``bench/scale_estimate.py``'s trainer);
- ``d3hr``: D^3HR class statistics (DDIM inversion, ``--inversion-steps``; ``ClassReader``, one class at a time);
- ``modes``: MGD^3 mode fitting (VAE encode + k-means per class, streamed);
- ``select``: selection's encoder and real class means (``encoder_for``) plus encode + choose over a pool of
  ``--ratio`` x IPC random candidates per class;
- ``generate``: ``ddkit generate -m dit`` of IPC ``--ipc`` at ``--steps`` DDPM steps (calibration, plan,
  sampling, VAE decode; the merge left out); ``s/img`` is seconds per image;
- ``merge``: ``merge_generation`` of those shards;
- ``package``: ``package_run(..., fmt="folder")``;
- ``eval-data``: the evaluation's data loading (``ddkit.evaluate.runner``: the distilled set, the real test
  split and one ``random_real`` draw; the ``full`` baseline, which trains on the whole train split, is not
  part of it).

Each stage's exponent is the least-squares slope of log(cost) on log(K), over all K and over the last two
(at 10 classes fixed costs, imports and warm-ups, dominate). CPU seconds (process time, all threads) are
printed beside wall seconds: on a shared machine they are the steadier measure. Goal: time ~1.0 or less;
peak memory growing no more than one class's data (exponent ~0).

    OMP_NUM_THREADS=1 python bench/scale.py                      # 10, 100, 1,000 classes
    python bench/scale.py --classes 10 100 --train-per-class 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("shard", "minimax", "d3hr", "modes", "select", "generate", "merge", "package", "eval-data")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """VmHWM: the peak RSS since the process started or :func:`_reset_peak`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def _reset_peak() -> None:
    """Restart VmHWM at the current RSS (Linux >= 4.0: ``echo 5 > /proc/PID/clear_refs``), so the stage's
    peak is not the imports' (importing torch peaks ~300 MB above where it settles)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_folder(root: Path, k: int, train: int, test: int, res: int) -> None:
    """``root/{train,val}/c<k>/<i>.png``: random RGB images (the content does not matter to the costs)."""
    import numpy as np
    from PIL import Image

    if (root / "ok").is_file():
        return
    rng = np.random.default_rng(k)
    for split, n in (("train", train), ("val", test)):
        for c in range(k):
            d = root / split / f"c{c:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(d / f"{i}.png")
    (root / "ok").write_text("")


def config(a, work: Path):
    from ddkit.config import load_config
    from ddkit.models.tiny import TINY_MODEL_SETTINGS

    model = {**TINY_MODEL_SETTINGS, "input_size": a.latent}
    sets = [f"model.{k}={v}" for k, v in model.items()] + [
        f"run_dir={work / 'run'}", f"data.shards={work / 'shards'}", "data.dataset=imagefolder",
        f"data.root={work / 'folder'}", f"data.resolution={8 * a.latent}", "data.channels=3",
        f"model.vae={a.pipe}", "model.class_map=identity", "generate.precision=fp32", "generate.sampler=ddpm",
        f"generate.steps_min={a.steps}", f"generate.steps_max={a.steps}", f"generate.ipc_min={a.ipc}",
        f"generate.ipc_max={a.ipc}", "generate.batch_size=64", "generate.cfg_scale=4.0",
        f"generate.d3hr.inversion_steps={a.inversion_steps}", "generate.d3hr.store_from=500",
        "generate.d3hr.store_to=700", "generate.d3hr.timestep=600", "generate.d3hr.batch_size=64",
        "generate.select.encoder_epochs=1",
    ]  # fmt: skip
    return load_config(None, sets)


def backbone(a):
    import torch

    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone
    from ddkit.models.tiny import TINY_MODEL_SETTINGS

    torch.manual_seed(0)
    return build_backbone(ModelConfig(**{**TINY_MODEL_SETTINGS, "input_size": a.latent})).eval()


def stage(a, name: str, work: Path) -> dict:
    """Run one stage in this process; returns seconds, peak RSS and what the stage added to the setup's RSS."""
    import types

    import torch

    cfg = config(a, work)
    k = a.k
    gen = work / "run" / "gen-dit"
    setup: dict = {}
    if name in ("minimax",):
        sys.path.insert(0, str(REPO / "bench"))
        from scale_estimate import train  # noqa: F401  (imports torch models before the clock starts)
    if name in ("d3hr", "modes", "generate"):
        setup["model"] = backbone(a)
    if name == "modes":
        from ddkit.models.vae import load_vae

        setup["vae"] = load_vae(str(a.pipe)).eval()
    if name == "select":
        g = torch.Generator().manual_seed(0)
        setup["pool"] = torch.randint(
            0, 256, (k * a.ratio * a.ipc, 3, 8 * a.latent, 8 * a.latent), generator=g, dtype=torch.uint8
        )
        setup["labels"] = torch.arange(k).repeat_interleave(a.ratio * a.ipc)
    base = _rss_mb()
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if name == "shard":
        from ddkit.data import shard_dataset

        shard_dataset(cfg.data, work / "shards")
    elif name == "minimax":
        from scale_estimate import train

        train(k, a.train_batch, a.train_steps)
    elif name == "d3hr":
        from ddkit.methods import d3hr

        d3hr.class_statistics(setup["model"], cfg, device="cpu", cache_dir=work / "d3hr-cache")
    elif name == "modes":
        from ddkit.methods.mgd3 import class_modes_for

        s = types.SimpleNamespace(
            config=cfg,
            model=setup["model"],
            vae=setup["vae"],
            device=torch.device("cpu"),
            classes=[f"c{c:04d}" for c in range(k)],
        )
        class_modes_for(s, min(a.ipc, a.train_per_class), None)
    elif name == "select":
        from ddkit.methods.select import select_streamed
        from ddkit.methods.selected import encoder_for

        net, means, _ = encoder_for(cfg)
        select_streamed(net, setup["pool"], setup["labels"], a.ipc, real_means=means)
    elif name == "generate":
        from ddkit.generate import generate

        generate(
            cfg,
            method="dit",
            time_limit=1e5,
            out_dir=gen,
            model=setup["model"],
            progress=False,
            merge_when_done=False,
            follow_changes=False,
        )
    elif name == "merge":
        from ddkit.generate.run import merge_generation

        merge_generation(cfg, "dit", gen)
    elif name == "package":
        from ddkit.package import package_run

        package_run(gen, fmt="folder", out=work / "distilled")
    elif name == "eval-data":
        from ddkit.data import load_tensors, read_index
        from ddkit.evaluate.runner import load_distilled
        from ddkit.evaluate.runs import RealTrain

        load_distilled(gen / "dataset.pt", read_index(work / "shards"))
        load_tensors(work / "shards", "test")
        RealTrain(work / "shards").random_subset(min(a.ipc, a.train_per_class), 0, k)  # random_real's draw
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "peak_mb": _peak_mb(), "added_mb": max(0.0, _peak_mb() - base)}


def slope(ks: list[int], ys: list[float]) -> float:
    """Least-squares slope of log y on log k (nan when fewer than two positive points)."""
    pts = [(math.log(k), math.log(y)) for k, y in zip(ks, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den


def run_stage(a, name: str, k: int, work: Path) -> dict:
    """``name`` at ``k`` classes in a fresh process (its own peak RSS)."""
    cmd = [sys.executable, __file__, "--stage", name, "--k", str(k), "--work", str(work), *a.passthrough]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"stage {name} at {k} classes failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: dict, ks: list[int], a) -> str:
    """The markdown table: wall and CPU seconds and +MB per K (``a / b / c`` for the class counts), the
    exponents over all K and, for time, over the last two K (where per-class work outweighs fixed costs)."""

    def cells(xs: list[float], fmt: str) -> str:
        return " / ".join(format(x, fmt) for x in xs)

    lines = [
        f"| stage | wall s ({' / '.join(map(str, ks))} classes) | CPU s | time exp (last two) | CPU exp | "
        "+MB peak | memory exp |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in STAGES:
        r = [rows[name][k] for k in ks]
        secs, cpu, added = [x["seconds"] for x in r], [x["cpu"] for x in r], [x["added_mb"] for x in r]
        label = (
            name if name != "generate" else f"generate ({secs[-1] / (ks[-1] * a.ipc):.4f} s/img at {ks[-1]})"
        )
        last = slope(ks[-2:], secs[-2:]) if len(ks) > 1 else float("nan")
        lines.append(
            f"| {label} | {cells(secs, '.2f')} | {cells(cpu, '.2f')} | {slope(ks, secs):.2f} ({last:.2f}) "
            f"| {slope(ks, cpu):.2f} | {cells(added, '.0f')} | {slope(ks, [max(m, 1.0) for m in added]):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--train-per-class", type=int, default=4)
    ap.add_argument("--test-per-class", type=int, default=1)
    ap.add_argument("--latent", type=int, default=4, help="latent side (images are 8x: 4 -> 32 px)")
    ap.add_argument("--ipc", type=int, default=2)
    ap.add_argument("--ratio", type=int, default=2, help="selection pool: ratio x IPC candidates per class")
    ap.add_argument("--steps", type=int, default=5, help="DDPM steps of the generation")
    ap.add_argument("--inversion-steps", type=int, default=10, help="D^3HR DDIM inversion steps")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pipe", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stage:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(stage(a, a.stage, a.work)))
        return 0
    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="ddkit-scale-"))
    pipe = work / "pipe"
    if not (pipe / "model_index.json").is_file():
        from ddkit.models.tiny import build_tiny_pipeline

        build_tiny_pipeline(pipe, sample_size=a.latent)
    keep = [
        "train_per_class",
        "latent",
        "ipc",
        "ratio",
        "steps",
        "inversion_steps",
        "train_batch",
        "train_steps",
    ]
    a.passthrough = [x for key in keep for x in (f"--{key.replace('_', '-')}", str(getattr(a, key)))]
    a.passthrough += ["--pipe", str(pipe)]
    rows: dict = {s: {} for s in STAGES}
    print(
        f"threads {os.environ.get('OMP_NUM_THREADS', '?')}, {a.train_per_class}+{a.test_per_class} images per "
        f"class at {8 * a.latent} px, work dir {work}",
        flush=True,
    )
    for k in a.classes:
        d = work / f"k{k}"
        make_folder(d / "folder", k, a.train_per_class, a.test_per_class, 8 * a.latent)
        for name in STAGES:
            rows[name][k] = run_stage(a, name, k, d)
            print(
                f"{k:5d} classes  {name:10s} {rows[name][k]['seconds']:8.2f} s  CPU {rows[name][k]['cpu']:8.2f} s  peak "
                f"{rows[name][k]['peak_mb']:7.0f} MB  +{rows[name][k]['added_mb']:.0f} MB",
                flush=True,
            )
    print(table(rows, a.classes, a))
    if a.json:
        a.json.write_text(
            json.dumps({"args": {k: getattr(a, k) for k in keep}, "rows": rows}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
