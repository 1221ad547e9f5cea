"""D^3HR step 1: the DDIM grid of the inversion (stride, stored and restart timesteps) and DDIM inversion of
clean latents (see :mod:`ddkit.methods.d3hr` for the reference mapping)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ddkit.errors import ConfigError
from ddkit.schedule import scheduler_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ddkit.config import D3HRConfig


def stride(cfg: D3HRConfig, num_train_timesteps: int = 1000) -> int:
    """Timesteps between two DDIM steps: ``num_train_timesteps // inversion_steps`` (20 for 50 of 1000).

    Raises:
        ConfigError: ``store_from``/``store_to``/``timestep`` are not multiples of the stride, or past T.
    """
    s = num_train_timesteps // cfg.inversion_steps
    if s <= 0:
        raise ConfigError(
            f"generate.d3hr.inversion_steps: {cfg.inversion_steps} > {num_train_timesteps} timesteps"
        )
    for name in ("store_from", "store_to", "timestep"):
        v = getattr(cfg, name)
        if v % s:
            raise ConfigError(f"generate.d3hr.{name}: {v} is not a multiple of the DDIM stride {s}")
        if v >= num_train_timesteps:
            raise ConfigError(f"generate.d3hr.{name}: {v} >= num_train_timesteps {num_train_timesteps}")
    return s


def stored_timesteps(cfg: D3HRConfig, num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps whose inverted latents are kept: ``store_from, store_from + stride, …, store_to``."""
    s = stride(cfg, num_train_timesteps)
    return list(range(cfg.store_from, cfg.store_to + 1, s))


def start_timestep(cfg: D3HRConfig, num_train_timesteps: int = 1000) -> int:
    """Timestep at which decoding restarts from the sampled latents: ``timestep + restart_strides·stride``.

    With the defaults this is 620 for latents stored at 600: the reference's mapping (``group_sampling.py``
    ``--start_step 18`` of a 50-step DDIM sampler, ``--i_step 6`` of the stored 480…760 latents); the
    module docstring explains why it is one stride above the stored timestep. Returns an int timestep in
    [0, num_train_timesteps).

    Raises:
        ConfigError: the restart timestep falls outside the schedule.
    """
    t = cfg.timestep + cfg.restart_strides * stride(cfg, num_train_timesteps)
    if t >= num_train_timesteps:
        raise ConfigError(f"generate.d3hr.restart_strides: restart timestep {t} >= {num_train_timesteps}")
    return t


def _inverse_scheduler(num_train_timesteps: int, steps: int):
    from diffusers import DDIMInverseScheduler

    sch = DDIMInverseScheduler(
        **scheduler_config(num_train_timesteps), steps_offset=0, timestep_spacing="leading"
    )
    sch.set_timesteps(steps)
    return sch


def guided_eps(model, x: torch.Tensor, t: int, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free-guided ε, ε_u + s·(ε_c − ε_u) on every channel (Ho & Salimans 2022), as the reference
    D3HR code guides: :func:`ddkit.sampling.guided_forward` without the learned variance channels (DDIM
    does not use them).

    Args:
        model: a :class:`ddkit.models.Backbone` (``model(x, t, y) -> [B, C or 2C, H, W]``; null class
            ``model.num_classes``).
        x: float [B, C, H, W] noisy latents.
        t: integer timestep (the same for the whole batch).
        y: int64 [B] backbone class indices.
        cfg_scale: guidance scale s; ``s == 1`` runs only the conditional pass.

    Returns:
        float32 [B, C, H, W].
    """
    from ddkit.sampling import guided_forward

    return guided_forward(model, x, t, y, cfg_scale=cfg_scale)[:, : x.shape[1]]


def ddim_invert(
    model,
    z0: torch.Tensor,
    y: torch.Tensor,
    *,
    cfg: D3HRConfig,
    num_train_timesteps: int = 1000,
    store: Sequence[int] | None = None,
) -> torch.Tensor:
    """DDIM inversion of clean latents, returning the latents at the stored timesteps.

    Uses diffusers' :class:`~diffusers.DDIMInverseScheduler` (Song et al. 2021, eq. 12 run backwards;
    Mokady et al. 2023) with DiT's linear schedule, ``cfg.inversion_steps`` steps (stride 20 for 50) and
    ε guided with ``cfg.inversion_cfg_scale``. Like the reference ``invert`` the scheduler's first
    timestep (0) is skipped, so the first step maps z_0 (taken at ᾱ_0 = 0.9999) to x_20 with ε(z_0, 20),
    and the loop stops after the last stored timestep.

    Args:
        model: Backbone (eval mode; gradients are not needed).
        z0: float32 [B, C, H, W] clean latents (VAE latents ×0.18215, or pixels in [-1, 1]).
        y: int64 [B] backbone class indices.
        cfg: inversion settings (steps, CFG scale, stored range).
        num_train_timesteps: T of the backbone's schedule (1000 for DiT).
        store: timesteps to return; default :func:`stored_timesteps`.

    Returns:
        float32 [S, B, C, H, W], S = len(store), in the order of ``store`` (ascending timesteps).

    Raises:
        ConfigError: a requested timestep is not on the inversion grid.
    """
    import torch

    store = list(store) if store is not None else stored_timesteps(cfg, num_train_timesteps)
    sch = _inverse_scheduler(num_train_timesteps, cfg.inversion_steps)
    grid = [int(t) for t in sch.timesteps[1:]]
    missing = [t for t in store if t not in grid]
    if missing:
        raise ConfigError(
            f"generate.d3hr: timesteps {missing} are not on the {cfg.inversion_steps}-step DDIM grid"
        )
    last = max(store)
    x = z0.float()
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for t in grid:
            if t > last:
                break
            eps = guided_eps(model, x, t, y, cfg.inversion_cfg_scale)
            x = sch.step(eps, t, x).prev_sample
            if t in store:
                out[t] = x
    return torch.stack([out[t] for t in store])
