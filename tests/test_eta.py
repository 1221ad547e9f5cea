"""ddkit.eta: the whole-run ETA line of ``ddkit run`` from configured work and measured rates."""

from __future__ import annotations

from ddkit.config import load_config
from ddkit.eta import RunClock, fmt_seconds
from ddkit.io import append_jsonl, mark_done


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (4.4, 75.4, 3725)] == ["4s", "1m15s", "1h02m"]


def test_estimates_from_steps_rates_budgets_and_previous_times(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "minimax.steps=300", "pretrain.batch_size=64",
                             "minimax.batch_size=128", "generate.time_limit=30"])  # fmt: skip
    plan = [("pretrain", "skip"), ("minimax", "continue"), ("gen-minimax", "run"), ("evaluate", "run"),
            ("package", "run"), ("report", "run")]  # fmt: skip
    clock = RunClock(cfg, plan, {"evaluate": 100.0})
    # Nothing measured for the minimax stage or the package yet: listed, not guessed.
    assert clock.estimate("minimax", "continue") is None
    assert "whole run ~2m10s left + minimax, package (not measured yet)" in clock.line("minimax")
    # The pretrain stage's rate, scaled by batch size (64 -> 128: half the steps per second).
    append_jsonl(tmp_path / "pretrain" / "train_log.jsonl", {"step": 10, "steps_per_s": 4.0})
    clock.finished("pretrain", 1.0)
    mark_done(tmp_path / "minimax", {"step": 100})
    assert clock.estimate("minimax", "continue") == 200 / 2.0
    # Its own log, once there is one, wins; a continued stage counts only the steps still to do.
    append_jsonl(tmp_path / "minimax" / "train_log.jsonl", {"step": 100, "steps_per_s": 1.0})
    assert clock.estimate("minimax", "continue") == 200.0
    assert clock.estimate("minimax", "run") == 300.0
    clock.finished("minimax", 200.0)
    assert clock.line("gen-minimax").endswith("whole run ~2m10s left + package (not measured yet)")
