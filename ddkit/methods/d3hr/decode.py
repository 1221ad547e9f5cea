"""D^3HR steps 4 and 5: the decoding grid and the settings ``ddkit generate`` decodes with, DDIM decoding on
:mod:`ddkit.sampling`'s sampler, and the reference's image resizes (inversion input, saved PNGs)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ddkit.errors import ConfigError
from ddkit.methods.d3hr.inversion import start_timestep, stride

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ddkit.config import D3HRConfig

#: CFG channels of the D^3HR decoding chain: None = all, as the reference ``sample`` guides every latent channel.
GUIDED_CHANNELS = None


def decode_grid(cfg: D3HRConfig, num_train_timesteps: int = 1000) -> list[int]:
    """The reference's decoding timesteps: the DDIM grid (stride ``num_train_timesteps // inversion_steps``)
    from :func:`start_timestep` down to 0 — ``[620, 600, …, 0]``, 32 steps, with the defaults
    (``group_sampling.py``: ``scheduler.timesteps[18:]`` of 50 "leading" steps)."""
    return list(range(start_timestep(cfg, num_train_timesteps), -1, -stride(cfg, num_train_timesteps)))


def decode_settings(gcfg, num_train_timesteps: int = 1000):
    """The :class:`ddkit.config.GenerateConfig` D^3HR decodes with: ``steps_min``/``steps_max`` capped at
    ``len(decode_grid)`` (so the planner's largest choice is the reference's stride-20 chain, which
    ``ddkit.sampling.timestep_spacing("ddim", 32, start_timestep=620)`` reproduces exactly) and
    ``guided_channels`` = :data:`GUIDED_CHANNELS` (all channels, as the reference)."""

    n = len(decode_grid(gcfg.d3hr, num_train_timesteps))
    return dataclasses.replace(
        gcfg,
        steps_min=min(gcfg.steps_min, n),
        steps_max=min(gcfg.steps_max, n),
        guided_channels=GUIDED_CHANNELS,
    )


def ddim_denoise(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    start_t: int,
    cfg_scale: float = 4.0,
    num_inference_steps: int = 50,
    num_train_timesteps: int = 1000,
    final_step: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM sampling (η = 0) from ``x`` taken to be x_{start_t}, down to a clean latent.

    :func:`ddkit.sampling.sample` (``sampler="ddim"``, CFG on all channels) on the grid timesteps ``<=
    start_t`` of ``num_inference_steps`` "leading" steps (980, 960, …, 0 for 50): diffusers'
    :class:`~diffusers.DDIMScheduler` on DiT's schedule. This is the reference ``sample`` loop of
    ``dit_inversion_save_statistic.py`` (its last step lands on ᾱ_1 instead of ᾱ = 1; ᾱ_1 = 0.9998, a
    negligible difference).

    Args:
        model: Backbone.
        x: float [B, C, H, W] latents at ``start_t``.
        y: int64 [B] backbone class indices.
        start_t: a timestep on the sampling grid (620 for D^3HR's default, :func:`start_timestep`).
        cfg_scale: CFG scale (D^3HR reference: 4.0); ``<= 1``: the conditional model alone.
        num_inference_steps: DDIM steps of the full 0…T chain (the grid stride is T // steps).
        num_train_timesteps: T.
        final_step: run the last step t = 0 -> ᾱ = 1 (x0-prediction). ``False`` stops at ᾱ_0 = 0.9999,
            the level :func:`ddim_invert` starts from, which makes inversion -> denoising an exact round trip
            up to the ε-mismatch of DDIM inversion.

    Returns:
        float32 [B, C, H, W] denoised latents (decode with ``ddkit.models.vae.decode`` for latent models).

    Raises:
        ConfigError: ``start_t`` is not on the sampling grid.
    """
    from ddkit.sampling import sample, timestep_spacing

    grid = timestep_spacing("ddim", num_inference_steps, num_train_timesteps=num_train_timesteps)
    if start_t not in grid:
        raise ConfigError(f"start timestep {start_t} is not on the {num_inference_steps}-step DDIM grid")
    chain = [t for t in grid if t <= start_t]
    return sample(
        model, y, steps=len(chain), sampler="ddim", cfg_scale=cfg_scale, guided_channels=GUIDED_CHANNELS,
        latents=x, num_train_timesteps=num_train_timesteps, timesteps=chain, final_step=final_step,
    )  # fmt: skip


#: Side of the PNGs the reference saves (``group_sampling.py``: ``.resize((224, 224), Image.LANCZOS)``).
SAVE_SIZE = 224


def _pil_map(images_u8: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn(PIL image) -> PIL image`` to each uint8 [C, H, W] of [B, C, H, W]; uint8 [B, C, H', W']."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for img in images_u8.cpu():
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        res = np.asarray(fn(pil), dtype=np.uint8)
        out.append(torch.from_numpy(res.reshape(res.shape[0], res.shape[1], -1).copy()).permute(2, 0, 1))
    return torch.stack(out) if out else images_u8


def reference_input_resize(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """The reference's inversion input transform on uint8 [B, C, H, W]: ``transforms.Resize(size)`` (shorter
    side to ``size``, PIL bilinear, torchvision's default) then ``CenterCrop(size)``
    (``dit_inversion_save_statistic.py`` ``get_transforms``). Returns uint8 [B, C, size, size]; the reference's
    ``ToTensor`` then divides these bytes by 255."""
    from torchvision import transforms

    t = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    return _pil_map(images_u8, t)


def reference_save_resize(images_u8: torch.Tensor, size: int = SAVE_SIZE) -> torch.Tensor:
    """The reference's save step on uint8 [B, C, H, W]: each decoded image resized to ``size`` x ``size`` with
    PIL LANCZOS (``group_sampling.py``). Returns uint8 [B, C, size, size]."""
    from PIL import Image

    return _pil_map(images_u8, lambda im: im.resize((size, size), Image.LANCZOS))
