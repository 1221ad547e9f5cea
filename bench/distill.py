"""Distilled-set quality: accuracy against IPC for every method and random real, and the budget planner
against fixed step counts (issue 16). Ratios are against random real / the fixed-step rules measured in the
same run, on the same model, with the same student seeds.

    python bench/distill.py configs/mnist.yaml --ipcs 1 10 50           # the IPC table and plot
    python bench/distill.py configs/mnist.yaml --planner --budget 60    # planner vs 10 and 50 fixed steps

The run directory must hold the model the config samples (``ddkit run CONFIG`` first, or a config whose
``model.pretrained`` is set). Everything goes under ``RUN/bench/``; a rerun reuses what is done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _generate(cfg, method: str, run_dir: Path, progress: bool) -> Path:
    """Generate ``method`` into ``run_dir/gen-<method>`` from the weights ``cfg``'s own run sampled."""
    from ddkit.config import replace
    from ddkit.generate import checkpoint_for, generate

    g = replace(cfg.generate, checkpoint=checkpoint_for(cfg, method))
    cfg = replace(cfg, run_dir=str(run_dir), generate=g)
    return generate(cfg, method=method, progress=progress, merge_if_complete=True)


def ipc_table(cfg, methods: list[str], ipcs: list[int], steps: int, repeats: int, progress: bool) -> dict:
    """{ipc: results.json dict} with every method at ``steps`` fixed steps and random real."""
    from ddkit.config import replace
    from ddkit.evaluate import evaluate

    bench = Path(cfg.run_dir) / "bench"
    out: dict[int, dict] = {}
    for ipc in ipcs:
        g = replace(cfg.generate, ipc_min=ipc, ipc_max=ipc, steps_min=steps, steps_max=steps,
                    time_limit=max(cfg.generate.time_limit, 3600.0), safety_margin=0.0)
        c = replace(cfg, generate=g)
        sets = {}
        for m in methods:
            d = _generate(c, m, bench / f"ipc{ipc}", progress)
            sets[m] = d / "dataset.pt"
        ecfg = replace(cfg.evaluate, repeats=repeats, ipc=ipc, baselines=("random_real",))
        out[ipc] = evaluate(sets, cfg.data.shards, ecfg, out_dir=bench / f"eval-ipc{ipc}", progress=progress)
        for m, f in sets.items():
            out[ipc][m]["cost"] = cost(f.parent)
    return out


PREPARATION = ("d3hr_statistics", "d3hr_latents", "mgd3_modes", "igd_surrogate_made_s", "igd_memory")


def cost(gen_dir: Path) -> dict:
    """One generation's cost from its ``manifest.json``: the method's preparation (seconds per phase, summed
    over ranks; IGD's surrogate as the seconds it took to make, also when read from the cache; ``+select``'s
    encoder and selection), the calibration, and sampling seconds per image generated."""
    from ddkit.io import read_json

    m = read_json(gen_dir / "manifest.json")
    ranks = [v for k, v in m["phases"].items() if k.startswith("rank")]
    prep = {k: sum(r.get(k, 0.0) for r in ranks) for k in PREPARATION if any(k in r for r in ranks)}
    if "selection" in m:
        prep["select_encoder"] = m["selection"]["encoder_seconds"]
        prep["select"] = m["selection"]["select_seconds"]
    return {
        "preparation": prep,
        "preparation_s": sum(prep.values()),
        "calibrate_s": sum(r.get("calibrate", 0.0) for r in ranks),
        "sample_s_per_image": sum(r.get("sample", 0.0) for r in ranks) / max(1, m["images_generated"]),
        "images_generated": m["images_generated"],
        "precision": (m.get("precision") or {}).get("precision"),
    }


def planner_vs_fixed(cfg, method: str, budget: float, seeds: list[int], progress: bool) -> dict:
    """Under one budget: the planner (``generate.quality``: DSR or the measured table) against fixed 10 steps
    (DD_Track2's rule) and fixed 50 steps (Minimax's), each spending the budget on IPC; one student per
    seed. Returns {variant: results.json entry}."""
    from ddkit.config import replace
    from ddkit.evaluate import evaluate

    g0 = cfg.generate
    variants = {
        "planner": {},
        "fixed-10": {"steps_min": 10, "steps_max": 10, "quality": "dsr", "dsr_min_steps_quality": 10},
        "fixed-50": {"steps_min": 50, "steps_max": 50, "quality": "dsr", "dsr_min_steps_quality": 50},
    }
    bench = Path(cfg.run_dir) / "bench" / f"planner-{method}-{budget:g}s-ipc{g0.ipc_min}-{g0.ipc_max}"
    sets = {}
    for name, kw in variants.items():
        for seed in seeds:
            g = replace(g0, time_limit=budget, seed=seed, **kw)
            d = _generate(replace(cfg, generate=g), method, bench / f"{name}-seed{seed}", progress)
            sets[f"{name}-seed{seed}"] = d / "dataset.pt"
    ecfg = replace(cfg.evaluate, repeats=1, baselines=())
    res = evaluate(sets, cfg.data.shards, ecfg, out_dir=bench / "eval", progress=progress)
    out = {}
    for name in variants:
        accs = [res[f"{name}-seed{s}"]["mean"] for s in seeds]
        out[name] = {"mean": sum(accs) / len(accs), "runs": accs}
    return out


def plot(table: dict, path: Path) -> Path:
    """Accuracy against IPC, one line per set (mean ± std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for r in table.values() for n in r})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in names:
        xs = [i for i in sorted(table) if n in table[i]]
        ax.errorbar(xs, [table[i][n]["mean"] for i in xs], yerr=[table[i][n]["std"] for i in xs],
                    marker="o", capsize=3, label=n)
    ax.set_xscale("log")
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--methods", nargs="+", default=["minimax", "dit", "d3hr", "dit+select", "mgd3"])
    ap.add_argument("--ipcs", nargs="+", type=int, default=[1, 10, 50])
    ap.add_argument("--steps", type=int, default=50, help="fixed steps for every method (a fair table)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--planner", action="store_true", help="planner vs fixed steps instead of the IPC table")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per generation (--planner)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()

    from ddkit.config import load_config
    from ddkit.io import atomic_write_json

    cfg = load_config(args.config, args.sets)
    if args.planner:
        res = planner_vs_fixed(cfg, args.methods[0], args.budget, args.seeds, not args.no_progress)
        for name, r in res.items():
            print(f"{name:>10} {r['mean']:6.2f}  {r['runs']}")
        for ref in ("fixed-10", "fixed-50"):
            print(f"planner / {ref}: {res['planner']['mean'] / res[ref]['mean']:.3f}")
        return
    table = ipc_table(cfg, args.methods, args.ipcs, args.steps, args.repeats, not args.no_progress)
    bench = Path(cfg.run_dir) / "bench"
    atomic_write_json(bench / "ipc_table.json", {str(k): v for k, v in table.items()})
    plot(table, bench / "ipc_curve.png")
    print(f"{'set':>16} " + " ".join(f"IPC {i:>3}" for i in args.ipcs) + "   (÷ random real)")
    for n in sorted({n for r in table.values() for n in r}):
        cells = []
        for i in args.ipcs:
            r = table[i].get(n)
            rr = table[i]["random_real"]["mean"]
            cells.append(f"{r['mean']:5.1f} ({r['mean'] / rr:.2f})" if r else "   -   ")
        print(f"{n:>16} " + " ".join(cells))
    print("\ncost: preparation s (its parts) · calibration s · sampling s per image generated")
    for i in args.ipcs:
        for n, r in sorted(table[i].items()):
            if "cost" in r:
                c = r["cost"]
                parts = ", ".join(f"{k} {v:.1f}" for k, v in c["preparation"].items())
                print(f"IPC {i:>3} {n:>16} {c['preparation_s']:8.1f} ({parts}) · {c['calibrate_s']:6.1f} · "
                      f"{c['sample_s_per_image']:.3f} ({c['images_generated']} images, {c['precision']})")


if __name__ == "__main__":
    main()
