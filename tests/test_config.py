"""Typed config loading: every shipped config validates; bad keys and types fail with one line naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ddkit.config import ExperimentConfig, dump_yaml, load_config
from ddkit.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == path.stem



@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_resolved_config_round_trips(path, tmp_path):
    """What goes into run directories reloads to the same config (so a run reproduces from its folder)."""
    cfg = load_config(path)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert load_config(dumped) == cfg


def test_challenge_configs_hold_the_challenge_budget():
    for name in ("cifar100", "tinyimagenet"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
        assert cfg.generate.time_limit == 600.0
        assert cfg.package.format == "eccv2024"
        assert cfg.package.dataset == name


def test_paper_configs_hold_the_paper_values():
    for name in ("imagewoof", "imagenette"):
        cfg = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
        assert cfg.model.arch == "DiT-XL/2" and cfg.data.resolution == 256
        assert (cfg.minimax.lambda_r, cfg.minimax.lambda_d, cfg.minimax.memory_size) == (0.002, 0.008, 64)
        assert cfg.generate.cfg_scale == 4.0 and cfg.generate.steps_max == 50


def test_overrides_are_typed():
    cfg = load_config(None, ["generate.cfg_scale=2", "minimax.steps=7", "evaluate.baselines=[full]"])
    assert cfg.generate.cfg_scale == 2.0 and isinstance(cfg.generate.cfg_scale, float)
    assert cfg.minimax.steps == 7
    assert cfg.evaluate.baselines == ("full",)


def test_an_error_names_the_set_that_gave_the_value_else_the_file(tmp_path):
    p = _write(tmp_path, {"generate": {"sampler": "foo", "cfg_scale": 2.0}})
    with pytest.raises(ConfigError) as e:
        load_config(p, ["generate.modes.scale=1"])
    assert str(e.value) == f"{p}: generate.sampler: must be one of ['ddpm', 'ddim'], got 'foo'"
    p = _write(tmp_path, {"seed": 1})
    cases = {
        "generate.modes.scale=abc": "--set generate.modes.scale=abc: generate.modes.scale: expected a number",
        "generate.modes.scale=-1": "--set generate.modes.scale=-1: generate.modes.scale: must be >= 0",
        "generate.nope=1": "--set generate.nope=1: unknown key 'generate.nope'",
        "methods=[dit, 3]": "--set methods=[dit, 3]: methods[1]: expected a string",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(p, ["generate.cfg_scale=2", override])
        assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(ConfigError) as e:  # a later --set of the same key is the one named
        load_config(p, ["generate.modes={scale: x}", "generate.modes.scale=y"])
    assert str(e.value).startswith("--set generate.modes.scale=y: "), str(e.value)


def _write(tmp_path, data) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"generate": {"cfg_scal": 2.0}}, "unknown key 'generate.cfg_scal'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"generate": {True: 1}}, "YAML reads bare on/off/yes/no as booleans: quote the key"),
        ({"minimax": {"steps": "ten"}}, "minimax.steps: expected an integer, got 'ten'"),
        ({"minimax": {"steps": 1.5}}, "minimax.steps: expected an integer"),
        ({"pretrain": {"trainable": "some"}}, "pretrain.trainable: must be one of"),
        ({"generate": {"steps_min": 60, "steps_max": 50}}, "generate.steps_min"),
        ({"data": {"resolution": -1}}, "data.resolution: must be > 0"),
        ({"generate": {"use_ema": "yes"}}, "generate.use_ema: expected true/false"),
        ({"generate": {"d3hr": {"timestep": "x"}}}, "generate.d3hr.timestep"),
        ({"pretrain": {"warmup_steps": -1}}, "pretrain.warmup_steps: must be >= 0"),
        ({"pretrain": {"loss_weight_cap": 0.5}}, "pretrain.loss_weight_cap: must be >= 1"),
        ({"pretrain": {"class_embed_std": 0}}, "pretrain.class_embed_std: must be > 0"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, data, fragment):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert fragment in msg
    assert str(path) in msg
    assert "\n" not in msg


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="unknown key 'generate.nope'"):
        load_config(None, ["generate.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["generate.cfg_scale"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_configs_are_frozen():
    cfg = load_config(None)
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_cli_lists_command_groups():
    from ddkit.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    for group in ("data", "train", "generate", "evaluate", "package", "submit", "container", "run", "jobs"):
        assert group in out


def test_partial_section_keeps_the_experiments_section_defaults():
    """`minimax:` with one key must keep the minimax stage's own defaults (lambda_r 0.002), not TrainConfig's."""
    cfg = load_config(None, ["minimax.steps=10"])
    assert cfg.minimax.steps == 10
    assert (cfg.minimax.lambda_r, cfg.minimax.lambda_d, cfg.minimax.trainable) == (0.002, 0.008, "difffit")
    assert cfg.pretrain.lambda_r == 0.0


def test_stage_names_are_checked_in_one_place():
    """``ddkit train``/``submit train`` and ``ddkit run``'s --stage/--force share ddkit.config.check_stages."""
    from ddkit.cli import app
    from ddkit.config import TRAIN_STAGES, check_stages
    from ddkit.pipeline import STAGES, check_selection

    assert check_stages(["minimax"]) == ("minimax",)
    with pytest.raises(ConfigError, match=r"^--stage train: unknown stage \(known: pretrain, minimax\)$"):
        check_stages(("train",))
    assert set(TRAIN_STAGES) < set(STAGES)
    cfg = load_config(None, ["methods=[dit]"])
    check_selection(cfg, STAGES, ("gen-dit", "generate"))
    with pytest.raises(ConfigError, match="--stage gen-dit: unknown stage"):
        check_selection(cfg, ("gen-dit",), ())
    with pytest.raises(ConfigError, match=r"--force gen-minimax: unknown stage \(known: .*gen-dit\)"):
        check_selection(cfg, STAGES, ("gen-minimax",))
    res = CliRunner().invoke(app, ["train", "--stage", "train"])
    assert res.exit_code != 0 and "--stage train: unknown stage" in res.output
