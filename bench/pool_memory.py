"""Memory of the merge and of ``+select``'s selection against the sizes of what they read and write.

At ImageNet-1K, IPC 50 and ratio 4 at 256 px, a ``+select`` pool is 200,000 images, 39 GB of uint8. The merge
and the selection read the shards and the pool memory-mapped (``torch.load(mmap=True)``): the merge copies
the kept rows into the merged set in chunks (``ddkit.generate.shards._gather``), and the selection encodes
the pool one batch at a time and chooses a class once its last candidate is encoded
(``ddkit.methods.select.select_streamed``). So the memory they add should be about the set they write, not
the pool they read.

For each ``--ratios`` at a fixed kept IPC, this bench runs, each in its own process, with the tiny latent
stand-in (``bench/scale.py``'s, random weights):

- ``generate``: a ``dit+select`` pool as two ranks' shards, one rank after the other; a rank spools its
  images to disk as they are sampled (``ddkit.rows.RowSpool``; "set MB" is one rank's share);
- ``merge``: ``ddkit.generate.merge`` of the pool's shards (the library);
- ``merge-in-memory``: the reference: every shard loaded whole, the images concatenated, the kept rows taken;
- ``select``: ``ddkit.methods.selected.select_pool`` (the library; the encoder is trained in the setup);
- ``select-in-memory``: the reference: the pool loaded whole, encoded whole, ``select_per_class``.

Memory is the peak *anonymous* RSS (``RssAnon``, sampled every 2 ms by a thread) above the RSS before the
stage: a memory-mapped file's pages are the page cache's, which the kernel drops under pressure, so VmHWM,
which counts them, would hide the difference. Each row divides it by the pool's and the written set's bytes;
the summary is the slope between the smallest and largest ratio, anonymous MB added per MB of pool, which
leaves out the fixed costs (``grid.png``'s matplotlib figure, about 500 MB at 100 rows; one encode batch).

    OMP_NUM_THREADS=1 python bench/pool_memory.py                  # 100 classes, IPC 10, ratios 2 and 4
    python bench/pool_memory.py --classes 200 --latent 16 --ratios 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STAGES = ("generate", "merge", "merge-in-memory", "select", "select-in-memory")


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024  # kB


class AnonPeak:
    """The highest RssAnon seen while the block runs (a thread samples every ``every`` seconds)."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_mb())
            self._stop.wait(self.every)

    def __enter__(self) -> AnonPeak:
        self.peak = _anon_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mb())


def _cfg(a, work: Path, ratio: int):
    """``bench/scale.py``'s stand-in config with ``generate.select.ratio`` = ``ratio``."""
    from scale import config

    from ddkit.config import replace

    cfg = config(a, work)
    return replace(cfg, generate=replace(cfg.generate, select=replace(cfg.generate.select, ratio=ratio)))


def setup(a, work: Path, ratio: int) -> None:
    """Shards of the real stand-in and the selector's encoder (trained once)."""
    from scale import make_folder

    from ddkit.data import shard_dataset
    from ddkit.methods.selected import encoder_for

    cfg = _cfg(a, work, ratio)
    if not (work / "shards" / "dataset.json").is_file():
        make_folder(work / "folder", a.classes, a.train_per_class, 1, 8 * a.latent)
        shard_dataset(cfg.data, work / "shards")
    encoder_for(cfg)


def stage(a, name: str, work: Path, ratio: int) -> dict:
    import torch
    from scale import backbone

    from ddkit.generate import generate, merge
    from ddkit.methods.select import encode, select_per_class
    from ddkit.methods.selected import encoder_for, select_pool

    cfg = _cfg(a, work, ratio)
    gen = work / "run" / f"gen-r{ratio}"
    pool = gen / "pool"
    if name.startswith("select") and not (pool / "dataset.pt").is_file():
        merge(pool)
    encoder, means, _ = encoder_for(cfg) if name == "select-in-memory" else (None, None, None)
    model = backbone(a) if name == "generate" else None
    base = _anon_mb()
    t0 = time.perf_counter()
    with AnonPeak() as peak:
        if name == "generate":  # both ranks' shards of the pool, one after the other, not merged
            for rank in (0, 1):
                generate(cfg, method="dit+select", time_limit=1e5, out_dir=gen, rank=rank, world_size=2,
                         model=model, progress=False, merge_when_done=False, follow_changes=False)  # fmt: skip
        elif name == "merge":
            merge(pool)
        elif name == "merge-in-memory":
            shards = [torch.load(d / "images.pt", weights_only=False) for d in sorted(pool.glob("shard-*"))]
            images, labels = (
                torch.cat([s["images"] for s in shards]),
                torch.cat([s["labels"] for s in shards]),
            )
            images[torch.argsort(labels, stable=True)].contiguous()
        elif name == "select":
            select_pool(cfg, "dit+select", gen)
        else:
            data = torch.load(pool / "dataset.pt", weights_only=True)
            feats, logits = encode(encoder, data["images"])
            sel = select_per_class(feats, logits, data["labels"], a.ipc, real_means=means)
            data["images"][sel.keep].contiguous()
    seconds = time.perf_counter() - t0
    pool_mb = sum(f.stat().st_size for f in pool.glob("shard-*/images.pt")) / 2**20
    written = {"generate": None, "merge": pool / "dataset.pt", "merge-in-memory": pool / "dataset.pt"}
    f = written.get(name, gen / "dataset.pt")
    set_mb = (
        pool_mb / 2 if f is None else torch.load(f, weights_only=True, mmap=True)["images"].numel() / 2**20
    )
    return {"seconds": seconds, "added_mb": max(0.0, peak.peak - base), "pool_mb": pool_mb, "set_mb": set_mb}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--ipc", type=int, default=10, help="kept images per class")
    ap.add_argument("--ratios", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--latent", type=int, default=8, help="latent side (images are 8x: 8 -> 64 px)")
    ap.add_argument("--train-per-class", type=int, default=4)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--ratio", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--pipe", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    # bench/scale.py's config() reads these
    a.k, a.steps, a.inversion_steps = a.classes, 2, 2
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.stage:
        print(json.dumps(stage(a, a.stage, a.work, a.ratio)))
        return 0
    import tempfile

    work = a.work or Path(tempfile.mkdtemp(prefix="ddkit-pool-"))
    a.pipe = work / "pipe"
    if not (a.pipe / "model_index.json").is_file():
        from ddkit.models.tiny import build_tiny_pipeline

        build_tiny_pipeline(a.pipe, sample_size=a.latent)
    passthrough = ["--classes", str(a.classes), "--ipc", str(a.ipc), "--latent", str(a.latent),
                   "--train-per-class", str(a.train_per_class), "--work", str(work), "--pipe", str(a.pipe)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    rows = []
    print(f"{a.classes} classes, kept IPC {a.ipc}, {8 * a.latent} px, work dir {work}", flush=True)
    print(
        "| ratio | stage | s | pool MB | set MB | +MB anonymous | ÷ pool | ÷ set |\n|---|---|---|---|---|---|---|---|"
    )
    for ratio in a.ratios:
        setup(a, work, ratio)
        for name in STAGES:
            cmd = [sys.executable, __file__, *passthrough, "--stage", name, "--ratio", str(ratio)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{name} at ratio {ratio} failed:\n{out.stderr[-3000:]}")
            r = {"ratio": ratio, "stage": name, **json.loads(out.stdout.strip().splitlines()[-1])}
            rows.append(r)
            print(f"| {ratio} | {name} | {r['seconds']:.2f} | {r['pool_mb']:.1f} | {r['set_mb']:.1f} | "
                  f"{r['added_mb']:.1f} | {r['added_mb'] / r['pool_mb']:.2f} | {r['added_mb'] / r['set_mb']:.2f} |",
                  flush=True)  # fmt: skip
    if len(a.ratios) > 1:
        print(
            "\nAnonymous MB added per MB of pool, from ratio "
            f"{min(a.ratios)} to {max(a.ratios)} (the goal: about 0 for the library, at any pool size):"
        )
        for name in STAGES:
            lo, hi = (
                next(r for r in rows if r["stage"] == name and r["ratio"] == x)
                for x in (min(a.ratios), max(a.ratios))
            )
            print(f"  {name:17s} {(hi['added_mb'] - lo['added_mb']) / (hi['pool_mb'] - lo['pool_mb']):6.2f}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
