"""``ddkit run CONFIG``: the whole pipeline, each stage skipped when complete."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ddkit.cli.common import SetOption, console, handle_errors


@handle_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="Experiment YAML; default: the embedded MNIST-5k."),
    sets: Optional[list[str]] = SetOption,
    quick: bool = typer.Option(False, "--quick", help="The short CI profile (ddkit.pipeline.QUICK)."),
    stage: Optional[list[str]] = typer.Option(
        None, "--stage", help="Run only these stages (repeatable): shard pretrain minimax generate evaluate package report."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Plain log lines instead of progress bars."),
) -> None:
    """Run shard -> pretrain -> minimax -> generate -> evaluate -> package -> report on one config."""
    from rich.table import Table

    from ddkit.config import absolute_paths, load_config
    from ddkit.errors import ConfigError
    from ddkit.pipeline import QUICK, STAGES, run_pipeline
    from ddkit.report import results_table

    overrides = (*QUICK, *(sets or ())) if quick else tuple(sets or ())
    cfg = absolute_paths(load_config(config, overrides))
    stages = tuple(stage) if stage else STAGES
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"--stage {s}: unknown stage (known: {', '.join(STAGES)})")
    res = run_pipeline(cfg, stages=stages, progress=not no_progress, log=lambda s: console.print(s, markup=False, highlight=False))

    table = Table(title=f"ddkit run: {cfg.name}" + (" (quick)" if quick else ""))
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for r in res.stages:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", r.output)
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
