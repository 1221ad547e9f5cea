"""``ddkit run`` after config changes, on a very small real MNIST run (stage fingerprints, issue 14).

One finished run (20 pretraining steps, 10 minimax steps, minimax + plain DiT generation, a 2-epoch
evaluation), then reruns with changes, each asserting from the returned PipelineResult and the DONE
records which stages ran, which continued and which were skipped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddkit.config import load_config
from ddkit.io import read_done, read_jsonl
from ddkit.pipeline import run_pipeline

ROOT = Path(__file__).parent.parent
TINY = (
    "methods=[minimax, dit]",
    "model.pretrained=null",  # pretrain from scratch here; the shipped DiT is covered by test_pipeline.py
    "pretrain.steps=20",
    "pretrain.batch_size=16",
    "pretrain.log_every=5",
    "pretrain.ckpt_every=10",
    "pretrain.warmup_steps=5",
    "minimax.steps=10",
    "minimax.batch_size=16",
    "minimax.log_every=5",
    "minimax.ckpt_every=5",
    "minimax.warmup_steps=5",
    "generate.time_limit=60",  # a ceiling: 5 steps x IPC 2 take seconds, but a loaded CI machine loads slowly
    "generate.steps_min=5",
    "generate.steps_max=5",
    "generate.ipc_min=2",
    "generate.ipc_max=2",
    "evaluate.epochs=2",
    "evaluate.repeats=1",
    "evaluate.baselines=[]",
)


def _run(run_dir: Path, shards: Path, *sets: str, **kw):
    cfg = load_config(
        ROOT / "configs" / "mnist.yaml", (f"run_dir={run_dir}", f"data.shards={shards}", *TINY, *sets)
    )
    lines: list[str] = []
    res = run_pipeline(cfg, progress=False, log=lines.append, **kw)
    return res, lines


def _acts(res) -> dict[str, str]:
    return {s.name: s.action for s in res.stages}


@pytest.fixture(scope="module")
def first_run(mnist_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("reruns") / "run"
    res, lines = _run(run, mnist_shards)
    assert res.ran() == ["pretrain", "minimax", "gen-minimax", "gen-dit", "evaluate", "package", "report"], (
        lines
    )
    assert _acts(res)["shard"] == "skip"  # the session's shard set matches data.*
    assert any(line.startswith("[run] next: pretrain (run") and "whole run ~" in line for line in lines), (
        lines
    )
    return run


def test_readme_example_continues_minimax_and_reruns_generation_and_evaluation(first_run, mnist_shards):
    run = first_run
    pre_ckpt = run / "pretrain" / "ckpt" / "last.pt"
    pre_mtime = pre_ckpt.stat().st_mtime_ns
    old_fp = read_done(run / "gen-dit")["fingerprint"]

    res, lines = _run(run, mnist_shards, "generate.cfg_scale=3.0", "minimax.steps=15")
    acts = _acts(res)
    assert acts == {
        "shard": "skip", "pretrain": "skip", "minimax": "continue", "gen-minimax": "run", "gen-dit": "run",
        "evaluate": "run", "package": "run", "report": "run",
    }, lines  # fmt: skip
    reasons = {s.name: s.reason for s in res.stages}
    assert reasons["minimax"] == "minimax.steps 10 -> 15: continue from its checkpoint"
    assert reasons["gen-dit"] == "changed: generate.cfg_scale 1.0 -> 3.0"
    assert pre_ckpt.stat().st_mtime_ns == pre_mtime
    # Continued, not restarted: the first run's log lines are kept and the new ones go on from step 10.
    assert [r["step"] for r in read_jsonl(run / "minimax" / "train_log.jsonl")] == [5, 10, 15]
    done = read_done(run / "minimax")
    assert done["step"] == 15 and done["inputs"]["minimax.steps"] == 15
    assert torch.load(run / "minimax" / "ckpt" / "last.pt", weights_only=False)["step"] == 15
    assert read_done(run / "gen-dit")["fingerprint"] != old_fp
    assert read_done(run / "gen-dit")["inputs"]["generate.cfg_scale"] == 3.0
    assert (run / ".stale" / "gen-dit" / "dataset.pt").is_file()  # the old set, set aside

    # The same command again: nothing but the report.
    res, lines = _run(run, mnist_shards, "generate.cfg_scale=3.0", "minimax.steps=15")
    assert res.ran() == ["report"], lines
    assert all(s.reason.startswith(("unchanged", "dataset.json")) for s in res.stages if s.name != "report")


def test_generation_keys_of_other_methods_force_and_dry_run(first_run, mnist_shards):
    run = first_run
    sets = ("generate.cfg_scale=3.0", "minimax.steps=15", "generate.d3hr.num_groups=99")
    res, lines = _run(run, mnist_shards, *sets, dry_run=True)
    assert res.ran() == ["report"], lines  # generate.d3hr.* is read by gen-d3hr only, which is not run here

    res, lines = _run(run, mnist_shards, *sets, force=("gen-dit",), dry_run=True)
    assert res.ran() == ["gen-dit", "evaluate", "report"], lines
    assert (
        "[gen-dit] would run: --force" in lines and "[evaluate] would run: upstream gen-dit reruns" in lines
    )
    assert "[package] would skip: unchanged" in " ".join(lines)  # package reads gen-minimax

    res, lines = _run(run, mnist_shards, *sets, force=("gen-dit",))
    assert res.ran() == ["gen-dit", "evaluate", "report"], lines
    assert read_done(run / "eval")["inputs"]["upstream.gen-dit"] == read_done(run / "gen-dit")["fingerprint"]


def test_model_pretrained_skips_pretraining_and_minimax_starts_from_it(first_run, mnist_shards, tmp_path):
    from ddkit.models.checkpoint import load_checkpoint

    weights = first_run / "pretrain"
    run = tmp_path / "run"
    res, lines = _run(
        run, mnist_shards, f"model.pretrained={weights}", "methods=[dit]", "minimax.lr=0.0",
        stages=("shard", "pretrain", "minimax", "generate"),
    )  # fmt: skip
    steps = {s.name: s for s in res.stages}
    assert steps["pretrain"].action == "skip" and steps["pretrain"].reason == "model.pretrained given"
    assert not (run / "pretrain").exists()
    assert steps["minimax"].action == "run" and steps["gen-dit"].action == "run"
    assert "path.model.pretrained" in read_done(run / "minimax")["inputs"]
    # At lr 0 the minimax stage leaves its initial weights as they are: they must be model.pretrained's (EMA).
    start = load_checkpoint(weights / "ckpt" / "last.pt")["ema"]
    got = load_checkpoint(run / "minimax" / "ckpt" / "last.pt")
    assert got["step"] == 10 and got["model"].keys() == start.keys()
    assert all(torch.equal(got["model"][k], start[k]) for k in start)
    assert (
        read_done(run / "gen-dit")["inputs"]["path.model.pretrained"]
        == read_done(run / "minimax")["inputs"]["path.model.pretrained"]
    )


def test_kill_9_during_training_resumes_on_rerun(first_run, mnist_shards, tmp_path):
    """``kill -9`` of ``ddkit run`` mid-minimax: no DONE, a complete periodic checkpoint (atomic writes); the
    rerun resumes the stage from it (same inputs) and finishes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from ddkit.models.checkpoint import load_checkpoint

    run = tmp_path / "run"
    sets = (
        f"model.pretrained={first_run / 'pretrain'}",
        "methods=[dit]",
        "minimax.steps=30",
        "minimax.ckpt_every=5",
    )
    args = ["run", str(ROOT / "configs" / "mnist.yaml"), "--no-progress", "--stage", "minimax"]
    for s in (f"run_dir={run}", f"data.shards={mnist_shards}", *TINY, *sets):
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    code = "import sys; from ddkit.cli import app; sys.argv[0] = 'ddkit'; app()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    ckpt = run / "minimax" / "ckpt" / "last.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and read_done(run / "minimax") is None
    killed_at = load_checkpoint(ckpt)["step"]
    assert 5 <= killed_at < 30

    res, lines = _run(run, mnist_shards, *sets, stages=("minimax",))
    steps = {s.name: s for s in res.stages}
    assert steps["minimax"].action == "resume", lines
    assert load_checkpoint(ckpt)["step"] == 30 and read_done(run / "minimax")["step"] == 30
    logged = [r["step"] for r in read_jsonl(run / "minimax" / "train_log.jsonl")]
    assert logged == list(range(5, 31, 5))  # no step logged twice, none missing


def test_a_stage_trained_by_its_own_command_is_skipped_by_ddkit_run(mnist_shards, tmp_path):
    """``ddkit train`` (and ``ddkit submit train``, the same wrapper) records the fingerprint ``ddkit run``
    would: the same config skips the stage, a changed one reruns it."""
    from typer.testing import CliRunner

    from ddkit.cli import app

    run = tmp_path / "run"
    sets = [f"run_dir={run}", f"data.shards={mnist_shards}", *TINY]
    args = ["train", "-c", str(ROOT / "configs" / "mnist.yaml"), "--stage", "pretrain", "--no-progress"]
    result = CliRunner().invoke(app, args + [a for kv in sets for a in ("--set", kv)])
    assert result.exit_code == 0, result.output
    assert "fingerprint" in read_done(run / "pretrain")
    res, lines = _run(run, mnist_shards, stages=("shard", "pretrain"), dry_run=True)
    assert _acts(res)["pretrain"] == "skip" and "[pretrain] would skip: unchanged" in " ".join(lines), lines
    res, lines = _run(run, mnist_shards, "pretrain.lr=0.0002", stages=("shard", "pretrain"), dry_run=True)
    assert _acts(res)["pretrain"] == "run", lines
