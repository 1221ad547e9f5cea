"""D^3HR against lin-zhao-resoLve/D3HR ``generation/``: decoding grid, CFG channels, group count and its cost,
and the reference's resizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ddkit.config import D3HRConfig, GenerateConfig, ModelConfig
from ddkit.methods import d3hr
from ddkit.sampling import sample, timestep_spacing


@pytest.fixture(scope="module")
def latent_model():
    """A 4-channel learn_sigma DiT-T/2 on 8x8 latents with random (non-zero) weights, so ε_c and ε_u differ."""
    from ddkit.models import build_backbone

    m = build_backbone(ModelConfig(arch="DiT-T/2", in_channels=4, input_size=8, num_classes=10, learn_sigma=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.dit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return m.eval()


def reference_sample(model, x, y, *, start_step=18, steps=50, guidance=4.0, channels=None):
    """group_sampling.py -> dit_inversion_save_statistic.py ``sample``, written out on a ddkit Backbone:
    DDIMScheduler "leading" timesteps[start_step:], CFG on ``noise_pred[:, :latent_channels]`` and the
    hand-written DDIM update with prev_t = max(1, t - 1000 // steps). ``channels`` < C guides only those
    (the DiT ``forward_with_cfg`` way), to show the difference."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(steps)
    ac = sch.alphas_cumprod
    C = model.in_channels
    g = C if channels is None else channels
    null = torch.full_like(y, model.num_classes)
    lat = x.clone()
    with torch.no_grad():
        for t in sch.timesteps[start_step:]:
            t = int(t)
            tt = torch.full((2 * len(y),), t, dtype=torch.long)
            out = model(torch.cat([lat, lat]), tt, torch.cat([y, null]))[:, :C]
            cond, uncond = out.chunk(2)
            eps = cond.clone()
            eps[:, :g] = uncond[:, :g] + guidance * (cond[:, :g] - uncond[:, :g])
            prev_t = max(1, t - 1000 // steps)
            a_t, a_prev = ac[t], ac[prev_t]
            x0 = (lat - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            lat = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return lat, x0


def test_decode_grid_is_the_reference_grid():
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000)
    sch.set_timesteps(50)
    reference = [int(t) for t in sch.timesteps[18:]]  # group_sampling.py --start_step 18
    cfg = D3HRConfig()
    assert d3hr.decode_grid(cfg) == reference and len(reference) == 32
    # The planner's cap: 50 configured steps become the 32 of the grid, spaced exactly as the reference.
    g = d3hr.decode_settings(GenerateConfig(steps_min=10, steps_max=50, guided_channels=3))
    assert (g.steps_min, g.steps_max) == (10, 32)
    assert timestep_spacing("ddim", g.steps_max, start_timestep=d3hr.start_timestep(cfg)) == reference
    # Without the cap, 50 steps over [0, 620] would leave the stride-20 grid.
    assert timestep_spacing("ddim", 50, start_timestep=620) != reference


def test_decoding_guides_all_channels_like_reference(latent_model):
    """The generate path (decode_settings -> sample) on the same tensors as the reference ``sample``: equal up
    to the reference's last two steps landing on ᾱ_1 (prev_t = max(1, ·)) instead of ᾱ_0 and 1; guiding
    only 3 channels, as configs ask for the other methods, is a far larger difference."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([1, 5, 9])
    g = d3hr.decode_settings(GenerateConfig(guided_channels=3))
    assert g.guided_channels is None
    start = d3hr.start_timestep(D3HRConfig())
    ours = sample(latent_model, y, steps=g.steps_max, sampler="ddim", cfg_scale=4.0, latents=x,
                  start_timestep=start, guided_channels=g.guided_channels)
    _, ref_x0 = reference_sample(latent_model, x, y)
    _, ref3_x0 = reference_sample(latent_model, x, y, channels=3)
    err = (ours - ref_x0).abs().max().item()
    assert err < 0.05 * ref_x0.abs().max().item()
    assert (ref3_x0 - ref_x0).abs().max().item() > 5 * err


def test_group_count_up_to_reference_and_cost_per_class():
    cfg = D3HRConfig(num_groups=d3hr.REFERENCE_NUM_GROUPS, chunk=256)
    assert cfg.num_groups == 10**8
    one_chunk = d3hr.group_search_seconds(64, 10, cfg, num_groups=256)
    full = d3hr.group_search_seconds(64, 10, cfg)
    assert one_chunk > 0 and full > 1000 * one_chunk  # 390,625 chunks of 256 groups
    stats = d3hr.D3HRStats(
        mean=torch.zeros(3, 4, 4, 4), var=torch.ones(3, 4, 4, 4), timestep=600, timesteps=[600],
        all_mean=torch.zeros(1, 3, 4, 4, 4), all_var=torch.ones(1, 3, 4, 4, 4),
        counts=torch.full((3,), 5), classes=["a", "b", "c"], key="k",
    )
    small = dataclasses.replace(cfg, num_groups=300)
    lat, per_class = d3hr.select_latents(stats, [2, 0, 2], 5, seed=0, cfg=small)
    assert sorted(lat) == [0, 2] and lat[0].shape == (5, 4, 4, 4) and per_class > 0
    torch.testing.assert_close(lat[2], d3hr.initial_latents(stats, 2, 5, seed=0, cfg=small))


def test_generate_decodes_on_reference_grid_and_prints_cost(mnist_shards, tmp_path, capsys):
    """``ddkit generate`` for D^3HR with steps_max 50 and guided_channels 3 (what the other methods use):
    the plan holds 32 steps, i.e. the reference chain 620, 600, ..., 0, and the group search's seconds per
    class are printed and recorded."""
    import json

    from ddkit.config import load_config
    from ddkit.generate import generate
    from ddkit.models import build_backbone

    cfg = load_config(None, [
        f"run_dir={tmp_path}/run", f"data.shards={mnist_shards}", "generate.method=d3hr",
        "generate.steps_min=10", "generate.steps_max=50", "generate.ipc_min=1", "generate.ipc_max=1",
        "generate.guided_channels=3", "generate.batch_size=10", "generate.time_limit=600",
        "generate.d3hr.max_images_per_class=2", "generate.d3hr.num_groups=8",
    ])
    gen_dir = generate(cfg, model=build_backbone(cfg.model, seed=0), device="cpu", progress=True)
    man = json.loads((gen_dir / "manifest.json").read_text())
    assert man["start_timestep"] == 620 and man["steps"]["planned"] == 32 and man["steps"]["max"] == 32
    assert man["phases"]["rank0"]["d3hr_group_search_s_per_class"] > 0
    assert "D^3HR group search: 8 groups/class" in capsys.readouterr().out
