"""The run estimate's arithmetic (ddkit.estimate): FLOP counts against flop_counter and the DiT paper, the
stage formulas, the throughput sources, and the ImageNet-1K config's dry-run estimate (no data, no weights)."""

from __future__ import annotations

import json
import math

import pytest

from ddkit import estimate as E
from ddkit.config import load_config
from ddkit.errors import ConfigError


def test_dit_xl2_forward_matches_the_dit_paper():
    # DiT paper, Table 4: 118.6 G multiply-adds for DiT-XL/2 at 256 px (32x32 latents).
    f = E.model_forward_flops("DiT-XL/2", 32, 4, True)
    assert f == pytest.approx(E.DIT_XL2_PAPER_FLOPS, rel=0.002)


@pytest.mark.parametrize("arch,size", [("custom(depth=2,hidden=32,heads=2,patch=2)", 8), ("DiT-T/4", 32)])
def test_dit_forward_formula_matches_flop_counter_on_small_dits(arch, size):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddkit.config import ModelConfig
    from ddkit.models import build_backbone

    cfg = ModelConfig(arch=arch, in_channels=4, input_size=size, num_classes=1000, learn_sigma=True)
    with torch.device("meta"):
        m = build_backbone(cfg, init=False)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.empty(1, 4, size, size), torch.tensor([5]), torch.tensor([3]))
    counted = float(fc.get_total_flops())
    assert E.model_forward_flops(arch, size, 4, True) == pytest.approx(counted, rel=0.05)


def test_stage_formulas():
    assert E.generation_flops(images=10, steps=50, forward=2.0, cfg=2, decode=3.0) == 10 * (50 * 2 * 2.0 + 3.0)
    assert E.training_flops(steps=100, batch=32, forward=2.0, factor=E.train_factor("difffit")) == 100 * 32 * 2 * 2.0
    assert E.train_factor("all") == 3.0 and E.cfg_factor(1.0) == 1 and E.cfg_factor(4.0) == 2
    tp = E.Throughput(1e12, "test")
    assert E.compute_seconds(8e12, 8, tp) == pytest.approx(1.0)
    assert E.vae_flops(512, decode=True) == pytest.approx(4 * E.SD_VAE_DECODE_FLOPS_256)
    # Minimax memories at ImageNet-1K: 2 x 64 x (4 x 32 x 32) x 1,000 x 4 bytes = 2.10e9 B (1.95 GiB)
    assert E.minimax_memory_bytes(64, 4 * 32 * 32, 1000) == 2_097_152_000
    assert E.format_seconds(90) == "90 s" and E.format_seconds(7200) == "2.0 h" and E.format_seconds(math.nan) == "-"


def test_throughput_from_peak_or_from_a_bench_file(tmp_path):
    tp = E.throughput("sample", "h100")
    assert tp.flops_per_s == pytest.approx(0.40 * 989e12) and "40 % (assumed)" in tp.source
    with pytest.raises(ConfigError, match="--accelerator tpu"):
        E.throughput("sample", "tpu")
    res = {"device_name": "NVIDIA H100 80GB HBM3", "forward_gflop": 237.3,
           "generation": {"ddkit fp32": {"tflops": 100.0}, "ddkit bf16": {"tflops": 300.0}},
           "training": {"minimax DiffFit bf16": {"images_per_s": 500.0}}}
    f = tmp_path / "gpu.json"
    f.write_text(json.dumps(res))
    bench = E.load_gpu_bench(f)
    assert E.throughput("sample", "h100", bench=bench).flops_per_s == pytest.approx(300e12)
    assert E.throughput("train", "h100", bench=bench).flops_per_s == pytest.approx(500 * 2 * 237.3e9)
    assert "assumed" in E.throughput("cnn", "h100", bench=bench).source  # no student in the bench
    f.write_text("{}")
    with pytest.raises(ConfigError, match="not a bench/gpu.py --json result"):
        E.load_gpu_bench(f)


def test_imagenet1k_config_estimates_without_data_or_weights():
    cfg = load_config("configs/imagenet1k.yaml")
    assert cfg.model.num_classes == 1000 and cfg.evaluate.protocol == "rded"
    assert cfg.evaluate.network == "ResNet-18" and cfg.model.pretrained == "facebook/DiT-XL-2-256"
    est = E.estimate_run(cfg, "h100", 8)
    stages = {s.stage: s for s in est.stages}
    assert set(stages) == {"shard", "minimax", "gen-minimax", "gen-dit", "evaluate"}
    gen = stages["gen-dit"]
    # 10,000 images x 50 steps x 2 (CFG) forwards + decodes, on 8 devices at 40 % of 989 TFLOP/s
    flops = 10_000 * (50 * 2 * E.model_forward_flops("DiT-XL/2", 32, 4, True) + E.SD_VAE_DECODE_FLOPS_256)
    assert gen.flops == pytest.approx(flops)
    # the busiest rank: ceil(100 batches / 8) = 13 batches of 100 images
    assert gen.seconds == pytest.approx(13 * 100 * flops / 10_000 / (0.4 * 989e12))
    assert any("1.95 GiB per rank" in a for a in est.assumptions)
    assert est.seconds == pytest.approx(sum(s.seconds for s in est.stages))
    assert any("(assumed)" in a for a in est.assumptions)


def test_a_budget_that_does_not_fit_is_reported_not_raised():
    cfg = load_config("configs/imagenet1k.yaml", ["generate.time_limit=60"])
    est = E.estimate_run(cfg, "a10", 1)
    gen = next(s for s in est.stages if s.stage == "gen-dit")
    assert gen.work.startswith("does not fit") and math.isnan(gen.seconds)


def test_cli_dry_run_prints_the_estimate_and_its_assumptions(tmp_path):
    from typer.testing import CliRunner

    from ddkit.cli import app

    res = CliRunner().invoke(app, [
        "run", "configs/imagenet1k.yaml", "--dry-run", "--accelerator", "h100", "--gpus", "8",
        "--set", f"run_dir={tmp_path / 'run'}", "--set", f"data.shards={tmp_path / 'shards'}",
    ], env={"COLUMNS": "200"})  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "Estimate: imagenet1k on 8 x h100" in res.output and "gen-minimax" in res.output
    assert "40 % (assumed) of the h100 peak" in res.output and "1.95 GiB per rank" in res.output
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    bad = CliRunner().invoke(app, ["run", "configs/imagenet1k.yaml", "--dry-run", "--accelerator", "tpu",
                                   "--set", f"run_dir={tmp_path / 'run'}"])
    assert bad.exit_code != 0 and "--accelerator tpu: unknown" in bad.output
