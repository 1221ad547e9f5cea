"""Measure the planner's quality table (steps, kept IPC, over-generation ratio) -> student accuracy on one
model, and write it beside the model (issue 16: "a measured quality table, stored with the model").

    python bench/quality.py configs/mnist.yaml --out ddkit/assets/mnist-dit-t4/quality.yaml

    python bench/quality.py configs/mnist.yaml --method d3hr --steps 25 50 --ipcs 1 10 50 --ratios 1 \
        --seeds 0 1 2 --out ddkit/assets/mnist-dit-t4/quality-d3hr.yaml

For each step count the method (``--method``, default ``dit``) samples at fixed steps without a budget, and
every (IPC i, ratio r) with ``i · r <= P`` is cut from what it sampled: ratio 1 keeps the first ``i``
candidates per class (a plain ``<method>`` set), ratio r > 1 selects ``i`` of the first ``r · i`` with
``generate.select`` (``<method>+select``). For ``dit`` and ``minimax`` one pool of ``P`` candidates per
class serves every point: an image depends only on its own seed, so prefixes of one pool are the sets a
smaller IPC or a budget cut would make. Every other method fits something to the IPC it samples (D^3HR's
representative groups, MGD^3's k-means modes), so each point's ``ceil(r · i)`` candidates per class are
sampled on their own. One student per point and seed, the config's ``evaluate`` protocol. The table is what
:func:`ddkit.budget.plan` reads through ``generate.quality``, and ``generate.method: best`` compares the
tables beside it (:mod:`ddkit.methods.best`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


NESTED = ("dit", "minimax")  # methods whose IPC-n set is the first n images per class of a larger one


def pool(cfg, steps: int, per_class: int, out: Path, method: str = "dit") -> Path:
    """Sample ``per_class`` candidates per class of ``method`` at ``steps`` fixed steps into ``out`` (reused
    when done)."""
    from ddkit.config import replace
    from ddkit.generate import generate, merge

    g = replace(cfg.generate, ipc_min=per_class, ipc_max=per_class, steps_min=steps, steps_max=steps,
                time_limit=max(cfg.generate.time_limit, 7200.0), safety_margin=0.0, checkpoint=None)
    d = generate(replace(cfg, generate=g), method=method, out_dir=out, progress=False)
    if not (d / "dataset.pt").exists():
        merge(d)
    return d / "dataset.pt"


def cut(cfg, pool_file: Path, ipc: int, ratio: float, out: Path) -> Path:
    """The (ipc, ratio) point of a pool as a ``dataset.pt``: the first ``ceil(ratio · ipc)`` candidates per
    class, then ``ipc`` of them by ``generate.select`` when ratio > 1."""
    import torch

    from ddkit.io import atomic_torch_save
    from ddkit.methods.select import encode, select_per_class
    from ddkit.methods.selected import encoder_for

    f = out / "dataset.pt"
    if f.is_file():
        return f
    data = torch.load(pool_file, map_location="cpu", weights_only=True)
    n = math.ceil(ratio * ipc)
    labels = data["labels"]
    first = torch.cat([torch.nonzero(labels == c).flatten()[:n] for c in range(len(data["classes"]))])
    keep = first
    if ratio > 1:
        scfg = cfg.generate.select
        encoder, means, _ = encoder_for(cfg)
        feats, logits = encode(encoder, data["images"][first])
        sel = select_per_class(feats, logits, labels[first], ipc, criterion=scfg.criterion,
                               min_confidence=scfg.min_confidence, real_means=means)
        keep = first[sel.keep]
    atomic_torch_save({"images": data["images"][keep].contiguous(), "labels": labels[keep].contiguous(),
                       "classes": data["classes"], "ipc": ipc}, f)
    return f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--method", default="dit", help="the registered method whose samples are scored")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50])
    ap.add_argument("--ipcs", nargs="+", type=int, default=[10, 20, 50])
    ap.add_argument("--ratios", nargs="+", type=float, default=[1, 2, 4])
    ap.add_argument("--max-pool", type=int, default=100, help="candidates per class sampled per step count")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="student seeds per point")
    ap.add_argument("--out", type=Path, required=True, help="the table (YAML), e.g. beside the model")
    args = ap.parse_args()

    import yaml

    from ddkit.config import load_config, replace
    from ddkit.data import read_index
    from ddkit.evaluate import evaluate
    from ddkit.io import atomic_write_bytes
    from ddkit.models.provenance import record

    cfg = load_config(args.config, args.sets)
    points = [(i, r) for i in args.ipcs for r in args.ratios if math.ceil(i * r) <= args.max_pool]
    per_class = max(math.ceil(i * r) for i, r in points)
    bench = Path(cfg.run_dir) / "bench" / ("quality" if args.method == "dit" else f"quality-{args.method}")
    sets = {}
    for s in args.steps:
        for i, r in points:
            n = per_class if args.method in NESTED else math.ceil(i * r)
            pf = pool(cfg, s, n, bench / (f"pool-s{s}" + ("" if args.method in NESTED else f"-n{n}")), args.method)
            sets[f"s{s}-ipc{i}-r{r:g}"] = cut(cfg, pf, i, r, bench / f"s{s}-ipc{i}-r{r:g}")
    rows = []
    for seed in args.seeds:
        ecfg = replace(cfg.evaluate, repeats=1, seed=seed, baselines=())
        res = evaluate(sets, cfg.data.shards, ecfg, out_dir=bench / f"eval-seed{seed}", progress=False)
        rows.append(res)
    table = []
    for s in args.steps:
        for i, r in points:
            accs = [res[f"s{s}-ipc{i}-r{r:g}"]["mean"] for res in rows]
            table.append({"steps": s, "ipc": i, "ratio": r, "accuracy": round(sum(accs) / len(accs), 2)})
    head = (f"# {cfg.name}: (steps, kept IPC, over-generation ratio) -> {cfg.evaluate.network} accuracy (%), "
            f"{cfg.evaluate.protocol} protocol, {cfg.evaluate.epochs} epochs, student seeds {args.seeds}.\n"
            f"# Made by: python bench/quality.py {args.config} --method {args.method} --steps "
            f"{' '.join(map(str, args.steps))} --ipcs {' '.join(map(str, args.ipcs))} --ratios "
            f"{' '.join(f'{r:g}' for r in args.ratios)} --seeds {' '.join(map(str, args.seeds))} --out {args.out} "
            + " ".join(f"--set {x}" for x in args.sets) + "\n")
    # {method, rows}: the planner notes in a plan's reason when it plans another method from this table;
    # made_on: the planner refuses the table on other classes (ddkit.models.provenance.check_classes).
    doc = {"method": args.method, "made_on": record(read_index(cfg.data.shards)), "rows": table}
    atomic_write_bytes(args.out, (head + yaml.safe_dump(doc, sort_keys=False)).encode())
    print(f"{'steps':>5} {'ipc':>4} {'ratio':>5} {'acc':>6}")
    for row in table:
        print(f"{row['steps']:>5} {row['ipc']:>4} {row['ratio']:>5g} {row['accuracy']:>6.2f}")


if __name__ == "__main__":
    main()
