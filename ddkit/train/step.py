"""One optimizer step of :class:`ddkit.train.Trainer`, as small parts composed by ``Trainer.train_step``.

The step, in order (the order of the random draws is part of the exact-resume contract: a resumed run
draws the same numbers from the same generator state):

1. :func:`prepare_batch`: x0 on the device (pixels, cached latents, or VAE-encoded), with the optional
   horizontal flip; the dataset labels mapped to the backbone's classes and dropped to the null class
   with probability ``class_dropout`` (classifier-free guidance). Draws: flip, VAE sample, dropout.
2. :func:`add_noise`: t ~ U{0..T-1}, ε ~ N(0, I), x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. Draws: t, ε.
3. the backbone's forward (in the trainer: DDP wrapper, autocast);
4. :func:`diffusion_loss`: L_simple (timestep-weighted, :func:`ddkit.methods.minimax.timestep_weights`) +
   L_vb, and x̂0;
5. :func:`ddkit.methods.minimax.minimax_objective`: + λr·L_r + λd·L_d, then the memories take the batch;
6. :func:`optimizer_step`: warm-up learning rate (:func:`warmup_lr`), (scaled) backward, optional
   gradient clipping, AdamW step;
7. :func:`update_ema` with :func:`ema_decay`;
8. :func:`step_record`: the step's loss terms for the log; :func:`log_record` turns their mean over a log
   interval into a ``train_log.jsonl`` line and :func:`terms_text` into the progress bar's text.

:func:`data_mode` decides, once per run, how step 1 turns a batch into x0.
"""

from __future__ import annotations

from typing import Any

import torch

from ddkit.config import ModelConfig
from ddkit.errors import ConfigError
from ddkit.methods.minimax import diffusion_losses, timestep_weights
from ddkit.models.vae import check_latent_vae, encode


def data_mode(mcfg: ModelConfig, index: dict, shards: str) -> str:
    """How batches become x0 for this model: ``"pixels"`` (the images themselves), ``"latents"`` (the
    shards' cached VAE latents) or ``"encode"`` (the model's VAE encodes each batch).

    Args:
        mcfg: the backbone's config; index: the shard set's ``dataset.json``; shards: its path (messages).

    Raises:
        ConfigError: a latent model without a VAE or latent shards, or image sizes that fit neither;
        ``check_latent_vae``'s error when cached latents come from another VAE.
    """
    res, ch = int(index["resolution"]), int(index["channels"])
    if mcfg.in_channels == ch and mcfg.input_size == res:
        return "pixels"
    if mcfg.in_channels == 4 and mcfg.input_size * 8 == res:
        if index.get("latents"):

            check_latent_vae(index.get("latent"), mcfg.vae, f"{shards}/dataset.json")
            return "latents"
        if mcfg.vae:
            return "encode"
        raise ConfigError(f"model.vae: a latent model on {shards} needs a VAE or latent shards")
    raise ConfigError(
        f"model: {mcfg.arch} sees {mcfg.in_channels}x{mcfg.input_size}px but {shards} holds {ch}x{res}px images"
    )


def maybe_flip(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """Mirror the rows of x [B, C, H, W] where flip [B] is True (reference: ``RandomHorizontalFlip``)."""
    if flip is None:
        return x
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def prepare_batch(
    batch: tuple,
    mode: str,
    device: torch.device,
    generator: torch.Generator,
    *,
    hflip: bool,
    vae: Any,
    cond_map: torch.Tensor,
    class_dropout: float,
    null_class: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0, the subset labels and the conditioning labels of a loader batch (step 1 of the module docstring).

    Args:
        batch: ``(images float [B, C, H, W] in [-1, 1], labels int64 [B][, latents float [B, 4, h, w]])``.
        mode: :func:`data_mode`; ``vae`` is used by ``"encode"`` only.
        generator: the rank's generator on ``device`` (draws flip [B], the VAE sample, dropout [B]).
        cond_map: int64 [num subset classes] on ``device``: subset class -> backbone class.
        null_class: the backbone's "no label" index (its ``num_classes``).

    Returns:
        (x0 float32 [B, C', H', W'] on ``device``, labels int64 [B] on the CPU (memory keys),
        y int64 [B] on ``device``).
    """
    images, labels = batch[0], batch[1]
    labels_cpu = labels.to("cpu")
    b = labels_cpu.shape[0]
    flip = torch.rand(b, generator=generator, device=device) < 0.5 if hflip else None
    if mode == "latents":
        # Flipping a cached latent approximates encoding the flipped image (as fast-DiT's caches).
        x0 = maybe_flip(batch[2].to(device, non_blocking=True).float(), flip)
    elif mode == "encode":

        x = maybe_flip(images.to(device, non_blocking=True), flip)
        x0 = encode(vae, x, generator=generator).float()
    else:
        x0 = maybe_flip(images.to(device, non_blocking=True).float(), flip)
    y = cond_map[labels_cpu.to(device, non_blocking=True)]
    if class_dropout > 0:
        drop = torch.rand(b, generator=generator, device=device) < class_dropout
        y = torch.where(drop, torch.full_like(y, null_class), y)
    return x0, labels_cpu, y


def add_noise(
    x0: torch.Tensor, scheduler: Any, num_train_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t int64 [B], ε float [B, ...] of x0's dtype, x_t) with x_t from the diffusers ``scheduler``'s
    ``add_noise`` (DDPM forward process, Ho et al. 2020 eq. 4); t is drawn before ε."""
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, num_train_timesteps, (b,), generator=generator, device=dev)
    noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
    return t, noise, scheduler.add_noise(x0, noise, t)


def diffusion_loss(
    out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    tables: Any,
    learn_sigma: bool,
    weight_cap: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The diffusion loss ``mean(w_t·L_simple + L_vb)`` (w_t: :func:`ddkit.methods.minimax.timestep_weights`,
    ones without a cap as DiT) and the per-sample terms of
    :func:`ddkit.methods.minimax.diffusion_losses` (``mse``, ``vb`` [B], ``x0_pred`` [B, C, H, W]).

    Returns:
        (loss float32 scalar with gradient, terms).
    """

    terms = diffusion_losses(out, x0, x_t, t, noise, tables, learn_sigma)
    w = timestep_weights(t, tables, weight_cap)
    return (w * terms["mse"] + terms["vb"]).mean(), terms


def warmup_lr(lr: float, warmup_steps: int, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): ``lr·min(1, step/warmup_steps)``, a linear
    warm-up (a function of the step alone, so a resumed run continues it exactly)."""
    return lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else lr


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    total: torch.Tensor,
    params: list[torch.Tensor],
    lr: float,
    grad_clip: float | None,
) -> None:
    """Backward ``total`` and step: gradients cleared, every group's lr set to ``lr``, the (fp16: scaled)
    backward, gradients of ``params`` clipped to norm ``grad_clip`` (unscaled first) when set, then the
    scaler's optimizer step and update (without fp16 the scaler is disabled: a plain backward and step)."""
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.scale(total).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


def ema_decay(decay: float, warmup: bool, step: int) -> float:
    """The EMA decay after ``step`` earlier optimizer steps: ``decay``, or with ``warmup``
    ``min(decay, (1+step)/(10+step))``."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema ← d·ema + (1−d)·θ, in place, over paired parameter lists (reference ``update_ema``; parameters
    not trained need none: the EMA starts as a copy)."""
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, [x.detach() for x in params], 1.0 - decay)


#: The order of :func:`step_record`'s values (and of the trainer's running sums).
TERMS = ("loss", "mse", "vb", "l_r", "l_d", "total")


def step_record(
    loss: torch.Tensor,
    terms: dict[str, torch.Tensor],
    l_r: torch.Tensor,
    l_d: torch.Tensor,
    total: torch.Tensor,
) -> torch.Tensor:
    """The step's logged values, float64 [6] on the device in :data:`TERMS` order (no host sync): loss
    (w·L_simple + L_vb, mean), mse and vb (means), L_r, L_d, total."""
    return torch.stack(
        [loss.detach(), terms["mse"].detach().mean(), terms["vb"].detach().mean(), l_r.detach(),
         l_d.detach(), total.detach()]
    ).double()  # fmt: skip


def log_record(
    means: list[float], *, step: int, epoch: int, lr: float, steps: int, seconds: float
) -> dict[str, Any]:
    """A ``train_log.jsonl`` line: ``step``, ``epoch``, the :data:`TERMS` means over the interval, ``lr``
    and ``steps_per_s`` (``steps`` over ``seconds``; None for no time)."""
    rec: dict[str, Any] = {"step": step, "epoch": epoch}
    rec.update(zip(TERMS, means, strict=True))
    rec["lr"] = lr
    rec["steps_per_s"] = steps / seconds if seconds > 0 else None
    return rec


def terms_text(rec: dict[str, Any]) -> str:
    """The progress bar's loss text for a :func:`log_record`: loss, then vb and L_r/L_d when non-zero."""
    txt = f"loss {rec['loss']:.4f}"
    if rec.get("vb"):
        txt += f" vb {rec['vb']:.4f}"
    if rec.get("l_r") or rec.get("l_d"):
        txt += f" L_r {rec['l_r']:.4f} L_d {rec['l_d']:.4f}"
    return txt
