"""``ddkit run``: every stage in order on one experiment config, each skipped when its output is complete.

shard -> pretrain -> minimax -> generate (one run per method in ``cfg.methods``) -> evaluate -> package ->
report. Each stage is also its own command (``ddkit data shard``, ``ddkit train``, ...); this module only
sequences them through their library functions, so a rerun after a crash or a preemption resumes at the
first incomplete stage (and the training stages resume from their last checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddkit.config import ExperimentConfig, load_config
from ddkit.io import atomic_write_json, is_done, read_json, write_run_config

STAGES = ("shard", "pretrain", "minimax", "generate", "evaluate", "package", "report")

# The --quick profile: the whole pipeline in a few minutes on 2 CPU cores, for CI. It keeps every stage and
# every method, only shorter: enough training that samples are digits, 1 evaluation repeat, short epochs.
QUICK = (
    "pretrain.steps=1000",
    "pretrain.batch_size=64",
    "pretrain.ckpt_every=125",
    "minimax.steps=60",
    "minimax.batch_size=64",
    "minimax.warmup_steps=20",
    "minimax.ckpt_every=30",
    "generate.time_limit=30",
    # A 1,000-step model reads its labels less well than the demo's 2,400-step one: guide it at the paper's
    # 4.0 (quick run: minimax 52.3 %, plain DiT 48.9 %), not the demo's 2.0, which suits the stronger model.
    "generate.cfg_scale=4.0",
    "generate.steps_max=25",
    "generate.d3hr.max_images_per_class=20",
    "generate.d3hr.num_groups=256",
    "evaluate.epochs=100",
    "evaluate.full_epochs=3",
    "evaluate.repeats=1",
)


@dataclass
class StageRecord:
    """One stage's outcome: ``status`` is ``ran`` or ``skipped``; ``seconds`` is this invocation's wall time."""

    name: str
    status: str
    seconds: float
    output: str


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[StageRecord] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None


def quick_config(path: str | Path | None, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """Load ``path`` with the :data:`QUICK` profile applied before the user's own overrides."""
    return load_config(path, (*QUICK, *overrides))


def run_pipeline(
    cfg: ExperimentConfig,
    *,
    stages: tuple[str, ...] = STAGES,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run ``stages`` of the experiment in order, skipping complete ones.

    Returns:
        A :class:`PipelineResult` with per-stage records, the evaluation results and the report path.

    Raises:
        DdkitError: from any stage (bad data, missing weights, budget too short, ...); completed stages stay.
    """
    from ddkit.hardware import configure_threads

    log(f"threads: {configure_threads()} (usable CPUs or OMP_NUM_THREADS)")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg)
    result = PipelineResult(run_dir=run_dir)
    timings_path = run_dir / "pipeline.json"
    timings: dict[str, Any] = read_json(timings_path) if timings_path.exists() else {}

    for name in STAGES:
        if name not in stages:
            continue
        t = time.monotonic()
        status, output = _STAGE_FNS[name](cfg, progress, log)
        seconds = time.monotonic() - t
        if status == "ran":
            timings[name] = round(seconds, 2)
            atomic_write_json(timings_path, timings)
        result.stages.append(StageRecord(name, status, seconds, str(output)))
        log(f"[{name}] {status} in {seconds:.1f}s -> {output}")

    eval_path = run_dir / "eval" / "results.json"
    if eval_path.exists():
        result.results = read_json(eval_path)
    if (run_dir / "report.md").exists():
        result.report = run_dir / "report.md"
    return result


# ----------------------------------------------------------------------------------------------------------
# Stages. Each returns ("ran" | "skipped", output path).
# ----------------------------------------------------------------------------------------------------------
def _shard(cfg: ExperimentConfig, progress: bool, log: Callable[[str], None]) -> tuple[str, Path]:
    from ddkit.data import shard_dataset

    out = Path(cfg.data.shards)
    if (out / "dataset.json").is_file():
        return "skipped", out
    return "ran", shard_dataset(cfg.data, out)


def _train_stage(stage: str) -> Callable[..., tuple[str, Path]]:
    def fn(cfg: ExperimentConfig, progress: bool, log: Callable[[str], None]) -> tuple[str, Path]:
        from ddkit.train import train

        stage_dir = Path(cfg.run_dir) / stage
        if is_done(stage_dir):
            return "skipped", stage_dir
        train(cfg, stage, resume="auto", progress=progress)
        return "ran", stage_dir

    return fn


def _generate(cfg: ExperimentConfig, progress: bool, log: Callable[[str], None]) -> tuple[str, Path]:
    from ddkit.generate import generate, merge

    ran = False
    for method in cfg.methods:
        gen_dir = Path(cfg.run_dir) / f"gen-{method}"
        if is_done(gen_dir) and (gen_dir / "dataset.pt").exists():
            continue
        gen_dir = generate(cfg, method=method, progress=progress)
        if not (gen_dir / "dataset.pt").exists():
            merge(gen_dir)
        ran = True
    return ("ran" if ran else "skipped"), Path(cfg.run_dir)


def _evaluate(cfg: ExperimentConfig, progress: bool, log: Callable[[str], None]) -> tuple[str, Path]:
    from ddkit.evaluate import evaluate

    out = Path(cfg.run_dir) / "eval"
    if is_done(out):
        return "skipped", out
    distilled = {m: Path(cfg.run_dir) / f"gen-{m}" / "dataset.pt" for m in cfg.methods}
    evaluate(distilled, cfg.data.shards, cfg.evaluate, out_dir=out, progress=progress)
    return "ran", out


def _package(cfg: ExperimentConfig, progress: bool, log: Callable[[str], None]) -> tuple[str, Path]:
    from ddkit.package import package_run

    method = cfg.methods[0]
    gen_dir = Path(cfg.run_dir) / f"gen-{method}"
    out = Path(cfg.package.out) if cfg.package.out else Path(cfg.run_dir) / _package_name(cfg.package.format)
    if out.exists():
        return "skipped", out
    return "ran", package_run(gen_dir, fmt=cfg.package.format, out=out, dataset=cfg.package.dataset)


def _package_name(fmt: str) -> str:
    return {"eccv2024": "submission.zip", "folder": "distilled", "webdataset": "distilled-wds"}.get(
        fmt, "generator"
    )


def _report(cfg: ExperimentConfig, progress: bool, log: Callable[[str], None]) -> tuple[str, Path]:
    from ddkit.report import write_report

    return "ran", write_report(cfg)


_STAGE_FNS: dict[str, Callable[..., tuple[str, Path]]] = {
    "shard": _shard,
    "pretrain": _train_stage("pretrain"),
    "minimax": _train_stage("minimax"),
    "generate": _generate,
    "evaluate": _evaluate,
    "package": _package,
    "report": _report,
}

