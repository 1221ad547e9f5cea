"""bench/gpu.py: skips cleanly without a GPU, and ``--tiny`` runs every code path on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "gpu.py"


def _run(*args: str, tmp_path: Path, hide_gpu: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=os.environ.get("DDKIT_TEST_THREADS", "1"))
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def test_without_gpu_reports_skipped(tmp_path):
    for args in ((), ("--device", "cuda")):
        p = _run(*args, tmp_path=tmp_path)
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith("skipped: no GPU")


def test_tiny_runs_every_path_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    p = _run("--tiny", "--json", str(out), tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    gen = res["generation"]
    assert list(gen) == ["DiTPipeline fp32 (reference)", "ddkit fp32", "ddkit bf16", "ddkit bf16 + flash SDPA",
                         "ddkit bf16 + flash SDPA + compile"]
    assert all(r["images_per_s"] > 0 and r["peak_mem_gib"] > 0 for r in gen.values())
    # Same transformer, VAE, schedule, noise and CFG: ddkit's fp32 chain is the pipeline's computation.
    assert gen["ddkit fp32"]["max_abs_diff_vs_pipeline"] < 1e-4
    assert "compile" in gen["ddkit bf16 + flash SDPA + compile"]["note"]
    assert set(res["training"]) == {"minimax DiffFit fp32", "minimax DiffFit bf16"}
    assert all(r["steps_per_s"] > 0 for r in res["training"].values())
    assert res["forward_gflop"] > 0
    assert "goal generation >= 1.5x DiTPipeline" in p.stdout and "of bf16 peak" in p.stdout


def test_bf16_peak_table():
    sys.path.insert(0, str(BENCH.parent))
    import gpu

    assert gpu.bf16_peak("NVIDIA H200") == pytest.approx(989e12)
    assert gpu.bf16_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989e12)
    assert gpu.bf16_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu.bf16_peak("Some CPU") is None
    assert gpu.goal_lines({"generation": {}}) == ["goals: not measured"]


def test_dit_xl2_flops_match_paper():
    """The share-of-peak arithmetic counts FLOPs; DiT's Table 4 gives 118.6 G multiply-adds per forward."""
    sys.path.insert(0, str(BENCH.parent))
    import gpu

    gflop = gpu.forward_flops(gpu.Setup(device="cpu")) / 1e9
    assert gflop == pytest.approx(2 * gpu.DIT_XL2_GMACS, rel=0.01)
