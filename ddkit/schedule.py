"""The DiT noise schedule, shared by training, sampling and inversion.

DiT (Peebles & Xie 2023; facebookresearch/DiT ``diffusion/__init__.py``) trains with 1000 linear betas from
1e-4 to 0.02. Every diffusers scheduler ddkit builds starts from :func:`scheduler_config` so the three agree.
"""

from __future__ import annotations

from typing import Any


def scheduler_config(num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Keyword arguments for diffusers' DDPM/DDIM/DDIMInverse schedulers matching DiT's training schedule
    (the learned-σ variance type, where wanted, is the caller's: it does not change the betas)."""
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.0001 * 1000 / num_train_timesteps,
        "beta_end": 0.02 * 1000 / num_train_timesteps,
        "beta_schedule": "linear",
        "clip_sample": False,
        "prediction_type": "epsilon",
    }


def alphas_cumprod(num_train_timesteps: int = 1000):
    """ᾱ_t for t = 0..T-1 as float64 tensor [T] (DDPM, Ho et al. 2020, eq. 4)."""
    import torch

    cfg = scheduler_config(num_train_timesteps)
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)
