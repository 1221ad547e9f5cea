"""IGD's formulas (Chen et al., ICLR 2025, reference ``mchen725/DD_IGD``), pure functions on tensors.

A surrogate classifier's parameters are passed flat (float32 [P], the order of ``net.named_parameters()``, as
the reference's ``ReparamModule`` flattens them), so one network object evaluates every checkpoint of its
training trajectory (:func:`torch.func.functional_call`).

* :func:`param_grad`: ∇_θ CE(f_θ(x), y), the reference's ``torch.autograd.grad(loss, cur_params)``.
* :func:`real_gradients`: the real-gradient memory of one class at each checkpoint (``sample.py``
  ``get_grads``): the mean over consecutive batches of ``batch`` images of the batch-mean CE gradient.
* :func:`select_checkpoints`: the trajectory checkpoints guidance uses (``test_ckpts_grad_sim.py``: keep a
  checkpoint when its class gradients' mean cosine to the last kept one drops below ``threshold``).
* :func:`influence_loss`: the influence guidance objective, Σ (1 − cos(∇_θ ℓ(x̂), g_real)) averaged over the
  checkpoints (the ``gm_loss`` of the reference's IGD sampling, transcribed by its ports).
* :func:`deviation_loss`: the deviation (diversity) objective, the largest cosine similarity between x̂_0 and
  the samples already generated for the class (the memory ``pseudo_memory_c`` of ``sample.py``).
* :func:`guided_window`: the reference's guided range of respaced steps [low, high] as model timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ddkit.sampling import timestep_spacing

#: The reference's ``gm_loss`` and ``cos_simf`` add this to the product of the norms.
COS_EPS = 1e-6


def param_shapes(net: torch.nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, shape) of ``net``'s parameters in the flat layout of every checkpoint."""
    return [(n, p.shape) for n, p in net.named_parameters()]


def flatten(net: torch.nn.Module) -> torch.Tensor:
    """``net``'s parameters as one float32 [P] vector (detached copy)."""
    return torch.cat([p.detach().reshape(-1).float() for p in net.parameters()])


def _unflatten(flat: torch.Tensor, shapes: Sequence[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    out, at = {}, 0
    for name, shape in shapes:
        n = shape.numel()
        out[name] = flat[at : at + n].view(shape)
        at += n
    if at != flat.numel():
        raise ValueError(f"flat parameters: {flat.numel()} values for a network of {at}")
    return out


def logits(net: torch.nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float [B, K] logits of ``net`` with the flat parameters ``flat`` on images ``x`` float [B, C, H, W]."""
    return torch.func.functional_call(net, _unflatten(flat, param_shapes(net)), (x,))


def param_grad(net: torch.nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               create_graph: bool = False) -> torch.Tensor:  # fmt: skip
    """∇_θ of the batch-mean cross-entropy of ``net`` at ``flat`` (float [P]) on ``x`` float [B, C, H, W] with
    labels ``y`` int64 [B]: float [P]. ``create_graph`` keeps the graph to ``x`` (the influence guidance
    differentiates this gradient with respect to the sample)."""
    with torch.enable_grad():
        theta = flat.detach().requires_grad_(True)
        loss = F.cross_entropy(logits(net, theta, x), y)
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]


def real_gradients(net: torch.nn.Module, checkpoints: Sequence[torch.Tensor], images: torch.Tensor, label: int,
                   batch: int = 50) -> torch.Tensor:  # fmt: skip
    """The real-gradient memory of one class: float32 [len(checkpoints), P].

    ``sample.py`` ``get_grads``: for each checkpoint, the batch-mean CE gradient of consecutive batches of
    ``batch`` (the reference's ``gap`` = 50) of the class's images, averaged over the batches (each batch
    weighs the same, a short last batch included, as ``acc_grad / len(gap_idxs)``).

    Args:
        images: float [N, C, H, W] the class's real images in [-1, 1] (the reference's first ``grad_ipc``).
        label: the class's index in the surrogate's logits.
    """
    y = torch.full((len(images),), int(label), dtype=torch.long, device=images.device)
    starts = range(0, len(images), batch)
    out = []
    for flat in checkpoints:
        acc = torch.zeros_like(flat)
        for s in starts:
            acc += param_grad(net, flat, images[s : s + batch], y[s : s + batch])
        out.append(acc / len(starts))
    return torch.stack(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference's ``cos_simf`` / ``gm_loss`` cosine over the last dim: Σ a·b / (‖a‖ ‖b‖ + 1e-6)."""
    return torch.sum(a * b, dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1) + COS_EPS)


def select_checkpoints(grads_at: Callable[[int], torch.Tensor], count: int, threshold: float = 0.7) -> list[int]:
    """Indices of the trajectory checkpoints guidance uses (``test_ckpts_grad_sim.py`` ``main``).

    Checkpoint 0 is kept; walking the trajectory, checkpoint j is kept when the mean over classes of the cosine
    between the class gradients at j and at the last kept checkpoint is below ``threshold`` (0.7), and it
    becomes the new reference point.

    Args:
        grads_at: j -> float [K, P] checkpoint j's real gradient of each class (called once per checkpoint,
            so only two are held at a time); count: checkpoints on the trajectory.
    """
    kept, ref = [0], grads_at(0)
    for j in range(1, count):
        cur = grads_at(j)
        if float(cosine(ref, cur).mean()) < threshold:
            kept.append(j)
            ref = cur
    return kept


def influence_loss(net: torch.nn.Module, checkpoints: Sequence[torch.Tensor], real: torch.Tensor,
                   x: torch.Tensor, label: int) -> torch.Tensor:  # fmt: skip
    """IGD's influence guidance objective of ONE sample (the reference samples one image at a time).

    G_I(x) = (1/T) Σ_t (1 − cos(∇_θ CE(f_θt(x), y), g_t^real)), the reference's ``gm_loss(pseudo_g, real_g)``
    summed over its checkpoints and divided by their number; minimising it raises the TracIn-style influence
    (gradient alignment with the real class gradient) along the surrogate's trajectory.

    Args:
        checkpoints: T flat parameter vectors; real: float [T, P] the class's :func:`real_gradients`.
        x: float [1, C, H, W] the sample (the decoded x̂_0) in the surrogate's input space, in the graph.

    Returns:
        float scalar, differentiable with respect to ``x``.
    """
    y = torch.full((x.shape[0],), int(label), dtype=torch.long, device=x.device)
    total = x.new_zeros(())
    for flat, g_real in zip(checkpoints, real, strict=True):
        g = param_grad(net, flat, x, y, create_graph=True)
        total = total + torch.sum(1 - cosine(g, g_real))
    return total / len(checkpoints)


def deviation_loss(x0: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """IGD's deviation (diversity) objective of one sample: max_m cos(x̂_0, m) over the class's memory.

    The memory (``pseudo_memory_c``) holds the samples already generated for the class, in the backbone's
    space (latents in the reference); minimising the largest similarity pushes x̂_0 away from its nearest
    predecessor, the representativeness/diversity memory of Minimax (Gu et al. 2024) that IGD builds on.

    Args:
        x0: float [C, H, W]; memory: float [M, C, H, W] (M = 0: no term, as the class's first sample).

    Returns:
        float scalar (0 for an empty memory).
    """
    if memory.shape[0] == 0:
        return x0.new_zeros(())
    return cosine(x0.reshape(1, -1), memory.reshape(memory.shape[0], -1)).max()


def guided_window(low: int, high: int, reference_steps: int = 50, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """The reference's guided steps, ``low <= t <= high`` in its respaced index (``sample_mp.sh``: 30..45 of
    50 DDPM steps), as the model timesteps of those indices (DiT ``space_timesteps``), so that a chain of any
    length guides the same noise range: (t_low, t_high) inclusive.

    Raises:
        ValueError: not 0 <= low <= high < reference_steps.
    """

    if not 0 <= low <= high < reference_steps:
        raise ValueError(f"generate.igd: need 0 <= low <= high < {reference_steps}, got low={low}, high={high}")
    ts = sorted(timestep_spacing("ddpm", reference_steps, num_train_timesteps=num_train_timesteps))
    return ts[low], ts[high]
