"""`ddkit generate`: budgeted, sharded generation of the distilled set (library: :mod:`ddkit.generate`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ddkit import generate as lib
from ddkit.cli.common import ConfigArg, SetOption, console, handle_errors, load
from ddkit.io import read_json
from ddkit.methods.registry import METHODS


def _find_config(run: Optional[Path], config: Optional[Path]) -> Optional[Path]:
    """``--config``, else the run's ``config.yaml`` or a training stage's."""
    if config is None and run is not None:
        for cand in (run / "config.yaml", run / "minimax" / "config.yaml", run / "pretrain" / "config.yaml"):
            if cand.is_file():
                return cand
    return config


def _report(gen_dir: Path) -> None:
    if (gen_dir / "manifest.json").is_file():

        man = read_json(gen_dir / "manifest.json")
        console.print(
            f"[green]generated[/] {gen_dir / 'dataset.pt'}: IPC {man['ipc']} x {man['num_classes']} classes, "
            f"{man['steps']['min']}-{man['steps']['max']} steps, {man['elapsed_seconds']:.1f} s "
            f"({100 * man['budget_share_used']:.0f}% of {man['time_limit']:.0f} s)"
        )
    else:
        console.print(f"[green]shard done[/] in {gen_dir}; merge with `ddkit generate --merge` when all are")


@handle_errors
def generate(
    ctx: typer.Context,
    run: Optional[Path] = typer.Argument(
        None, help="Run directory (uses RUN/config.yaml, or a stage's config.yaml, and sets run_dir=RUN)."
    ),
    config: Optional[Path] = ConfigArg,
    method: Optional[str] = typer.Option(
        None, "--method", "-m",
        help=f"A registered method ({' | '.join(METHODS)}), or <base>+select to over-generate and select "
        "(default: generate.method).",
    ),
    time_limit: Optional[float] = typer.Option(
        None, "--time-limit", "-t", help="Seconds for the whole generation, model loading included."
    ),
    merge: bool = typer.Option(
        False, "--merge", help="Only merge finished shards into dataset.pt + manifest."
    ),
    rank: Optional[int] = typer.Option(
        None, "--rank", help="Shard index (SLURM array task); default from torchrun/srun."
    ),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Number of shards (array size)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Generation dir (default RUN/gen-<method>)."),
    force: bool = typer.Option(False, "--force", help="Rerun even when the inputs are unchanged."),
    no_progress: bool = typer.Option(False, "--no-progress", help="Hide the progress bar."),
    sets: Optional[list[str]] = SetOption,
) -> None:
    """Generate RUN/gen-<method>/ (shard-<rank>/, dataset.pt, manifest.json, grid.png, budget.png, DONE).

    The budget (--time-limit) covers the whole process, model loading included; DDKIT_T0 (Unix epoch
    seconds) makes every rank/array task share the job's start. Ranks come from torchrun/srun, or from
    --rank/--world-size for SLURM array tasks (then run `ddkit generate --merge` once all are done; the
    last rank to finish merges by itself too). Like `ddkit run`, it skips a generation whose inputs are
    unchanged and reruns a changed one (the old directory goes to RUN/.stale/); --force reruns anyway.
    """

    # As the process's own command (ddkit.cli.main passes its start) the budget starts when the process
    # started, so interpreter start-up and imports count; called in-process (tests, another command) now.
    process_start = (ctx.obj or {}).get("process_start")
    t0 = time.monotonic() if process_start is None else process_start
    config = _find_config(run, config)
    sets = list(sets or [])
    if run is not None and not any(s.startswith("run_dir=") for s in sets):
        sets.insert(0, f"run_dir={run}")
    cfg = load(config, sets)

    m = method or cfg.generate.method
    gen_dir = out or lib.gen_dir_for(cfg, m)
    if merge:
        path = lib.merge_generation(cfg, m, gen_dir)
        console.print(f"[green]merged[/] {path / 'dataset.pt'}")
        return
    gen_dir = lib.generate(cfg, method=m, time_limit=time_limit, out_dir=gen_dir, rank=rank, world_size=world_size,
                           progress=not no_progress, t0=t0, force=force,
                           log=lambda line: console.print(line, markup=False))  # fmt: skip
    _report(gen_dir)
    if process_start is not None:
        # The budget covers the process's whole life; torch's interpreter teardown (about 1 s idle, several
        # under load) would run after the deadline the planner kept, so the process ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
