"""The tiny diffusers DiT pipeline (ddkit.models.tiny) and loading any diffusers DiT, whatever its size."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ddkit.config import ModelConfig
from ddkit.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from ddkit.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "tiny-dit")


def _expected(**kw) -> ModelConfig:
    from ddkit.models.tiny import TINY_MODEL_SETTINGS

    return dataclasses.replace(ModelConfig(**TINY_MODEL_SETTINGS), **kw)


def test_tiny_pipeline_has_the_hub_layout(tiny_pipe):
    index = json.loads((tiny_pipe / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline"
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    tcfg = json.loads((tiny_pipe / "transformer" / "config.json").read_text())
    # DiT-XL/2's keys: learn-sigma (4 -> 8 channels), 1,000 classes, patch 2, adaLN-Zero.
    assert (tcfg["in_channels"], tcfg["out_channels"], tcfg["num_embeds_ada_norm"]) == (4, 8, 1000)
    assert tcfg["patch_size"] == 2 and tcfg["norm_type"] == "ada_norm_zero" and tcfg["sample_size"] == 8
    sched = json.loads((tiny_pipe / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["beta_schedule"] == "linear"
    assert (sched["beta_start"], sched["beta_end"], sched["num_train_timesteps"]) == (1e-4, 0.02, 1000)
    assert json.loads((tiny_pipe / "vae" / "config.json").read_text())["latent_channels"] == 4


def test_any_diffusers_dit_loads_as_a_custom_arch(tiny_pipe):
    from ddkit.models import arch_spec, build_backbone, load_backbone

    model, mcfg = load_backbone(tiny_pipe, expect=_expected(vae="some-vae"), difffit_blocks=14)
    assert mcfg.arch == "custom(depth=2,hidden=32,heads=2,patch=2)"
    assert mcfg.vae == "some-vae" and mcfg.pretrained == str(tiny_pipe.resolve())
    assert len(model.gammas) == 2
    spec = arch_spec(mcfg.arch)
    assert (spec.depth, spec.hidden, spec.heads, spec.patch) == (2, 32, 2, 2)
    # The custom name rebuilds the same module tree (how a fine-tuned checkpoint of it is reloaded).
    rebuilt = build_backbone(mcfg, init=False)
    rebuilt.load_state_dict(model.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 1000])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, t, y), model(x, t, y))
        assert model(x, t, y).shape == (2, 8, 8, 8)


def test_a_mismatching_model_config_is_one_line_naming_the_folder(tiny_pipe):
    from ddkit.models import load_backbone

    with pytest.raises(ConfigError) as e:
        load_backbone(tiny_pipe, expect=_expected(arch="DiT-XL/2", input_size=32))
    msg = str(e.value)
    assert "\n" not in msg and str(tiny_pipe.resolve()) in msg
    assert "arch='DiT-XL/2'" in msg and "input_size=32" in msg
    assert "model.arch=custom(depth=2,hidden=32,heads=2,patch=2)" in msg and "model.input_size=8" in msg


def test_custom_arch_names_are_validated():
    from ddkit.models import arch_name, arch_spec

    with pytest.raises(ConfigError, match="heads must divide hidden"):
        arch_spec("custom(depth=2,hidden=30,heads=4,patch=2)")
    with pytest.raises(ConfigError, match=r"custom\(depth=D"):
        arch_spec("DiT-Q/3")
    assert arch_name(arch_spec("DiT-XL/2")) == "DiT-XL/2"


# --------------------------------------------------------------------------------------------------------
# Latents, evaluation inputs
# --------------------------------------------------------------------------------------------------------
def make_wnid_imagefolder(*args, **kw):
    pytest.importorskip("foolbox")  # a dev dependency: its 20 ImageNet JPEGs are the real images
    from ddkit.models.tiny import make_wnid_imagefolder as make

    return make(*args, **kw)


def test_encode_latents_takes_a_pipeline_folder_and_records_the_vae(tiny_pipe, tmp_path):
    from ddkit.config import DataConfig
    from ddkit.data import read_index, shard_dataset
    from ddkit.data.registry import imagenet_wnids
    from ddkit.errors import DataError
    from ddkit.models.tiny import build_tiny_pipeline
    from ddkit.models.vae import check_latent_vae

    root = make_wnid_imagefolder(tmp_path / "inet", imagenet_wnids()[:2], 3, 1)
    cfg = DataConfig(
        dataset="imagefolder", root=str(root), shards=str(tmp_path / "sh"), resolution=64, channels=3,
        encode_latents=str(tiny_pipe),
    )
    out = shard_dataset(cfg)
    latent = read_index(out)["latent"]
    assert latent["vae"] == str(tiny_pipe.resolve()) and len(latent["encoder_sha256"]) == 64
    assert latent["channels"] == 4 and latent["size"] == 8
    where = str(out / "dataset.json")
    check_latent_vae(latent, str(tiny_pipe / "vae"), where)  # another name, the same encoder: accepted
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    with pytest.raises(DataError) as e:
        check_latent_vae(latent, str(other), where)
    assert "\n" not in str(e.value) and str(other) in str(e.value) and where in str(e.value)
    # Reusing the shard set with another VAE is refused, not silently served.
    with pytest.raises(DataError, match="another encoder"):
        shard_dataset(dataclasses.replace(cfg, encode_latents=str(other)))


def test_evaluate_refuses_too_few_real_images_before_any_training(mnist_shards, tmp_path):
    from ddkit.config import EvaluateConfig
    from ddkit.errors import DataError
    from ddkit.evaluate import evaluate

    cfg = EvaluateConfig(protocol="idc", epochs=1, repeats=1, ipc=401, baselines=("random_real",))
    with pytest.raises(DataError) as e:
        evaluate({}, mnist_shards, cfg, out_dir=tmp_path / "ev", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "IPC 401" in msg and "10 class(es)" in msg and str(mnist_shards) in msg
    assert not (tmp_path / "ev" / "runs.jsonl").exists()


# --------------------------------------------------------------------------------------------------------
# model.class_map: one rule for training, generation and D^3HR
# --------------------------------------------------------------------------------------------------------
def test_class_map_modes(tmp_path):
    from ddkit.data.classmap import backbone_labels

    cifar = {"classes": ["apple", "aquarium_fish", "baby"], "imagenet_index": None}
    with pytest.raises(ConfigError, match="choose 'identity'"):
        backbone_labels(cifar, 1000)  # not silently ImageNet 0..2
    assert backbone_labels(cifar, 1000, "identity") == [0, 1, 2]
    assert backbone_labels(cifar, 3) == [0, 1, 2]
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"apple": 948, "aquarium_fish": 1, "baby": 2}))
    assert backbone_labels(cifar, 1000, str(f)) == [948, 1, 2]
    f.write_text(json.dumps([948, 1, 1000]))
    with pytest.raises(ConfigError, match="'baby' maps to 1000"):
        backbone_labels(cifar, 1000, str(f))
    with pytest.raises(ConfigError, match="no imagenet_index"):
        backbone_labels(cifar, 1000, "imagenet")
    woof = {"classes": ["a", "b"], "imagenet_index": [155, 159]}
    assert backbone_labels(woof, 1000) == [155, 159] and backbone_labels(woof, 1000, "identity") == [0, 1]


def test_training_generation_and_d3hr_condition_on_the_same_imagenet_labels(tiny_pipe, tmp_path):
    from ddkit.config import load_config
    from ddkit.data import read_index, shard_dataset
    from ddkit.data.registry import imagenet_wnids
    from ddkit.generate import class_layout
    from ddkit.methods.d3hr import backbone_labels
    from ddkit.models import load_backbone
    from ddkit.train import Trainer

    wnids = [imagenet_wnids()[i] for i in (7, 281, 948)]  # cock, tabby cat, Granny Smith
    root = make_wnid_imagefolder(tmp_path / "inet", wnids, 2, 1)
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", "data.dataset=imagefolder", f"data.root={root}", "data.resolution=64",
        "data.channels=3", f"data.shards={tmp_path / 'sh'}", f"data.encode_latents={tiny_pipe}",
        *tiny_model_sets(tiny_pipe), "minimax.batch_size=2",
    ])  # fmt: skip
    shard_dataset(cfg.data)
    index = read_index(cfg.data.shards)
    tr = Trainer(cfg, "minimax", resume="never", progress=False)
    tr.setup()
    assert tr.data_mode == "latents"
    trained = tr.cond_map.tolist()
    model, _ = load_backbone(tiny_pipe, expect=cfg.model)
    assert trained == [7, 281, 948]
    assert class_layout(cfg, model.num_classes)[1] == trained
    assert backbone_labels(index, model, cfg.model.class_map) == trained


def tiny_model_sets(pipe) -> list[str]:
    """``--set`` values pointing ``model.*`` at the tiny pipeline folder."""
    from ddkit.models.tiny import TINY_MODEL_SETTINGS

    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_MODEL_SETTINGS.items()]
    return sets + [f"model.pretrained={pipe}", f"model.vae={pipe}", f"model.vae_decoder={pipe}"]


def test_cli_paths_are_absolute_and_package_says_where_it_looked(tmp_path, monkeypatch):
    from ddkit.config import absolute_paths, load_config
    from ddkit.errors import PackageError
    from ddkit.package import ECCV2024, canonical_order

    (tmp_path / "weights").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(load_config(None, [
        "run_dir=runs/x", "data.shards=shards/x", "model.pretrained=weights", "model.vae=stabilityai/sd-vae-ft-ema",
    ]))  # fmt: skip
    assert cfg.run_dir == str(tmp_path / "runs/x") and cfg.data.shards == str(tmp_path / "shards/x")
    assert cfg.model.pretrained == str(tmp_path / "weights")
    assert cfg.model.vae == "stabilityai/sd-vae-ft-ema"  # a Hugging Face id stays an id
    with pytest.raises(PackageError, match="looked in /somewhere/shards"):
        canonical_order([f"c{i}" for i in range(200)], ECCV2024["tinyimagenet"], None, "/somewhere/shards")


# --------------------------------------------------------------------------------------------------------
# The whole latent chain through the CLI, at 64 px, on the CPU
# --------------------------------------------------------------------------------------------------------
CHAIN_YAML = """\
name: latent-chain
run_dir: runs/inet10
methods: [minimax, d3hr]
data: {dataset: imagefolder, root: inet10, shards: shards/inet10, resolution: 64, channels: 3, shard_size: 64}
minimax:
  {steps: 4, batch_size: 8, trainable: difffit, lambda_r: 0.002, lambda_d: 0.008, memory_size: 8, ckpt_every: 2}
generate:
  sampler: ddpm
  steps_min: 2
  steps_max: 4
  ipc_min: 10
  ipc_max: 10
  batch_size: 100
  d3hr: {inversion_steps: 5, store_from: 400, store_to: 800, timestep: 600, num_groups: 50, max_images_per_class: 4}
evaluate: {protocol: idc, network: ConvNet-3, epochs: 1, repeats: 1, baselines: [random_real]}
"""


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from ddkit.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (args, r.output[-3000:])
    return r.output


def test_latent_chain_through_the_cli(tmp_path, monkeypatch):
    """Shard with VAE latents -> DiffFit minimax from a diffusers pipeline -> budgeted generation -> D^3HR ->
    idc evaluation on 10 wnid classes; then the same checkpoint on 200 wnid classes -> eccv2024 package
    (Tiny-ImageNet layout) written and checked from another directory."""
    from typer.testing import CliRunner

    from ddkit.cli import app
    from ddkit.data.registry import imagenet_wnids
    from ddkit.io import read_json
    from ddkit.models import load_checkpoint
    from ddkit.models.tiny import build_tiny_pipeline

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    pipe = build_tiny_pipeline(work / "tiny-dit")
    wnids = imagenet_wnids()
    make_wnid_imagefolder(work / "inet10", [wnids[i] for i in range(0, 1000, 100)], 12, 2)
    (work / "cfg.yaml").write_text(CHAIN_YAML)
    sets = [a for kv in tiny_model_sets("tiny-dit") for a in ("--set", kv)]

    _cli("data", "shard", "imagefolder", "-c", "cfg.yaml", "--encode-latents", "tiny-dit", *sets)
    latent = read_json(work / "shards/inet10/dataset.json")["latent"]
    assert latent["vae"] == str(pipe) and latent["size"] == 8

    # model.arch is checked against the folder, not ignored.
    r = CliRunner().invoke(app, ["train", "-c", "cfg.yaml", "--stage", "minimax", *sets, "--set", "model.arch=DiT-XL/2"])
    assert r.exit_code != 0 and "model.arch=custom(depth=2,hidden=32,heads=2,patch=2)" in r.output

    _cli("train", "-c", "cfg.yaml", "--stage", "minimax", "--no-progress", *sets)
    state = load_checkpoint(work / "runs/inet10/minimax/ckpt/last.pt")
    assert state["model_config"]["arch"] == "custom(depth=2,hidden=32,heads=2,patch=2)"
    assert state["model_config"]["pretrained"] == str(pipe) and state["trainable"] == "difffit"

    for method in ("minimax", "d3hr"):
        _cli("generate", "-c", "cfg.yaml", "--method", method, "--time-limit", "240", "--no-progress", *sets)
        man = read_json(work / f"runs/inet10/gen-{method}/manifest.json")
        assert man["budget_share_used"] <= 1.0 and Path(man["checkpoint"]).is_absolute()
    assert read_json(work / "runs/inet10/gen-d3hr/manifest.json")["checkpoint"] == str(pipe)

    _cli("evaluate", "-c", "cfg.yaml", "runs/inet10/gen-minimax", "runs/inet10/gen-d3hr", "--no-progress", *sets)
    res = read_json(work / "runs/inet10/eval/results.json")["sets"]
    assert set(res) == {"gen-minimax", "gen-d3hr", "random_real"} and res["gen-minimax"]["images"] == 100

    # 200 wnid classes (the Tiny-ImageNet scorer's), one real image each, sampled by the same checkpoint.
    make_wnid_imagefolder(work / "inet200", sorted(wnids[i] for i in range(0, 1000, 5)), 1, 1)
    big = [*sets, "--set", "run_dir=runs/inet200", "--set", "data.root=inet200", "--set", "data.shards=shards/inet200",
           "--set", "generate.checkpoint=runs/inet10/minimax", "--set", "generate.batch_size=250"]  # fmt: skip
    _cli("data", "shard", "imagefolder", "-c", "cfg.yaml", *big)
    _cli("generate", "-c", "cfg.yaml", "--method", "minimax", "--time-limit", "400", "--no-progress", *big)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _cli("package", str(work / "runs/inet200"), "--method", "minimax", "--format", "eccv2024", "--dataset",
         "tinyimagenet", "--out", "submission.zip")  # fmt: skip
    out = _cli("package", "--check", "submission.zip", "--partial")
    assert "tinyimagenet.pt: float32 [2000, 3, 64, 64], 200 classes x IPC 10" in out


def test_a_checkpoint_fine_tuned_from_an_untied_dit_reloads_unchanged(tmp_path):
    """A diffusers DiT whose blocks hold different embedder copies stays untied, and so does its reload."""
    from diffusers import DiTTransformer2DModel

    from ddkit.models import load_backbone, save_checkpoint

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=4, patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    dit.save_pretrained(tmp_path / "dit")
    model, mcfg = load_backbone(tmp_path / "dit")
    assert model.dit.transformer_blocks[1].norm1.emb is not model.dit.transformer_blocks[0].norm1.emb
    sd = model.state_dict()
    state = {"model": sd, "ema": sd, "model_config": dataclasses.asdict(mcfg)}
    save_checkpoint(state, tmp_path / "stage" / "ckpt" / "last.pt")
    again, _ = load_backbone(tmp_path / "stage")
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([1, 900]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(again(x, t, y), model(x, t, y))
