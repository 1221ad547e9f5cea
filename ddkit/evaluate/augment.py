"""Training-time augmentation of the evaluation protocols, on whole batches of float tensors.

* DSA, Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), with the parameters and the
  one-random-op-per-batch mode of the ECCV 2024 challenge scorer
  (DataDistillation/ECCV2024-Dataset-Distillation-Challenge, ``utils/utils.py``: ``ParamDiffAug``,
  ``DiffAugment``, ``rand_*``). The ops are vectorised (the reference builds affine matrices in Python
  loops) but draw the same distributions in the same order.
* IDC's ImageNet-style transforms (snu-mllab/Efficient-Dataset-Condensation, ``data.py``
  ``transform_imagenet`` and ``misc/utils.py`` ``ColorJitter``/``Lighting``): RandomResizedCrop(scale
  0.5–1), horizontal flip, colour jitter 0.4 in random order, AlexNet PCA lighting 0.1.
* CutMix (Yun et al., ICCV 2019) boxes as IDC/RDED draw them (``rand_bbox``: side ``sqrt(1 - λ)``,
  λ ~ Beta(β, β), centre uniform, clipped).

All randomness comes from the global torch RNG (seeded per run by :mod:`ddkit.evaluate.trainer`), drawn on
the CPU and moved to the batch's device, so a run is reproducible across devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """DSA strengths; defaults are the challenge scorer's ``ParamDiffAug`` values.

    ``aug_mode='S'`` applies ONE op group, chosen uniformly from the strategy, per batch; ``'M'`` applies all.
    """

    aug_mode: str = "S"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2  # sx, sy ~ U[1/r, r]
    ratio_rotate: float = 15.0  # degrees, angle ~ U[-r, r]
    ratio_crop_pad: float = 0.125  # max translation, fraction of the side
    ratio_cutout: float = 0.5  # cutout square side, fraction of the side
    brightness: float = 1.0  # x + (u - 0.5) * b
    saturation: float = 2.0  # (x - mean_c) * (u * s) + mean_c
    contrast: float = 0.5  # (x - mean) * (u + c) + mean

    @classmethod
    def zero(cls) -> DSAParams:
        """Zero strength for the ops that have one (flip, scale, rotate, crop, cutout, brightness).

        Saturation and contrast have no identity setting in the reference parametrisation (their factor
        is ``u * s`` and ``u + c`` with ``u ~ U[0, 1)``), so they stay at their defaults.
        """
        return cls(
            prob_flip=0.0,
            ratio_scale=1.0,
            ratio_rotate=0.0,
            ratio_crop_pad=0.0,
            ratio_cutout=0.0,
            brightness=0.0,
        )


def _rand(*shape: int, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(*shape).to(device=like.device, dtype=like.dtype)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def rand_scale(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Anisotropic zoom: ``sx, sy ~ U[1/r, r]`` independently per image. ``[B,C,H,W] -> [B,C,H,W]``."""
    r = p.ratio_scale
    n = x.shape[0]
    sx = torch.rand(n) * (r - 1.0 / r) + 1.0 / r
    sy = torch.rand(n) * (r - 1.0 / r) + 1.0 / r
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 1, 1] = sy
    return _affine(x, theta)


def rand_rotate(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Rotation by ``U[-r, r]`` degrees per image. ``[B,C,H,W] -> [B,C,H,W]``."""
    n = x.shape[0]
    a = (torch.rand(n) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(a)
    theta[:, 0, 1] = torch.sin(-a)
    theta[:, 1, 0] = torch.sin(a)
    theta[:, 1, 1] = torch.cos(a)
    return _affine(x, theta)


def rand_flip(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Horizontal flip with probability ``prob_flip`` per image."""
    u = _rand(x.shape[0], 1, 1, 1, like=x)
    return torch.where(u < p.prob_flip, x.flip(3), x)


def rand_brightness(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Add ``(u - 0.5) * brightness`` per image (in normalised units)."""
    return x + (_rand(x.shape[0], 1, 1, 1, like=x) - 0.5) * p.brightness


def rand_saturation(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Scale the deviation from the per-pixel channel mean by ``u * saturation`` (identity on 1 channel)."""
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (_rand(x.shape[0], 1, 1, 1, like=x) * p.saturation) + m


def rand_contrast(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Scale the deviation from the image mean by ``u + contrast``."""
    m = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - m) * (_rand(x.shape[0], 1, 1, 1, like=x) + p.contrast) + m


def rand_crop(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Integer translation by up to ``ratio_crop_pad`` of the side; uncovered pixels are zero."""
    n, _, h, w = x.shape
    sx, sy = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    tx = torch.randint(-sx, sx + 1, size=[n, 1, 1]).to(x.device)
    ty = torch.randint(-sy, sy + 1, size=[n, 1, 1]).to(x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(h, device=x.device),
        torch.arange(w, device=x.device),
        indexing="ij",
    )
    # Index a 1-px zero-padded copy so out-of-range shifts land on the zero border (reference behaviour).
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    xp = F.pad(x, [1, 1, 1, 1])
    return xp.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2).contiguous()


def rand_cutout(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Zero one square of side ``ratio_cutout`` × side at a uniform centre per image."""
    n, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), size=[n, 1, 1]).to(x.device)
    oy = torch.randint(0, w + (1 - cw % 2), size=[n, 1, 1]).to(x.device)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, device=x.device),
        torch.arange(ch, device=x.device),
        torch.arange(cw, device=x.device),
        indexing="ij",
    )
    gx = torch.clamp(gx + ox - ch // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + oy - cw // 2, min=0, max=w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


AUGMENT_FNS = {
    "color": (rand_brightness, rand_saturation, rand_contrast),
    "crop": (rand_crop,),
    "cutout": (rand_cutout,),
    "flip": (rand_flip,),
    "scale": (rand_scale,),
    "rotate": (rand_rotate,),
}


def dsa(x: torch.Tensor, strategy: str = DSA_STRATEGY, params: DSAParams | None = None) -> torch.Tensor:
    """Apply DSA to a batch.

    Args:
        x: float32 ``[B, C, H, W]``, normalised (the scorer augments normalised data).
        strategy: op groups joined by ``_`` (keys of :data:`AUGMENT_FNS`); ``""``/``"none"``: identity.
        params: strengths and mode; default :class:`DSAParams` (challenge values, one op per batch).

    Returns:
        float32 ``[B, C, H, W]``.

    Raises:
        ValueError: an unknown op group or mode.
    """
    p = params or DSAParams()
    if strategy in ("", "none", "None"):
        return x
    groups = strategy.split("_")
    for g in groups:
        if g not in AUGMENT_FNS:
            raise ValueError(f"DSA strategy {strategy!r}: unknown op {g!r}")
    if p.aug_mode == "M":
        chosen = groups
    elif p.aug_mode == "S":
        chosen = [groups[int(torch.randint(0, len(groups), size=(1,)).item())]]
    else:
        raise ValueError(f"DSA aug_mode {p.aug_mode!r}: expected 'S' or 'M'")
    for g in chosen:
        for f in AUGMENT_FNS[g]:
            x = f(x, p)
    return x.contiguous()


# ----------------------------------------------------------------------------------------------------------
# IDC (ImageNet-style) transforms, applied to [0, 1] images before normalisation
# ----------------------------------------------------------------------------------------------------------
# AlexNet PCA lighting constants as IDC uses them (data.py transform_imagenet).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-image RandomResizedCrop (torchvision's sampling rule: 10 tries, then a centre crop).

    ``x``: float ``[B, C, H, W]`` -> float ``[B, C, size, size]`` (bilinear, antialiased when shrinking).
    """
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as TF

    out = []
    for img in x:
        i, j, h, w = RandomResizedCrop.get_params(img, list(scale), list(ratio))
        out.append(TF.resized_crop(img, i, j, h, w, [size, size], antialias=True))
    return torch.stack(out)


def random_flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Horizontal flip per image with probability ``p``."""
    u = torch.rand(x.shape[0], 1, 1, 1).to(x.device)
    return torch.where(u < p, x.flip(3), x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        g = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        return g.expand_as(x)
    return x


def color_jitter(
    x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4
) -> torch.Tensor:
    """IDC's ColorJitter: brightness, contrast, saturation as ``lerp`` towards black / mean grey / grey with
    ``α ~ U(-v, v)`` each, applied in a random order drawn per image.

    Source: snu-mllab/Efficient-Dataset-Condensation ``misc/utils.py`` (``Brightness``, ``Contrast``,
    ``Saturation``, ``ColorJitter``; originally eladhoffer/convNet.pytorch). ``[B,C,H,W] -> [B,C,H,W]``.
    """
    n = x.shape[0]
    specs = [
        (brightness, lambda z, a: z.lerp(torch.zeros_like(z), a)),
        (contrast, lambda z, a: z.lerp(_grayscale(z).mean(dim=(1, 2, 3), keepdim=True).expand_as(z), a)),
        (saturation, lambda z, a: z.lerp(_grayscale(z), a)),
    ]
    specs = [(v, f) for v, f in specs if v]
    if not specs:
        return x
    ops_v = [v for v, _ in specs]
    ops = [f for _, f in specs]
    k = len(ops)
    alphas = torch.stack([(torch.rand(n) * 2 - 1) * v for v in ops_v], dim=1).to(x.device, x.dtype)  # [B, k]
    order = torch.argsort(torch.rand(n, k), dim=1).to(x.device)  # per-image random order of the ops
    for stage in range(k):
        which = order[:, stage]
        new = x
        for o in range(k):
            a = alphas[:, o].view(n, 1, 1, 1)
            sel = (which == o).view(n, 1, 1, 1)
            new = torch.where(sel, ops[o](x, a), new)
        x = new
    return x


def lighting(x: torch.Tensor, alphastd: float = 0.1) -> torch.Tensor:
    """AlexNet PCA lighting noise (IDC ``Lighting``): add ``eigvec @ (α ⊙ eigval)``, ``α ~ N(0, alphastd)``,
    per image. RGB only: 1-channel batches are returned unchanged. ``[B,3,H,W] -> [B,3,H,W]``."""
    if alphastd == 0 or x.shape[1] != 3:
        return x
    n = x.shape[0]
    alpha = torch.randn(n, 3) * alphastd
    eigvec = torch.tensor(LIGHTING_EIGVEC)
    eigval = torch.tensor(LIGHTING_EIGVAL)
    rgb = (eigvec.unsqueeze(0) * (alpha * eigval).unsqueeze(1)).sum(2)  # [B, 3]
    return x + rgb.to(x.device, x.dtype).view(n, 3, 1, 1)


def idc_train_transform(
    x: torch.Tensor,
    size: int,
    rrc_scale: tuple[float, float] = (0.5, 1.0),
    jitter: float = 0.4,
    lighting_std: float = 0.1,
) -> torch.Tensor:
    """IDC's ``transform_imagenet(augment=True, from_tensor=True)`` without the final Normalize:
    RandomResizedCrop(size, scale) -> flip -> ColorJitter(jitter) -> Lighting(lighting_std).

    ``x``: float32 ``[B, C, H, W]`` in [0, 1] -> float32 ``[B, C, size, size]``.
    """
    x = random_resized_crop(x, size, rrc_scale)
    x = random_flip(x)
    x = color_jitter(x, jitter, jitter, jitter)
    return lighting(x, lighting_std)


def rand_bbox(h: int, w: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix box ``(x1, y1, x2, y2)`` over dims (H, W): side ratio ``sqrt(1 - λ)``, uniform centre, clipped.

    Source: IDC ``misc/utils.py`` / RDED ``validation/utils.py`` ``rand_bbox`` (indexing dims 2 and 3).
    """
    cut = math.sqrt(1.0 - lam)
    cw, chh = int(h * cut), int(w * cut)
    cx = int(torch.randint(h, (1,)).item())
    cy = int(torch.randint(w, (1,)).item())
    x1, x2 = min(max(cx - cw // 2, 0), h), min(max(cx + cw // 2, 0), h)
    y1, y2 = min(max(cy - chh // 2, 0), w), min(max(cy + chh // 2, 0), w)
    return x1, y1, x2, y2


def cutmix(x: torch.Tensor, beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Paste a box from a shuffled copy of the batch into every image.

    Args:
        x: float ``[B, C, H, W]`` (not modified).
        beta: Beta(β, β) parameter of λ.

    Returns:
        ``(mixed [B,C,H,W], perm int64 [B], ratio)`` where ``ratio`` is the area fraction kept from the
        original image (the weight of the original label: ``loss = ratio·CE(y) + (1-ratio)·CE(y[perm])``).
    """
    lam = float(torch.distributions.Beta(beta, beta).sample().item())
    perm = torch.randperm(x.shape[0]).to(x.device)
    h, w = x.shape[2], x.shape[3]
    x1, y1, x2, y2 = rand_bbox(h, w, lam)
    out = x.clone()
    out[:, :, x1:x2, y1:y2] = x[perm, :, x1:x2, y1:y2]
    ratio = 1.0 - ((x2 - x1) * (y2 - y1) / (h * w))
    return out, perm, ratio
