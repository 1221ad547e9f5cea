"""`ddkit jobs`: list this user's ddkit SLURM jobs, show a job's logs, cancel one (library: :mod:`ddkit.cluster`)."""

from __future__ import annotations

import typer
from rich.table import Table

from ddkit.cli.common import console, handle_errors
from ddkit.errors import ClusterError

app = typer.Typer(invoke_without_command=True)


@app.callback(invoke_without_command=True)
@handle_errors
def jobs(
    ctx: typer.Context,
    days: int = typer.Option(7, "--days", help="Show jobs submitted in the last N days."),
) -> None:
    """List this user's ddkit jobs (names ddkit-*) and their states as a table."""
    if ctx.invoked_subcommand is not None:
        return

    from ddkit import cluster

    rows = cluster.list_jobs(days=days)
    if not rows:
        console.print(f"no ddkit jobs in the last {days} day(s)")
        return
    colors = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "REQUEUED": "yellow"}
    table = Table(title="ddkit jobs")
    for col in ("job", "name", "state", "partition", "elapsed", "nodes"):
        table.add_column(col, no_wrap=True)
    table.add_column("folder", overflow="fold")
    for r in rows:
        color = colors.get(r.state, "red")
        table.add_row(
            r.job_id, r.name, f"[{color}]{r.state}[/]", r.partition, r.elapsed, r.nodes, r.folder or ""
        )
    console.print(table)


@app.command("logs")
@handle_errors
def logs(
    job_id: str = typer.Argument(..., metavar="ID", help="Job id (array task: JOB_TASK)."),
    err: bool = typer.Option(False, "--err", help="Show stderr instead of stdout."),
    tail: int | None = typer.Option(None, "--tail", "-n", help="Only the last N lines."),
) -> None:
    """Print a job's log (task 0): stdout, or stderr with --err."""
    from ddkit import cluster

    out, errp = cluster.log_paths(job_id)
    path = errp if err else out
    if not path.is_file():
        raise ClusterError(f"job {job_id}: no log yet at {path} (pending, or the job folder was removed)")
    lines = path.read_text(errors="replace").splitlines()
    if tail is not None:
        lines = lines[-tail:] if tail > 0 else []
    typer.echo("\n".join(lines))


@app.command("cancel")
@handle_errors
def cancel(
    job_id: str = typer.Argument(..., metavar="ID", help="Job id (array: JOB for all tasks)."),
) -> None:
    """Cancel a job (scancel)."""
    from ddkit import cluster

    cluster.cancel(job_id)
    console.print(f"cancelled {job_id}")
