"""GPU benchmark: DiT-XL/2 at 256 px + the SD-VAE decoder, random weights, one command, no downloads.

    python bench/gpu.py                 # one CUDA GPU, under 10 minutes on an H100/H200; "skipped: no GPU" without
    python bench/gpu.py --tiny          # every code path on the CPU with a tiny DiT and VAE, in seconds
    python bench/gpu.py --json out.json # also write the figures

What it measures, each against a reference measured in the same run:

1. **Generation** images/s (class-conditional, CFG 4.0, 50 DDIM steps, batch 32, VAE decode included) of
   :func:`ddkit.sampling.sample` + :func:`ddkit.models.vae.decode` against diffusers' ``DiTPipeline`` (fp32,
   as loaded by default) on the very same transformer and VAE, the same DDIM schedule, steps, CFG scale and
   per-image generators; ddkit in fp32, bf16 autocast, bf16 + flash attention (``sdpa_kernel(FLASH)``;
   diffusers' DiT already calls ``scaled_dot_product_attention``, this pins the flash kernel) and that plus
   ``torch.compile``. The max difference of the fp32 outputs from the pipeline's is printed (same math:
   ~1e-6). Goal: the best ddkit variant >= 1.5x ``DiTPipeline``.
2. **Share of the GPU's dense bf16 peak** reached by the transformer: images/s x steps x 2 forwards (CFG)
   x FLOPs of one forward. FLOPs are counted with ``torch.utils.flop_counter`` on the real module (meta
   tensors): DiT-XL/2 at 256 px is 118.6 G multiply-adds (DiT paper, Table 4 "Gflops", fvcore counts one
   multiply-add as one flop), i.e. ~237 GFLOP. Peaks (dense, no sparsity, vendor data sheets):
   :data:`BF16_PEAK_TFLOPS`. The VAE decode is in the time but not in the FLOPs, so this is a lower bound.
   Goal: >= 40 %.
3. **Minimax training** steps/s (DiffFit on the first 14 blocks, lambda_r 0.002, lambda_d 0.008, memory 64,
   cached latents) through :meth:`ddkit.train.Trainer.train_step`, fp32 (the reference's precision) and bf16.
4. **Peak memory** of every variant (``torch.cuda.max_memory_allocated``; on the CPU the process's max RSS).

Random weights: N(0, 0.02) for every transformer parameter (so ε_c and ε_u differ and CFG is real work);
the VAE is ``AutoencoderKL`` with the SD-VAE layout (sd-vae-ft-ema config) at its own random init. Speed
does not depend on the values. A time guard (``--max-seconds``) skips what would not fit.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import timed_interleaved  # noqa: E402  (bench/generate.py)

from ddkit.config import ModelConfig, load_config  # noqa: E402
from ddkit.models import build_backbone  # noqa: E402
from ddkit.models.vae import decode  # noqa: E402
from ddkit.sampling import sample, to_uint8  # noqa: E402
from ddkit.schedule import scheduler_config  # noqa: E402

#: Dense bf16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name`` (first match wins;
#: NVIDIA data sheets: H100/H200 SXM 989, H100 PCIe 756, H100 NVL 835, A100 312, L40S 362, A10 125).
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}
DIT_XL2_GMACS = 118.6  # DiT paper, Table 4, per forward at 256 px
GOAL_SPEEDUP = 1.5
GOAL_PEAK_SHARE = 0.40


@dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run."""

    device: str
    arch: str = "DiT-XL/2"
    input_size: int = 32  # latent side (256 px / 8)
    vae_widths: tuple[int, ...] = (128, 256, 512, 512)  # SD-VAE (sd-vae-ft-ema) block_out_channels
    vae_groups: int = 32
    batch: int = 32
    steps: int = 50
    repeats: int = 2
    train_batch: int = 32
    train_steps: int = 10
    compile_backend: str = "inductor"


def tiny_setup(device: str) -> Setup:
    """A DiT-T/2 on 8x8 latents and a 4-level VAE of width 16 (64 px images): seconds on a CPU. Compiling
    uses dynamo's ``eager`` backend there (the code path, not inductor's minutes of C++ compilation)."""
    return Setup(device=device, arch="DiT-T/2", input_size=8, vae_widths=(16, 16, 16, 16), vae_groups=8,
                 batch=2, steps=3, repeats=1, train_batch=4, train_steps=2,
                 compile_backend="eager" if device == "cpu" else "inductor")


def bf16_peak(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name, or None when unknown (:data:`BF16_PEAK_TFLOPS`)."""
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def model_config(s: Setup, difffit_blocks: int = 0) -> ModelConfig:
    return ModelConfig(arch=s.arch, in_channels=4, input_size=s.input_size, num_classes=1000, learn_sigma=True,
                       difffit_blocks=difffit_blocks)


def random_backbone(s: Setup, difffit_blocks: int = 0):
    """A Backbone with N(0, 0.02) weights on the device (no init pass: DiT-XL/2's takes seconds)."""
    model = build_backbone(model_config(s, difffit_blocks), init=False).to(s.device)
    gen = torch.Generator(device=s.device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("gammas."):
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def random_vae(s: Setup):
    """``AutoencoderKL`` with the SD-VAE layout (4 levels, 2 resnets each, 4 latent channels), random init."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(s.vae_widths)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=s.vae_widths,
                        layers_per_block=2, latent_channels=4, norm_num_groups=s.vae_groups,
                        sample_size=s.input_size * 8, scaling_factor=0.18215)
    return vae.to(s.device).eval().requires_grad_(False)


def forward_flops(s: Setup) -> float:
    """FLOPs of one transformer forward of one image (``torch.utils.flop_counter``, meta tensors)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = build_backbone(model_config(s), init=False)
        x, t, y = torch.randn(1, 4, s.input_size, s.input_size), torch.tensor([5]), torch.tensor([3])
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x, t, y)
    return float(fc.get_total_flops())


def _sync(device: str):
    return (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (process)


def _flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION])


def generation_fns(s: Setup, model, vae) -> tuple[dict, dict]:
    """{variant: callable -> float [B, 3, H, W] in [0, 1] on the CPU} and {variant: note}."""
    from diffusers import DDIMScheduler, DiTPipeline

    labels = torch.arange(s.batch, device=s.device) * 7 % 1000

    def gens():
        return [torch.Generator(device=s.device).manual_seed(i) for i in range(s.batch)]

    pipe = DiTPipeline(transformer=model.dit, vae=vae,
                       scheduler=DDIMScheduler(**scheduler_config(1000), set_alpha_to_one=True)).to(s.device)
    pipe.set_progress_bar_config(disable=True)

    def run_pipe():
        out = pipe(class_labels=labels.tolist(), num_inference_steps=s.steps, guidance_scale=4.0,
                   generator=gens(), output_type="np").images
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    fns, notes = {"DiTPipeline fp32 (reference)": run_pipe}, {}
    variants = {"ddkit fp32": (None, False, False), "ddkit bf16": (torch.bfloat16, False, False),
                "ddkit bf16 + flash SDPA": (torch.bfloat16, True, False),
                "ddkit bf16 + flash SDPA + compile": (torch.bfloat16, True, True)}
    for name, (dtype, flash, compiled) in variants.items():
        run_model = model
        if compiled:
            run_model = torch.compile(model, backend=s.compile_backend)
            for a in ("in_channels", "input_size", "num_classes", "learn_sigma"):
                setattr(run_model, a, getattr(model, a))

        def run(run_model=run_model, dtype=dtype, flash=flash, exact=False):
            """As ``ddkit generate``: uint8 images on the CPU; ``exact`` skips the quantisation (for the diff)."""
            with _flash() if flash else nullcontext():
                z = sample(run_model, labels, steps=s.steps, sampler="ddim", cfg_scale=4.0, generators=gens(),
                           autocast_dtype=dtype)
            x = decode(vae, z).float()
            return (x / 2 + 0.5).clamp(0, 1).cpu() if exact else to_uint8(x).cpu().float() / 255.0

        if compiled:
            t0 = time.perf_counter()
            run()
            _sync(s.device)()
            notes[name] = f"compile + first call {time.perf_counter() - t0:.1f} s ({s.compile_backend})"
        fns[name] = run
    return fns, notes


def bench_generation(s: Setup, flops_fwd: float, peak: float | None) -> dict:
    model, vae = random_backbone(s), random_vae(s)
    fns, notes = generation_fns(s, model, vae)
    sync = _sync(s.device)
    secs, mem = {}, {}
    for name, fn in fns.items():  # peak memory per variant, one call each (also the warm-up)
        _peak_reset(s.device)
        fn()
        sync()
        mem[name] = _peak_gib(s.device)
    secs = timed_interleaved(fns, s.repeats, sync)
    ref_name = next(iter(fns))
    ref_img = fns[ref_name]()
    rows = {}
    for name, sec in secs.items():
        ips = s.batch / sec
        achieved = ips * s.steps * 2 * flops_fwd  # CFG: two transformer forwards per image and step
        row = {"images_per_s": ips, "vs_pipeline": ips * secs[ref_name] / s.batch, "peak_mem_gib": mem[name],
               "tflops": achieved / 1e12, "peak_share": achieved / peak if peak else None, "note": notes.get(name)}
        if name == "ddkit fp32":
            row["max_abs_diff_vs_pipeline"] = float((fns[name](exact=True) - ref_img).abs().max())
        rows[name] = row
    return rows


def bench_training(s: Setup) -> dict:
    """Minimax DiffFit steps/s in fp32 and bf16 (cached latents, full memories after the warm-up)."""
    from ddkit.train import Trainer

    blocks = 14
    out = {}
    latents = torch.randn(s.train_batch, 4, s.input_size, s.input_size, device=s.device)
    labels = torch.arange(s.train_batch) % 10
    sync = _sync(s.device)
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, ["minimax.trainable=difffit", f"minimax.batch_size={s.train_batch}",
                                 "minimax.lambda_r=0.002", "minimax.lambda_d=0.008", "minimax.memory_size=64",
                                 f"minimax.precision={precision}"])
        model = random_backbone(s, difffit_blocks=blocks).train()
        _peak_reset(s.device)
        tr = Trainer.from_model(cfg, "minimax", model, device=s.device, data_mode="latents")
        batch = (None, labels, latents)
        for _ in range(3):
            tr.train_step(batch)
        sync()
        t0 = time.perf_counter()
        for _ in range(s.train_steps):
            tr.train_step(batch)
        sync()
        dt = time.perf_counter() - t0
        out[f"minimax DiffFit {precision}"] = {"steps_per_s": s.train_steps / dt,
                                               "images_per_s": s.train_steps * s.train_batch / dt,
                                               "peak_mem_gib": _peak_gib(s.device)}
        del tr, model
    return out


def report(s: Setup, res: dict) -> None:
    dev = res["device_name"]
    print(f"ddkit GPU benchmark on {dev} — torch {torch.__version__}; {s.arch}, latents 4x{s.input_size}x"
          f"{s.input_size}, VAE widths {s.vae_widths}")
    print(f"  transformer forward: {res['forward_gflop']:.4g} GFLOP per image (flop_counter); "
          f"DiT paper: {DIT_XL2_GMACS} G multiply-adds = {2 * DIT_XL2_GMACS:.1f} GFLOP for DiT-XL/2")
    peak = res["bf16_peak_tflops"]
    print(f"  bf16 dense peak used: {f'{peak:.0f} TFLOP/s' if peak else 'unknown for this device'}; peak mem: "
          f"{'torch.cuda.max_memory_allocated' if s.device.startswith('cuda') else 'process max RSS (CPU)'}")
    gen = res.get("generation")
    if gen:
        print(f"[1] generation: batch {s.batch}, {s.steps} DDIM steps, CFG 4.0, VAE decode included, "
              f"median of {s.repeats} interleaved rounds")
        for name, r in gen.items():
            share = f"{100 * r['peak_share']:5.1f}% of bf16 peak" if r["peak_share"] is not None else "peak n/a"
            line = (f"    {name:36s} {r['images_per_s']:9.2f} images/s  x{r['vs_pipeline']:.2f} vs DiTPipeline  "
                    f"{r['tflops']:8.2f} TFLOP/s  {share}  peak mem {r['peak_mem_gib']:.2f} GiB")
            if "max_abs_diff_vs_pipeline" in r:
                line += f"  max|diff| vs pipeline {r['max_abs_diff_vs_pipeline']:.1e}"
            if r["note"]:
                line += f"  [{r['note']}]"
            print(line)
    else:
        print("[1] generation: skipped (time guard)")
    tr = res.get("training")
    if tr:
        print(f"[2] training: batch {s.train_batch}, {s.train_steps} timed steps after 3 warm-up")
        for name, r in tr.items():
            print(f"    {name:36s} {r['steps_per_s']:9.2f} steps/s ({r['images_per_s']:.1f} images/s)  "
                  f"peak mem {r['peak_mem_gib']:.2f} GiB")
    else:
        print("[2] training: skipped (time guard)")
    for line in goal_lines(res):
        print(line)
    print(f"total {res['seconds']:.1f} s")


def goal_lines(res: dict) -> list[str]:
    """The two goals as ratios (achieved / goal; >= 1 means met)."""
    gen = res.get("generation") or {}
    ddkit = {k: v for k, v in gen.items() if k.startswith("ddkit")}
    if not ddkit:
        return ["goals: not measured"]
    best = max(ddkit, key=lambda k: ddkit[k]["vs_pipeline"])
    speed = ddkit[best]["vs_pipeline"]
    lines = [f"goal generation >= {GOAL_SPEEDUP}x DiTPipeline: {speed:.2f}x ({best}) -> ratio to goal "
             f"{speed / GOAL_SPEEDUP:.2f} {'met' if speed >= GOAL_SPEEDUP else 'NOT met'}"]
    shares = {k: v["peak_share"] for k, v in ddkit.items() if v["peak_share"] is not None}
    if shares:
        k = max(shares, key=shares.get)
        lines.append(f"goal >= {100 * GOAL_PEAK_SHARE:.0f}% of bf16 peak: {100 * shares[k]:.1f}% ({k}) -> ratio to "
                     f"goal {shares[k] / GOAL_PEAK_SHARE:.2f} {'met' if shares[k] >= GOAL_PEAK_SHARE else 'NOT met'}")
    else:
        lines.append(f"goal >= {100 * GOAL_PEAK_SHARE:.0f}% of bf16 peak: n/a (no known bf16 peak for this device)")
    return lines


def run(s: Setup, max_seconds: float) -> dict:
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(0) if s.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    peak = bf16_peak(name) if s.device.startswith("cuda") else None
    res = {"setup": asdict(s), "device_name": name, "bf16_peak_tflops": peak / 1e12 if peak else None}
    flops = forward_flops(s)
    res["forward_gflop"] = flops / 1e9
    res["generation"] = bench_generation(s, flops, peak)
    if time.perf_counter() - t0 < 0.7 * max_seconds:
        res["training"] = bench_training(s)
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny DiT + VAE: every code path in seconds (CPU default)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda if available; without it the full benchmark is skipped")
    ap.add_argument("--batch", type=int, default=None, help="generation batch (default 32; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; tiny 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 2; tiny 1)")
    ap.add_argument("--max-seconds", type=float, default=540.0, help="time guard: training is skipped past 70%%")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = a.device if a.device != "auto" else ("cuda" if cuda else "cpu")
    if device == "cuda" and not cuda:
        print("skipped: no GPU")
        return 0
    if device == "cpu" and not a.tiny:
        print("skipped: no GPU (the full-size benchmark needs one; --tiny runs every code path on the CPU)")
        return 0
    s = tiny_setup(device) if a.tiny else Setup(device=device)
    s = replace(s, **{k: v for k, v in (("batch", a.batch), ("steps", a.steps), ("repeats", a.repeats)) if v})
    res = run(s, a.max_seconds)
    report(s, res)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
