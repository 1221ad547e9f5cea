"""Submission: training and generation as SLURM jobs through :class:`submitit.AutoExecutor`, then waiting
for a result.

Multi-GPU jobs start one task per GPU with ``srun`` (submitit's default launch); each task reads its rank,
world size, master address and port from SLURM through :func:`ddkit.dist.dist_env` (master = first node of
the step, port derived from the job id), so no ``torchrun`` runs inside an allocation.

Job folders: ``RUN/slurm/`` (``<job>_submission.sh``, ``<job>_<task>_log.out|err``, pickles); the pickles
of finished jobs older than a week are removed at the next submission into the same folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from submitit.core.utils import FailedJobError, UncompletedJobError

from ddkit.cluster.executor import job_folder, job_python, make_executor, slurm_parameters
from ddkit.cluster.introspect import parse_time, preflight, run_slurm
from ddkit.cluster.jobs import GenerateJob, TrainJob, merge_job
from ddkit.cluster.listing import JOB_PREFIX, register_job
from ddkit.config import ExperimentConfig, SlurmConfig, check_stages, replace
from ddkit.errors import ClusterError

_SUBMITIT_FILES = ("_submitted.pkl", "_result.pkl")


def cleanup_folder(
    folder: str | Path, *, max_age_s: float = 7 * 86400, active: set[str] | None = None
) -> int:
    """Delete submitit pickles of finished jobs older than ``max_age_s`` in ``folder``; keep logs/scripts.

    A job counts as finished when it is not in ``active`` (default: this user's jobs in ``squeue``).
    Returns the number of files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    if active is None:
        active = _active_job_ids()
    now = time.time()
    removed = 0
    for f in folder.iterdir():
        if not f.name.endswith(_SUBMITIT_FILES):
            continue
        job = f.name.split("_")[0]
        if job in active or f.name.split("_submitted")[0] in active:
            continue
        with contextlib.suppress(FileNotFoundError):
            if now - f.stat().st_mtime > max_age_s:
                f.unlink()
                removed += 1
    return removed


def _active_job_ids() -> set[str]:
    try:
        out = run_slurm(["squeue", "--me", "-h", "-o", "%i|%A"], timeout=15)
    except ClusterError:
        return set()
    ids: set[str] = set()
    for line in out.splitlines():
        for part in line.split("|"):
            if part.strip():
                ids.add(part.strip().split("_")[0])
    return ids


def _resolve(cfg: ExperimentConfig, slurm: SlurmConfig | None) -> ExperimentConfig:
    return replace(cfg, slurm=slurm) if slurm is not None else cfg


def submit_train(
    cfg: ExperimentConfig,
    stage: str,
    *,
    slurm: SlurmConfig | None = None,
    max_steps: int | None = None,
    cluster: str | None = None,
    check: bool = True,
):
    """Submit ``ddkit train --stage STAGE`` as one SLURM job: ``nodes x gpus_per_node`` tasks (one per GPU).

    Args:
        cfg: the experiment; ``cfg.slurm`` (or ``slurm``) gives partition, sizes, time, container.
        stage: "pretrain" or "minimax".
        max_steps: stop early without DONE (tests).
        cluster: submitit cluster override ("local"/"debug" in unit tests; no preflight then).
        check: run :func:`preflight` first.

    Returns:
        The :class:`submitit.Job`; ``job.result()`` is the checkpoint path (str).

    Raises:
        ClusterError: preflight failed or sbatch refused the job (one line).
        ConfigError: ``stage`` is not a training stage.
    """

    check_stages((stage,))  # here, not on the compute node after a SLURM job was spent
    cfg = _resolve(cfg, slurm)
    s = cfg.slurm
    tasks = max(1, s.gpus_per_node)
    time_min = parse_time(s.time)
    if check and cluster in (None, "slurm"):
        preflight(s, tasks_per_node=tasks, time_min=time_min)
    folder = job_folder(cfg)
    name = f"{JOB_PREFIX}train-{stage}-{cfg.name}"
    params = slurm_parameters(
        s, name=name, time_min=time_min, tasks_per_node=tasks, gpus_per_node=s.gpus_per_node
    )
    ex = make_executor(folder, s, params, python=job_python(cfg, folder), cluster=cluster)
    if cluster in (None, "slurm"):
        cleanup_folder(folder)
    job = _submit(ex, TrainJob(cfg, stage, max_steps))
    register_job(job.job_id, name, folder, cfg.run_dir, "train", ex)
    return job


def submit_generate(
    cfg: ExperimentConfig,
    *,
    method: str | None = None,
    time_limit: float | None = None,
    gpus: int = 1,
    array: bool = False,
    slurm: SlurmConfig | None = None,
    time: str | None = None,
    merge: bool = True,
    cluster: str | None = None,
    check: bool = True,
) -> list:
    """Submit budgeted generation: one job with ``gpus`` tasks (one per rank), or with ``array`` a job
    array of ``gpus`` one-GPU tasks (one per shard); then a merge job that runs after all succeed.

    Args:
        method: generation method (default ``cfg.generate.method``).
        time_limit: the challenge budget in seconds (default ``cfg.generate.time_limit``), counted from
            each task's own start.
        gpus: ranks / shards.
        time: SLURM time limit (default: the budget + 10 minutes, rounded up to minutes).

    Returns:
        The submitted jobs: the generation job(s) (one per array task), then the merge job if ``merge``.

    Raises:
        ClusterError: preflight failed or sbatch refused a job.
    """
    if gpus < 1:
        raise ClusterError(f"--gpus {gpus}: must be >= 1")
    cfg = _resolve(cfg, slurm)
    method = method or cfg.generate.method
    time_limit = float(time_limit if time_limit is not None else cfg.generate.time_limit)
    per_task_gpus = 1 if array else gpus
    s = dataclasses.replace(cfg.slurm, gpus_per_node=per_task_gpus, nodes=1)
    cfg = _resolve(cfg, s)
    time_min = parse_time(time) if time else -(-int(time_limit + 600) // 60)
    tasks = 1 if array else gpus
    if check and cluster in (None, "slurm"):
        preflight(s, tasks_per_node=tasks, time_min=time_min)
    folder = job_folder(cfg)
    name = f"{JOB_PREFIX}gen-{method}-{cfg.name}"
    python = job_python(cfg, folder)
    params = slurm_parameters(
        s, name=name, time_min=time_min, tasks_per_node=tasks, gpus_per_node=s.gpus_per_node
    )
    ex = make_executor(folder, s, params, python=python, cluster=cluster)
    if cluster in (None, "slurm"):
        cleanup_folder(folder)
    if array:
        fns = [GenerateJob(cfg, method, time_limit, k, gpus) for k in range(gpus)]
        jobs = _submit_array(ex, fns)
        if jobs:
            register_job(jobs[0].job_id.split("_")[0], name, folder, cfg.run_dir, "generate-array", ex)
    else:
        jobs = [_submit(ex, GenerateJob(cfg, method, time_limit))]
        register_job(jobs[0].job_id, name, folder, cfg.run_dir, "generate", ex)
    if merge:
        gen_dir = str((Path(cfg.run_dir) / f"gen-{method}").absolute())
        mname = f"{JOB_PREFIX}merge-{method}-{cfg.name}"
        ms = dataclasses.replace(
            s, gpus_per_node=0, cpus_per_task=1, signal_delay_s=min(s.signal_delay_s, 60)
        )
        dep = "afterok:" + ":".join(sorted({j.job_id.split("_")[0] for j in jobs}))
        mparams = slurm_parameters(
            ms,
            name=mname,
            time_min=min(time_min, 30),
            tasks_per_node=1,
            gpus_per_node=0,
            dependency=dep if cluster in (None, "slurm") else None,
        )
        if cluster in (None, "slurm"):  # a failed shard must not leave the merge pending forever
            mparams["slurm_additional_parameters"]["kill_on_invalid_dep"] = "yes"
        mex = make_executor(folder, ms, mparams, python=python, cluster=cluster)
        mjob = _submit(mex, merge_job, gen_dir)
        register_job(mjob.job_id, mname, folder, cfg.run_dir, "merge", mex)
        jobs.append(mjob)
    return jobs


def _sbatch_refusal(e: Exception) -> ClusterError:
    lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or ["?"]
    return ClusterError(f"sbatch refused the job: {lines[-1].strip()}")


def _submit(ex, fn, *args):
    try:
        return ex.submit(fn, *args)
    except FailedJobError as e:  # sbatch's own refusal, e.g. an account or QOS it rejects
        raise _sbatch_refusal(e) from None


def _submit_array(ex, fns: list) -> list:
    try:
        with ex.batch():
            return [ex.submit(fn) for fn in fns]
    except FailedJobError as e:
        raise _sbatch_refusal(e) from None


def wait_result(job, *, poll_s: float = 0.5, timeout_s: float | None = None) -> Any:
    """Wait for a submitit job by polling SLURM quickly, then return its (task 0's) result.

    submitit's own ``result()`` polls every 10+ s; small jobs finish in about a second.

    Raises:
        TimeoutError: not done within ``timeout_s``.
        ClusterError: the job failed or was cancelled (one line naming the job and its log).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} not done after {timeout_s:.0f}s (state {job.state})")
        time.sleep(poll_s)

    try:
        return job.results()[0]  # task 0's (rank 0's) result; every task of a multi-GPU job returns one
    except (FailedJobError, UncompletedJobError) as e:
        # submitit's message holds the remote traceback; one line here, the rest in the job's log
        trace = str(e).split("You can check full logs")[0]
        last = [ln for ln in trace.splitlines() if ln.strip() and not ln.startswith("---")][-1:] or ["?"]
        raise ClusterError(
            f"job {job.job_id} failed ({last[0].strip()}); see: ddkit jobs logs {job.job_id} --err"
        ) from None
