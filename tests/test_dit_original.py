"""Original-DiT checkpoints: the port reproduces facebookresearch/DiT ``models.py`` (with MinimaxDiffusion's
DiffFit gammas) on the same tensors, because ported weights keep the original timestep embedding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddkit.models import load_backbone
from ddkit.models.dit_original import original_model_config

HIDDEN, DEPTH, HEADS, PATCH, C, SIZE, K = 128, 6, 4, 2, 4, 8, 10  # the registry's DiT-T/2
GAMMA_BLOCKS = 3


# --- the reference, written out from facebookresearch/DiT models.py (+ MinimaxDiffusion gammas) ----------
def ref_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    g = np.stack(g, axis=0).reshape(2, 1, grid, grid)
    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def ref_forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    modulate = lambda h, shift, scale: h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # noqa: E731
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = lin(F.silu(lin(ref_timestep_embedding(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    B, N, D = h.shape
    for i in range(DEPTH):
        b = f"blocks.{i}."
        g = lambda n, b=b: sd.get(b + n, 1.0)  # noqa: E731
        mods = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = modulate(F.layer_norm(h, (D,), eps=1e-6), mods[0], mods[1])
        qkv = (g("attn.gamma1") * lin(a, b + "attn.qkv")).reshape(B, N, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = ((q @ k.transpose(-2, -1)) * (D // HEADS) ** -0.5).softmax(-1)
        a = g("attn.gamma2") * lin((att @ v).transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        h = h + g("gamma1") * mods[2].unsqueeze(1) * a
        m = modulate(F.layer_norm(h, (D,), eps=1e-6), mods[3], mods[4])
        m = lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + g("gamma2") * mods[5].unsqueeze(1) * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(modulate(F.layer_norm(h, (D,), eps=1e-6), shift, scale), "final_layer.linear")
    n = int(N**0.5)
    h = h.reshape(B, n, n, PATCH, PATCH, 2 * C)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(B, 2 * C, n * PATCH, n * PATCH)


def random_original_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen) * 0.2  # noqa: E731
    sd = {
        "x_embedder.proj.weight": r(HIDDEN, C, PATCH, PATCH),
        "x_embedder.proj.bias": r(HIDDEN),
        "pos_embed": torch.from_numpy(ref_pos_embed(HIDDEN, SIZE // PATCH)).float().unsqueeze(0),
        "t_embedder.mlp.0.weight": r(HIDDEN, 256),
        "t_embedder.mlp.0.bias": r(HIDDEN),
        "t_embedder.mlp.2.weight": r(HIDDEN, HIDDEN),
        "t_embedder.mlp.2.bias": r(HIDDEN),
        "y_embedder.embedding_table.weight": r(K + 1, HIDDEN),
        "final_layer.adaLN_modulation.1.weight": r(2 * HIDDEN, HIDDEN),
        "final_layer.adaLN_modulation.1.bias": r(2 * HIDDEN),
        "final_layer.linear.weight": r(PATCH * PATCH * 2 * C, HIDDEN),
        "final_layer.linear.bias": r(PATCH * PATCH * 2 * C),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        for name, shape in (("attn.qkv", (3 * HIDDEN, HIDDEN)), ("attn.proj", (HIDDEN, HIDDEN)),
                            ("mlp.fc1", (4 * HIDDEN, HIDDEN)), ("mlp.fc2", (HIDDEN, 4 * HIDDEN)),
                            ("adaLN_modulation.1", (6 * HIDDEN, HIDDEN))):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = r(*shape), r(shape[0])
        if i < GAMMA_BLOCKS:  # MinimaxDiffusion use_gamma blocks
            sd[b + "attn.gamma1"], sd[b + "attn.gamma2"] = 1 + r(3 * HIDDEN), 1 + r(HIDDEN)
            sd[b + "gamma1"], sd[b + "gamma2"] = 1 + r(HIDDEN), 1 + r(HIDDEN)
    return sd


def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, C, SIZE, SIZE, generator=gen), torch.tensor([0, 371, 999]), torch.tensor([0, 4, K])


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    sd = random_original_state()
    path = tmp_path_factory.mktemp("dit") / "0012000.pt"
    # MinimaxDiffusion train_dit.py checkpoint layout; sample.py reads its "ema".
    torch.save({"model": {k: v * 0 for k, v in sd.items()}, "ema": sd, "opt": {}, "args": None}, path)
    return sd, path


def test_config_read_from_tensors(ported):
    mcfg = original_model_config(ported[0])
    assert (mcfg.arch, mcfg.in_channels, mcfg.input_size, mcfg.num_classes) == ("DiT-T/2", C, SIZE, K)
    assert mcfg.learn_sigma and mcfg.difffit_blocks == GAMMA_BLOCKS and mcfg.timestep_shift == 0


def test_timestep_embedding_matches_reference_formula(ported):
    model, _ = load_backbone(ported[1])
    t = torch.tensor([0, 1, 20, 371, 620, 999])
    got = model.dit.transformer_blocks[0].norm1.emb.time_proj(t)
    torch.testing.assert_close(got, ref_timestep_embedding(t), rtol=0, atol=2e-5)
    diffusers_default, _ = load_backbone(ported[1], timestep_shift=1)
    other = diffusers_default.dit.transformer_blocks[0].norm1.emb.time_proj(t)
    assert (other - ref_timestep_embedding(t)).abs().max() > 0.1  # the /(half-1) divisor is a different embedding


def test_ported_outputs_match_reference_forward(ported):
    sd, path = ported
    x, t, y = inputs()
    with torch.no_grad():
        want = ref_forward(sd, x, t, y)
        model, _ = load_backbone(path)
        got = model(x, t, y)
        shifted, _ = load_backbone(path, timestep_shift=1)
        off = shifted(x, t, y)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The diffusers divisor on original weights is a real error, far above float rounding.
    assert (off - want).abs().max() > 100 * (got - want).abs().max()


def test_shift_survives_a_ddkit_checkpoint(ported, tmp_path):
    from dataclasses import asdict

    from ddkit.models import save_checkpoint

    model, mcfg = load_backbone(ported[1])
    save_checkpoint({"model": model.state_dict(), "ema": None, "model_config": asdict(mcfg)}, tmp_path / "last.pt")
    again, mcfg2 = load_backbone(tmp_path / "last.pt")
    assert mcfg2.timestep_shift == 0
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), model(x, t, y))
