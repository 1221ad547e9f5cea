"""Samplers: DiT respacing, DDPM learned-range and DDIM steps against the reference formulas, CFG."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddkit.sampling import SamplingAborted, guided_output, sample, timestep_spacing


class FakeBackbone(nn.Module):
    """Deterministic stand-in with the Backbone call signature; records every forward."""

    def __init__(self, in_channels=2, input_size=4, num_classes=3, learn_sigma=True):
        super().__init__()
        self.in_channels, self.input_size, self.num_classes, self.learn_sigma = (
            in_channels,
            input_size,
            num_classes,
            learn_sigma,
        )
        self.w = nn.Parameter(torch.tensor(0.3))
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.calls.append((x.clone(), t.clone(), y.clone()))
        yy = y.float().view(-1, 1, 1, 1)
        tt = t.float().view(-1, 1, 1, 1) / 1000
        eps = self.w * x + 0.1 * yy + 0.05 * tt
        if not self.learn_sigma:
            return eps
        v = torch.tanh(x) * 0.5 - 0.1 * yy
        return torch.cat([eps, v], dim=1)


def dit_alphas_cumprod(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def test_ddpm_spacing_matches_dit_respace():
    # DiT respace.space_timesteps(1000, [50]): frac_stride = 999/49, accumulated and rounded.
    ts = timestep_spacing("ddpm", 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert ts[-4:] == [61, 41, 20, 0]
    # DiT "ddim50" == diffusers DDIMScheduler leading spacing.
    assert timestep_spacing("ddim", 50) == list(range(980, -1, -20))
    # D^3HR restart at 620 with 32 steps lands on the 50-step DDIM grid.
    assert timestep_spacing("ddim", 32, start_timestep=620) == list(range(620, -1, -20))


def reference_ddpm_learned_range(x, kept, model_out_fn, noises):
    """DiT gaussian_diffusion.p_sample_loop on a SpacedDiffusion (float64), LEARNED_RANGE, eps prediction."""
    ac_full = dit_alphas_cumprod()
    kept = sorted(kept)
    ac = ac_full[kept]
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    betas = 1 - ac / ac_prev
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_log_clipped = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef1 = betas * ac_prev.sqrt() / (1 - ac)
    coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)
    x = x.double()
    for n_i, i in enumerate(reversed(range(len(kept)))):
        out = model_out_fn(x.float(), kept[i]).double()
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        frac = (v + 1) / 2
        log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log_clipped[i]
        x0 = (1 / ac[i]).sqrt() * x - (1 / ac[i] - 1).sqrt() * eps
        mean = coef1[i] * x0 + coef2[i] * x
        x = mean + (torch.exp(0.5 * log_var) * noises[n_i] if i != 0 else 0)
    return x


def test_ddpm_learned_range_matches_dit_reference():
    torch.manual_seed(0)
    m = FakeBackbone(in_channels=2, input_size=4, num_classes=3, learn_sigma=True)
    B = 3
    y = torch.tensor([0, 2, 1])
    x_T = torch.randn(B, 2, 4, 4)
    kept = [999, 700, 350, 0]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    # The noise the sampler draws per step: from each image's generator, in order.
    copies = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    noises = [torch.stack([torch.randn(1, 2, 4, 4, generator=g)[0] for g in copies]).double() for _ in kept]
    got = sample(
        m, y, steps=len(kept), sampler="ddpm", cfg_scale=1.0, generators=gens, latents=x_T, timesteps=kept
    )
    ref = reference_ddpm_learned_range(x_T, kept, lambda x, t: m(x, torch.full((B,), t), y), noises)
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_ddim_eta0_matches_formula_from_restart_timestep():
    m = FakeBackbone(in_channels=2, input_size=4, num_classes=3, learn_sigma=True)
    y = torch.tensor([1, 2])
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    ts = timestep_spacing("ddim", 4, start_timestep=620)
    got = sample(m, y, steps=4, sampler="ddim", cfg_scale=1.0, latents=x, start_timestep=620)
    ac = dit_alphas_cumprod()
    ref = x.double()
    for k, t in enumerate(ts):
        eps = m(ref.float(), torch.full((2,), t), y)[:, :2].double()
        a_t = ac[t]
        a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        x0 = (ref - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        ref = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # Song et al. 2021, eq. 12 with sigma = 0
    assert ts[0] == 620 and ts[-1] == 0
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=1e-4)
    # η = 0: no randomness once the start latents are fixed.
    again = sample(m, y, steps=4, sampler="ddim", cfg_scale=1.0, latents=x, start_timestep=620)
    assert torch.equal(got, again)


def test_cfg_null_class_is_num_classes_in_one_batched_forward():
    m = FakeBackbone(in_channels=4, input_size=2, num_classes=5, learn_sigma=True)
    y = torch.tensor([0, 3, 4])
    sample(m, y, steps=3, sampler="ddpm", cfg_scale=4.0)
    assert len(m.calls) == 3  # one forward per step, both halves together
    for x, _t, yy in m.calls:
        assert x.shape[0] == 6 and torch.equal(x[:3], x[3:])
        assert yy[:3].tolist() == [0, 3, 4]
        assert yy[3:].tolist() == [5, 5, 5]  # null class = num_classes, never 0
    m.calls.clear()
    sample(m, y, steps=2, sampler="ddim", cfg_scale=1.0)
    assert all(c[0].shape[0] == 3 for c in m.calls) and len(m.calls) == 2


def test_guided_channels_all_vs_first_three():
    C = 4
    cond = torch.randn(2, 2 * C, 3, 3)
    uncond = torch.randn(2, 2 * C, 3, 3)
    out = torch.cat([cond, uncond])
    s = 4.0
    full = guided_output(out, in_channels=C, cfg_scale=s, guided_channels=None)
    three = guided_output(out, in_channels=C, cfg_scale=s, guided_channels=3)
    want = uncond[:, :C] + s * (cond[:, :C] - uncond[:, :C])
    assert torch.allclose(full[:, :C], want)
    assert torch.allclose(three[:, :3], want[:, :3])
    assert torch.equal(three[:, 3], cond[:, 3])  # DiT forward_with_cfg leaves channel 3 unguided
    assert torch.equal(full[:, C:], cond[:, C:]) and torch.equal(
        three[:, C:], cond[:, C:]
    )  # v from cond half


def test_images_do_not_depend_on_batch_composition():
    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone

    torch.manual_seed(0)
    m = build_backbone(
        ModelConfig(arch="DiT-T/4", in_channels=1, input_size=8, num_classes=4, learn_sigma=True), seed=0
    )
    m.eval()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = sample(m, torch.tensor([1, 2]), steps=4, sampler="ddpm", generators=gens([11, 22]))
    alone = sample(m, torch.tensor([2]), steps=4, sampler="ddpm", generators=gens([22]))
    assert both.shape == (2, 1, 8, 8) and torch.isfinite(both).all()
    assert torch.allclose(both[1:], alone, atol=1e-4)
    other = sample(m, torch.tensor([2]), steps=4, sampler="ddpm", generators=gens([23]))
    assert not torch.allclose(other, alone, atol=1e-3)


def test_bad_labels_and_abort():
    m = FakeBackbone(num_classes=3)
    with pytest.raises(ValueError, match=r"labels: must be in \[0, 3\)"):
        sample(m, torch.tensor([3]), steps=2)
    with pytest.raises(SamplingAborted):
        sample(m, torch.tensor([0]), steps=5, step_callback=lambda i, n: i < 2)
    assert math.isfinite(float(sample(m, torch.tensor([0]), steps=2).sum()))


def test_step_callback_can_shorten_the_rest_of_the_chain():
    m = FakeBackbone(num_classes=3)
    out = sample(
        m,
        torch.tensor([0, 1]),
        steps=10,
        sampler="ddpm",
        cfg_scale=2.0,
        step_callback=lambda i, n: 2 if (i, n) == (3, 10) else True,
    )
    ts = [int(c[1][0]) for c in m.calls]
    assert len(ts) == 6 and ts[:4] == timestep_spacing("ddpm", 10)[:4] and ts[-1] == 0
    assert ts == sorted(ts, reverse=True) and torch.isfinite(out).all()


def test_conditioning_is_computed_once_per_forward_and_restored():
    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone
    from ddkit.sampling import cached_conditioning

    m = build_backbone(ModelConfig(arch="DiT-T/4", in_channels=1, input_size=8, num_classes=4), seed=0).eval()
    emb = m.dit.transformer_blocks[0].norm1.emb
    calls = []
    h = emb.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 4])
    with torch.no_grad():
        ref = m(x, t, y)
        n_plain = len(calls)
        calls.clear()
        with cached_conditioning(m):
            got = m(x, t, y)
    h.remove()
    assert n_plain == len(m.dit.transformer_blocks) + 1 and len(calls) == 1
    assert torch.equal(ref, got)
    assert all(b.norm1.emb is emb for b in m.dit.transformer_blocks)
