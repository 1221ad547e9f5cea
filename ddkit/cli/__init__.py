"""The ``ddkit`` command: Typer groups, one module each. No logic here: parse, load config, call the library.

Heavy imports (torch, diffusers) happen inside the commands so ``ddkit --help`` stays fast.
"""

from __future__ import annotations

import time

import typer

from ddkit import __version__
from ddkit.cli import container, data, evaluate, generate, jobs, package, run, submit, train
from ddkit.dist import process_start_monotonic

# Taken at import (CLI start-up); main() prefers the process start time from /proc when it can.
_ENTRY = time.monotonic()

app = typer.Typer(
    name="ddkit",
    help="Diffusion-based dataset distillation under a hard time budget (Minimax, DSR, D^3HR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ddkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """ddkit: turn an image dataset into a small distilled set with a diffusion model."""


app.add_typer(data.app, name="data", help="Datasets -> WebDataset shards; inspect shard sets.")
app.command("train", help="Pretrain a tiny DiT or minimax-fine-tune a checkpoint.")(train.train)
app.command("generate", help="Budgeted, sharded generation of the distilled set (DSR planner).")(generate.generate)
app.command("evaluate", help="Train students on distilled sets; test on real data.")(evaluate.evaluate)
app.command("package", help="Write or check a challenge submission.")(package.package)
app.add_typer(submit.app, name="submit", help="Submit training or generation to SLURM (submitit).")
app.add_typer(jobs.app, name="jobs", help="List, inspect and cancel ddkit SLURM jobs.")
app.add_typer(container.app, name="container", help="Build and run the Apptainer image.")
app.command("run", help="Every stage in order on one config; each skipped when complete.")(run.run)


def main() -> None:
    """The ``ddkit`` console script. As the process's own command a budget (``ddkit generate``) starts at
    the process start, so interpreter start-up and imports count; in-process callers of ``app`` (tests,
    another program) pass no start, and the budget starts at the call."""

    app(obj={"process_start": min(_ENTRY, process_start_monotonic())})


if __name__ == "__main__":
    main()
