"""Backbones (ddkit.models): registry, diffusers DiT wrapper, DiffFit gamma placement, offline loading."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ddkit.config import ModelConfig
from ddkit.errors import ConfigError, WeightsError
from ddkit.models import REGISTRY, build_backbone, load_backbone
from ddkit.models.backbone import make_dit

TINY = ModelConfig(arch="DiT-T/4", in_channels=1, input_size=32, num_classes=10)


def _inputs(b: int = 4, c: int = 1, s: int = 32, k: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, s, s, generator=g),
        torch.randint(0, 1000, (b,), generator=g),
        torch.randint(0, k, (b,), generator=g),
    )


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """DiT's init zeroes adaLN and the output layer (the output is 0); perturb so outputs carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_registry_has_paper_names_and_tiny_configs():
    for name in ("DiT-XL/2", "DiT-L/2", "DiT-B/2", "DiT-S/2", "DiT-XL/4", "DiT-S/8", "DiT-T/4", "DiT-T/2"):
        assert name in REGISTRY
    xl = REGISTRY["DiT-XL/2"]
    assert (xl.depth, xl.hidden, xl.heads, xl.patch) == (28, 1152, 16, 2)
    with pytest.raises(ConfigError, match="DiT-Q/3"):
        build_backbone(dataclasses.replace(TINY, arch="DiT-Q/3"))


def test_tiny_backbone_shapes_and_null_class():
    m = build_backbone(TINY, seed=0)
    n = sum(p.numel() for p in m.parameters())
    assert 1.5e6 < n < 2.5e6
    x, t, y = _inputs()
    assert m(x, t, y).shape == (4, 1, 32, 32)
    null = torch.full_like(y, m.num_classes)  # the CFG null class is num_classes
    assert m(x, t, null).shape == (4, 1, 32, 32)
    sig = build_backbone(dataclasses.replace(TINY, learn_sigma=True), seed=0)
    assert sig(x, t, y).shape == (4, 2, 32, 32)
    # Sampling's CFG on a learn_sigma backbone: one batched forward; ε guided, v from the conditional half.
    from ddkit.sampling import guided_forward

    _randomize(sig)
    with torch.no_grad():
        out = guided_forward(sig, x, 500, y, cfg_scale=4.0)
        cond, uncond = sig(x, torch.full_like(t, 500), y), sig(x, torch.full_like(t, 500), null)
    assert out.shape == (4, 2, 32, 32)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])
    assert not torch.allclose(out[:, :1], cond[:, :1])  # guidance moved ε


def test_conditioning_tied_and_no_internal_label_dropout():
    m = build_backbone(TINY, seed=0)
    _randomize(m)
    blocks = m.dit.transformer_blocks
    assert all(b.norm1.emb is blocks[0].norm1.emb for b in blocks)
    m.train()
    x, t, y = _inputs()
    # diffusers would drop labels independently per block in train mode; ddkit drops them in the trainer.
    torch.manual_seed(0)
    a = m(x, t, y)
    torch.manual_seed(1)
    b = m(x, t, y)
    assert torch.equal(a, b)


def test_class_embed_std_sets_only_the_label_table():
    a, b = build_backbone(TINY, seed=0), build_backbone(TINY, seed=0, class_embed_std=1.0)
    table = "dit.transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa[table].std() < 0.03 and 0.8 < sb[table].std() < 1.2
    # every block's (tied) embedder lists the same table; the rest draws the same random numbers
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "class_embedder" not in k)


def _copy_weights(src, dst):
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    assert not unexpected
    return missing


def test_difffit_gammas_start_neutral_and_sit_where_the_reference_puts_them():
    base = build_backbone(TINY, seed=0)
    _randomize(base)
    gam = build_backbone(dataclasses.replace(TINY, difffit_blocks=14), seed=0)
    missing = _copy_weights(base, gam)
    assert all(k.startswith("gammas.") for k in missing)
    assert len(gam.gammas) == 6  # the tiny model has 6 < 14 blocks: every block gets gammas
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.allclose(gam(x, t, y), base(x, t, y), atol=1e-6)
        # gamma_qkv[q-part] == scaling the to_q projection (weights and bias) by the same vector.
        h = base.dit.inner_dim
        s = torch.linspace(0.5, 1.5, h)
        gam.gammas[1].gamma_qkv[:h] = s
        ref = copy.deepcopy(base)
        q = ref.dit.transformer_blocks[1].attn1.to_q
        q.weight.mul_(s[:, None])
        q.bias.mul_(s)
        assert torch.allclose(gam(x, t, y), ref(x, t, y), atol=1e-5)
        # gamma_mlp == scaling the MLP output projection; gamma_attn * gamma_proj == scaling to_out.
        gam.gammas[1].gamma_qkv.fill_(1.0)
        gam.gammas[2].gamma_mlp.copy_(s)
        gam.gammas[3].gamma_attn.copy_(s)
        gam.gammas[3].gamma_proj.copy_(s)
        ref = copy.deepcopy(base)
        ff = ref.dit.transformer_blocks[2].ff.net[2]
        ff.weight.mul_(s[:, None])
        ff.bias.mul_(s)
        out = ref.dit.transformer_blocks[3].attn1.to_out[0]
        out.weight.mul_((s * s)[:, None])
        out.bias.mul_(s * s)
        assert torch.allclose(gam(x, t, y), ref(x, t, y), atol=1e-5)
        assert not torch.allclose(gam(x, t, y), base(x, t, y), atol=1e-3)


def test_deepcopy_keeps_its_own_gammas():
    m = build_backbone(dataclasses.replace(TINY, difffit_blocks=2), seed=0)
    _randomize(m)
    x, t, y = _inputs()
    with torch.no_grad():
        before = m(x, t, y)
        c = copy.deepcopy(m)
        c.gammas[0].gamma_mlp.mul_(3.0)
        assert torch.equal(m(x, t, y), before)
        assert not torch.allclose(c(x, t, y), before)


def test_difffit_trainable_set_matches_reference_roles():
    m = build_backbone(dataclasses.replace(TINY, difffit_blocks=14), seed=0)
    names = [n for n, _ in m.trainable_parameters("difffit")]
    assert any("gammas.0.gamma_qkv" == n for n in names)
    assert any("class_embedder.embedding_table" in n for n in names)
    assert all(n.endswith("bias") or n.startswith("gammas.") or "embedding_table" in n for n in names)
    # adaLN modulation weights (diffusers: norm1.linear), attention and MLP weights stay frozen.
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert "dit.transformer_blocks.0.norm1.linear.weight" in frozen
    assert "dit.transformer_blocks.0.attn1.to_q.weight" in frozen
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n_train < 0.02 * sum(p.numel() for p in m.parameters())
    assert len(m.trainable_parameters("all")) == len(list(m.parameters()))
    with pytest.raises(ConfigError):
        m.trainable_parameters("lora")


def test_load_backbone_missing_local_path_and_hf_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="nowhere"):
        load_backbone(tmp_path / "nowhere" / "last.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(WeightsError, match="facebook/DiT-XL-2-256"):
        load_backbone("facebook/DiT-XL-2-256")


def _fake_hf_cache(root, repo: str, files: dict[str, bytes]):
    """A Hugging Face hub cache under ``root`` holding ``files`` (relative paths) of ``repo`` at ``main``."""
    sha = "0" * 40
    d = root / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(sha)
    for rel, data in files.items():
        (d / "snapshots" / sha / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / "snapshots" / sha / rel).write_bytes(data)
    return root


def test_corrupt_dit_weights_read_as_unreadable_not_missing(tmp_path, monkeypatch):
    """The loaders kept only the last attempt's error: a corrupt ``transformer/`` of an HF id read as "not
    found" (the root's error). Now each attempt is named, and found-but-corrupt is told from missing."""
    import huggingface_hub.constants

    folder = tmp_path / "dit"
    make_dit(TINY).save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"torn download")
    with pytest.raises(WeightsError) as e:
        load_backbone(folder)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{folder}: DiT weights found but unreadable (replace the files): ./:")
    assert "SafetensorError" in msg  # the cause under diffusers' "Unable to load weights"
    files = {f"transformer/{f.name}": f.read_bytes() for f in folder.iterdir()}
    cache = _fake_hf_cache(tmp_path / "hub", "facebook/DiT-XL-2-256", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(WeightsError) as e:
        load_backbone("facebook/DiT-XL-2-256")
    msg = str(e.value)
    assert msg.startswith("facebook/DiT-XL-2-256: DiT weights found but unreadable (replace the files): transformer/:")
    assert msg.endswith("(also tried ./: not found)")
    assert [sub for sub, _ in e.value.attempts] == ["transformer", ""]  # every attempt, kept
    assert e.value.__cause__ is e.value.attempts[0][1]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as e:
        load_backbone("facebook/DiT-XL-2-256")
    msg = str(e.value)
    assert msg.startswith("facebook/DiT-XL-2-256: DiT weights not found locally (no network;")
    assert "transformer/: OSError" in msg and "; ./: OSError" in msg


def test_load_diffusers_saved_tiny_dit(tmp_path):
    torch.manual_seed(0)
    dit = make_dit(TINY)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # Keep the per-block embedder copies equal, as diffusers' conversion of DiT-XL/2 does.
        first = dit.transformer_blocks[0].norm1.emb.state_dict()
        for b in dit.transformer_blocks[1:]:
            b.norm1.emb.load_state_dict(first)
    dit.save_pretrained(tmp_path / "pipe" / "transformer")
    model, mcfg = load_backbone(tmp_path / "pipe")
    assert mcfg.arch == "DiT-T/4" and mcfg.num_classes == 10 and not mcfg.learn_sigma
    assert model.dit.transformer_blocks[3].norm1.emb is model.dit.transformer_blocks[0].norm1.emb
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, t, y), dit(x, timestep=t, class_labels=y).sample, atol=1e-5)
    model2, mcfg2 = load_backbone(tmp_path / "pipe" / "transformer", difffit_blocks=14)
    assert mcfg2.difffit_blocks == 14 and len(model2.gammas) == 6


def test_load_backbone_from_ddkit_checkpoint(tmp_path):
    from ddkit.config import to_dict
    from ddkit.models import save_checkpoint

    m = build_backbone(TINY, seed=0)
    _randomize(m)
    ema = copy.deepcopy(m)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    save_checkpoint(
        {"model": m.state_dict(), "ema": ema.state_dict(), "model_config": to_dict(TINY)},
        tmp_path / "stage" / "ckpt" / "last.pt",
    )
    x, t, y = _inputs()
    loaded, cfg = load_backbone(tmp_path / "stage")
    assert cfg == TINY and not loaded.training
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, y), ema(x, t, y))
        raw, _ = load_backbone(tmp_path / "stage" / "ckpt" / "last.pt", use_ema=False)
        assert torch.allclose(raw(x, t, y), m(x, t, y))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pt"):
        load_backbone(tmp_path / "bad.pt")


def test_vae_helpers_offline(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    from ddkit.models.vae import decode, encode, load_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="stabilityai/sd-vae-ft-ema"):
        load_vae("stabilityai/sd-vae-ft-ema")
    torch.manual_seed(0)
    small = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    small.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    torn = tmp_path / "torn"
    small.save_pretrained(torn)
    (torn / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 16)
    with pytest.raises(WeightsError, match=rf"^{torn}: VAE weights found but unreadable .*SafetensorError"):
        load_vae(torn)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = encode(vae, x, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 4, 4)
    z_mean = encode(vae, x, sample=False)
    assert torch.allclose(z_mean, vae.encode(x).latent_dist.mean * 0.18215)
    img = decode(vae, z)
    assert img.shape == (2, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
