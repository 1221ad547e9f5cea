"""SLURM through submitit: preflight checks, executors, checkpointable training and generation jobs.

Everything ddkit sends to a cluster goes through :class:`submitit.AutoExecutor`. The package follows a
submission from the login node to the compute node and back:

- :mod:`~ddkit.cluster.introspect`: what SLURM and the node say (time strings, ``sinfo`` partitions, whether
  a request fits: :func:`preflight`; what one task sees: :func:`task_info`);
- :mod:`~ddkit.cluster.executor`: job folder, ``slurm_`` parameters, the submitit executor, the batch
  script (``--dry-run``), the Apptainer ``python`` command;
- :mod:`~ddkit.cluster.jobs`: the checkpointable jobs run on the node (:class:`TrainJob`,
  :class:`GenerateJob`, :func:`merge_job`), requeue on preemption, and the ``slurm_events.jsonl`` they record;
- :mod:`~ddkit.cluster.submit`: :func:`submit_train`, :func:`submit_generate`, :func:`wait_result`;
- :mod:`~ddkit.cluster.listing`: the per-user jobs index and ``ddkit jobs`` (list, logs, cancel).

The environment (SLURM's ids, ``SUBMITIT_EXECUTOR``, the Hugging Face cache, the jobs index path) is read
through :mod:`ddkit.dist`, never here.
"""

from ddkit.cluster.executor import (
    container_binds,
    container_python,
    job_folder,
    job_python,
    make_executor,
    sbatch_script,
    slurm_parameters,
)
from ddkit.cluster.introspect import (
    Partition,
    check_request,
    format_minutes,
    parse_sinfo,
    parse_time,
    partitions,
    preflight,
    require_slurm,
    run_slurm,
    task_info,
)
from ddkit.cluster.jobs import EVENTS, GenerateJob, TrainJob, merge_job, read_events, record_event
from ddkit.cluster.listing import JOB_PREFIX, JobRow, cancel, jobs_index, list_jobs, log_paths, register_job
from ddkit.cluster.submit import cleanup_folder, submit_generate, submit_train, wait_result

__all__ = [
    "EVENTS",
    "JOB_PREFIX",
    "GenerateJob",
    "JobRow",
    "Partition",
    "TrainJob",
    "cancel",
    "check_request",
    "cleanup_folder",
    "container_binds",
    "container_python",
    "format_minutes",
    "job_folder",
    "job_python",
    "jobs_index",
    "list_jobs",
    "log_paths",
    "make_executor",
    "merge_job",
    "parse_sinfo",
    "parse_time",
    "partitions",
    "preflight",
    "read_events",
    "record_event",
    "register_job",
    "require_slurm",
    "run_slurm",
    "sbatch_script",
    "slurm_parameters",
    "submit_generate",
    "submit_train",
    "task_info",
    "wait_result",
]
