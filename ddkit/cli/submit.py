"""`ddkit submit`: send training or generation to SLURM through submitit (library: :mod:`ddkit.cluster`).

Every option overrides the config's ``slurm`` section; the request is checked against ``sinfo`` before
anything is submitted, so a wrong partition or an impossible request fails at once with one line.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from ddkit.cli.common import ConfigArg, SetOption, handle_errors, load
from ddkit.config import check_stages, replace
from ddkit.errors import ConfigError

app = typer.Typer(no_args_is_help=True)

_PARTITION = typer.Option(
    None, "--partition", "-p", help="SLURM partition (default: slurm.partition, 'gpu')."
)
_TIME = typer.Option(None, "--time", "-t", help="SLURM time limit: MM, HH:MM:SS or D-HH:MM:SS.")
_ACCOUNT = typer.Option(None, "--account", "-A", help="SLURM account.")
_QOS = typer.Option(None, "--qos", help="SLURM quality of service.")
_CONSTRAINT = typer.Option(None, "--constraint", help="SLURM node features (e.g. a100).")
_CPUS = typer.Option(None, "--cpus-per-task", help="CPUs per task (one task per GPU).")
_MEM = typer.Option(None, "--mem-gb", help="Memory per node in GB.")
_CONTAINER = typer.Option(None, "--container", help="Apptainer image: run the job's Python inside it.")
_BIND = typer.Option(None, "--bind", help="Extra apptainer bind SRC[:DST] (repeatable).")
_WAIT = typer.Option(False, "--wait", help="Block until the job ends and print its result.")
_DRY = typer.Option(False, "--dry-run", help="Check and print the batch script; submit nothing.")


def _slurm_overrides(cfg, **opts: Any):
    changes = {k: v for k, v in opts.items() if v is not None}
    if "binds" in changes:
        changes["binds"] = tuple(cfg.slurm.binds) + tuple(changes["binds"])
    return dataclasses.replace(cfg.slurm, **changes)


def _print_jobs(jobs: list, folder: Path) -> None:
    # Plain echo, not rich: ids and paths must survive pipes and narrow terminals unwrapped.
    for job in jobs:
        typer.echo(f"submitted {job.job_id}  (logs: ddkit jobs logs {job.job_id})")
    typer.echo(f"job folder: {folder}")


@app.command("train")
@handle_errors
def train(
    config_arg: Path | None = typer.Argument(None, metavar="[CONFIG]", help="Experiment YAML (same as -c)."),
    config: Path | None = ConfigArg,
    stage: str = typer.Option("minimax", "--stage", help="pretrain or minimax."),
    partition: str | None = _PARTITION,
    nodes: int | None = typer.Option(None, "--nodes", "-N", help="Nodes."),
    gpus_per_node: int | None = typer.Option(None, "--gpus-per-node", "-G", help="GPUs (= tasks) per node."),
    cpus_per_task: int | None = _CPUS,
    mem_gb: int | None = _MEM,
    time: str | None = _TIME,
    account: str | None = _ACCOUNT,
    qos: str | None = _QOS,
    constraint: str | None = _CONSTRAINT,
    container: str | None = _CONTAINER,
    bind: list[str] | None = _BIND,
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many steps (not DONE)."),
    wait: bool = _WAIT,
    dry_run: bool = _DRY,
    sets: list[str] | None = SetOption,
) -> None:
    """Submit `ddkit train --stage STAGE` as one checkpointable job (one srun task per GPU).

    On preemption or near the time limit the job checkpoints and requeues itself; the restart resumes.
    """
    from ddkit import cluster

    if config_arg is not None and config is not None and config_arg != config:
        raise ConfigError(f"CONFIG {config_arg} and --config {config}: give one")
    check_stages((stage,))
    cfg = load(config_arg or config, sets)
    slurm = _slurm_overrides(
        cfg,
        partition=partition,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        mem_gb=mem_gb,
        time=time,
        account=account,
        qos=qos,
        constraint=constraint,
        container=container,
        binds=tuple(bind) if bind else None,
    )
    cfg = replace(cfg, slurm=slurm)
    if dry_run:
        tasks = max(1, slurm.gpus_per_node)
        cluster.preflight(slurm, tasks_per_node=tasks)
        folder = cluster.job_folder(cfg)
        params = cluster.slurm_parameters(
            slurm,
            name=f"{cluster.JOB_PREFIX}train-{stage}-{cfg.name}",
            time_min=cluster.parse_time(slurm.time),
            tasks_per_node=tasks,
            gpus_per_node=slurm.gpus_per_node,
        )
        typer.echo(cluster.sbatch_script(folder, params, cluster.job_python(cfg, folder)))
        return
    job = cluster.submit_train(cfg, stage, max_steps=max_steps)
    _print_jobs([job], cluster.job_folder(cfg))
    if wait:
        typer.echo(f"result: {cluster.wait_result(job)}")


@app.command("generate")
@handle_errors
def generate(
    run: Path = typer.Argument(..., help="Run directory (its config.yaml, or one of its stages', is used)."),
    config: Path | None = ConfigArg,
    method: str | None = typer.Option(None, "--method", "-m", help="minimax, dit, d3hr or mgd3 (default: config)."),
    time_limit: float | None = typer.Option(
        None, "--time-limit", help="Generation budget in seconds, per task."
    ),
    gpus: int = typer.Option(1, "--gpus", help="Ranks (one job, one task per GPU) or shards (--array)."),
    array: bool = typer.Option(
        False, "--array", help="One array task (one GPU) per shard instead of one job."
    ),
    partition: str | None = _PARTITION,
    cpus_per_task: int | None = _CPUS,
    mem_gb: int | None = _MEM,
    time: str | None = typer.Option(
        None, "--time", "-t", help="SLURM time limit (default: budget + 10 min)."
    ),
    account: str | None = _ACCOUNT,
    qos: str | None = _QOS,
    constraint: str | None = _CONSTRAINT,
    container: str | None = _CONTAINER,
    bind: list[str] | None = _BIND,
    wait: bool = _WAIT,
    sets: list[str] | None = SetOption,
) -> None:
    """Submit budgeted generation into RUN/gen-<method>/, then a merge job once every shard is done.

    A requeued task skips its completed shards; its budget restarts from its own start (see manifest.json).
    """
    from ddkit import cluster

    cfg = load(config or _run_config(run), sets)
    cfg = replace(cfg, run_dir=str(run))
    slurm = _slurm_overrides(
        cfg,
        partition=partition,
        cpus_per_task=cpus_per_task,
        mem_gb=mem_gb,
        account=account,
        qos=qos,
        constraint=constraint,
        container=container,
        binds=tuple(bind) if bind else None,
    )
    jobs = cluster.submit_generate(
        cfg, method=method, time_limit=time_limit, gpus=gpus, array=array, slurm=slurm, time=time
    )
    _print_jobs(jobs, cluster.job_folder(cfg))
    if wait:
        for job in jobs:
            result = cluster.wait_result(job)
        typer.echo(f"result: {result}")


def _run_config(run: Path) -> Path | None:
    """The config a run directory was made with: RUN/config.yaml, else its newest stage's."""
    for cand in (run / "config.yaml", run / "minimax" / "config.yaml", run / "pretrain" / "config.yaml"):
        if cand.is_file():
            return cand
    return None
