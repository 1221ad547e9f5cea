"""IGD's change to a DDPM step: the ``step_guide`` of :func:`ddkit.sampling.sample` (:class:`InfluenceGuide`).

Inside the guided window (:func:`ddkit.methods.igd.influence.guided_window`), with x̂_0(x_t) = (x_t −
√(1−ᾱ_t) ε̂(x_t)) / √ᾱ_t through the backbone (CFG-combined ε̂):

    L(x_t) = Σ_b [ k · G_I(D(x̂_0,b)) + γ · G_D(x̂_0,b; M_b) ]
    x_{t-1} = μ_θ(x_t) + σ_t z − σ_t² ∇_{x_t} L

G_I and G_D are :func:`~ddkit.methods.igd.influence.influence_loss` and
:func:`~ddkit.methods.igd.influence.deviation_loss`, D maps x̂_0 to the surrogate's pixels (the VAE decoder for a
latent backbone; a clamp to [-1, 1] for a pixel backbone, see below), M_b is image b's memory. Each image's
term depends on that image only, so an image does not depend on its batch.

The step form is guided-diffusion's ``condition_mean`` (Dhariwal & Nichol 2021, Algorithm 1: μ + Σ ∇ log p, here
the gradient of −L), which the reference's ``diffusion/`` package descends from. Departure: the reference's
``diffusion/gaussian_diffusion.py`` (its IGD branch of ``p_sample``) could not be read where this was written
(the index holds its ``sample.py``, ``sample_mp.sh``, ``train.py`` and ``test_ckpts_grad_sim.py``); the
objectives, scales, window and memory follow those files and the paper, the step form follows the base it
builds on. The pixel clamp: at high t a pixel x̂_0 grows like 1/√ᾱ_t off the data range and the surrogate never
saw such inputs; the reference decodes latents with the VAE instead (bounded images), so the clamp is the pixel
stand-in for that decoder, as MGD^3's pixel pull in :func:`ddkit.methods.modes.guide`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ddkit.methods.igd.influence import deviation_loss, influence_loss


class InfluenceGuide:
    """The step guide for one batch.

    Args:
        net: the surrogate (structure only; parameters come from ``checkpoints``).
        checkpoints: T flat parameter vectors float32 [P] (the selected trajectory points).
        real: float32 [K, T, P] each class's real-gradient memory.
        classes: int per image, the dataset class (row of ``real``, logit of the surrogate).
        memories: per image, float [M_b, C, H, W] the samples already generated for its class (M_b may be 0).
        window: (t_low, t_high) inclusive model timesteps guided.
        scale: k (the reference's ``gm_scale``; ``sample_mp.sh``: 5); dev_scale: γ (``dev_scale``: 120).
        to_pixels: x̂_0 float [B, C, H, W] -> surrogate input float [B, c, h, w] in [-1, 1], differentiable.
    """

    def __init__(self, net, checkpoints: Sequence[torch.Tensor], real: torch.Tensor, classes: Sequence[int],
                 memories: Sequence[torch.Tensor], window: tuple[int, int], scale: float, dev_scale: float,
                 to_pixels: Callable[[torch.Tensor], torch.Tensor]) -> None:  # fmt: skip
        self.net, self.checkpoints, self.real = net, list(checkpoints), real
        self.classes, self.memories = list(classes), list(memories)
        self.window, self.scale, self.dev_scale, self.to_pixels = window, float(scale), float(dev_scale), to_pixels

    def objective(self, x0: torch.Tensor) -> torch.Tensor:
        """L summed over the batch for x̂_0 float [B, C, H, W] (in the graph): k G_I + γ G_D per image."""
        pix = self.to_pixels(x0)
        total = x0.new_zeros(())
        for b, c in enumerate(self.classes):
            if self.scale:
                total = total + self.scale * influence_loss(self.net, self.checkpoints, self.real[c], pix[b : b + 1], c)
            if self.dev_scale and self.memories[b].shape[0]:
                total = total + self.dev_scale * deviation_loss(x0[b], self.memories[b].to(x0.device))
        return total

    def gradient(self, s) -> torch.Tensor:
        """∇_{x_t} L at the step ``s`` (:class:`ddkit.sampling.GuideStep`): float [B, C, H, W]."""
        C = s.x_t.shape[1]
        ab = s.alpha_bar.to(s.x_t.device)
        with torch.enable_grad():
            x = s.x_t.detach().requires_grad_(True)
            eps = s.forward(x)[:, :C]
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            loss = self.objective(x0)
            if not loss.requires_grad:  # both scales 0, or nothing to deviate from and k = 0
                return torch.zeros_like(x)
            return torch.autograd.grad(loss, x)[0]

    def __call__(self, s) -> torch.Tensor:
        lo, hi = self.window
        if not lo <= s.t <= hi:
            return s.x_prev
        return s.x_prev - s.std**2 * self.gradient(s)
