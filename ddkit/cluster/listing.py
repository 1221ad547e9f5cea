"""Finding ddkit's jobs again: the per-user jobs index, ``ddkit jobs`` (list, logs, cancel).

Each submission is appended to a per-user index (``$DDKIT_JOBS_INDEX``, default
``~/.local/state/ddkit/jobs.jsonl``: :func:`ddkit.dist.jobs_index`) so ``ddkit jobs logs ID`` finds a
job's folder after SLURM forgot it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.core.utils import JobPaths

from ddkit.cluster.introspect import require_slurm, run_slurm
from ddkit.dist import jobs_index
from ddkit.errors import ClusterError
from ddkit.io import append_jsonl, read_jsonl

# ----------------------------------------------------------------------------------------------------------
# The jobs index (written at submission)
# ----------------------------------------------------------------------------------------------------------
JOB_PREFIX = "ddkit-"  # every job name ddkit submits starts with this; `ddkit jobs` lists only those


def register_job(job_id: str, name: str, folder: Path, run_dir: str, kind: str, executor=None) -> None:
    """Append a submitted job to the jobs index (:func:`ddkit.dist.jobs_index`): id, name, job folder,
    absolute run dir, ``kind`` ("train", "generate", "generate-array", "merge") and submission time.

    Jobs of a local/debug ``executor`` (tests) are not recorded; a failing write (read-only home) is ignored.
    """

    if executor is not None and getattr(executor, "cluster", "slurm") != "slurm":
        return  # local/debug executors (tests) leave the user's index alone

    with contextlib.suppress(OSError):  # a read-only home must not fail a submission
        append_jsonl(
            jobs_index(),
            {
                "job_id": str(job_id),
                "name": name,
                "folder": str(folder),
                "run_dir": str(Path(run_dir).absolute()),
                "kind": kind,
                "submitted": time.time(),
            },
        )


# ----------------------------------------------------------------------------------------------------------
# Listing, logs, cancel
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobRow:
    """One line of ``ddkit jobs``."""

    job_id: str
    name: str
    state: str
    partition: str
    elapsed: str
    nodes: str
    folder: str | None = None


def _index_rows() -> dict[str, dict[str, Any]]:
    return {r["job_id"]: r for r in read_jsonl(jobs_index()) if "job_id" in r}


def list_jobs(days: int = 7) -> list[JobRow]:
    """This user's ddkit jobs (names starting with ``ddkit-``) of the last ``days`` days, newest last.

    Reads ``sacct`` (accounting) and falls back to ``squeue`` (running/pending only) without it.

    Raises:
        ClusterError: neither sacct nor squeue answers.
    """
    require_slurm()
    index = _index_rows()
    rows: list[JobRow] = []
    try:
        out = run_slurm(
            [
                "sacct",
                "-X",
                "-n",
                "-P",
                "-S",
                f"now-{days}days",
                "-o",
                "JobID,JobName%200,State,Partition,Elapsed,NodeList",
            ],
            timeout=30,
        )
        for line in out.splitlines():
            f = line.split("|")
            if len(f) != 6 or not f[1].startswith(JOB_PREFIX):
                continue
            jid = f[0]
            folder = (index.get(jid) or index.get(jid.split("_")[0]) or {}).get("folder")
            rows.append(JobRow(jid, f[1], f[2].split()[0], f[3], f[4], f[5], folder))
        return rows
    except ClusterError:
        pass
    out = run_slurm(["squeue", "--me", "-h", "-o", "%i|%j|%T|%P|%M|%N"], timeout=30)
    for line in out.splitlines():
        f = line.split("|")
        if len(f) == 6 and f[1].startswith(JOB_PREFIX):
            folder = (index.get(f[0]) or index.get(f[0].split("_")[0]) or {}).get("folder")
            rows.append(JobRow(f[0], f[1], f[2], f[3], f[4], f[5], folder))
    return rows


def log_paths(job_id: str) -> tuple[Path, Path]:
    """(stdout, stderr) of task 0 of a ddkit job, from the jobs index or ``scontrol show job``.

    Raises:
        ClusterError: the job is unknown to both.
    """

    job_id = str(job_id)
    index = _index_rows()
    rec = index.get(job_id) or index.get(job_id.split("_")[0])
    if rec:
        paths = JobPaths(rec["folder"], job_id=job_id, task_id=0)
        return paths.stdout, paths.stderr
    with contextlib.suppress(ClusterError):
        info = run_slurm(["scontrol", "show", "job", job_id, "-o"], timeout=15)
        out = re.search(r"\bStdOut=(\S+)", info)
        err = re.search(r"\bStdErr=(\S+)", info)
        if out:
            return Path(out.group(1)), Path(err.group(1) if err else out.group(1))
    raise ClusterError(f"job {job_id}: not in {jobs_index()} and unknown to scontrol")


def cancel(job_id: str) -> None:
    """``scancel JOB_ID``.

    Raises:
        ClusterError: scancel failed (unknown job, not yours).
    """
    require_slurm()
    try:
        out = subprocess.run(
            ["scancel", "--verbose", str(job_id)], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise ClusterError("scancel: no answer from slurmctld within 30s") from None
    # scancel exits 0 even for an unknown job id and says so only with --verbose, on stderr.
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower()]
    if out.returncode != 0 or errors:
        msg = (errors or out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise ClusterError(f"scancel {job_id}: {msg.split('error:', 1)[-1].strip()}")
