"""The minimax terms, honestly measured (issue 16): representativeness weight λ_r, diversity weight λ_d
(each also at 0) and the memory size, at the same number of fine-tuning steps, several seeds.

    python bench/minimax_ablation.py configs/mnist.yaml --seeds 0 1 2

Every variant fine-tunes the config's pretrained model for ``minimax.steps`` steps (Gu et al., CVPR 2024,
``train_dit.py`` objective: ε-MSE − λ_r · representativeness − λ_d · diversity over per-class memories),
then samples IPC ``generate.ipc_min`` at ``--steps`` fixed DDPM steps and trains one student. Seed s sets the
fine-tuning, sampling and student seeds alike, so the spread across seeds is the whole pipeline's noise.
The printout gives each variant's mean ± std and its difference to λ_r = λ_d = 0 in units of the pooled
standard error (|z| < 2: within noise), each set's within-class diversity and how far its images moved from
the λ = 0 set of the same seed (:func:`image_stats`). Everything goes under ``RUN/bench/minimax-ablation/``; a rerun reuses
finished stages.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: (lambda_r, lambda_d, memory_size); the paper's (0.002, 0.008, 64) is "minimax"
    "none (λr=λd=0)": (0.0, 0.0, 64),
    "λr only": (0.002, 0.0, 64),
    "λd only": (0.0, 0.008, 64),
    "minimax": (0.002, 0.008, 64),
    "minimax, memory 16": (0.002, 0.008, 16),
    # Stronger weights ask whether the terms act at all on this scale, where the paper's are too weak to matter.
    "minimax ×10": (0.02, 0.08, 64),
    "minimax ×100": (0.2, 0.8, 64),
}


def run_variant(cfg, lr: float, ld: float, mem: int, seed: int, steps: int, run_dir: Path) -> Path:
    """Fine-tune and sample one variant; returns its ``dataset.pt``."""
    from ddkit.config import replace
    from ddkit.generate import generate, merge
    from ddkit.train import train

    m = replace(cfg.minimax, lambda_r=lr, lambda_d=ld, memory_size=mem)
    g = replace(cfg.generate, steps_min=steps, steps_max=steps, ipc_max=cfg.generate.ipc_min, seed=seed,
                time_limit=max(cfg.generate.time_limit, 3600.0), safety_margin=0.0, checkpoint=None)
    c = replace(cfg, run_dir=str(run_dir), seed=seed, minimax=m, generate=g)
    train(c, "minimax", progress=False)
    out = generate(c, method="minimax", progress=False)
    if not (out / "dataset.pt").exists():
        merge(out)
    return out / "dataset.pt"


def image_stats(path: Path, ref: Path) -> tuple[float, float]:
    """(within-class diversity, change from ``ref``) of a ``dataset.pt``, both RMS pixel distances in [0, 1] units.

    Diversity is the mean over classes of the mean pairwise RMS distance between that class's images (what the
    diversity term is meant to raise); the change is the mean RMS distance from each image to the image with
    the same index in ``ref`` (the λ = 0 set of the same seed: same sampling noise, other weights).
    """
    import torch

    def load(p: Path):
        d = torch.load(p, map_location="cpu", weights_only=False)
        return d["images"].float().div(255).flatten(1), d["labels"]

    x, y = load(path)
    x0, _ = load(ref)
    rms = lambda a, b: torch.cdist(a, b) / math.sqrt(a.shape[1])  # noqa: E731
    div = []
    for c in y.unique():
        xc = x[y == c]
        n = len(xc)
        if n > 1:
            div.append(float(rms(xc, xc).sum() / (n * (n - 1))))
    change = float(((x - x0).pow(2).mean(1).sqrt()).mean())
    return statistics.fmean(div), change


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=50, help="fixed sampling steps for every variant")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    from ddkit.config import load_config, replace
    from ddkit.evaluate import evaluate
    from ddkit.io import atomic_write_json

    cfg = load_config(args.config, args.sets)
    bench = Path(cfg.run_dir) / "bench" / "minimax-ablation"
    accs: dict[str, list[float]] = {}
    stats: dict[str, list[tuple[float, float]]] = {}
    for seed in args.seeds:
        sets = {}
        for name in args.variants:
            lr, ld, mem = VARIANTS[name]
            tag = f"r{lr:g}-d{ld:g}-m{mem}-seed{seed}"
            sets[name] = run_variant(cfg, lr, ld, mem, seed, args.steps, bench / tag)
        ref_set = run_variant(cfg, 0.0, 0.0, 64, seed, args.steps, bench / f"r0-d0-m64-seed{seed}")
        for name, path in sets.items():
            stats.setdefault(name, []).append(image_stats(path, ref_set))
        ecfg = replace(cfg.evaluate, repeats=1, seed=seed, baselines=())
        res = evaluate(sets, cfg.data.shards, ecfg, out_dir=bench / f"eval-seed{seed}", progress=False)
        for name in args.variants:
            accs.setdefault(name, []).append(res[name]["mean"])
    atomic_write_json(bench / "ablation.json", {"steps": cfg.minimax.steps, "seeds": args.seeds, "accs": accs,
                                                "diversity_and_change": stats})
    ref = accs.get("none (λr=λd=0)")
    print(f"{cfg.minimax.steps} fine-tuning steps, IPC {cfg.generate.ipc_min}, {args.steps} sampling steps, "
          f"seeds {args.seeds}")
    for name, a in accs.items():
        m, sd = statistics.fmean(a), (statistics.stdev(a) if len(a) > 1 else 0.0)
        z = ""
        if ref is not None and name != "none (λr=λd=0)" and len(a) > 1:
            se = math.sqrt(sd**2 / len(a) + statistics.stdev(ref) ** 2 / len(ref)) or float("nan")
            z = f"  Δ vs none {m - statistics.fmean(ref):+.2f} (z {(m - statistics.fmean(ref)) / se:+.1f})"
        div = statistics.fmean(d for d, _ in stats[name])
        change = statistics.fmean(c for _, c in stats[name])
        print(f"{name:>24} {m:6.2f} ± {sd:4.2f}  diversity {div:.4f}  change vs λ=0 {change:.4f}{z}")


if __name__ == "__main__":
    main()
