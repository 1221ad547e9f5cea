"""MGD^3 mode guidance: k-means modes, the guided step against the reference formula, σ_t against
diffusers' own noise, and the guided chain pulled towards each image's mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddkit.methods.modes import class_modes, guide, guided_steps, kmeans, mode_of, mode_step_guide
from ddkit.sampling import make_scheduler, sample, step_std, timestep_spacing
from tests.test_sampling import FakeBackbone

ROOT = Path(__file__).parent.parent


def test_kmeans_recovers_separated_clusters_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(30, 2, generator=g) for c in centers])
    got, assign = kmeans(x, 3, seed=1)
    order = torch.cdist(centers, got).argmin(dim=1)
    assert sorted(order.tolist()) == [0, 1, 2]
    assert torch.allclose(got[order], centers, atol=0.1)
    assert all(len(set(assign[i * 30:(i + 1) * 30].tolist())) == 1 for i in range(3))
    again, _ = kmeans(x, 3, seed=1)
    assert torch.equal(got, again)
    with pytest.raises(ValueError, match="k <= points"):
        kmeans(x[:2], 3)


def test_class_modes_are_per_class_and_shaped_like_the_inputs():
    x = torch.cat([torch.full((6, 1, 2, 2), -1.0), torch.full((6, 1, 2, 2), 1.0)])
    y = torch.tensor([0] * 6 + [1] * 6)
    m = class_modes(x, y, 2, 3)
    assert m.shape == (2, 3, 1, 2, 2)
    assert torch.all(m[0] == -1) and torch.all(m[1] == 1)
    few = class_modes(x[:8], y[:8], 2, 4)  # class 1 has 2 samples for 4 modes: each is a mode, in turn
    assert torch.equal(few[1], x[[6, 7, 6, 7]])
    with pytest.raises(ValueError, match="class 2: no real samples"):
        class_modes(x, y, 3, 2)
    assert [mode_of(i, 10) for i in (0, 9, 10, 23)] == [0, 9, 0, 3]


def test_guided_steps_follow_the_reference_stop_t():
    assert guided_steps(50, 0.5) == 24  # t = 49 .. 26 > stop_t = 25
    assert guided_steps(50, 0.0) == 49 and guided_steps(50, 1.0) == 0
    with pytest.raises(ValueError, match="generate.modes.stop"):
        guided_steps(50, 1.5)


def test_guide_is_the_reference_mean_shift():
    x_prev, x0, m = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    std = torch.tensor(0.3)
    # reference: sample = mean + (-(pred_xstart - mode) * scale * exp(0.5 * log_var)) + std * noise
    assert torch.allclose(guide(x_prev, x0, m, std, 0.1), x_prev - (x0 - m) * 0.1 * 0.3)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_step_std_is_the_noise_diffusers_adds(learn_sigma):
    """Two steps from the same x with different noise differ by exactly σ_t (z_a − z_b)."""
    ts = timestep_spacing("ddpm", 20)
    sched, sts = make_scheduler("ddpm", ts, learn_sigma=learn_sigma)
    C = 2
    out = torch.randn(3, 2 * C if learn_sigma else C, 4, 4).clamp(-1, 1)
    x = torch.randn(3, C, 4, 4)
    for i in (0, 7, 18):
        seeds_a, seeds_b = (1, 2, 3), (4, 5, 6)
        prev = {}
        for seeds in (seeds_a, seeds_b):
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            prev[seeds] = sched.step(out, sts[i], x, generator=gens).prev_sample
        z = {s: torch.stack([torch.randn(C, 4, 4, generator=torch.Generator().manual_seed(k)) for k in s])
             for s in (seeds_a, seeds_b)}
        std = step_std(sched, sts[i], out)
        assert torch.allclose(prev[seeds_a] - prev[seeds_b], std * (z[seeds_a] - z[seeds_b]), atol=1e-5)


class ZeroDataBackbone(FakeBackbone):
    """The exact ε of data concentrated at 0 (x_t = sqrt(1 − ᾱ_t) ε): every x̂_0 is 0, so the free chain
    ends at 0 and only mode guidance moves it."""

    def forward(self, x, t, y):
        from ddkit.sampling import make_scheduler

        ac = make_scheduler("ddpm", [999, 0])[0].alphas_cumprod
        return x / (1 - ac[t.long()]).sqrt().view(-1, 1, 1, 1)


def test_mode_guidance_pulls_each_image_towards_its_own_mode():
    model = ZeroDataBackbone(in_channels=1, learn_sigma=False)
    labels = torch.tensor([0, 1, 2, 0])
    modes = torch.stack([torch.full((1, 4, 4), v) for v in (0.8, -0.8, 0.4, -0.4)])

    def run(**kw):  # stop before the last step, which maps any x to this model's x̂_0 = 0
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        return sample(model, labels, steps=20, cfg_scale=1.0, generators=gens, final_step=False, **kw)

    free = run()
    pulled = run(step_guide=mode_step_guide(modes, 1.0, 0.0, None))
    assert torch.equal(run(step_guide=mode_step_guide(modes, 0.0, 0.5, None)), free)  # λ = 0: the unguided chain
    d_free = (free - modes).pow(2).flatten(1).mean(1)
    d_pulled = (pulled - modes).pow(2).flatten(1).mean(1)
    assert torch.all(d_pulled < 0.8 * d_free), (d_pulled, d_free)
    with pytest.raises(ValueError, match="needs sampler 'ddpm'"):
        sample(model, labels, steps=5, sampler="ddim", step_guide=mode_step_guide(modes, 0.1, 0.5, None))
    with pytest.raises(ValueError, match="one mode per image"):
        sample(model, labels, steps=5, step_guide=mode_step_guide(modes[:2], 0.1, 0.5, None))


class SaturatingBackbone(FakeBackbone):
    """An ε-prediction that stops following x_t off the training distribution (|x| > 3), as a trained
    network does: there x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t moves 1/√ᾱ_t per unit of x_t."""

    def forward(self, x, t, y):
        return x.clamp(-3, 3)


def test_clipped_mode_guidance_stays_bounded_where_the_unclipped_pull_diverges():
    """Pixel space (clip 1): the demo's minimax checkpoint went blank without it (modes.guide docstring)."""
    model = SaturatingBackbone(in_channels=1, learn_sigma=False)
    labels = torch.tensor([0, 1, 2, 0])
    modes = torch.stack([torch.full((1, 4, 4), v) for v in (0.8, -0.8, 0.4, -0.4)])

    def run(clip):
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        return sample(model, labels, steps=50, cfg_scale=1.0, generators=gens, step_guide=mode_step_guide(modes, 1.0, 0.5, clip))

    unclipped, clipped = run(None), run(1.0)
    assert not torch.isfinite(unclipped).all() or unclipped.abs().max() > 1e3
    assert torch.isfinite(clipped).all() and clipped.abs().max() < 10
    x0 = torch.full((1, 1, 2, 2), 50.0)
    assert torch.equal(guide(torch.zeros_like(x0), x0, torch.zeros_like(x0), torch.tensor(1.0), 1.0, clip=1.0),
                       torch.full_like(x0, -1.0))


def test_mgd3_generation_fits_modes_and_steers_each_image_to_its_own(tmp_path, mnist_shards):
    """``generate(method="mgd3")`` with the shipped demo DiT on real MNIST shards: ``modes.pt`` holds k =
    IPC modes per class, each image ends closer to its mode than the unguided image from the same seed,
    λ = 0 is plain ``dit`` exactly, and a modes file made for another IPC is refused."""
    from ddkit.config import load_config
    from ddkit.errors import ConfigError, DataError
    from ddkit.generate import generate

    sets = [f"run_dir={tmp_path / 'run'}", f"data.shards={mnist_shards}", "generate.batch_size=20",
            "generate.precision=fp32", "generate.steps_min=10", "generate.steps_max=10", "generate.ipc_min=2",
            "generate.ipc_max=2", "generate.cfg_scale=1.0", "generate.modes.max_images_per_class=30",
            "generate.modes.scale=0.5", "generate.modes.weights=pretrained"]  # fmt: skip

    def run(method, name, *extra):
        cfg = load_config(ROOT / "configs" / "mnist.yaml", [*sets, *extra])
        d = generate(cfg, method=method, time_limit=600, out_dir=tmp_path / name, progress=False)
        return torch.load(d / "dataset.pt"), d

    guided, d = run("mgd3", "mgd3")
    plain, _ = run("dit", "dit")
    blob = torch.load(d / "modes.pt")
    assert blob["modes"].shape == (10, 2, 1, 32, 32) and blob["k"] == 2 and len(blob["classes"]) == 10
    idx = torch.arange(20) % 2  # class-major: image i of a class is steered to mode i mod k
    target = blob["modes"][guided["labels"], idx]

    def dist(ds):
        return (ds["images"].float() / 127.5 - 1 - target).pow(2).mean().item()

    assert dist(guided) < 0.9 * dist(plain), (dist(guided), dist(plain))
    zero, _ = run("mgd3", "zero", "generate.modes.scale=0.0")
    assert torch.equal(zero["images"], plain["images"])
    with pytest.raises(ConfigError, match="generate.modes.file: .*nope.pt unreadable"):
        run("mgd3", "missing", f"generate.modes.file={tmp_path / 'nope.pt'}")
    with pytest.raises(DataError, match="holds 2 modes for 10 classes; this generation keeps 3"):
        run("mgd3", "file", f"generate.modes.file={d / 'modes.pt'}", "generate.ipc_min=3", "generate.ipc_max=3")


def test_mgd3_prices_its_mode_fitting_before_the_plan(tmp_path, mnist_shards):
    """Mode fitting runs once the plan is known, so calibration prices it (one class timed, times the
    classes) as one-off work, and nothing when the modes come from a file."""
    import types

    from ddkit.config import load_config
    from ddkit.methods.mgd3 import MGD3, MODES_FILE

    cfg = load_config(ROOT / "configs" / "mnist.yaml", [f"data.shards={mnist_shards}",
                                                        "generate.modes.max_images_per_class=30"])
    model = types.SimpleNamespace(input_size=32, in_channels=1)
    sampler = types.SimpleNamespace(config=cfg, model=model, vae=None, device=torch.device("cpu"),
                                    classes=[str(c) for c in range(10)])
    per_image, once = MGD3(cfg).plan_work(sampler, 4, 2, gen_dir=tmp_path)
    assert per_image == 0.0 and once > 0.0
    (tmp_path / MODES_FILE).write_bytes(b"")  # an earlier attempt's modes: nothing left to fit
    assert MGD3(cfg).plan_work(sampler, 4, 2, gen_dir=tmp_path) == (0.0, 0.0)
