"""Class-conditional samplers for DiT backbones on diffusers schedulers, with classifier-free guidance.

Two samplers, both on DiT's training schedule (:func:`ddkit.schedule.scheduler_config`):

* ``"ddpm"`` — ancestral DDPM on an explicit timestep spacing with the learned-range variance. This is
  what the DiT reference samples with (facebookresearch/DiT ``sample.py``: ``create_diffusion("50")``,
  ``diffusion/respace.py`` ``space_timesteps`` + ``SpacedDiffusion``, ``diffusion/gaussian_diffusion.py``
  ``p_mean_variance`` with ``ModelVarType.LEARNED_RANGE``). diffusers' ``DDPMScheduler`` with
  ``variance_type="learned_range"`` and custom timesteps computes the same respaced quantities: for a step
  t -> t' it uses β' = 1 - ᾱ_t/ᾱ_t' and the posterior variance of that respaced step, exactly as
  ``SpacedDiffusion`` rebuilds betas from the kept ᾱ. Backbones without ``learn_sigma`` use
  ``"fixed_large"`` (DiT ``create_diffusion`` default ``sigma_small=False``).
* ``"ddim"`` — deterministic DDIM, η = 0 (Song et al. 2021, eq. 12), through diffusers'
  ``DDIMScheduler``. To run it on an arbitrary descending timestep list (DiT ``ddimN`` spacing, or a
  D^3HR restart at t = 620) the scheduler is *respaced* the way DiT ``respace.py`` does it: it is built on
  the kept timesteps only (its ``alphas_cumprod`` are the kept ᾱ, ``set_alpha_to_one`` gives ᾱ_prev = 1 at
  the end, as DiT's ``alphas_cumprod_prev``), stepped with stride 1, and the backbone receives the original
  timestep (DiT ``_WrappedModel`` ``map_tensor[ts]``).

Classifier-free guidance (Ho & Salimans 2022; DiT ``models.py`` ``forward_with_cfg``): the conditional and
unconditional halves go through ONE batched forward ``[x; x]`` with labels ``[y; null]``, the null class
being ``num_classes`` (the extra row of DiT's label table — never class 0), and
ε = ε_u + s·(ε_c − ε_u) on the first ``guided_channels`` channels (None: all; 3: the original DiT, which
guides channels 0..2 of the 4 latent channels and leaves channel 3 conditional). The learned variance is
taken from the conditional half, as the DiT reference keeps the first half of its doubled batch.
:func:`guided_forward` is ddkit's one CFG: the samplers here and D^3HR's inversion and decoding call it.

Speed: one CFG forward of 2B per step, the scheduler stepped on B only, and the conditioning embedding
computed once per forward instead of once per block (:class:`cached_conditioning`). A ``step_callback``
lets the time budget shorten a running chain: the rest is respaced from the current timestep.

Randomness is per image: every image owns a ``torch.Generator`` (seeded by the caller from its (class,
index)), which draws its initial noise and its DDPM step noise, so an image does not depend on which batch
or which rank produced it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from ddkit.schedule import scheduler_config

Sampler = Literal["ddpm", "ddim"]


class SamplingAborted(Exception):
    """Raised by :func:`sample` when ``step_callback`` returns False (the batch cannot meet its deadline)."""


def timestep_spacing(
    sampler: Sampler, steps: int, *, num_train_timesteps: int = 1000, start_timestep: int | None = None
) -> list[int]:
    """Descending model timesteps for ``steps`` sampling steps.

    * ``ddpm``: DiT ``respace.py`` ``space_timesteps(T, str(steps))`` — one section, fractional stride
      ``(T_top) / (steps - 1)`` accumulated and rounded, so both ends (``T_top`` and 0) are kept.
    * ``ddim`` from the top: DiT ``space_timesteps(T, "ddimN")`` = diffusers ``DDIMScheduler`` "leading"
      spacing, ``range(0, T, T // steps)``.
    * ``ddim`` from ``start_timestep``: the same fractional spacing as ddpm over ``[0, start_timestep]``,
      so the first step is exactly at ``start_timestep`` (D^3HR restart).

    Args:
        sampler: ``"ddpm"`` or ``"ddim"``.
        steps: number of model evaluations (>= 1).
        num_train_timesteps: T of the training schedule (DiT: 1000).
        start_timestep: top timestep to start from (default: T - 1 for ddpm, the leading grid for ddim).

    Returns:
        ``steps`` distinct ints, strictly descending, ending at 0 (fewer when ``start_timestep + 1 <
        steps``).

    Raises:
        ValueError: ``steps < 1`` or ``start_timestep`` outside [0, T).
    """
    if steps < 1:
        raise ValueError(f"steps: must be >= 1, got {steps}")
    T = num_train_timesteps
    if start_timestep is not None and not 0 <= start_timestep < T:
        raise ValueError(f"start_timestep: must be in [0, {T}), got {start_timestep}")
    if sampler == "ddim" and start_timestep is None:
        stride = T // steps
        return list(range(0, stride * steps, stride))[::-1]
    top = T - 1 if start_timestep is None else start_timestep
    steps = min(steps, top + 1)
    if steps == 1:
        return [top]
    # DiT respace.py: frac_stride = (size - 1) / (section_count - 1); cur_idx accumulated, then rounded.
    size = top + 1
    frac_stride = (size - 1) / (steps - 1)
    cur, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(cur))
        cur += frac_stride
    return sorted(set(taken), reverse=True)


def make_scheduler(
    sampler: Sampler,
    timesteps: Sequence[int],
    *,
    num_train_timesteps: int = 1000,
    learn_sigma: bool = False,
    device: torch.device | str = "cpu",
):
    """A diffusers scheduler set up to run exactly ``timesteps`` (descending).

    Returns:
        ``(scheduler, scheduler_timesteps)``: step the scheduler with ``scheduler_timesteps[i]`` while the
        backbone sees ``timesteps[i]``. For ddpm both are the same (custom timesteps); for ddim the
        scheduler is respaced onto the kept timesteps (see module docstring) and steps ``n-1 .. 0``.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    base = scheduler_config(num_train_timesteps)
    ts = [int(t) for t in timesteps]
    if sampler == "ddpm":
        sched = DDPMScheduler(**base, variance_type="learned_range" if learn_sigma else "fixed_large")
        sched.set_timesteps(timesteps=ts, device=device)
        return sched, [int(t) for t in sched.timesteps]
    if sampler == "ddim":
        full = DDPMScheduler(**base).alphas_cumprod  # float32 [T], DiT's linear schedule
        kept = torch.tensor(sorted(ts), dtype=torch.long)
        ac = full[kept]
        prev = torch.cat([torch.ones(1), ac[:-1]])
        # DiT respace.py: new_betas[i] = 1 - ᾱ(t_i) / ᾱ(t_{i-1}); cumprod of (1 - new_betas) gives back ᾱ(t_i).
        new_betas = (1 - ac / prev).tolist()
        cfg = dict(base, num_train_timesteps=len(ts), beta_schedule="linear")
        sched = DDIMScheduler(
            **cfg, trained_betas=new_betas, set_alpha_to_one=True, timestep_spacing="leading"
        )
        sched.alphas_cumprod = ac.clone()  # exact kept ᾱ (no float32 telescoping error)
        sched.set_timesteps(len(ts), device=device)
        return sched, [int(t) for t in sched.timesteps]
    raise ValueError(f"sampler: must be 'ddpm' or 'ddim', got {sampler!r}")


def guided_output(
    out: torch.Tensor, *, in_channels: int, cfg_scale: float, guided_channels: int | None = None
) -> torch.Tensor:
    """Combine the conditional and unconditional halves of one batched CFG forward.

    Args:
        out: float [2B, C or 2C, H, W] backbone output on ``[x; x]`` with labels ``[y; null]``.
        in_channels: C (ε channels; a learned variance v follows when the output has 2C channels).
        cfg_scale: s in ε = ε_u + s (ε_c − ε_u) (Ho & Salimans 2022, eq. 6; DiT ``forward_with_cfg``).
        guided_channels: first channels guided (None: all C; 3: original DiT on 4-channel latents); the
            remaining ε channels keep the conditional prediction.

    Returns:
        float [B, C or 2C, H, W]: guided ε, followed by the conditional half's v when present.
    """
    cond, uncond = out.chunk(2, dim=0)
    eps_c, rest = cond[:, :in_channels], cond[:, in_channels:]
    eps_u = uncond[:, :in_channels]
    g = in_channels if guided_channels is None else min(guided_channels, in_channels)
    guided = eps_u[:, :g] + cfg_scale * (eps_c[:, :g] - eps_u[:, :g])
    return torch.cat([guided, eps_c[:, g:], rest], dim=1)


def guided_forward(
    model,
    x: torch.Tensor,
    t: int,
    labels: torch.Tensor,
    *,
    cfg_scale: float,
    guided_channels: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One backbone evaluation under classifier-free guidance, the only CFG in ddkit (sampling, D^3HR's
    inversion and decoding): ``[x; x]`` with labels ``[y; null]`` in ONE forward, combined by
    :func:`guided_output`.

    Args:
        model: a ``ddkit.models.Backbone`` (``model(x, t, y)``; attribute ``num_classes``, the null class).
        x: float [B, C, H, W] noisy input at timestep ``t``.
        t: integer timestep, the same for the whole batch.
        labels: int64 [B] backbone class indices.
        cfg_scale: guidance scale s; exactly 1.0 runs one conditional forward of B instead (``sample`` maps
            s <= 1 to 1.0; D^3HR's inversion guides with any s != 1, as the reference).
        guided_channels: first channels guided (None: all C; 3: the original DiT), see :func:`guided_output`.
        autocast_dtype: run the backbone under ``torch.autocast`` with this dtype (None: as it is).

    Returns:
        float32 [B, C or 2C, H, W]: guided ε, then the conditional half's learned variance v when present.
    """
    use_cfg = cfg_scale != 1.0
    x_in = torch.cat([x, x]) if use_cfg else x
    # Null class = num_classes: the extra CFG row of DiT's label table (LabelEmbedding), never class 0.
    y_in = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if use_cfg else labels
    tt = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)
    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            out = model(x_in, tt, y_in)
    else:
        out = model(x_in, tt, y_in)
    out = out.float()
    if not use_cfg:
        return out
    return guided_output(out, in_channels=x.shape[1], cfg_scale=cfg_scale, guided_channels=guided_channels)


class _MemoConditioning(torch.nn.Module):
    """Computes the timestep + class embedding once per forward instead of once per block.

    diffusers' DiT calls its ``CombinedTimestepLabelEmbeddings`` from every block's adaLN and again for
    the final layer, with the same (t, y). The ddkit Backbone ties those embedders to ONE module (see
    ``ddkit.models.backbone``), so within a forward the result is identical; this wrapper returns the
    previous result when called again with the very same tensor objects. Identity, not values: no copy
    and no device sync; holding references to the last inputs keeps their ids from being reused.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self._last: tuple | None = None

    def forward(self, timestep, class_labels, hidden_dtype=None):
        last = self._last
        if last is not None and last[0] is timestep and last[1] is class_labels and last[2] == hidden_dtype:
            return last[3]
        out = self.inner(timestep, class_labels, hidden_dtype=hidden_dtype)
        self._last = (timestep, class_labels, hidden_dtype, out)
        return out


class cached_conditioning:
    """Context manager: while sampling, every DiT block of ``model`` shares one memoised conditioning
    embedding (:class:`_MemoConditioning`). A no-op for models whose blocks hold different embedders
    (untied copies) or that are not ddkit Backbones. The original modules are restored on exit."""

    def __init__(self, model) -> None:
        self.model = model
        self.saved: list[tuple[torch.nn.Module, torch.nn.Module]] = []

    def __enter__(self):
        if hasattr(self.model, "_orig_mod"):
            return self  # torch.compile'd: swapping submodules would invalidate its guards every call
        dit = getattr(self.model, "dit", None)
        blocks = getattr(dit, "transformer_blocks", None)
        if not blocks:
            return self
        embs = [getattr(getattr(b, "norm1", None), "emb", None) for b in blocks]
        if embs[0] is None or any(e is not embs[0] for e in embs):
            return self
        memo = _MemoConditioning(embs[0])
        for b in blocks:
            self.saved.append((b.norm1, b.norm1.emb))
            b.norm1.emb = memo
        return self

    def __exit__(self, *exc):
        for norm, emb in self.saved:
            norm.emb = emb
        self.saved.clear()
        return False


def initial_noise(
    generators: Sequence[torch.Generator], shape: Sequence[int], device, dtype=torch.float32
) -> torch.Tensor:
    """x_T: float [B, *shape], image i drawn from ``generators[i]`` (independent of batching)."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype).to(device) for g in generators]
    )


@torch.no_grad()  # measured: inference_mode was ~2x slower on CPU with the DiffFit hooks
def sample(
    model: Callable[..., torch.Tensor],
    labels: torch.Tensor,
    *,
    steps: int,
    sampler: Sampler = "ddpm",
    cfg_scale: float = 4.0,
    guided_channels: int | None = None,
    generators: Sequence[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    start_timestep: int | None = None,
    num_train_timesteps: int = 1000,
    timesteps: Sequence[int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    step_callback: Callable[[int, int], bool | int | None] | None = None,
    final_step: bool = True,
    step_guide: Callable[[GuideStep], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample a batch of class-conditional images (or latents) with a DiT backbone.

    Args:
        model: a ``ddkit.models.Backbone`` (or anything with its call signature and attributes
            ``in_channels``, ``input_size``, ``num_classes``, ``learn_sigma``):
            ``model(x float [B,C,H,W], t int64 [B], y int64 [B]) -> float [B, C or 2C, H, W]``.
        labels: int64 [B] backbone class indices in [0, num_classes).
        steps: model evaluations (sampling steps), >= 1.
        sampler: ``"ddpm"`` (learned-range σ, DiT reference) or ``"ddim"`` (η = 0).
        cfg_scale: guidance scale s; ``<= 1`` disables CFG (one forward of B instead of 2B; s = 1 is
            exactly the conditional model).
        guided_channels: channels guided by CFG (None: all; 3: the original DiT).
        generators: one ``torch.Generator`` per image (initial noise and DDPM step noise); default: one
            generator seeded 0..B-1.
        latents: float [B,C,H,W] starting point x_{start} (D^3HR initial latents); default: N(0, I) from
            ``generators``.
        start_timestep: timestep of ``latents`` (default: the top of the schedule, T - 1).
        num_train_timesteps: T of the training schedule.
        timesteps: explicit descending model timesteps (overrides ``steps``/``start_timestep`` spacing).
        autocast_dtype: run the backbone under ``torch.autocast`` with this dtype (bf16 / fp16; None: fp32),
            ``generate.precision`` as resolved by :func:`ddkit.hardware.choose_precision`.
        step_callback: called as ``step_callback(i, n)`` after step i (0-based) of n; returns None/True to
            go on, False to abort, or an int k (< n - i - 1) to finish the chain in k more steps, respaced
            from the current timestep (the budget's mid-batch step reduction).
        final_step: False stops one step early, at the noise level of the last timestep (x at ᾱ of
            ``timesteps[-1]``, e.g. ᾱ_0 = 0.9999, where D^3HR's inversion starts) instead of x_0 at ᾱ = 1.
        step_guide: a method's change to the DDPM step (MGD^3's mode pull, IGD's influence guidance), called
            after every scheduler step with a :class:`GuideStep` and returning the guided x_{t-1}
            (float [B, C, H, W]); None: the plain chain. It runs under ``torch.no_grad`` like the chain; a
            guide that differentiates enables gradients itself.

    Returns:
        float32 [B, C, H, W]: x_0 in the backbone's space (pixels in [-1, 1], or scaled SD-VAE latents).

    Raises:
        ValueError: a bad label or latent shape, an unknown sampler, ``step_guide`` with a sampler but ddpm.
        SamplingAborted: ``step_callback`` returned False.
    """
    device = next(iter(model.parameters())).device if hasattr(model, "parameters") else labels.device
    labels, generators = _checked_labels(model, labels, generators, device)
    x = _start_latents(model, latents, generators, device)
    if step_guide is not None and sampler != "ddpm":
        raise ValueError(f"step_guide: a guided step needs sampler 'ddpm' (its σ_t), got {sampler!r}")
    if timesteps is None:
        timesteps = timestep_spacing(
            sampler, steps, num_train_timesteps=num_train_timesteps, start_timestep=start_timestep
        )
    chain = _Chain(model, sampler, num_train_timesteps, [int(t) for t in timesteps], device)
    with cached_conditioning(model):
        return _loop(
            model,
            x,
            labels,
            chain,
            cfg_scale=cfg_scale if cfg_scale > 1.0 else 1.0,
            guided_channels=guided_channels,
            generators=list(generators),
            autocast_dtype=autocast_dtype,
            step_callback=step_callback,
            final_step=final_step,
            step_guide=step_guide,
            cfg_kw=dict(cfg_scale=cfg_scale if cfg_scale > 1.0 else 1.0, guided_channels=guided_channels,
                        autocast_dtype=autocast_dtype),
        )


def _checked_labels(model, labels: torch.Tensor, generators, device) -> tuple[torch.Tensor, list]:
    """``labels`` as int64 on ``device`` and one generator per image (default: seeded 0..B-1).

    Raises:
        ValueError: a label outside [0, num_classes), or not one generator per image.
    """
    labels = labels.to(device=device, dtype=torch.long)
    B, K = labels.shape[0], model.num_classes
    if B and (labels.min() < 0 or labels.max() >= K):
        raise ValueError(f"labels: must be in [0, {K}), got range [{int(labels.min())}, {int(labels.max())}]")
    if generators is None:
        generators = [torch.Generator(device=device).manual_seed(i) for i in range(B)]
    if len(generators) != B:
        raise ValueError(f"generators: need one per image ({B}), got {len(generators)}")
    return labels, generators


def _start_latents(model, latents: torch.Tensor | None, generators, device) -> torch.Tensor:
    """x at the first timestep: a float32 copy of ``latents``, or N(0, I) per image from ``generators``.

    Raises:
        ValueError: ``latents`` not of shape [B, C, S, S] (the backbone's channels and side).
    """
    B, C, S = len(generators), model.in_channels, model.input_size
    if latents is None:
        return initial_noise(generators, (C, S, S), device)
    if tuple(latents.shape) != (B, C, S, S):
        raise ValueError(f"latents: expected shape {(B, C, S, S)}, got {tuple(latents.shape)}")
    return latents.to(device=device, dtype=torch.float32).clone()


class _Chain:
    """The model timesteps of a running chain and the scheduler stepping them (:func:`make_scheduler`);
    :meth:`respace` finishes it in fewer steps."""

    def __init__(self, model, sampler: Sampler, num_train_timesteps: int, timesteps: list[int], device):
        self.sampler, self.T = sampler, num_train_timesteps
        self.options = dict(
            num_train_timesteps=num_train_timesteps, learn_sigma=model.learn_sigma, device=device
        )
        self.set(timesteps)

    def set(self, timesteps: list[int]) -> None:
        self.timesteps = timesteps
        self.sched, self.sched_ts = make_scheduler(self.sampler, timesteps, **self.options)

    def respace(self, i: int, k: int) -> None:
        """Finish in ``k`` steps after step ``i``: x is now at noise level ``timesteps[i + 1]``; the rest of the
        chain is respaced from there (the D^3HR-style restart at an arbitrary timestep)."""
        tail = timestep_spacing("ddpm", k, num_train_timesteps=self.T, start_timestep=self.timesteps[i + 1])
        self.set(self.timesteps[: i + 1] + tail)


def step_std(sched, t: int, out: torch.Tensor) -> torch.Tensor:
    """σ_t, the standard deviation of the noise a diffusers ``DDPMScheduler`` step at ``t`` adds.

    DDPM posterior (Ho et al. 2020, eqs. 6-7): β_t = 1 − ᾱ_t / ᾱ_prev and β̃_t = (1 − ᾱ_prev) / (1 − ᾱ_t) β_t;
    ``fixed_large`` uses σ² = β_t; ``learned_range`` (DiT, improved DDPM eq. 15) log σ² = f log β_t +
    (1 − f) log β̃_t with f = (v + 1) / 2 from the backbone's variance channels v.

    Args:
        sched: the ``DDPMScheduler`` of :func:`make_scheduler`; t: its timestep.
        out: float [B, C or 2C, H, W] the step's model output (v = channels C.. under ``learned_range``).

    Returns:
        float: scalar tensor (``fixed_large``) or [B, C, H, W] (``learned_range``).
    """
    ac = sched.alphas_cumprod
    prev = sched.previous_timestep(t)
    a_t = ac[t]
    a_prev = ac[prev] if prev >= 0 else torch.tensor(1.0)
    beta = 1 - a_t / a_prev
    if sched.config.variance_type != "learned_range":
        return beta.sqrt().to(out.device)
    C = out.shape[1] // 2
    tilde = torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20)
    frac = (out[:, C:].float() + 1) / 2
    return torch.exp(0.5 * (frac * beta.log().to(out.device) + (1 - frac) * tilde.log().to(out.device)))


@dataclasses.dataclass(frozen=True)
class GuideStep:
    """What a ``step_guide`` of :func:`sample` sees after DDPM step ``i`` of ``n`` (model timestep ``t``).

    Attributes:
        i, n, t: the step, the chain's length and the backbone's timestep.
        x_t: float [B, C, H, W] the step's input; x_prev: the scheduler's x_{t-1} = μ_θ + σ_t z.
        x0: float [B, C, H, W] the step's x̂_0 (from the CFG-combined ε); out: the model output.
        std: σ_t of the step's noise (:func:`step_std`: scalar or [B, C, H, W]).
        alpha_bar: ᾱ_t (float scalar tensor) of the training schedule.
        labels: int64 [B] backbone labels.
        forward: ``forward(x)`` -> the step's model output at ``x`` with the chain's CFG and precision
            (for guides that differentiate through the backbone, e.g. IGD).
    """

    i: int
    n: int
    t: int
    x_t: torch.Tensor
    x_prev: torch.Tensor
    x0: torch.Tensor
    out: torch.Tensor
    std: torch.Tensor
    alpha_bar: torch.Tensor
    labels: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]


def _loop(model, x, labels, chain: _Chain, *, cfg_scale, guided_channels, generators, autocast_dtype,
          step_callback, final_step, step_guide=None, cfg_kw=None):  # fmt: skip
    """The denoising loop of :func:`sample` (see there)."""
    C = model.in_channels
    i = 0
    while i < len(chain.timesteps) - (0 if final_step else 1):
        t = chain.timesteps[i]
        out = guided_forward(
            model, x, t, labels,
            cfg_scale=cfg_scale, guided_channels=guided_channels, autocast_dtype=autocast_dtype,
        )  # fmt: skip
        if chain.sampler == "ddim":
            # DDIM uses ε only; the learned variance is meaningless at η = 0.
            x = chain.sched.step(out[:, :C], chain.sched_ts[i], x, eta=0.0).prev_sample
        else:
            res = chain.sched.step(out, chain.sched_ts[i], x, generator=generators)
            if step_guide is not None:
                st = chain.sched_ts[i]

                def forward(z, t=t):
                    return guided_forward(model, z, t, labels, **cfg_kw)

                x = step_guide(GuideStep(
                    i=i, n=len(chain.timesteps), t=t, x_t=x, x_prev=res.prev_sample, x0=res.pred_original_sample,
                    out=out, std=step_std(chain.sched, st, out), alpha_bar=chain.sched.alphas_cumprod[st],
                    labels=labels, forward=forward,
                ))  # fmt: skip
            else:
                x = res.prev_sample
        n = len(chain.timesteps)
        verdict = step_callback(i, n) if step_callback is not None else None
        if verdict is False:
            raise SamplingAborted(f"aborted after step {i + 1} of {n}")
        if type(verdict) is int and 1 <= verdict < n - i - 1:
            chain.respace(i, verdict)
        i += 1
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [B,C,H,W] in [-1, 1] -> uint8 [B,C,H,W] (round half up after clamping; DiT ``save_image``)."""
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
