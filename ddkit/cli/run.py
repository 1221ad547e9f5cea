"""``ddkit run CONFIG``: the whole pipeline, each stage rerun exactly when its inputs changed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ddkit.cli.common import SetOption, console, handle_errors
from ddkit.config import absolute_paths, load_config
from ddkit.estimate import estimate_run, format_seconds, load_gpu_bench, peak_flops
from ddkit.pipeline import QUICK, STAGES, run_pipeline
from ddkit.report import results_table


@handle_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML; default: the embedded MNIST-5k."),
    sets: Optional[list[str]] = SetOption,
    quick: bool = typer.Option(False, "--quick", help="The short CI profile (ddkit.pipeline.QUICK)."),
    stage: Optional[list[str]] = typer.Option(
        None,
        "--stage",
        help="Run only these stages (repeatable): shard pretrain minimax generate evaluate package report.",
    ),
    force: Optional[list[str]] = typer.Option(
        None,
        "--force",
        help="Rerun this stage and everything downstream (repeatable): a --stage name or gen-METHOD.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print which stages would run and why, and each stage's estimated time; run nothing."
    ),
    accelerator: str = typer.Option(
        "h100", "--accelerator", help="--dry-run estimate: h100, h100-pcie, h200, gh200, a100, l40s, a10 or cpu."
    ),
    gpus: int = typer.Option(1, "--gpus", min=1, help="--dry-run estimate: devices working in parallel."),
    gpu_bench: Optional[Path] = typer.Option(
        None, "--gpu-bench", help="--dry-run estimate: throughput measured by `python bench/gpu.py --json FILE`."
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Plain log lines instead of progress bars."
    ),
) -> None:
    """Run shard -> pretrain -> minimax -> generate -> evaluate -> package -> report on one config.

    A stage runs when the fingerprint of its inputs (the config keys it reads, upstream stages, shard index,
    ddkit code identity) differs from its DONE record, and then everything downstream runs too.
    """

    overrides = (*QUICK, *(sets or ())) if quick else tuple(sets or ())
    cfg = absolute_paths(load_config(config, overrides))
    if dry_run:  # a bad --accelerator fails before the stage plan

        peak_flops(accelerator)
    stages = tuple(stage) if stage else STAGES
    res = run_pipeline(
        cfg, stages=stages, force=tuple(force or ()), dry_run=dry_run, progress=not no_progress,
        log=lambda s: console.print(s, markup=False, highlight=False),
    )  # fmt: skip
    if dry_run:
        _print_estimate(cfg, accelerator, gpus, gpu_bench)
        return

    table = Table(title=f"ddkit run: {cfg.name}" + (" (quick)" if quick else ""))
    for col in ("stage", "status", "seconds", "why"):
        table.add_column(col)
    for r in res.stages:
        status = r.status if r.action in ("skip", "run") else f"{r.status} ({r.action})"
        table.add_row(r.name, status, f"{r.seconds:.1f}", r.reason)
    console.print(table)
    if res.results:
        t = Table(title="Test accuracy (%)")
        for col in ("set", "IPC", "accuracy", "runs"):
            t.add_column(col)
        for row in results_table(res.results):
            t.add_row(*row)
        console.print(t)
    if res.report:
        console.print(f"report: {res.report}")


def _print_estimate(cfg, accelerator: str, gpus: int, gpu_bench: Optional[Path]) -> None:
    """The per-stage estimate of :func:`ddkit.estimate.estimate_run` as a table, then its assumptions."""

    bench = load_gpu_bench(gpu_bench) if gpu_bench else None
    est = estimate_run(cfg, accelerator, gpus, bench=bench)
    t = Table(title=f"Estimate: {cfg.name} on {gpus} x {accelerator}")
    for col in ("stage", "work", "PFLOP", "compute", "loading", "estimate"):
        t.add_column(col)
    for st in est.stages:
        t.add_row(st.stage, st.work, f"{st.flops / 1e15:.3g}", format_seconds(st.compute_s),
                  format_seconds(st.data_s), format_seconds(st.seconds))
    t.add_row("total", "", "", "", "", format_seconds(est.seconds))
    console.print(t)
    console.print("assumptions:")
    for a in est.assumptions:
        console.print(f"  - {a}", markup=False, highlight=False)
