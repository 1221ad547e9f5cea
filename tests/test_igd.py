"""IGD (method ``igd``): its formulas against transcriptions of the reference (mchen725/DD_IGD) on identical
tensors, its guided step, its config, and a tiny end-to-end generation on real MNIST digits."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import digit_shards
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ddkit.errors import ConfigError
from ddkit.evaluate.networks import ConvNet
from ddkit.methods.igd.guide import InfluenceGuide
from ddkit.methods.igd.influence import (
    deviation_loss,
    flatten,
    guided_window,
    influence_loss,
    real_gradients,
    select_checkpoints,
)
from ddkit.sampling import sample, timestep_spacing
from tests.test_sampling import FakeBackbone


# ---- the reference, transcribed (module-based, ReparamModule-style: one network, flat parameters loaded) ----
def ref_gm_loss(pg, rg):
    """DD_IGD's IGD sampling, ``gm_loss`` (as its ports carry it beside ``sample.py``'s ``get_grads``)."""
    return torch.sum(1 - torch.sum(pg * rg, dim=-1) / (torch.norm(pg, dim=-1) * torch.norm(rg, dim=-1) + 0.000001))


def ref_cos_simf(pg, rg):
    """DD_IGD ``test_ckpts_grad_sim.py`` ``cos_simf``."""
    return torch.sum(pg * rg) / (torch.norm(pg) * torch.norm(rg) + 0.000001)


def _load(net, flat):
    """A copy of ``net`` holding ``flat`` (ReparamModule's ``flat_param=``: each checkpoint its own leaves)."""
    net = copy.deepcopy(net)
    vector_to_parameters(flat.detach().clone(), net.parameters())
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def ref_get_grads(net, ckpts, grads_memory, correspond_y, grad_ipc, gap=50):
    """DD_IGD ``sample.py`` ``get_grads``: per checkpoint, Σ over gap-batches of ∇CE, / len(gap_idxs)."""
    criterion_ce = nn.CrossEntropyLoss()
    gap_idxs = np.arange(0, grad_ipc, gap).tolist()
    ckpt_grads = []
    for ckpt in ckpts:
        for gi in gap_idxs:
            cur_embds = torch.stack(grads_memory[gi:gi + gap]).squeeze(1)
            cur = _load(net, ckpt)
            if gi == 0:
                acc_grad = torch.zeros(ckpt.shape)
            real_pred = cur(cur_embds)
            real_target = torch.tensor(np.ones((1, len(cur_embds))) * correspond_y, dtype=torch.long).view(-1)
            real_loss = criterion_ce(real_pred, real_target)
            real_grad = parameters_to_vector(torch.autograd.grad(real_loss, list(cur.parameters())))
            acc_grad += real_grad.detach()
        ckpt_grads.append(acc_grad / len(gap_idxs))
    return ckpt_grads


def ref_influence(net, ckpts, real_grad, pseudo_imgs, label_idx):
    """The IGD guidance objective of DD_IGD's sampling: Σ_ckpt gm_loss(∇θ CE(pseudo), real_g) / len(ckpts)."""
    criterion = nn.CrossEntropyLoss()
    pseudo_target = torch.tensor(np.ones((1, len(pseudo_imgs))) * label_idx, dtype=torch.long).view(-1)
    total_gm_loss = 0
    for idx, ckpt in enumerate(ckpts):
        cur = _load(net, ckpt)
        pseudo_loss_val = criterion(cur(pseudo_imgs), pseudo_target)
        pseudo_g = parameters_to_vector(torch.autograd.grad(pseudo_loss_val, list(cur.parameters()), create_graph=True))
        total_gm_loss += ref_gm_loss(pseudo_g, real_grad[idx])
    return total_gm_loss / len(ckpts)


def ref_select(pre_grads_at, n, threshold=0.7):
    """DD_IGD ``test_ckpts_grad_sim.py`` ``main``: walk the trajectory, keep where the class-mean cos < 0.7."""
    pre_grads, _comp_idx, kept = pre_grads_at(0), 0, [0]
    for idx in range(1, n):
        cur_grads = pre_grads_at(idx)
        cls_grad_sim = 0
        for y in range(len(cur_grads)):
            cls_grad_sim += ref_cos_simf(pre_grads[y], cur_grads[y])
        cls_grad_sim /= len(cur_grads)
        if cls_grad_sim < threshold:
            _comp_idx, pre_grads = idx, cur_grads
            kept.append(idx)
    return kept


@pytest.fixture(scope="module")
def trajectory():
    torch.manual_seed(0)
    net = ConvNet(1, 4, 16, depth=3, width=8)
    ckpts = []
    for _ in range(3):
        ckpts.append(flatten(net))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(120, 1, 16, 16) * 2 - 1
    return ConvNet(1, 4, 16, depth=3, width=8), ckpts, images


def test_real_gradients_match_the_reference_get_grads(trajectory):
    net, ckpts, images = trajectory
    ours = real_gradients(net, ckpts, images, 2, batch=50)  # 120 images: batches of 50, 50 and 20
    ref = ref_get_grads(ConvNet(1, 4, 16, depth=3, width=8), ckpts, list(images.split(1)), 2, grad_ipc=120)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_influence_guidance_gradient_matches_the_reference(trajectory):
    net, ckpts, images = trajectory
    real = real_gradients(net, ckpts, images[:60], 1)
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    xa = x.clone().requires_grad_(True)
    ours = influence_loss(net, ckpts, real, xa, 1)
    g_ours = torch.autograd.grad(ours, xa)[0]
    xb = x.clone().requires_grad_(True)
    ref = ref_influence(ConvNet(1, 4, 16, depth=3, width=8), ckpts, list(real), xb, 1)
    g_ref = torch.autograd.grad(ref, xb)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-7)
    assert g_ours.abs().max() > 0


def test_deviation_term_matches_the_max_cosine_to_the_memory():
    torch.manual_seed(1)
    x0 = torch.randn(1, 8, 8)
    memory = torch.randn(5, 1, 8, 8)
    memory[3] = 2 * x0 + 0.1 * torch.randn_like(x0)  # the nearest predecessor
    xa = x0.clone().requires_grad_(True)
    ours = deviation_loss(xa, memory)
    g_ours = torch.autograd.grad(ours, xa)[0]
    xb = x0.clone().requires_grad_(True)
    ref = max(ref_cos_simf(xb.flatten(), m.flatten()) for m in memory)
    g_ref = torch.autograd.grad(ref, xb)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    assert deviation_loss(x0, memory[:0]) == 0  # the class's first sample has nothing to deviate from


def test_checkpoint_selection_matches_the_reference():
    torch.manual_seed(2)
    base = torch.randn(4, 30)
    steps = [base]
    for j in range(1, 12):  # a drifting trajectory: cosines to earlier points fall off
        steps.append(steps[-1] + (0.3 + 0.2 * (j % 3)) * torch.randn(4, 30))
    assert select_checkpoints(lambda j: steps[j], len(steps), 0.7) == ref_select(lambda j: steps[j], len(steps))
    assert len(select_checkpoints(lambda j: steps[j], len(steps), 0.7)) > 1


def test_guided_window_is_the_reference_respaced_range_at_any_chain_length():
    ts = timestep_spacing("ddpm", 50)  # descending; the reference's respaced index of step i is 49 - i
    lo, hi = guided_window(30, 45)
    assert [t for i, t in enumerate(ts) if 30 <= 49 - i <= 45] == [t for t in ts if lo <= t <= hi]
    with pytest.raises(ValueError, match="low <= high"):
        guided_window(45, 30)


class _Step:
    def __init__(self, model, x, t, labels):
        from ddkit.sampling import make_scheduler

        self.i, self.n, self.t, self.x_t, self.labels = 0, 10, t, x, labels
        self.alpha_bar = make_scheduler("ddpm", [999, 0])[0].alphas_cumprod[t]
        self.x_prev, self.x0, self.std = x * 0.9, x, torch.tensor(0.5)
        self.out = model(x, torch.full((len(x),), t), labels)
        self.forward = lambda z: model(z, torch.full((len(z),), t), labels)


def _guided(trajectory):
    """(net, checkpoints, real gradients, a fake backbone, x_t [2, 1, 16, 16], memories, the reference-scaled
    guide for classes 0 and 3)."""
    net, ckpts, images = trajectory
    real = torch.stack([real_gradients(net, ckpts, images[:40], c) for c in range(4)])
    model = FakeBackbone(in_channels=1, input_size=16, num_classes=4, learn_sigma=False)
    x = torch.randn(2, 1, 16, 16) * 0.3
    mem = [torch.zeros(0, 1, 16, 16), torch.randn(2, 1, 16, 16)]
    guide = InfluenceGuide(net, ckpts, real, [0, 3], mem, (600, 900), 5.0, 120.0, lambda z: z.clamp(-1, 1))
    return net, ckpts, real, model, x, mem, guide


def test_the_guided_step_descends_the_objective_inside_the_window_only(trajectory):
    net, ckpts, real, model, x, mem, guide = _guided(trajectory)
    outside = _Step(model, x, 300, torch.tensor([0, 3]))
    assert torch.equal(guide(outside), outside.x_prev)
    s = _Step(model, x, 700, torch.tensor([0, 3]))
    g = guide.gradient(s)
    moved = guide(s)
    torch.testing.assert_close(moved, s.x_prev - 0.25 * g)

    def objective(z):
        with torch.enable_grad():
            eps = s.forward(z)
            x0 = (z - (1 - s.alpha_bar).sqrt() * eps) / s.alpha_bar.sqrt()
            return float(guide.objective(x0).detach())

    assert objective(x - 1e-3 * g / g.norm()) < objective(x)
    off = InfluenceGuide(net, ckpts, real, [0, 3], mem, (600, 900), 0.0, 0.0, lambda z: z)
    assert torch.equal(off(s), s.x_prev)


def test_igd_config_is_validated_naming_the_key():
    from ddkit.config import load_config

    assert load_config(None, ["generate.method=igd"]).generate.igd.scale == 5.0
    for bad, key in [("generate.igd.low=46", "low"), ("generate.igd.scale=-1", "scale"),
                     ("generate.igd.epochs=0", "epochs"), ("generate.igd.nope=1", "nope")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            load_config(None, ["generate.method=igd", bad])
    from ddkit.methods.registry import build

    cfg = load_config(None, ["generate.method=igd", "generate.sampler=ddim"])
    with pytest.raises(ConfigError, match="igd guides DDPM"):
        build("igd", cfg).sampling(cfg.generate, 1000)
    with pytest.raises(ValueError, match="needs sampler 'ddpm'"):
        sample(FakeBackbone(), torch.tensor([0]), steps=3, sampler="ddim", step_guide=lambda s: s.x_prev)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """4 classes × 12 real MNIST digits at 16 px, sharded, a tiny random DiT, 8 DDPM steps (two in the
    guided window) and a cheap surrogate."""

    from ddkit.config import load_config
    from ddkit.models import build_backbone

    tmp = tmp_path_factory.mktemp("igd")
    data = digit_shards(tmp, 4)
    sets = [f"run_dir={tmp / 'run'}", *data, "model.arch=custom(depth=1,hidden=16,heads=1,patch=4)",
            "model.input_size=16", "model.in_channels=1", "model.num_classes=4", "model.pretrained=null",
            "generate.precision=fp32", "generate.quality=dsr", "generate.batch_size=8", "generate.steps_min=8",
            "generate.steps_max=8", "generate.ipc_min=3", "generate.ipc_max=3", "generate.cfg_scale=1.0",
            "generate.igd.epochs=3", "generate.igd.width=8", "generate.igd.grad_ipc=8", "generate.igd.select_ipc=4"]
    cfg = load_config(None, sets)
    return cfg, build_backbone(cfg.model, seed=0).eval()


def test_igd_generates_a_guided_set_and_the_unguided_limit_is_plain_dit(digits, tmp_path):
    import dataclasses
    import json

    from ddkit.generate import generate

    cfg, model = digits

    def run(c, method, name):
        out = generate(c, method=method, time_limit=600, out_dir=tmp_path / name, progress=False, model=model)
        man = json.loads((out / "manifest.json").read_text())
        return torch.load(out / "dataset.pt", weights_only=False), man["record"], out

    igd, rec, out = run(cfg, "igd", "igd")
    dit, _, _ = run(cfg, "dit", "dit")
    assert igd["ipc"] == 3 and set(rec["prepared"]) == {"igd_surrogate", "igd_memory"}
    assert (out / "igd-memory.pt").is_file() and list((Path(cfg.run_dir) / "igd-cache").glob("igd-surrogate-*.pt"))
    assert not torch.equal(igd["images"], dit["images"])  # the guided steps moved the samples
    from ddkit.distilled import load_distilled
    from ddkit.io import sha256_file
    from ddkit.methods import registry

    shipped, name = registry.build("igd", cfg).bundle_files(load_distilled(out), Path("unused"))["generate.igd.surrogate"]
    assert sha256_file(shipped) == rec["prepared"]["igd_surrogate"] and name == "igd-surrogate.pt"
    off = dataclasses.replace(cfg, generate=dataclasses.replace(
        cfg.generate, igd=dataclasses.replace(cfg.generate.igd, scale=0.0, dev_scale=0.0)))
    plain, _, _ = run(off, "igd", "igd-off")
    assert torch.equal(plain["images"], dit["images"])  # k = γ = 0: exactly the plain chain, same seeds


def test_igd_on_modes_adds_both_offsets_in_either_order(trajectory):
    """igd+mgd3's step: the mode pull and the influence step each add an offset computed from x_t, so the
    composed step is their sum and the order of the two guides does not matter."""
    import dataclasses

    from ddkit.methods.igd_mgd3 import composed
    from ddkit.methods.modes import mode_step_guide
    from ddkit.sampling import GuideStep

    _, _, _, model, x, _, igd = _guided(trajectory)
    pull = mode_step_guide(torch.rand(2, 1, 16, 16) * 2 - 1, 1.0, 0.5, 1.0)
    raw = _Step(model, x, 700, torch.tensor([0, 3]))
    s = GuideStep(**{f.name: getattr(raw, f.name) for f in dataclasses.fields(GuideStep)})
    both = composed(pull, igd)(s)
    expected = s.x_prev + (pull(s) - s.x_prev) + (igd(s) - s.x_prev)
    torch.testing.assert_close(both, expected)
    torch.testing.assert_close(composed(igd, pull)(s), both)
    assert not torch.allclose(both, pull(s)) and not torch.allclose(both, igd(s))


def test_igd_on_modes_is_each_method_when_the_other_is_off(digits, tmp_path):
    """igd+mgd3 with IGD's scales at 0 samples MGD^3's set exactly, and with the mode pull at 0 IGD's; its
    record carries both methods' prepared files and its bundle ships both."""
    import dataclasses

    from ddkit.distilled import load_distilled
    from ddkit.generate import generate
    from ddkit.methods import registry

    cfg, model = digits
    g = cfg.generate

    def run(c, method, name):
        out = generate(c, method=method, time_limit=600, out_dir=tmp_path / name, progress=False, model=model)
        return torch.load(out / "dataset.pt", weights_only=False)["images"], out

    no_igd = dataclasses.replace(cfg, generate=dataclasses.replace(
        g, igd=dataclasses.replace(g.igd, scale=0.0, dev_scale=0.0)))
    no_pull = dataclasses.replace(cfg, generate=dataclasses.replace(g, modes=dataclasses.replace(g.modes, scale=0.0)))
    assert torch.equal(run(no_igd, "igd+mgd3", "a")[0], run(no_igd, "mgd3", "b")[0])
    assert torch.equal(run(no_pull, "igd+mgd3", "c")[0], run(no_pull, "igd", "d")[0])
    both, out = run(cfg, "igd+mgd3", "e")
    assert not torch.equal(both, run(cfg, "igd", "f")[0]) and not torch.equal(both, run(cfg, "mgd3", "g")[0])
    import json

    rec = json.loads((out / "manifest.json").read_text())["record"]
    assert set(rec["prepared"]) == {"modes", "igd_surrogate", "igd_memory"}
    shipped = registry.build("igd+mgd3", cfg).bundle_files(load_distilled(out), Path("unused"))
    assert set(shipped) == {"generate.modes.file", "generate.igd.surrogate"}
    assert registry.sections_read("igd+mgd3") == ("generate.igd", "generate.modes")
