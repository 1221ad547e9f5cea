"""Mode guidance (MGD^3: Chan-Santiago et al., "Mode-Guided Dataset Distillation using Diffusion Models",
ICML 2025): find IPC modes per class in the real data, then steer each sample towards its own mode during
the first part of the reverse chain, so the IPC samples of a class cover its modes instead of collapsing
onto the most likely one. Needs no fine-tuning.

Pure functions; the sampler applies :func:`guide` after every guided DDPM step (:func:`ddkit.sampling.sample`).
"""

from __future__ import annotations

import torch


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's ``KMeans(n_clusters=k, random_state=seed)``, as the MGD^3 reference fits each class
    (``sample_mode_guidance.py``: ``KMeans(n_clusters=IPC, random_state=0)`` on the class's VAE latents):
    k-means++ seeding, Lloyd iterations to convergence, one initialisation (``n_init="auto"``).

    Args:
        x: float [N, D] points (N >= k); fitted in float32.
        k: clusters.
        seed: ``random_state``, so the modes are reproducible.

    Returns:
        (centers float32 [k, D], assignment int64 [N]).

    Raises:
        ValueError: fewer points than clusters, or k < 1.
    """
    from sklearn.cluster import KMeans

    n = x.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"kmeans: need 1 <= k <= points, got k={k} for {n} points")
    km = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(x.detach().float().cpu().numpy())
    return torch.from_numpy(km.cluster_centers_).float(), torch.from_numpy(km.labels_).long()


def class_modes(x: torch.Tensor, y: torch.Tensor, num_classes: int, k: int, *, seed: int = 0) -> torch.Tensor:
    """IPC modes of every class: the k-means centers of its real samples in the backbone's space.

    Args:
        x: float [N, C, H, W] real samples as the backbone diffuses them (pixels in [-1, 1], or scaled
            VAE latents).
        y: int64 [N] dataset class of each sample.
        num_classes: K.
        k: modes per class (the IPC kept).
        seed: ``random_state`` of class 0's k-means; class c uses ``seed + c``.

    Returns:
        float32 [K, k, C, H, W]. A class with n < k samples has no k clusters: its samples themselves are
        the modes, repeated in turn (mode j is sample j mod n).

    Raises:
        ValueError: a class without samples.
    """
    return torch.stack([modes_of_class(x[y == c], k, c, seed=seed) for c in range(num_classes)])


def modes_of_class(xc: torch.Tensor, k: int, c: int, *, seed: int = 0) -> torch.Tensor:
    """The ``k`` modes of one class (:func:`class_modes` for class ``c`` alone, so a caller can stream the
    classes one at a time).

    Args:
        xc: float [n, C, H, W] class ``c``'s real samples in the backbone's space.
        k: modes; c: the class index (k-means ``random_state`` is ``seed + c``).

    Returns:
        float32 [k, C, H, W]: the k-means centers, or the samples in turn when n < k.

    Raises:
        ValueError: no samples.
    """
    xc = xc.float()
    n = xc.shape[0]
    if n == 0:
        raise ValueError(f"class {c}: no real samples to find modes in")
    if n < k:
        return xc[torch.arange(k) % n]
    centers, _ = kmeans(xc.flatten(1), k, seed=seed + c)
    return centers.view(k, *xc.shape[1:])


def mode_of(index: int, k: int) -> int:
    """The mode image ``index`` of a class is steered to: ``index mod k``, so over-generated candidates
    (index >= k, ``+select``) spread evenly over the modes."""
    return index % k


def guided_steps(n: int, stop: float) -> int:
    """How many of the first of ``n`` steps are mode-guided. The reference guides while the respaced index
    t (n-1 .. 0) exceeds ``stop_t`` (25 of 50: the first 24 steps); ``stop`` is stop_t / n.

    Raises:
        ValueError: ``stop`` outside [0, 1].
    """
    if not 0.0 <= stop <= 1.0:
        raise ValueError(f"generate.modes.stop: must be in [0, 1], got {stop}")
    return max(0, n - 1 - round(stop * n))


def guide(
    x_prev: torch.Tensor, x0: torch.Tensor, modes: torch.Tensor, std: torch.Tensor, scale: float,
    clip: float | None = None,
) -> torch.Tensor:
    """One mode-guided DDPM step: x_{t-1} = μ_θ(x_t) + σ_t z + λ σ_t (m − x̂_0).

    MGD^3 reference (``gaussian_diffusion.py``, ``p_sample_with_mode_guidance``): the guidance
    ``-(pred_xstart - mode) * scale * exp(0.5 * log_variance)`` is added to the posterior mean, beside the
    step's noise; σ_t is the step's own standard deviation, so the pull fades with the noise level.

    ``clip`` bounds x̂_0 to [-clip, clip] in the pull only (the sampler passes 1 for a pixel-space backbone,
    whose data lie in [-1, 1]: ADM's ``clip_denoised``; None for VAE latents, as the latent reference). Why:
    at high t, x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t moves 1/√ᾱ_t (≈ 150 at t = 999) per unit of x_t wherever ε̂
    does not follow x_t off the training distribution, so an unclipped pull feeds on itself: measured on the
    demo's DiT-T/4, max |x| grew from 5 to 1e10 within 8 guided steps and the minimax checkpoint's set
    went blank (25 of 100 images; ConvNet-3 73.3 % against 94.5 % clipped, README).

    Args:
        x_prev: float [B, C, H, W] the unguided step's output μ_θ + σ_t z.
        x0: float [B, C, H, W] the step's x̂_0 prediction (from the CFG-combined ε).
        modes: float [B, C, H, W] each image's target mode m.
        std: float scalar or [B, 1, 1, 1] σ_t of the step.
        scale: λ (the reference's ``mode_guidance_scale``, 0.1).
        clip: bound on |x̂_0| in the pull, or None (no bound).

    Returns:
        float [B, C, H, W] the guided x_{t-1}.
    """
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return x_prev + scale * std * (modes - x0)


def mode_step_guide(modes: torch.Tensor, scale: float, stop: float, clip: float | None):
    """The ``step_guide`` of :func:`ddkit.sampling.sample` that applies :func:`guide` on the first
    :func:`guided_steps` of the chain (``modes``: float [B, C, H, W], each image's mode).

    Raises:
        ValueError: ``stop`` outside [0, 1] (when the guide first runs).
    """

    def step(s):
        if tuple(modes.shape) != tuple(s.x_prev.shape):
            raise ValueError(f"modes: one mode per image of shape {tuple(s.x_prev.shape)} needed, got {tuple(modes.shape)}")
        if s.i >= guided_steps(s.n, stop):
            return s.x_prev
        return guide(s.x_prev, s.x0, modes.to(device=s.x_prev.device, dtype=torch.float32), s.std, scale, clip=clip)

    return step
