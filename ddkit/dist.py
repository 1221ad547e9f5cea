"""Rank, world size and device, from ``torchrun`` or SLURM ``srun`` — the only module that reads that env.

One code path serves a single process, ``torchrun --nproc-per-node N`` and ``srun`` with one task per GPU:
:func:`dist_env` reads whichever launcher set the variables, :func:`init_distributed` starts the process
group when the world has more than one rank (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ddkit.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # "none" | "torchrun" | "slurm"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables.

    torchrun sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``; ``srun`` sets
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` and the node list, from which the master address is
    the first node and the port is derived from the job id (so concurrent jobs on a node do not collide).
    A SLURM *batch* step with a single task counts as one process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return DistEnv()


def usable_cpus(environ: dict[str, str] | None = None, affinity: int | None = None) -> int:
    """CPUs this process may use (>= 1): thread pools and torch's intra-op threads are sized from it.

    ``len(os.sched_getaffinity(0))`` (which honours taskset, cgroup cpusets and SLURM's binding, unlike
    ``os.cpu_count()``), capped by ``SLURM_CPUS_PER_TASK`` when set (a job step that is not bound still must
    not use more than ``--cpus-per-task``), then shared among the ``LOCAL_WORLD_SIZE`` processes torchrun
    starts on this node (they inherit one affinity mask).

    Args:
        environ: the environment (default ``os.environ``).
        affinity: CPUs in this process's affinity mask (default: measured; tests inject it).

    Raises:
        ConfigError: ``SLURM_CPUS_PER_TASK`` or ``LOCAL_WORLD_SIZE`` is not a positive integer.
    """
    env = os.environ if environ is None else environ
    if affinity is None:
        if hasattr(os, "sched_getaffinity"):
            affinity = len(os.sched_getaffinity(0))
        else:  # macOS / Windows have no affinity query: all CPUs
            affinity = (getattr(os, "process_cpu_count", None) or os.cpu_count)() or 1
    n = affinity
    slurm = _positive_env(env, "SLURM_CPUS_PER_TASK")
    if slurm is not None:
        n = min(n, slurm)
    local = _positive_env(env, "LOCAL_WORLD_SIZE")
    if local is not None:
        n //= local
    return max(1, n)


def thread_request(environ: dict[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` when the user set it (an explicit thread count wins over :func:`usable_cpus`).

    Raises:
        ConfigError: set but not a positive integer.
    """
    return _positive_env(os.environ if environ is None else environ, "OMP_NUM_THREADS")


def _positive_env(env, name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw.split(",")[0])  # OMP_NUM_THREADS may list nested levels: "4,1"
    except ValueError:
        value = 0
    if value < 1:

        raise ConfigError(f"{name}={raw!r}: expected a positive integer")
    return value


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list (``SLURM_JOB_NODELIST``), the rendezvous address of a multi-node job:
    ``gpu[003-005,7],cpu1`` -> ``gpu003``; ``gpu[003-005]-ib`` -> ``gpu003-ib``; ``a[1-2]b[3-4]`` -> ``a1b3``.

    SLURM's own expansion is ``scontrol show hostnames`` (a subprocess, absent inside some containers), and
    submitit's parser is private (``submitit.slurm.slurm._parse_node_list``), so this keeps the one rule it
    needs: the first entry of every bracket group of the first host. A malformed list (an unclosed bracket)
    keeps the text before it. Raises nothing.
    """
    s, out, i = nodelist.strip(), [], 0
    while i < len(s) and s[i] != ",":
        if s[i] != "[":
            out.append(s[i])
            i += 1
            continue
        j = s.find("]", i)
        if j < 0:
            break
        out.append(s[i + 1 : j].split(",")[0].split("-")[0])
        i = j + 1
    return "".join(out) or nodelist


def init_distributed(env: DistEnv | None = None, backend: str | None = None) -> DistEnv:
    """Initialise ``torch.distributed`` when the world has more than one rank; no-op otherwise."""
    import torch
    import torch.distributed as tdist

    env = env or dist_env()
    if env.distributed and not tdist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(env.local_rank)
        tdist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
        )
    return env


def device_for(env: DistEnv | None = None, requested: str = "auto"):
    """The torch device this rank should use: its local GPU, or the CPU."""
    import torch

    if requested != "auto":
        return torch.device(requested)
    env = env or dist_env()
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def barrier() -> None:
    """Synchronise ranks (no-op without a process group)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was started."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# What SLURM, submitit and the user's shell tell a cluster job (read here, so ddkit.cluster reads no environment)
# ----------------------------------------------------------------------------------------------------------
def slurm_job_id() -> str | None:
    """This SLURM job's id (``SLURM_JOB_ID``, possibly empty), or None outside a job."""
    return os.environ.get("SLURM_JOB_ID")


def slurm_job_ids() -> dict[str, str]:
    """SLURM's ids for this attempt of a job, recorded with every job event.

    Keys ``job_id`` (``SLURM_JOB_ID``), ``array_job_id``, ``array_task`` (``SLURM_ARRAY_TASK_ID``),
    ``restart`` (``SLURM_RESTART_COUNT``, absent before the first requeue) and ``node`` (``SLURMD_NODENAME``);
    a key whose variable is unset is left out (outside SLURM: an empty dict).
    """
    env = {
        k: os.environ.get(v)
        for k, v in (
            ("job_id", "SLURM_JOB_ID"),
            ("array_job_id", "SLURM_ARRAY_JOB_ID"),
            ("array_task", "SLURM_ARRAY_TASK_ID"),
            ("restart", "SLURM_RESTART_COUNT"),
            ("node", "SLURMD_NODENAME"),
        )
    }
    return {k: v for k, v in env.items() if v is not None}


def submitit_on_slurm() -> bool:
    """Whether this process runs a submitit job on SLURM (``SUBMITIT_EXECUTOR=slurm``); False in submitit's
    local and debug executors (tests) and outside submitit."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def cuda_visible_devices() -> str | None:
    """``CUDA_VISIBLE_DEVICES`` as the launcher set it (the GPUs SLURM gave this task), or None."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def hf_cache_dir() -> str:
    """The Hugging Face cache folder: ``$HF_HUB_CACHE``, else ``$HF_HOME``, else ``~/.cache/huggingface``."""

    return (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or str(Path.home() / ".cache/huggingface")
    )


def jobs_index():
    """The per-user index of ddkit submissions (``$DDKIT_JOBS_INDEX`` or ``~/.local/state/ddkit/jobs.jsonl``).

    Returns:
        A :class:`pathlib.Path` (``$XDG_STATE_HOME/ddkit/jobs.jsonl`` when ``XDG_STATE_HOME`` is set).
    """

    env = os.environ.get("DDKIT_JOBS_INDEX")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "ddkit" / "jobs.jsonl"


def drop_budget_start() -> None:
    """Forget a ``DDKIT_T0`` inherited from the submitting shell: a cluster job's time budget starts with
    its own process, never with the shell that submitted it (removes the variable from ``os.environ``)."""
    os.environ.pop("DDKIT_T0", None)


# Budget start: the moment a time limit counts from (generation, the challenge entry point)
# ----------------------------------------------------------------------------------------------------------
def process_start_monotonic() -> float:
    """``time.monotonic()`` value at which this process started (interpreter start-up and imports count).

    Linux: from ``/proc/self/stat`` (start time in clock ticks since boot) and ``/proc/uptime``; elsewhere
    the current time.
    """

    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); two fields precede the split point
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 86400:
            return time.monotonic() - age
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic()


def budget_start(start: float | None = None, clock=None, environ: dict[str, str] | None = None) -> float:
    """The budget's start in seconds on ``clock`` (default ``time.monotonic``).

    ``DDKIT_T0`` (Unix epoch seconds, e.g. ``export DDKIT_T0=$(date +%s)`` in an sbatch script before
    ``srun`` or array tasks) wins, so every rank of a job shares one deadline; else ``start`` (the caller's
    own start: the CLI and the challenge entry point pass the process start, ``min(entry,
    process_start_monotonic())``); else now.

    Args:
        start: a start on ``clock``, or None.
        clock: monotonic seconds (injected for tests).
        environ: the environment (default ``os.environ``).

    Raises:
        ConfigError: ``DDKIT_T0`` is not a number.
    """

    clock = time.monotonic if clock is None else clock
    env = (os.environ if environ is None else environ).get("DDKIT_T0")
    if env:

        try:
            epoch = float(env)
        except ValueError:
            raise ConfigError(f"DDKIT_T0: expected Unix epoch seconds, got {env!r}") from None
        return clock() - (time.time() - epoch)
    return clock() if start is None else start
