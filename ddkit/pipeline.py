"""``ddkit run``: every stage in order on one experiment config, each rerun exactly when its inputs changed.

shard -> pretrain -> minimax -> gen-METHOD (one node per method in ``cfg.methods``) -> evaluate -> package
-> report. Each stage is also its own command (``ddkit data shard``, ``ddkit train``, ...); this module
only sequences them through their library functions.

Which stage runs is the make rule over :mod:`ddkit.fingerprint`: :data:`NODES` declares, per stage, the
config keys it reads, the upstream stages whose outputs it reads and the weights paths it loads. A stage
is skipped when its ``DONE`` record holds the fingerprint of exactly those inputs; a changed one reruns it
and every stage downstream. A training stage whose only change is a larger step count trains on from its
checkpoint; an interrupted stage started with the same inputs resumes; a stage rerun from scratch has its
old directory set aside under ``RUN/.stale/`` first, so no stale checkpoint or shard is ever resumed.
The shard stage always checks an existing shard set against ``data.*`` (:func:`ddkit.data.shard_dataset`)
and its fingerprint is the sha256 of its ``dataset.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddkit.config import TRAIN_STAGES, ExperimentConfig, check_stages, load_config, to_dict
from ddkit.errors import ConfigError, DdkitError
from ddkit.eta import RunClock
from ddkit.fingerprint import Decision, decide, file_digest, fingerprint, read_records, write_start
from ddkit.generate import generate
from ddkit.hardware import configure_threads
from ddkit.io import atomic_write_json, mark_done, read_done, read_json, set_aside, write_run_config
from ddkit.methods import registry
from ddkit.report import write_report
from ddkit.stages import STALE, Node, graph, node_inputs, packaged, remember, stage_dir, version
from ddkit.train import train

# Names for --stage and --force, in order; "generate" stands for every gen-METHOD node.
STAGES = ("shard", "pretrain", "minimax", "generate", "evaluate", "package", "report")

# The --quick profile: the whole pipeline in a few minutes on 2 CPU cores, for CI. It keeps every stage and
# every method, only shorter: fewer minimax steps, half the generation budget, 1 evaluation repeat of half the
# epochs (the students were 518 s of the 689-s CI fixture on a 2-core AVX2 EPYC). The
# pretrain keys matter only with model.pretrained=null (the demo starts from the shipped DiT).
QUICK = (
    "pretrain.steps=1000", "pretrain.batch_size=64", "pretrain.ckpt_every=125",
    "minimax.steps=60", "minimax.batch_size=64", "minimax.warmup_steps=20", "minimax.ckpt_every=30",
    "generate.time_limit=30", "generate.steps_max=25",
    "generate.d3hr.max_images_per_class=20", "generate.d3hr.num_groups=256",
    "evaluate.epochs=50", "evaluate.full_epochs=3", "evaluate.repeats=1",
)  # fmt: skip

@dataclass
class StageRecord:
    """One stage's outcome: ``status`` is ``ran``, ``skipped`` or (``--dry-run``) ``planned``; ``action``
    is the :class:`ddkit.fingerprint.Decision` (skip | run | resume | continue) and ``reason`` its line;
    ``seconds`` is this invocation's wall time."""

    name: str
    status: str
    seconds: float
    output: str
    action: str = ""
    reason: str = ""


@dataclass
class PipelineResult:
    run_dir: Path
    stages: list[StageRecord] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None

    def ran(self) -> list[str]:
        """Names of the stages that ran (or, after ``--dry-run``, would run)."""
        return [s.name for s in self.stages if s.action not in ("", "skip")]


@dataclass
class _Step:
    node: Node
    decision: Decision
    inputs: dict[str, Any]


def quick_config(path: str | Path | None, overrides: tuple[str, ...] = ()) -> ExperimentConfig:
    """Load ``path`` with the :data:`QUICK` profile applied before the user's own overrides."""
    return load_config(path, (*QUICK, *overrides))


def check_selection(cfg: ExperimentConfig, stages: tuple[str, ...], force: tuple[str, ...]) -> None:
    """Check ``--stage`` names against :data:`STAGES` and ``--force`` names against them plus the gen-METHOD
    nodes of ``cfg.methods`` (:func:`ddkit.config.check_stages`).

    Raises:
        ConfigError: an unknown name (one line naming the option and the known names).
    """
    check_stages(stages, STAGES)
    check_stages(force, (*STAGES, *(f"gen-{m}" for m in cfg.methods)), "--force")


def plan(
    cfg: ExperimentConfig, *, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()
) -> list[_Step]:
    """Each stage's decision and inputs, reading only the run directory and the shard index.

    Args:
        stages: the ``--stage`` selection (others are skipped, and their outputs taken as they are).
        force: ``--force`` names (stage names, gen-METHOD, or ``generate`` for every generation).

    Raises:
        DataError: the existing shard set does not match ``data.*``.
        ConfigError: ``--force shard`` (a shard set is shared between runs: delete it to rebuild it).
    """
    if "shard" in force:

        raise ConfigError(
            f"--force shard: shard sets are shared between runs; delete {cfg.data.shards} to rebuild it"
        )
    code = version()
    cfgd = to_dict(cfg)
    fps: dict[str, str] = {}
    running: set[str] = set()
    steps = []
    for node in graph(cfg):
        inputs: dict[str, Any] = {}
        if node.off:
            d = Decision("skip", node.off)
        elif node.name == "shard":
            d, fps["shard"] = _shard_decision(cfg)
        elif node.name == "report":
            d = Decision("run", "always rebuilt from the run directory")
        else:
            inputs = node_inputs(node, cfgd, fps, code)
            d = _decision(node, cfg, inputs, force, tuple(u for u in node.upstream if u in running))
            fps[node.name] = fingerprint(inputs)
        if node.group not in stages and not node.off:
            d = Decision("skip", "not selected (--stage)")
            rec = read_done(stage_dir(cfg, node)) if node.name not in ("shard", "report") else None
            if rec and "fingerprint" in rec:
                fps[node.name] = rec["fingerprint"]  # downstream reads what is on disk
        if d.runs:
            running.add(node.name)
        steps.append(_Step(node, d, inputs))
    return steps


def _shard_decision(cfg: ExperimentConfig) -> tuple[Decision, str]:
    from ddkit.data import is_complete, shard_dataset

    out = Path(cfg.data.shards)
    if not is_complete(out):
        return Decision("run", f"no complete shard set at {out}"), "<to be written>"
    shard_dataset(cfg.data, out)  # a complete set: only checks dataset.json against data.* (DataError if not)
    return Decision("skip", "dataset.json matches data.*"), file_digest(out / "dataset.json")


def _decision(
    node: Node,
    cfg: ExperimentConfig,
    inputs: dict[str, Any],
    force: tuple[str, ...],
    upstream_runs: tuple[str, ...],
) -> Decision:
    d = stage_dir(cfg, node)
    done, started = read_records(d)
    return decide(
        inputs, done, started,
        forced=node.name in force or node.group in force,
        upstream_runs=upstream_runs,
        growable=node.growable,
        has_output=_output(cfg, node).exists(),
        has_partial=d.is_dir() and any(d.iterdir()),
    )  # fmt: skip


def _output(cfg: ExperimentConfig, node: Node) -> Path:
    """The file or directory that must exist for a DONE stage to count as complete."""
    from ddkit.models.checkpoint import checkpoint_path

    d = stage_dir(cfg, node)
    if node.group in TRAIN_STAGES:
        return checkpoint_path(d)
    if node.group == "generate":
        return d / "dataset.pt"
    if node.name == "evaluate":
        return d / "results.json"
    if node.name == "package":
        return package_out(cfg)
    return d


def package_out(cfg: ExperimentConfig) -> Path:
    """The package stage's output path (``package.out``, else a name from the format under RUN)."""
    if cfg.package.out:
        return Path(cfg.package.out)
    names = {"eccv2024": "submission.zip", "folder": "distilled", "webdataset": "distilled-wds"}
    return Path(cfg.run_dir) / names.get(cfg.package.format, "generator")


# ----------------------------------------------------------------------------------------------------------
# Running the plan
# ----------------------------------------------------------------------------------------------------------
def run_pipeline(
    cfg: ExperimentConfig,
    *,
    stages: tuple[str, ...] = STAGES,
    force: tuple[str, ...] = (),
    dry_run: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PipelineResult:
    """Run the stages whose inputs changed (:func:`plan`), in order; with ``dry_run`` only log the plan.

    Returns:
        A :class:`PipelineResult` with per-stage records (action and reason), the evaluation results and the
        report path.

    Raises:
        ConfigError: an unknown ``stages`` or ``force`` name (:func:`check_selection`).
        DdkitError: from any stage (bad data, missing weights, budget too short, ...); completed stages stay.
    """

    check_selection(cfg, stages, force)
    log(f"threads: {configure_threads()} (usable CPUs or OMP_NUM_THREADS)")
    run_dir = Path(cfg.run_dir)
    result = PipelineResult(run_dir=run_dir)
    steps = plan(cfg, stages=stages, force=force)
    if dry_run:
        for s in steps:
            result.stages.append(
                StageRecord(s.node.name, "planned", 0.0, "", s.decision.action, s.decision.reason)
            )
            log(f"[{s.node.name}] would {s.decision.action}: {s.decision.reason}")
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg)
    timings_path = run_dir / "pipeline.json"
    timings: dict[str, Any] = read_json(timings_path) if timings_path.exists() else {}
    clock = RunClock(cfg, [(s.node.name, s.decision.action) for s in steps], timings)
    fps: dict[str, str] = {}
    code, cfgd = version(), to_dict(cfg)
    for s in steps:
        node, d = s.node, s.decision
        if not d.runs:
            remember(cfg, node, fps)
            result.stages.append(
                StageRecord(node.name, "skipped", 0.0, str(_output(cfg, node)), d.action, d.reason)
            )
            log(f"[{node.name}] skipped: {d.reason}")
            continue
        if node.name != "report":  # the report only reads files
            log(clock.line(node.name))
        inputs = node_inputs(node, cfgd, fps, code) if s.inputs else {}  # with the shards' real digest
        t = time.monotonic()
        output = _execute(cfg, node, d, inputs, progress)
        seconds = time.monotonic() - t
        clock.finished(node.name, seconds)
        if node.name == "shard":
            fps["shard"] = file_digest(Path(cfg.data.shards) / "dataset.json")
        elif inputs:
            fps[node.name] = fingerprint(inputs)
        timings[node.name] = round(seconds, 2)
        atomic_write_json(timings_path, timings)
        result.stages.append(StageRecord(node.name, "ran", seconds, str(output), d.action, d.reason))
        log(f"[{node.name}] ran in {seconds:.1f}s -> {output} ({d.action}: {d.reason})")

    eval_path = run_dir / "eval" / "results.json"
    if eval_path.exists():
        result.results = read_json(eval_path)
    if (run_dir / "report.md").exists():
        result.report = run_dir / "report.md"
    return result


def _execute(cfg: ExperimentConfig, node: Node, d: Decision, inputs: dict[str, Any], progress: bool) -> Path:
    """Prepare the stage directory for ``d``, run the stage, stamp its DONE record with the fingerprint."""
    sdir = stage_dir(cfg, node)
    if inputs:
        if d.action == "run":
            _clear(cfg, node, sdir)
        sdir.mkdir(parents=True, exist_ok=True)
        write_start(sdir, inputs)
    output = _STAGE_FNS[node.group](cfg, node, progress)
    if inputs:
        rec = read_done(sdir)
        if rec is None and node.name != "package":

            raise DdkitError(f"{sdir}: stage {node.name} returned without writing DONE")
        mark_done(
            sdir, {**(rec or {}), "output": str(output)}, fingerprint=fingerprint(inputs), inputs=inputs
        )
    return output


def _clear(cfg: ExperimentConfig, node: Node, sdir: Path) -> None:
    """Make sure nothing of an earlier run with other inputs is resumed or reused.

    Training and generation resume from what their directory holds (checkpoint, finished shards): the
    directory is set aside (``RUN/.stale/<stage>``). Evaluation keeps its directory: ``runs.jsonl`` caches each
    student run under a key of its exact inputs (set file sha256, protocol, epochs, seed, ...), so only
    unchanged runs are reused; its DONE goes. The package is rewritten atomically; its DONE goes.
    """
    if node.group in ("pretrain", "minimax", "generate"):
        set_aside(sdir, Path(cfg.run_dir) / STALE)
    else:
        (sdir / "DONE").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# Stages: each runs one library function and returns its output path.
# ----------------------------------------------------------------------------------------------------------
def _shard(cfg: ExperimentConfig, node: Node, progress: bool) -> Path:
    from ddkit.data import shard_dataset

    return shard_dataset(cfg.data, Path(cfg.data.shards), progress=progress)


def _train(cfg: ExperimentConfig, node: Node, progress: bool) -> Path:
    train(cfg, node.name, resume="auto", progress=progress)
    return stage_dir(cfg, node)


def _generate(cfg: ExperimentConfig, node: Node, progress: bool) -> Path:
    method = node.name.removeprefix("gen-")
    # What a method computes once from real data before any budget (D^3HR's statistics, the selection
    # encoder), as training comes before it; `ddkit generate` alone spends its budget on it instead.
    registry.build(method, cfg).precompute(progress)
    # The pipeline decided this stage itself (_execute): generate() must not decide it again.
    return generate(cfg, method=method, progress=progress, follow_changes=False, merge_if_complete=True)


def _evaluate(cfg: ExperimentConfig, node: Node, progress: bool) -> Path:
    from ddkit.evaluate import evaluate

    out = stage_dir(cfg, node)
    distilled = {m: Path(cfg.run_dir) / f"gen-{m}" / "dataset.pt" for m in cfg.methods}
    evaluate(distilled, cfg.data.shards, cfg.evaluate, out_dir=out, progress=progress)
    return out


def _package(cfg: ExperimentConfig, node: Node, progress: bool) -> Path:
    from ddkit.package import package_run

    gen_dir = Path(cfg.run_dir) / f"gen-{packaged(cfg)}"
    return package_run(gen_dir, fmt=cfg.package.format, out=package_out(cfg), dataset=cfg.package.dataset)


def _report(cfg: ExperimentConfig, node: Node, progress: bool) -> Path:
    return write_report(cfg)


_STAGE_FNS: dict[str, Callable[[ExperimentConfig, Node, bool], Path]] = {
    "shard": _shard,
    "pretrain": _train,
    "minimax": _train,
    "generate": _generate,
    "evaluate": _evaluate,
    "package": _package,
    "report": _report,
}
