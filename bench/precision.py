"""fp32 / bf16 step-time ratios on this host, and what ``precision: auto`` chooses here and why.

Each ratio is fp32 seconds ÷ bf16 seconds of the same step measured in this run (> 1: bf16 is faster),
the two precisions interleaved step by step so that a change in machine load hits both alike:

1. the demo model (``configs/mnist.yaml``): DiT-T/4, 1x32x32, 10 classes, batch 64 —
   a real training step (:meth:`ddkit.train.Trainer.train_step`: noise, forward, loss, backward, AdamW, EMA)
   and the no-grad sampling forward of a CFG-doubled batch (2 x 64);
2. one DiT-XL/2-sized transformer block (hidden 1152, 16 heads, 256 tokens = 32x32 latents at patch 2,
   adaLN-Zero as in DiT; diffusers ``BasicTransformerBlock``) at a small batch, forward + backward.

Then :func:`ddkit.hardware.choose_precision` resolves ``auto`` for the demo's training step and the XL
block, with the same timed check the stages run. No wall-time assertions.

Run: ``python bench/precision.py [--threads N] [--repeats 5] [--xl-batch 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time


def interleaved(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each ``steps[name]()``, one warm-up each, then ``repeats`` rounds in turn."""
    for fn in steps.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def demo_steps(batch: int):
    """(train steps by precision, sampling-forward steps by precision, model) for the demo's DiT-T/4."""
    import torch

    from ddkit import hardware as hw
    from ddkit.config import ModelConfig, load_config
    from ddkit.models import build_backbone
    from ddkit.train import Trainer

    mcfg = ModelConfig(arch="DiT-T/4", in_channels=1, input_size=32, num_classes=10)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, 32, 32, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (batch,), generator=g)
    train, sample = {}, {}
    for p in ("fp32", "bf16"):
        cfg = load_config(None, [f"pretrain.precision={p}", f"pretrain.batch_size={batch}"])
        tr = Trainer.from_model(cfg, "pretrain", build_backbone(mcfg, seed=0))
        train[p] = lambda tr=tr: tr.train_step((images, labels))
        model = build_backbone(mcfg, seed=0).eval()
        step = hw.model_step(model, hw.backbone_inputs(model, 2 * batch, "cpu"), backward=False)
        sample[p] = lambda step=step, p=p: _under(p, step)
    return train, sample, build_backbone(mcfg, seed=0)


def xl_block_step(batch: int):
    """A DiT-XL/2 block (1152 hidden, 16 heads x 72, 256 tokens, adaLN-Zero): forward + backward."""
    import torch
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(
        1152, 16, 72, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 256, 1152, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)

    def step() -> None:
        block(x, timestep=t, class_labels=y).float().mean().backward()
        block.zero_grad(set_to_none=True)

    return step


def _under(precision: str, step) -> None:
    from ddkit.hardware import autocast

    with autocast("cpu", precision):
        step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per step (median)")
    ap.add_argument("--batch", type=int, default=64, help="demo batch (the demo trains at 64)")
    ap.add_argument("--xl-batch", type=int, default=2, help="batch of the DiT-XL/2 block")
    args = ap.parse_args()

    import torch

    from ddkit import hardware as hw

    threads = hw.configure_threads() if args.threads is None else args.threads
    torch.set_num_threads(threads)
    caps = hw.detect_capabilities("cpu")
    print(f"host: {caps.device_name}; torch CPU capability {caps.cpu_capability}; native bf16: "
          f"{'+'.join(caps.cpu_bf16) or 'none'}; {threads} threads; torch {torch.__version__}")

    train, sample, demo_model = demo_steps(args.batch)
    t = interleaved(train, args.repeats)
    print(f"demo DiT-T/4 train step, batch {args.batch}: fp32 {t['fp32']:.3f} s, bf16 {t['bf16']:.3f} s, "
          f"fp32/bf16 = {t['fp32'] / t['bf16']:.2f}")
    s = interleaved(sample, args.repeats)
    print(f"demo DiT-T/4 sampling forward, batch {2 * args.batch} (CFG): fp32 {s['fp32']:.3f} s, "
          f"bf16 {s['bf16']:.3f} s, fp32/bf16 = {s['fp32'] / s['bf16']:.2f}")
    xl = xl_block_step(args.xl_batch)
    x = interleaved({p: (lambda p=p: _under(p, xl)) for p in ("fp32", "bf16")}, max(2, args.repeats // 2))
    print(f"DiT-XL/2 block (1152 hidden, 16 heads, 256 tokens) fwd+bwd, batch {args.xl_batch}: "
          f"fp32 {x['fp32']:.3f} s, bf16 {x['bf16']:.3f} s, fp32/bf16 = {x['fp32'] / x['bf16']:.2f}")

    step = hw.model_step(demo_model, hw.backbone_inputs(demo_model, args.batch, "cpu"), backward=True)
    c = hw.choose_precision("auto", "cpu", role="train", step=step)
    print(f"auto for the demo's training: {c.summary()}")
    c = hw.choose_precision("auto", "cpu", role="train", step=xl)
    print(f"auto for a DiT-XL/2 block: {c.summary()}")


if __name__ == "__main__":
    main()
