"""The whole-run ETA line of ``ddkit run``: remaining seconds from each stage's configured work and the
rates measured so far.

Per stage still to run: training is steps left ÷ steps per second (measured in this stage's
``train_log.jsonl``, else in the other training stage scaled by batch size); generation is its time
budget (``generate.time_limit``, which it does not exceed); any other stage is its wall time from the last
run (``pipeline.json``), when there is one. A stage with neither a rate nor a previous time is listed as
not measured yet rather than guessed. Each stage's own progress bar still shows its own ETA.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from ddkit.config import TRAIN_STAGES, ExperimentConfig
from ddkit.io import read_done, read_jsonl


class RunClock:
    """Tracks one ``ddkit run``: which stages remain, what each is estimated to take, how long it has run.

    Args:
        cfg: the experiment (step counts, batch sizes, time limits, run directory).
        plan: ``(stage name, action)`` in run order; actions as :class:`ddkit.fingerprint.Decision`.
        timings: ``pipeline.json``: stage -> wall seconds of its last run.
    """

    def __init__(self, cfg: ExperimentConfig, plan: list[tuple[str, str]], timings: dict[str, Any]) -> None:
        self.cfg = cfg
        self.todo = [(n, a) for n, a in plan if a != "skip"]
        self.prior = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
        self.rates: dict[str, float] = {}  # training stage -> steps/s measured in this run
        self.t0 = time.monotonic()

    def finished(self, name: str, seconds: float) -> None:
        """Stage ``name`` ended after ``seconds``: drop it and learn its training rate."""
        self.todo = [(n, a) for n, a in self.todo if n != name]
        if name in TRAIN_STAGES:
            rate = _logged_rate(Path(self.cfg.run_dir) / name)
            if rate:
                self.rates[name] = rate

    def estimate(self, name: str, action: str) -> float | None:
        """Seconds stage ``name`` will take under ``action``, or None when nothing measured says."""
        cfg = self.cfg
        if name in TRAIN_STAGES:
            tcfg = getattr(cfg, name)
            rate = self.rates.get(name) or _logged_rate(Path(cfg.run_dir) / name) or self._scaled_rate(name)
            return max(tcfg.steps - _steps_done(Path(cfg.run_dir) / name, action), 0) / rate if rate else None
        if name.startswith("gen-"):
            return float(cfg.generate.time_limit)
        return self.prior.get(name, 0.0 if name == "report" else None)  # the report only reads files

    def _scaled_rate(self, name: str) -> float | None:
        other = "minimax" if name == "pretrain" else "pretrain"
        rate = self.rates.get(other)
        if not rate:
            return None
        return rate * getattr(self.cfg, other).batch_size / getattr(self.cfg, name).batch_size

    def line(self, name: str) -> str:
        """``[run] next: minimax (continue, ~2m10s) | 1m02s elapsed | whole run ~5m40s left + evaluate (not
        measured yet)``."""
        known, unknown, this = 0.0, [], None
        for n, a in self.todo:
            est = self.estimate(n, a)
            if n == name:
                this = est
            if est is None:
                unknown.append(n)
            else:
                known += est
        action = dict(self.todo).get(name, "run")
        head = f"[run] next: {name} ({action}" + (f", ~{fmt_seconds(this)})" if this is not None else ")")
        if unknown and not known:
            whole = f"whole run: not measured yet ({', '.join(unknown)})"
        else:
            whole = f"whole run ~{fmt_seconds(known)} left" + (
                f" + {', '.join(unknown)} (not measured yet)" if unknown else ""
            )
        return f"{head} | {fmt_seconds(time.monotonic() - self.t0)} elapsed | {whole}"


def fmt_seconds(s: float) -> str:
    """``75.4`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _logged_rate(stage_dir: Path) -> float | None:
    """Median steps/s of a training stage's ``train_log.jsonl`` lines, or None without any."""
    rates = [r["steps_per_s"] for r in read_jsonl(stage_dir / "train_log.jsonl") if r.get("steps_per_s")]
    return statistics.median(rates) if rates else None


def _steps_done(stage_dir: Path, action: str) -> int:
    """Steps a training stage starts from: its DONE step when continuing, its last logged step when resuming."""
    if action == "continue":
        return int((read_done(stage_dir) or {}).get("step", 0))
    if action == "resume":
        log = read_jsonl(stage_dir / "train_log.jsonl")
        return int(log[-1].get("step", 0)) if log else 0
    return 0
