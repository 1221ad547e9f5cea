"""Benchmark ``ddkit generate``: sampler throughput against diffusers' DiTPipeline, and budget keeping.

    python bench/generate.py                      # CPU parts (+ GPU part when CUDA is available)
    python bench/generate.py --time-limit 20 --runs 10 --steps 10 --batch 32

1. **Throughput** (images/s) of :func:`ddkit.sampling.sample` against ``diffusers.DiTPipeline`` on the SAME
   tiny DiT (4-channel 32x32 "latents", 1000 classes so the pipeline's hard-coded null class 1000 is
   valid), the same DDIM scheduler, steps, batch and CFG scale 4. The pipeline gets an identity "VAE" so
   only sampling is timed; both draw the initial noise from the same per-image generators, and the max
   difference of their outputs is printed (DDIM is deterministic, so it must be ~0). ddkit variants: fp32
   eager, bf16 autocast, and ``torch.compile`` (compile time reported separately) — only what helps is
   worth turning on (``generate.precision``, ``generate.compile``).
2. **Budget keeping**: ``--runs`` full generations (model build included in the budget) with
   ``--time-limit``; reports images made ÷ images possible (``manifest.budget_use_images``: the calibrated
   rate at the planned steps over the window after planning, minus the safety margin), the share of the
   limit used, and the number of overruns.
3. **GPU** (only with CUDA): the same comparison for DiT-XL/2 at 256 px (random weights, 4x32x32 latents),
   fp32 / bf16 / bf16+compile, with the share of the GPU's dense bf16 peak reached
   (DiT-XL/2: 118.6 G multiply-adds per image forward, Peebles & Xie 2023, Table 4; ×2 for CFG).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddkit.config import ModelConfig, load_config  # noqa: E402
from ddkit.models import build_backbone  # noqa: E402
from ddkit.sampling import sample  # noqa: E402
from ddkit.schedule import scheduler_config  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s), vendor data sheets (SXM parts).
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
DIT_XL2_MACS = 118.6e9  # per image forward at 256 px (DiT paper, Table 4 "Gflops")


def identity_vae():
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class IdentityVAE(ModelMixin, ConfigMixin):
        """Stands in for the SD-VAE so the pipeline times sampling only."""

        @register_to_config
        def __init__(self, scaling_factor: float = 1.0):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def decode(self, z):
            return SimpleNamespace(sample=z)

    return IdentityVAE()


def make_pipeline(backbone, device):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(
        transformer=backbone.dit,
        vae=identity_vae(),
        scheduler=DDIMScheduler(**scheduler_config(1000), set_alpha_to_one=True),
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_interleaved(fns: dict, repeats: int, sync) -> dict:
    """Median seconds per callable; one warm-up each, then ``repeats`` rounds calling every callable once
    per round, so a shared machine's load drifts over all of them alike."""
    for fn in fns.values():
        fn()
        sync()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            ts[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in ts.items()}


def throughput(
    backbone, *, batch: int, steps: int, repeats: int, device, variants: list[str], flops_per_img_step=None
):
    """Print images/s of DiTPipeline and ddkit variants; return {name: images/s}."""
    backbone = backbone.to(device).eval()
    labels = torch.arange(batch, device=device) % backbone.num_classes
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def gens():
        return [torch.Generator(device=device).manual_seed(i) for i in range(batch)]

    pipe = make_pipeline(backbone, device)
    ref_name = "diffusers DiTPipeline (fp32)"

    def run_pipe():
        return pipe(
            class_labels=labels.tolist(),
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=gens(),
            output_type="pt",
        ).images

    fns = {ref_name: run_pipe}
    notes = {}
    for v in variants:
        model = backbone
        autocast = torch.bfloat16 if "bf16" in v else None
        if "compile" in v:
            t = time.perf_counter()
            model = torch.compile(backbone)
            for a in ("in_channels", "input_size", "num_classes", "learn_sigma"):
                setattr(model, a, getattr(backbone, a))
            sample(model, labels, steps=2, sampler="ddim", generators=gens(), autocast_dtype=autocast)
            sync()
            notes[f"ddkit sample ({v})"] = f", compile {time.perf_counter() - t:.1f} s"

        def run(model=model, autocast=autocast):
            return sample(
                model,
                labels,
                steps=steps,
                sampler="ddim",
                cfg_scale=4.0,
                generators=gens(),
                autocast_dtype=autocast,
            )

        fns[f"ddkit sample ({v})"] = run
    secs = timed_interleaved(fns, repeats, sync)
    results = {k: batch / s for k, s in secs.items()}
    ref_img = run_pipe().float()
    print(f"  batch {batch}, {steps} DDIM steps, CFG 4.0, {device}, median of {repeats} interleaved rounds:")
    for name, ips in results.items():
        ratio = ips / results[ref_name]
        line = f"    {name:38s} {ips:9.2f} images/s   x{ratio:.2f} vs DiTPipeline"
        if name != ref_name:
            out = ((fns[name]() / 2 + 0.5).clamp(0, 1)).float()
            line += f"   max|diff| {(out - ref_img).abs().max().item():.1e}{notes.get(name, '')}"
        if flops_per_img_step is not None and device.type == "cuda":
            peak = next((p for k, p in BF16_PEAK.items() if k in torch.cuda.get_device_name(0)), None)
            achieved = ips * steps * flops_per_img_step
            line += f"   {achieved / 1e12:7.1f} TFLOP/s"
            if peak:
                line += f" = {100 * achieved / peak:.1f}% of bf16 peak"
        print(line)
    return results


def budget_runs(runs: int, time_limit: float) -> None:
    """``runs`` budgeted generations on CPU with a tiny pixel DiT (10 classes, 16x16, 1 channel)."""
    import json

    from ddkit.errors import BudgetError
    from ddkit.generate import generate

    mcfg = ModelConfig(arch="DiT-T/4", in_channels=1, input_size=16, num_classes=10, learn_sigma=True)
    uses, shares, overruns, ipcs, steps, refused = [], [], 0, [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(runs):
            t0 = time.monotonic()
            model = build_backbone(mcfg, seed=r).eval()  # "loading" is inside the budget
            cfg = load_config(
                None,
                [
                    f"run_dir={tmp}/run{r}",
                    f"data.shards={tmp}/none",
                    "generate.batch_size=20",
                    "generate.precision=fp32",  # budget use in one fixed precision
                    "model.input_size=16",
                    "generate.steps_min=2",
                    "generate.steps_max=50",
                    "generate.ipc_max=100000",
                    f"generate.seed={r}",
                ],
            )
            try:
                d = generate(cfg, time_limit=time_limit, model=model, progress=False, t0=t0)
            except BudgetError as e:
                refused += 1
                print(f"    run {r}: refused ({e})")
                continue
            wall = time.monotonic() - t0
            man = json.loads((d / "manifest.json").read_text())
            overruns += wall > time_limit
            uses.append(man["budget_use_images"] or 0.0)
            shares.append(wall / time_limit)
            ipcs.append(man["ipc"])
            steps.append(f"{man['steps']['min']}-{man['steps']['max']}")
            print(
                f"    run {r}: IPC {man['ipc']:4d}, steps {steps[-1]:>5s}, wall {wall:6.2f} s "
                f"({100 * wall / time_limit:.0f}%), images made/possible {uses[-1]:.2f}"
            )
    if not uses:
        print(f"  {runs} runs: all refused")
        return
    print(
        f"  {runs} runs ({refused} refused), --time-limit {time_limit:g}: overruns {overruns}, "
        f"budget use (images made / possible) mean {statistics.mean(uses):.2f} min {min(uses):.2f}, "
        f"wall share of limit mean {statistics.mean(shares):.2f} max {max(shares):.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--skip-budget", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on CPU (slow to compile)")
    ap.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="also time bf16 autocast on CPU (very slow without "
        "native bf16 matmuls: a 600 s timeout was hit on the 2-core dev VM)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: robust on a shared machine, where "
        "2 OpenMP threads competing with another process for 2 cores run several times slower)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"ddkit generate benchmark — torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_throughput:
        print(
            "[1] CPU: tiny DiT (DiT-T/4, 4x32x32 input, 1000 classes), ddkit sampler vs diffusers DiTPipeline"
        )
        torch.manual_seed(0)
        tiny = build_backbone(
            ModelConfig(arch="DiT-T/4", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True),
            seed=0,
        )
        variants = (
            ["fp32"]
            + (["bf16 autocast"] if args.cpu_bf16 else [])
            + (["fp32 + torch.compile"] if args.compile else [])
        )
        throughput(
            tiny,
            batch=args.batch,
            steps=args.steps,
            repeats=args.repeats,
            device=torch.device("cpu"),
            variants=variants,
        )

    if not args.skip_budget:
        print(f"[2] CPU: budget keeping over {args.runs} runs")
        budget_runs(args.runs, args.time_limit)

    print("[3] GPU: DiT-XL/2 256 (random weights)")
    if not torch.cuda.is_available():
        print("  skipped: no GPU")
        return
    xl = build_backbone(
        ModelConfig(arch="DiT-XL/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True), seed=0
    )
    throughput(
        xl,
        batch=64,
        steps=50,
        repeats=2,
        device=torch.device("cuda"),
        variants=["fp32", "bf16 autocast", "bf16 autocast + torch.compile"],
        flops_per_img_step=2 * 2 * DIT_XL2_MACS,
    )


if __name__ == "__main__":
    main()
