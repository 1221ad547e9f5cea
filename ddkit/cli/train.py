"""`ddkit train`: pretrain a tiny DiT or minimax-fine-tune a checkpoint (library: :mod:`ddkit.train`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ddkit import train as lib
from ddkit.cli.common import ConfigArg, SetOption, console, handle_errors, load
from ddkit.config import check_stages
from ddkit.dist import dist_env
from ddkit.stages import outside_run


@handle_errors
def train(
    config: Path | None = ConfigArg,
    stage: str = typer.Option(
        ..., "--stage", help="pretrain (tiny DiT from scratch) or minimax (fine-tune)."
    ),
    resume: str = typer.Option(
        "auto", "--resume", help="auto (continue if a checkpoint exists), never, or a checkpoint PATH."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Stop after this many steps in total (checkpointed, not marked DONE)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    sets: list[str] | None = SetOption,
) -> None:
    """Train one stage into RUN/<stage>/ (config.yaml, train_log.jsonl, ckpt/last.pt, DONE).

    Runs as one process, under `torchrun --nproc-per-node N` or under SLURM `srun` (DDP, rank 0 writes).
    """

    check_stages((stage,))
    cfg = load(config, sets)

    with outside_run(cfg, stage):  # so a later `ddkit run` skips or resumes this stage
        path = lib.train(cfg, stage, resume=resume, max_steps=max_steps, progress=not no_progress)  # type: ignore[arg-type]

    if dist_env().is_main:
        console.print(f"[green]{stage}[/] checkpoint: {path}")
