"""Check the run estimate (:mod:`ddkit.estimate`) against measured time on this machine: a tiny DiT stand-in
(``ddkit.models.tiny``'s transformer config, random weights) at 10, 100 and 1,000 classes.

    python bench/scale_estimate.py [--json out.json]

1. Calibrate at 10 classes, as ``bench/gpu.py`` would on a GPU (interleaved with each class count's
   measurement, medians of ``--rounds``): generation FLOP/s and minimax training images/s; write them in ``bench/gpu.py``'s result format and read them back through
   :func:`ddkit.estimate.load_gpu_bench` (the path ``ddkit run --dry-run --gpu-bench FILE`` takes).
2. For K = 10, 100, 1,000 classes predict with :mod:`ddkit.estimate`'s formulas and measure:
   - generation of K x IPC latents (DDPM, CFG 4, batches of ``--batch``; no VAE decode on either side);
   - minimax fine-tuning steps (DiffFit, λr 0.002, λd 0.008, memory 64 per class) on labels drawn from K
     classes, so the per-class memories grow with K.
3. Print predicted / measured; the goal is every ratio within 30 %. Times are process CPU seconds on one
   thread (a shared machine's load does not count); timings, so not a unit test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddkit import estimate as E  # noqa: E402
from ddkit.config import ModelConfig, load_config  # noqa: E402
from ddkit.models import build_backbone  # noqa: E402
from ddkit.models.tiny import TINY_MODEL_SETTINGS  # noqa: E402
from ddkit.sampling import sample  # noqa: E402

TOLERANCE = 0.30
#: Process CPU time: with one thread it is the work done, whatever else the shared machine runs (wall time
#: varied 3.6x between identical workloads here under a load of 8 on 2 cores).
CLOCK = time.process_time


def backbone(difffit_blocks: int = 0):
    torch.manual_seed(0)
    return build_backbone(ModelConfig(**TINY_MODEL_SETTINGS, difffit_blocks=difffit_blocks))


def generate(model, num_classes: int, ipc: int, batch: int, steps: int) -> float:
    """Seconds to sample ``num_classes x ipc`` latents in batches of ``batch`` (index-major, as ddkit)."""
    labels = torch.arange(num_classes * ipc) % num_classes
    t0 = CLOCK()
    with torch.no_grad():
        for s in range(0, len(labels), batch):
            sample(model, labels[s : s + batch], steps=steps, sampler="ddpm", cfg_scale=4.0)
    return CLOCK() - t0


def trainer(num_classes: int, batch: int):
    from ddkit.train import Trainer

    sets = [f"model.{k}={v}" for k, v in TINY_MODEL_SETTINGS.items()] + [
        "minimax.trainable=difffit", "minimax.difffit_blocks=2", f"minimax.batch_size={batch}",
        "minimax.lambda_r=0.002", "minimax.lambda_d=0.008", "minimax.memory_size=64", "minimax.precision=fp32",
    ]  # fmt: skip
    cfg = load_config(None, sets)
    return Trainer.from_model(cfg, "minimax", backbone(2).train(), data_mode="latents")


def train(num_classes: int, batch: int, steps: int) -> float:
    """Seconds for ``steps`` minimax steps on labels drawn from ``num_classes`` (after 2 warm-up steps)."""
    tr = trainer(num_classes, batch)
    g = torch.Generator().manual_seed(num_classes)
    size = TINY_MODEL_SETTINGS["input_size"]
    batches = [(None, torch.randint(num_classes, (batch,), generator=g), torch.randn(batch, 4, size, size, generator=g))
               for _ in range(steps + 2)]  # fmt: skip
    for b in batches[:2]:
        tr.train_step(b)
    t0 = CLOCK()
    for b in batches[2:]:
        tr.train_step(b)
    return CLOCK() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=50, help="generation batch (images per forward before CFG)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--ipc", type=int, default=5, help="images per class (10 classes x 5 fill one batch of 50)")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved calibration + measurement rounds (median)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)  # a shared machine: one thread is the steadier measurement
    m = TINY_MODEL_SETTINGS
    fwd = E.model_forward_flops(m["arch"], m["input_size"], m["in_channels"], m["learn_sigma"])
    model = backbone().eval()
    generate(model, 10, 1, a.batch, 2)  # warm-ups: first calls pay for lazy initialisation
    train(10, a.train_batch, 2)
    print(f"tiny DiT {m['arch']} at {m['input_size']}x{m['input_size']}x4: {fwd / 1e6:.3f} MFLOP per forward; "
          f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    rows, res = [], {}
    for k in (10, 100, 1000):
        # 1. calibration at 10 classes, interleaved with the measurement (median of --rounds), written and
        # read as a bench/gpu.py result
        t_gen, t_train, m_gen, m_train = [], [], [], []
        for _ in range(a.rounds):
            t_gen.append(generate(model, 10, 2 * a.batch // 10, a.batch, a.steps))
            t_train.append(train(10, a.train_batch, a.train_steps))
            m_gen.append(generate(model, k, a.ipc, a.batch, a.steps))
            m_train.append(train(k, a.train_batch, a.train_steps))
        gen_flops = E.generation_flops(2 * a.batch, a.steps, fwd, E.cfg_factor(4.0), 0.0)
        res = {"device_name": f"CPU ({torch.get_num_threads()} threads)", "forward_gflop": fwd / 1e9,
               "generation": {"ddkit fp32": {"tflops": gen_flops / median(t_gen) / 1e12}},
               "training": {"minimax DiffFit fp32": {"images_per_s": a.train_steps * a.train_batch / median(t_train)}}}
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "gpu.json").write_text(json.dumps(res))
            bench = E.load_gpu_bench(Path(d) / "gpu.json")
        tp_gen, tp_train = E.throughput("sample", "cpu", bench=bench), E.throughput("train", "cpu", bench=bench)
        # 2. prediction against the measurement; a partial last batch is charged as a full one, as the planner
        images = k * a.ipc
        charged = -(-images // a.batch) * a.batch
        pred = E.compute_seconds(E.generation_flops(charged, a.steps, fwd, 2, 0.0), 1, tp_gen)
        rows.append(("generation", k, f"{images} latents x {a.steps} steps x CFG 2", pred, median(m_gen)))
        flops = E.training_flops(a.train_steps, a.train_batch, fwd, E.train_factor("difffit"))
        rows.append(("minimax", k, f"{a.train_steps} steps x batch {a.train_batch}, {k} class memories",
                     E.compute_seconds(flops, 1, tp_train), median(m_train)))
    print(f"{'stage':11s} {'classes':>7s}  {'work':45s} {'predicted':>9s} {'measured':>9s} {'pred/meas':>9s}")
    worst = 0.0
    for stage, k, work, pred, meas in rows:
        worst = max(worst, abs(pred / meas - 1))
        print(f"{stage:11s} {k:7d}  {work:45s} {pred:8.2f}s {meas:8.2f}s {pred / meas:9.2f}")
    ok = worst <= TOLERANCE
    print(f"goal: every prediction within {100 * TOLERANCE:.0f} % of the measurement: worst {100 * worst:.0f} % "
          f"-> ratio to goal {worst / TOLERANCE:.2f} {'met' if ok else 'NOT met'}")
    if a.json:
        a.json.write_text(json.dumps({"calibration": res, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
