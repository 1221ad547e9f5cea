"""Students per second, batched ÷ sequential (ddkit.evaluate.batched vs K calls of train_student).

    PYTHONPATH=. python bench/evaluate.py                 # K = 3, 9, 18: eccv2024 ConvNet-3, IPC 10, 32 px
    PYTHONPATH=. python bench/evaluate.py --ks 3 9 18 32 64 --device cuda
    PYTHONPATH=. python bench/evaluate.py --step          # one training step: vmap vs grouped convolutions

Each measurement runs in its own subprocess (so its peak resident memory, ``ru_maxrss``, is its own), and at
every K the sequential and batched runs alternate (``--rounds`` times each), so a machine shared with other
work slows both alike and the ratio stays fair. The data are random digits-shaped tensors (1 × 32 × 32,
10 classes, IPC images per class), the test split ``--test`` images: the throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def _data(k: int, ipc: int, test: int, device: str):
    g = torch.Generator().manual_seed(0)
    sets = [(torch.randint(0, 256, (10 * ipc, 1, 32, 32), dtype=torch.uint8, generator=g),
             torch.arange(10).repeat_interleave(ipc)) for _ in range(k)]  # fmt: skip
    tx = torch.randint(0, 256, (test, 1, 32, 32), dtype=torch.uint8, generator=g)
    return sets, tx, torch.randint(0, 10, (test,), generator=g)


def one(mode: str, k: int, args) -> dict:
    """Train ``k`` students ``mode`` = sequential | batched; seconds and peak memory (GiB)."""
    from ddkit.evaluate.batched import Student, train_students
    from ddkit.evaluate.protocols import get_protocol
    from ddkit.evaluate.trainer import train_student

    sets, tx, ty = _data(k, args.ipc, args.test, args.device)
    p = get_protocol("eccv2024")
    kw = dict(mean=[0.5], std=[0.25], num_classes=10, epochs=args.epochs, batch_size=256, device=args.device)
    t0 = time.perf_counter()
    if mode == "sequential":
        for s, (x, y) in enumerate(sets):
            train_student(p, "ConvNet-3", x, y, tx, ty, seed=s, **kw)
    else:
        train_students(p, "ConvNet-3", [Student(x, y, s) for s, (x, y) in enumerate(sets)], tx, ty, **kw)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # fmt: skip
    return {"mode": mode, "k": k, "seconds": secs, "peak_gib": peak}


def _grouped_convnet3(models, x):
    """K ConvNet-3 as one network of grouped convolutions: ``x [K, B, C, H, W] -> [K, B, classes]``."""
    k, b = x.shape[0], x.shape[1]
    h = x.transpose(0, 1).reshape(b, -1, *x.shape[-2:])
    for d in range(3):
        conv = [m.features[4 * d] for m in models]
        gn = [m.features[4 * d + 1] for m in models]
        w, bias = torch.cat([c.weight for c in conv]), torch.cat([c.bias for c in conv])
        h = F.conv2d(h, w, bias, padding=1, groups=k)
        h = F.group_norm(h, h.shape[1], torch.cat([n.weight for n in gn]), torch.cat([n.bias for n in gn]))
        h = F.avg_pool2d(F.relu(h), 2)
    lw = torch.stack([m.classifier.weight for m in models])
    lb = torch.stack([m.classifier.bias for m in models])
    return torch.einsum("bkf,kof->kbo", h.reshape(b, k, -1), lw) + lb[:, None]


def step(args) -> None:
    """One forward + backward of K ConvNet-3 students on 10·IPC images each: sequential, vmap, grouped."""
    from torch.func import functional_call, stack_module_state, vmap

    from ddkit.evaluate.networks import build

    for k in args.ks:
        models = [build("ConvNet-3", 1, 10, 32) for _ in range(k)]
        x, y = torch.randn(k, 10 * args.ipc, 1, 32, 32), torch.randint(0, 10, (k, 10 * args.ipc))
        params, bufs = stack_module_state(models)

        def seq(models=models, x=x, y=y):
            for m, xb, yb in zip(models, x, y, strict=True):
                F.cross_entropy(m(xb), yb).backward()

        def vm(models=models, params=params, bufs=bufs, x=x, y=y):
            out = vmap(lambda p, b, xb: functional_call(models[0], (p, b), (xb,)))(params, bufs, x)
            F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").backward()

        def grp(models=models, x=x, y=y):
            F.cross_entropy(
                _grouped_convnet3(models, x).flatten(0, 1), y.flatten(), reduction="sum"
            ).backward()

        times: dict[str, list[float]] = {"sequential": [], "vmap": [], "grouped": []}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for name, fn in (("sequential", seq), ("vmap", vm), ("grouped", grp)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t[1:]) for n, t in times.items()}
        print(f"K={k:3d} step: sequential {med['sequential']:.3f}s  vmap {med['vmap']:.3f}s "
              f"({med['sequential'] / med['vmap']:.2f}x)  grouped {med['grouped']:.3f}s "
              f"({med['sequential'] / med['grouped']:.2f}x)", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 9, 18])
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2, help="the scorer runs epochs + 1")
    ap.add_argument("--test", type=int, default=500, help="test images")
    ap.add_argument("--rounds", type=int, default=1, help="alternating sequential/batched runs per K")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step", action="store_true", help="time one training step: vmap vs grouped convs")
    ap.add_argument("--one", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args)))
        return
    if args.step:
        step(args)
        return
    print(f"eccv2024 ConvNet-3, IPC {args.ipc}, {args.epochs} (+1) epochs, {args.test} test images, "
          f"{args.device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    base = [sys.executable, __file__, "--ipc", str(args.ipc), "--epochs", str(args.epochs),
            "--test", str(args.test), "--device", args.device]  # fmt: skip
    for k in args.ks:
        runs: dict[str, list[dict]] = {"sequential": [], "batched": []}
        for _ in range(args.rounds):
            for mode in runs:  # alternate, so contention hits both
                out = subprocess.run(
                    [*base, "--one", mode, str(k)], capture_output=True, text=True, check=True
                )
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        s, b = (statistics.median(r["seconds"] for r in runs[m]) for m in ("sequential", "batched"))
        print(f"K={k:3d}: sequential {k / s:.3f} students/s (peak {runs['sequential'][0]['peak_gib']:.2f} GiB), "
              f"batched {k / b:.3f} students/s (peak {runs['batched'][0]['peak_gib']:.2f} GiB): "
              f"batched ÷ sequential {s / b:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
