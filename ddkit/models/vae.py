"""SD-VAE helpers for latent DiT models (DiT, Peebles & Xie 2023; MinimaxDiffusion ``train_dit.py``).

The reference encodes with ``stabilityai/sd-vae-ft-ema`` (``latent_dist.sample() * 0.18215``) and its
sampler decodes with ``sd-vae-ft-mse``; both load here offline (``local_files_only=True``). The shard
writer's cached posterior moments (``--encode-latents``) come from :func:`moments_encoder`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ddkit.dist import device_for
from ddkit.errors import DataError
from ddkit.io import tensor_digest
from ddkit.models.sources import load_first

#: SD-VAE latent scaling factor (DiT ``train.py``; Rombach et al. 2022).
LATENT_SCALE = 0.18215


def load_vae(
    name_or_path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """Load an ``AutoencoderKL`` from a local directory or the Hugging Face cache, never the network.

    Accepts a VAE directory (``config.json`` + weights), a pipeline directory or HF id with a ``vae/``
    subfolder (e.g. ``facebook/DiT-XL-2-256``), or a plain VAE id (``stabilityai/sd-vae-ft-ema``).

    Raises:
        WeightsError: nothing loadable at ``name_or_path``: one line naming it, whether the weights are
            missing or present but unreadable, and each place tried with its error
            (:func:`ddkit.models.sources.load_first`).
    """
    from diffusers import AutoencoderKL

    src = str(name_or_path)
    p = Path(src)
    if p.is_dir():
        subs = ["vae"] if (p / "vae" / "config.json").is_file() else [""]
    else:
        subs = ["", "vae"]

    def load(sub: str):
        kw = {"subfolder": sub} if sub else {}
        return AutoencoderKL.from_pretrained(src, local_files_only=True, **kw)

    vae = load_first(src, subs, load, "VAE weights")
    vae = vae.to(device=device, dtype=dtype) if dtype is not None else vae.to(device)
    vae.eval().requires_grad_(False)
    return vae


def vae_source(name_or_path: str | Path) -> str:
    """How a VAE is recorded: the absolute path of a local directory (so records do not depend on the
    working directory), else the Hugging Face id as given."""
    p = Path(name_or_path).expanduser()
    return str(p.resolve()) if p.is_dir() else str(name_or_path)


def encoder_digest(vae) -> str:
    """sha256 hex of the encoder side (``encoder.*``, ``quant_conv.*``): what fixes the latent space. The SD
    decoders fine-tuned from one encoder (sd-vae-ft-ema / -mse) share it, so either may decode."""

    return tensor_digest(torch.nn.ModuleList([vae.encoder, vae.quant_conv]))


def check_latent_vae(latent: dict | None, vae_name: str | None, where: str) -> None:
    """Check that cached latents (``dataset.json``'s ``latent``: ``vae`` as given when sharding,
    ``encoder_sha256``) were encoded by ``vae_name`` (``model.vae``): same name, else same encoder weights
    (``vae_name`` is then loaded, on the CPU).

    Raises:
        DataError: one line naming both VAEs (``where`` is the index file).
    """
    if not latent or not vae_name or vae_source(str(latent.get("vae"))) == vae_source(vae_name):
        return
    recorded = latent.get("encoder_sha256")
    if recorded and encoder_digest(load_vae(vae_name)) == recorded:
        return
    raise DataError(
        f"{where}: latents were encoded with {latent.get('vae')!r} but model.vae={vae_name!r} "
        f"{'has another encoder' if recorded else '(no encoder digest recorded)'}; "
        "re-shard with that data.encode_latents or set model.vae to match"
    )


def moments_encoder(name_or_path: str | Path, *, device: str | torch.device | None = None):
    """The posterior-moments encoder ``ddkit data shard --encode-latents`` caches in a shard set.

    Loads the VAE offline (:func:`load_vae`) onto ``device`` (default :func:`ddkit.dist.device_for`) and
    returns ``encode(list of uint8 [H, W, C] arrays) -> (float32 [B, 2*Cz, h, w] numpy = posterior mean ++
    log-variance along channels, latent info dict)``. Images are scaled to [-1, 1] (SD-VAE convention, DiT
    ``train.py``); grey images are repeated to the VAE's input channels. The info records ``vae``
    (:func:`vae_source`), ``encoder_sha256`` (:func:`encoder_digest`), latent ``channels`` and ``size``, and
    ``scale`` (the VAE's ``scaling_factor``, else :data:`LATENT_SCALE`).

    Raises:
        WeightsError: the weights cannot be loaded offline (names the path).
        DataError: (from ``encode``) colour images for a VAE with another number of input channels.
    """
    import numpy as np

    vae = load_vae(name_or_path)
    digest = encoder_digest(vae)
    dev = device_for() if device is None else torch.device(device)
    vae = vae.to(dev).eval()
    in_ch = int(vae.config.in_channels)
    scale = float(getattr(vae.config, "scaling_factor", None) or LATENT_SCALE)

    @torch.no_grad()
    def encode_moments(arrays: list[np.ndarray]) -> tuple[np.ndarray, dict]:
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if x.shape[1] != in_ch:
            if x.shape[1] == 1:
                x = x.repeat(1, in_ch, 1, 1)
            else:
                raise DataError(f"{name_or_path}: VAE expects {in_ch} input channels, images have {x.shape[1]}")
        dist = vae.encode(x.to(dev)).latent_dist
        moments = torch.cat([dist.mean, dist.logvar], dim=1).float().cpu().numpy()
        info = {
            "vae": vae_source(name_or_path),
            "encoder_sha256": digest,
            "channels": int(dist.mean.shape[1]),
            "size": int(dist.mean.shape[-1]),
            "scale": scale,
            "moments": "mean ++ logvar along channels (diffusers DiagonalGaussianDistribution)",
        }
        return moments, info

    return encode_moments


@torch.no_grad()
def encode(
    vae, x: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = True
) -> torch.Tensor:
    """Images -> scaled latents.

    Args:
        x: float [B, 3, H, W] in [-1, 1].
        generator: for the posterior sample (the reference samples, ``latent_dist.sample()``).
        sample: False takes the posterior mean instead.

    Returns:
        float [B, 4, H/8, W/8] latents × 0.18215, in the VAE's dtype.
    """
    dist = vae.encode(x.to(vae.dtype)).latent_dist
    z = dist.sample(generator=generator) if sample else dist.mean
    return z * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents float [B, 4, h, w] -> images float [B, 3, 8h, 8w] in [-1, 1] (clamped)."""
    x = vae.decode(latents.to(vae.dtype) / LATENT_SCALE).sample
    return x.clamp(-1, 1)
