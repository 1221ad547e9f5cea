"""Minimax Diffusion losses and memories (Gu et al., CVPR 2024), as pure functions.

Reference: vimar-gu/MinimaxDiffusion ``train_dit.py`` (training loop, ``cosine_similarity``) and
``diffusion/gaussian_diffusion.py`` (``training_losses``, ``_vb_terms_bpd``), which come from DiT
(facebookresearch/DiT) and IDDPM (Nichol & Dhariwal 2021, openai/improved-diffusion ``losses.py``).

Per step, with x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and the model's ε̂ (and v when it learns σ):

* L_simple = mean over dims of (ε − ε̂)² per sample (DDPM, Ho et al. 2020, eq. 14);
* L_vb (learned σ only): the VLB term of IDDPM eq. 10–13 with the mean frozen (stop-grad on ε̂), in bits;
* the embedding is x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂ (``_predict_xstart_from_eps``), with gradient;
* per class c present in the batch whose memories are non-empty (Minimax paper eq. 5 and 7):
  L_r(c) = 1 − min cos(x̂0_i, m) over i in c's batch part × m in the real memory of c,
  L_d(c) = max cos(x̂0_i, g) over i × g in the generated memory of c;
  L_r = Σ_c L_r(c) / |classes present|, L_d likewise — the denominator counts every class present in the
  batch, including ones whose memory is still empty (the reference divides by ``len(set(ry))``);
* the memories are updated after the loss: real ← clean x0 of the batch, generated ← x̂0.detach(), FIFO
  of ``memory_size`` per class; a class's first batch therefore contributes no minimax term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddkit.schedule import alphas_cumprod


# ----------------------------------------------------------------------------------------------------------
# Schedule tables
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionTables:
    """Per-timestep constants of the DiT linear schedule, float64 tensors [T] (IDDPM ``GaussianDiffusion``).

    Computed in float64 and cast to float32 when gathered, as the reference's ``_extract_into_tensor``.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @classmethod
    def create(cls, num_train_timesteps: int = 1000, device: torch.device | str = "cpu") -> DiffusionTables:
        """Tables for ``ddkit.schedule`` (DiT: linear betas 1e-4..0.02)."""

        ac = alphas_cumprod(num_train_timesteps).to(torch.float64)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        betas = 1.0 - ac / ac_prev
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t=0; IDDPM clips the log by repeating the t=1 value.
        post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]])) if len(post_var) > 1 else post_var
        tabs = cls(
            betas=betas,
            alphas_cumprod=ac,
            sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / ac - 1.0),
            posterior_log_variance_clipped=post_log,
            posterior_mean_coef1=betas * torch.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * torch.sqrt(1.0 - betas) / (1.0 - ac),
        )
        return tabs.to(device)

    def to(self, device: torch.device | str) -> DiffusionTables:
        return DiffusionTables(**{k: v.to(device) for k, v in self.__dict__.items()})


def _gather(table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] as float32 [B, 1, ..., 1] with ``ndim`` dims."""
    v = table.to(t.device)[t].float()
    return v.view(-1, *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------------------------
# Diffusion losses
# ----------------------------------------------------------------------------------------------------------
def predict_x0(
    x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, tables: DiffusionTables
) -> torch.Tensor:
    """x̂0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε̂ (IDDPM ``_predict_xstart_from_eps``; equals
    (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t). x_t, eps: float [B, C, H, W]; t: int64 [B]. Returns float32 [B, C, H, W],
    differentiable in ``eps``."""
    n = x_t.ndim
    return (
        _gather(tables.sqrt_recip_alphas_cumprod, t, n) * x_t
        - _gather(tables.sqrt_recipm1_alphas_cumprod, t, n) * eps
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (IDDPM ``losses.py``)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # tanh approximation of Φ used by IDDPM losses.py (kept for bit-compatibility with the reference).
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of a Gaussian discretised to 256 bins on [-1, 1] (IDDPM ``losses.py``; DDPM eq. 13), in nats,
    elementwise; edge bins extend to ±∞. All inputs float [B, ...] of one shape."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_term(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor,
    tables: DiffusionTables,
) -> torch.Tensor:
    """The learned-σ variational-bound term, per sample, in bits (IDDPM eq. 10–13 and ``LEARNED_RANGE``).

    As DiT/MinimaxDiffusion ``gaussian_diffusion.py`` (``training_losses`` with learned variance): the mean
    comes from the *detached* ε̂ so that this term trains only the variance output v; log σ² =
    frac·log β_t + (1−frac)·log β̃_t with frac = (v+1)/2; the term is KL(q(x_{t−1}|x_t,x0) ‖ p(x_{t−1}|x_t))
    for t > 0 and the discretised decoder NLL at t = 0, each averaged over dims and divided by ln 2.

    Args:
        x0, x_t: float [B, C, H, W] clean input and its noised version.
        t: int64 [B].
        eps: float [B, C, H, W] ε̂ (detached here).
        v: float [B, C, H, W] variance interpolation output in [-1, 1] (gradient flows).

    Returns:
        float32 [B].
    """
    n = x_t.ndim
    eps = eps.detach()
    x0_pred = predict_x0(x_t, t, eps, tables)
    c1, c2 = _gather(tables.posterior_mean_coef1, t, n), _gather(tables.posterior_mean_coef2, t, n)
    model_mean = c1 * x0_pred + c2 * x_t
    true_mean = c1 * x0 + c2 * x_t
    min_log = _gather(tables.posterior_log_variance_clipped, t, n)
    max_log = _gather(torch.log(tables.betas), t, n)
    frac = (v.float() + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * min_log
    kl = mean_flat(normal_kl(true_mean, min_log, model_mean, model_log_var)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nll = mean_flat(nll) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def diffusion_losses(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    tables: DiffusionTables,
    learn_sigma: bool,
) -> dict[str, torch.Tensor]:
    """L_simple (+ L_vb) and x̂0 for one batch (MinimaxDiffusion ``gaussian_diffusion.py`` ``training_losses``,
    ``LossType.MSE``: the vb term is not rescaled).

    Args:
        model_out: float [B, C or 2C, H, W] backbone output (ε̂, then v when ``learn_sigma``).
        x0, x_t, noise: float [B, C, H, W]; t: int64 [B].

    Returns:
        ``mse`` float32 [B], ``vb`` float32 [B] (zeros without learned σ), ``loss`` = mse + vb [B], and
        ``x0_pred`` float32 [B, C, H, W] (with gradient through ε̂: the Minimax embedding).
    """
    c = x0.shape[1]
    out = model_out.float()
    eps = out[:, :c]
    mse = mean_flat((noise.float() - eps) ** 2)
    if learn_sigma:
        vb = vb_term(x0.float(), x_t.float(), t, eps, out[:, c:], tables)
    else:
        vb = torch.zeros_like(mse)
    return {"mse": mse, "vb": vb, "loss": mse + vb, "x0_pred": predict_x0(x_t.float(), t, eps, tables)}


def timestep_weights(t: torch.Tensor, tables: DiffusionTables, cap: float | None) -> torch.Tensor:
    """Per-sample weights of L_simple: ``min(1/ᾱ_t, cap)``, or ones when ``cap`` is None (DiT, uniform).

    On ε-prediction, ‖ε − ε̂‖² / ᾱ_t is exactly the v-prediction error ‖v − v̂‖² (Salimans & Ho 2022,
    v = √ᾱ ε − √(1−ᾱ) x0, so v − v̂ = (ε − ε̂)/√ᾱ); 1/ᾱ = 1 + 1/SNR. Uniform ε-MSE gives the high-noise
    steps, where x_t carries almost no image and only the label separates the classes, a vanishing share of
    the gradient (ᾱ_600 = 0.026 on DiT's schedule); capping the v-weight keeps them from dominating instead
    (the truncation mirrors Min-SNR weighting, Hang et al. 2023, on the other end of the SNR range).

    Args:
        t: int64 [B] timesteps; tables: the schedule; cap: None or >= 1.

    Returns:
        float32 [B] on ``t``'s device.
    """
    if cap is None:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    w = 1.0 / tables.alphas_cumprod.to(t.device)[t]
    return w.clamp(max=cap).float()


# ----------------------------------------------------------------------------------------------------------
# Minimax criteria
# ----------------------------------------------------------------------------------------------------------
def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All pairwise cosine similarities: a float [n, D], b float [m, D] -> [n, m] (MinimaxDiffusion
    ``train_dit.py`` ``cosine_similarity``: a·bᵀ / (‖a‖‖b‖ᵀ), no epsilon, as the reference)."""
    return (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1).unsqueeze(0))


class ClassMemory:
    """Per-class FIFO of flattened embeddings (MinimaxDiffusion ``train_dit.py``: ``real_memory`` /
    ``pseudo_memory``, lists trimmed from the front to ``memory_size``).

    ``items[c]`` is a float tensor [n ≤ size, D], oldest first; a class never seen has no entry.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"memory size must be > 0, got {size}")
        self.size = size
        self.items: dict[int, torch.Tensor] = {}

    def get(self, c: int) -> torch.Tensor | None:
        """Entries of class ``c`` [n, D], or None when empty."""
        return self.items.get(int(c))

    def push(self, c: int, x: torch.Tensor) -> None:
        """Append rows x [k, ...] (flattened to [k, D], detached) for class ``c``; keep the newest ``size``."""
        x = x.detach().flatten(1)
        old = self.items.get(int(c))
        new = x if old is None else torch.cat([old, x.to(old.dtype)])
        self.items[int(c)] = new[-self.size :].clone() if new.shape[0] > self.size else new

    def __len__(self) -> int:
        return len(self.items)

    def state_dict(self) -> dict:
        return {"size": self.size, "items": {c: v.cpu() for c, v in self.items.items()}}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.size = int(state["size"])
        self.items = {int(c): v.to(device) for c, v in state["items"].items()}


class MinimaxMemory:
    """The two memories of Minimax Diffusion: ``real`` (clean x0 of earlier batches) and ``gen`` (detached
    x̂0 of earlier batches), keyed by the subset's class index."""

    def __init__(self, size: int = 64) -> None:
        self.real = ClassMemory(size)
        self.gen = ClassMemory(size)

    def update(self, x0: torch.Tensor, x0_pred: torch.Tensor, labels: torch.Tensor) -> None:
        """Push a batch (after the loss, as the reference). x0, x0_pred: float [B, ...]; labels: int64 [B]
        subset class indices (CPU tensor preferred: no device sync)."""
        classes, order, counts = _class_runs(labels, x0.device)
        # One gather per memory, then views per class: the per-class cost is one cat, not three index ops.
        real = x0.index_select(0, order).split(counts)
        gen = x0_pred.detach().index_select(0, order).split(counts)
        for c, r, g in zip(classes, real, gen, strict=True):
            self.real.push(c, r)
            self.gen.push(c, g)

    def state_dict(self) -> dict:
        return {"real": self.real.state_dict(), "gen": self.gen.state_dict()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.real.load_state_dict(state["real"], device)
        self.gen.load_state_dict(state["gen"], device)


def _class_runs(labels: torch.Tensor, device: torch.device) -> tuple[list[int], torch.Tensor, list[int]]:
    """The batch sorted by class: (classes present, ascending; int64 [B] row order on ``device``, stable, so
    a class keeps its batch order; rows per class). One sort however many classes are present."""
    lab = labels.detach().to("cpu")
    classes, counts = torch.unique(lab, return_counts=True)
    order = torch.argsort(lab, stable=True)
    return classes.tolist(), order.to(device, non_blocking=True), counts.tolist()


def _has(mem: ClassMemory, c: int) -> bool:
    entries = mem.get(c)
    return entries is not None and len(entries) > 0


def _class_extreme(
    emb: torch.Tensor, group: torch.Tensor, bank: list[torch.Tensor], largest: bool
) -> torch.Tensor:
    """Σ over groups of the min (or max) cosine similarity between a group's rows and its own bank.

    emb: float32 [R, D]; group: int64 [R] in [0, G); bank: G float tensors [M_g, D]. All banks are stacked
    into one [ΣM_g, D] matrix and one similarity matrix [R, ΣM_g] is masked to each row's own group, so the
    kernel count does not grow with the classes present (the reference loops over classes). The values are
    the reference's per-class ``cosine_similarity(...).min()`` / ``.max()``; only float rounding differs.
    """
    sizes = torch.tensor([len(b) for b in bank], device=emb.device)
    owner = torch.repeat_interleave(torch.arange(len(bank), device=emb.device), sizes)  # [ΣM]
    sims = cosine_similarity_matrix(emb, torch.cat(bank).to(emb.dtype))  # [R, ΣM]
    fill = float("-inf") if largest else float("inf")
    per_row = sims.masked_fill(group[:, None] != owner[None, :], fill)  # [R, ΣM]
    per_row = per_row.amax(1) if largest else per_row.amin(1)  # [R]
    per_group = per_row.new_full((len(bank),), fill)
    per_group = per_group.scatter_reduce(0, group, per_row, "amax" if largest else "amin", include_self=False)
    return per_group.sum()


def minimax_terms(
    x0_pred: torch.Tensor, labels: torch.Tensor, memory: MinimaxMemory
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unweighted representativeness and diversity losses of one batch (Minimax paper eq. 5, 7;
    MinimaxDiffusion ``train_dit.py``). Pure: the memory is read, not changed.

    Args:
        x0_pred: float [B, C, H, W] x̂0 with gradient.
        labels: int64 [B] subset class indices (memory keys).
        memory: the memories *before* this batch is pushed.

    Returns:
        (L_r, L_d, classes_used): float32 scalars — Σ over classes with a non-empty memory of
        (1 − min cos) resp. (max cos), each divided by the number of classes present in the batch — and
        how many classes had a memory. Both are 0 (no graph) when no class had one.
    """
    lab = labels.detach().to("cpu")
    present = torch.unique(lab).tolist()
    emb = x0_pred.flatten(1).float()
    used = [c for c in present if _has(memory.real, c) and _has(memory.gen, c)]
    if not used:
        return emb.new_zeros(()), emb.new_zeros(()), 0
    slot = torch.full((int(lab.max()) + 1,), -1, dtype=torch.long)
    slot[torch.tensor(used)] = torch.arange(len(used))
    group = slot[lab]  # [B]: index into ``used``, -1 for a class without memory
    rows = torch.nonzero(group >= 0).flatten()
    e, g = emb.index_select(0, rows.to(emb.device)), group[rows].to(emb.device)
    l_r = len(used) - _class_extreme(e, g, [memory.real.get(c) for c in used], largest=False)
    l_d = _class_extreme(e, g, [memory.gen.get(c) for c in used], largest=True)
    n = len(present)
    return l_r / n, l_d / n, len(used)


def minimax_objective(
    loss: torch.Tensor,
    x0: torch.Tensor,
    x0_pred: torch.Tensor,
    labels: torch.Tensor,
    memory: MinimaxMemory | None,
    lambda_r: float,
    lambda_d: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training step's objective ``loss + λr·L_r + λd·L_d`` (:func:`minimax_terms` against the
    memories before this batch), then the memories take the batch (:meth:`MinimaxMemory.update`: clean
    x0, detached x̂0), as the reference's loop. Without a memory (pretraining: λr = λd = 0) the objective
    is ``loss`` itself and nothing is updated.

    Args:
        loss: float32 scalar, the diffusion loss; x0, x0_pred: float [B, C, H, W] (x0_pred with gradient);
        labels: int64 [B] subset class indices, CPU preferred; memory: this rank's memories or None.

    Returns:
        (total, L_r, L_d): float32 scalars; L_r and L_d are detached zeros without a memory.
    """
    zero = loss.detach().new_zeros(())
    if memory is None:
        return loss, zero, zero
    l_r, l_d, _ = minimax_terms(x0_pred, labels, memory)
    total = loss + lambda_r * l_r + lambda_d * l_d
    memory.update(x0, x0_pred, labels)
    return total, l_r, l_d
