"""Does a class-conditional backbone use its label? A diagnostic for issue 9 (README, "What made the labels count").

Two figures, both scored by a "judge": a ConvNet-3 trained on the real train split (4 epochs, ~97 % on the
real test split), so that a number means "a real-data classifier recognises the class":

- x̂0 label use: real test digits noised to timestep t (400 and 600), denoised in one step to
  x̂0 = (x_t − √(1−ᾱ) ε̂) / √ᾱ (DDPM, Ho et al. 2020, eq. 15) once with the right label and once with a wrong
  one (y + 1 mod K). Judge accuracy on x̂0, right vs wrong: equal numbers mean the label is ignored; a model
  that reads it scores far higher with the right label (at t = 600, x_t keeps 2.6 % of the signal energy).
- samples: ``--per-class`` images per class sampled from noise with the configured sampler (50 DDPM steps)
  at CFG 1, 2 and 4; judge accuracy against the label asked for.

The reference is the judge itself on the real test split, measured in the same run.

Usage::

    python bench/label_use.py                              # the demo's backbone, runs/mnist/pretrain
    python bench/label_use.py runs/mnist/minimax --per-class 20
"""

from __future__ import annotations

import argparse
import time

import torch


def train_judge(shards: str, epochs: int = 4, seed: int = 0):
    """ConvNet-3 (width 128) on the real train split, the selector's encoder recipe
    (:func:`ddkit.methods.select.train_encoder`). Returns (judge in eval mode, real test accuracy in [0, 1],
    the real test split as (float [N, C, H, W] in [-1, 1], int64 [N]))."""
    from ddkit.data.shards import load_tensors, read_index
    from ddkit.methods.select import tensor_batches, train_encoder

    idx = read_index(shards)
    x, y = load_tensors(shards, "train")
    xt, yt = load_tensors(shards, "test")
    net = train_encoder(tensor_batches(x, y, seed=seed), channels=int(x.shape[1]), resolution=int(x.shape[-1]),
                        num_classes=len(idx["classes"]), epochs=epochs, seed=seed, width=128)
    xt = xt.float() / 127.5 - 1
    return net, accuracy(net, xt, yt), (xt, yt)


@torch.no_grad()
def accuracy(judge, images, labels) -> float:
    """Judge accuracy on float [N, C, H, W] images in [-1, 1] (clamped) against int64 [N] labels."""
    return (judge(images.clamp(-1, 1)).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def x0_label_use(model, judge, x0, y, t: int, seed: int = 0) -> tuple[float, float]:
    """Judge accuracy of one-step x̂0 from x_t at timestep ``t`` with the right and a wrong label.

    Args: model: a ddkit Backbone; x0: float [N, C, H, W] real images in [-1, 1]; y: int64 [N].
    """
    from ddkit.methods.minimax import DiffusionTables, predict_x0

    tables = DiffusionTables.create(model.config.num_train_timesteps)
    ab = tables.alphas_cumprod[t].float()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    tt = torch.full((len(x0),), t, dtype=torch.long)
    out = []
    for labels in (y, (y + 1) % model.num_classes):
        eps = model(xt, tt, labels)[:, : model.in_channels]
        out.append(accuracy(judge, predict_x0(xt, tt, eps, tables), y))
    return out[0], out[1]


def main() -> None:
    from ddkit.data.shards import read_index
    from ddkit.models import load_backbone
    from ddkit.sampling import sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "checkpoint", nargs="?", default="runs/mnist/pretrain",
        help="RUN/<stage>, a ckpt/last.pt, or a diffusers DiT dir (default: the demo's pretrained backbone)",
    )  # fmt: skip
    ap.add_argument("--shards", default="shards/mnist", help="the real data the backbone was trained on")
    ap.add_argument("--per-class", type=int, default=10, help="samples per class at each CFG scale")
    ap.add_argument("--steps", type=int, default=50, help="DDPM sampling steps")
    ap.add_argument("--x0-images", type=int, default=200, help="real test images for the x̂0 check")
    a = ap.parse_args()
    from pathlib import Path

    if a.checkpoint == ap.get_default("checkpoint") and not Path(a.checkpoint).exists():
        print(f"skipped: no {a.checkpoint} (run `make demo` first, or pass a checkpoint)")
        return

    t0 = time.perf_counter()
    judge, real_acc, (xt, yt) = train_judge(a.shards)
    print(f"judge: real test accuracy {100 * real_acc:.1f} % (reference), trained in {time.perf_counter() - t0:.0f} s")
    model, _ = load_backbone(a.checkpoint)
    classes = len(read_index(a.shards)["classes"])
    x0, y = xt[: a.x0_images], yt[: a.x0_images]
    for t in (400, 600):
        right, wrong = x0_label_use(model, judge, x0, y, t)
        print(f"x̂0 at t={t}: right label {100 * right:.1f} %, wrong label {100 * wrong:.1f} % (ratio to real {right / real_acc:.2f})")
    labels = torch.arange(classes).repeat_interleave(a.per_class)
    for cfg in (1.0, 2.0, 4.0):
        x = sample(model, labels, steps=a.steps, sampler="ddpm", cfg_scale=cfg)
        acc = accuracy(judge, x, labels)
        print(f"samples, {a.steps} DDPM steps, CFG {cfg:g}: judge accuracy {100 * acc:.1f} % (ratio to real {acc / real_acc:.2f})")


if __name__ == "__main__":
    main()
