"""SLURM through submitit: preflight checks, executors, checkpointable training and generation jobs.

Everything ddkit sends to a cluster goes through :class:`submitit.AutoExecutor`: SLURM parameters with the
``slurm_`` prefix (``slurm_partition``, ``slurm_gpus_per_node``, ...), anything submitit does not name
through ``slurm_additional_parameters``. Multi-GPU jobs start one task per GPU with ``srun`` (submitit's
default launch); each task reads its rank, world size, master address and port from SLURM through
:func:`ddkit.dist.dist_env` (master = first node of the step, port derived from the job id), so no
``torchrun`` runs inside an allocation.

Preemption and time limits (submitit's protocol): SLURM sends ``USR2`` ``signal_delay_s`` seconds before
the limit (or at preemption); submitit calls the job's ``checkpoint`` on global rank 0, which writes an
atomic checkpoint and returns the job to resubmit; submitit then runs ``scontrol requeue``. The requeued
training job restarts with ``resume="auto"``; a requeued generation job skips its completed shards and
starts a fresh time budget, recorded in ``slurm_events.jsonl`` and in the merged ``manifest.json``.

Job folders: ``RUN/slurm/`` (``<job>_submission.sh``, ``<job>_<task>_log.out|err``, pickles). Each
submission is also appended to a per-user index (``$DDKIT_JOBS_INDEX``, default
``~/.local/state/ddkit/jobs.jsonl``) so ``ddkit jobs logs ID`` finds a job's folder after SLURM forgot it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from ddkit.config import ExperimentConfig, SlurmConfig
from ddkit.errors import ClusterError

JOB_PREFIX = "ddkit-"  # every job name ddkit submits starts with this; `ddkit jobs` lists only those
EVENTS = "slurm_events.jsonl"  # per stage/gen dir: requeues and restarts, appended by the jobs
_SUBMITIT_FILES = ("_submitted.pkl", "_result.pkl")


# ----------------------------------------------------------------------------------------------------------
# Time limits
# ----------------------------------------------------------------------------------------------------------
def parse_time(value: str | int) -> int:
    """A SLURM time string as whole minutes (rounded up), as ``sbatch --time`` reads it.

    Accepted: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS`` (sbatch(1), --time).

    Raises:
        ClusterError: the string is not one of those forms.
    """
    s = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m or not s:
        raise ClusterError(f"--time {s!r}: not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        secs = int(a) * 60 + int(b)
    else:  # MM
        secs = int(a) * 60
    if secs <= 0:
        raise ClusterError(f"--time {s!r}: must be positive")
    return -(-secs // 60)


def format_minutes(minutes: int | None) -> str:
    """Minutes as SLURM's ``D-HH:MM:SS`` (``None`` -> ``infinite``)."""
    if minutes is None:
        return "infinite"
    d, rem = divmod(int(minutes), 1440)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h}:{m:02d}:00"


# ----------------------------------------------------------------------------------------------------------
# Preflight: sbatch present, partition exists, request fits
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Partition:
    """What ``sinfo`` says about one partition (largest node where node groups differ)."""

    name: str
    default: bool
    max_time_min: int | None  # None: infinite
    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    mem_mb_per_node: int
    available: bool


def require_slurm() -> None:
    """Raise :class:`ClusterError` unless the SLURM client commands are on PATH."""
    for tool in ("sbatch", "sinfo", "srun"):  # submitit also insists on srun on the submitting host
        if shutil.which(tool) is None:
            raise ClusterError(
                f"{tool}: not found on PATH (no SLURM client here); for a local cluster run "
                "slurm/start-local-cluster.sh DIR and export SLURM_CONF=DIR/slurm.conf"
            )


def _run(cmd: Sequence[str], timeout: float = 30) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ClusterError(f"{cmd[0]}: not found on PATH (no SLURM client here)") from None
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{cmd[0]}: no answer from slurmctld within {timeout:.0f}s") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise ClusterError(f"{' '.join(cmd[:2])}: {msg[-1] if msg else f'exit {out.returncode}'}")
    return out.stdout


def _parse_sinfo_time(s: str) -> int | None:
    s = s.strip()
    if s.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    return parse_time(s)


def _gpus_in_gres(gres: str) -> int:
    # "gpu:2", "gpu:a100:4(S:0-1)", "gpu:a100:2,gpu:v100:2,shard:8", "(null)"
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,()]+)?:(\d+)", gres))


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Parse ``sinfo -h -a -o '%P|%l|%G|%D|%c|%m|%a'`` into partitions (node groups merged)."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 7:
            continue
        name, limit, gres, nodes, cpus, mem, avail = fields
        default = name.endswith("*")
        name = name.rstrip("*")
        p = Partition(
            name=name,
            default=default,
            max_time_min=_parse_sinfo_time(limit),
            nodes=int(nodes or 0),
            gpus_per_node=_gpus_in_gres(gres),
            cpus_per_node=int(re.sub(r"\D.*", "", cpus) or 0),
            mem_mb_per_node=int(re.sub(r"\D.*", "", mem) or 0),
            available=avail.strip().lower() == "up",
        )
        if name in parts:  # heterogeneous node groups: keep the largest figures, sum the nodes
            q = parts[name]
            p = dataclasses.replace(
                q,
                nodes=q.nodes + p.nodes,
                gpus_per_node=max(q.gpus_per_node, p.gpus_per_node),
                cpus_per_node=max(q.cpus_per_node, p.cpus_per_node),
                mem_mb_per_node=max(q.mem_mb_per_node, p.mem_mb_per_node),
                default=q.default or p.default,
            )
        parts[name] = p
    return parts


def partitions() -> dict[str, Partition]:
    """The cluster's partitions from ``sinfo``.

    Raises:
        ClusterError: sinfo missing or failing (its last error line).
    """
    require_slurm()
    return parse_sinfo(_run(["sinfo", "-h", "-a", "-o", "%P|%l|%G|%D|%c|%m|%a"]))


def check_request(
    parts: dict[str, Partition],
    *,
    partition: str,
    nodes: int,
    gpus_per_node: int,
    tasks_per_node: int,
    cpus_per_task: int,
    time_min: int,
    mem_gb: int | None = None,
) -> Partition:
    """Check that a request can ever run on ``partition``; return the partition.

    Raises:
        ClusterError: one line naming the option and the partition's limit.
    """
    if partition not in parts:
        known = ", ".join(sorted(parts)) or "none"
        raise ClusterError(f"--partition {partition!r}: no such partition (sinfo lists: {known})")
    p = parts[partition]
    if nodes > p.nodes:
        raise ClusterError(f"--nodes {nodes}: partition {partition!r} has {p.nodes} node(s)")
    if gpus_per_node > p.gpus_per_node:
        raise ClusterError(
            f"--gpus-per-node {gpus_per_node}: partition {partition!r} nodes have at most "
            f"{p.gpus_per_node} GPU(s)"
        )
    if p.cpus_per_node and tasks_per_node * cpus_per_task > p.cpus_per_node:
        raise ClusterError(
            f"--cpus-per-task {cpus_per_task} x {tasks_per_node} task(s) per node: partition {partition!r} "
            f"nodes have {p.cpus_per_node} CPUs"
        )
    if p.max_time_min is not None and time_min > p.max_time_min:
        raise ClusterError(
            f"--time {format_minutes(time_min)}: partition {partition!r} allows at most "
            f"{format_minutes(p.max_time_min)}"
        )
    if mem_gb is not None and p.mem_mb_per_node and mem_gb * 1024 > p.mem_mb_per_node:
        raise ClusterError(
            f"--mem-gb {mem_gb}: partition {partition!r} nodes have {p.mem_mb_per_node // 1024} GB"
        )
    return p


def preflight(
    slurm: SlurmConfig, *, tasks_per_node: int | None = None, time_min: int | None = None
) -> Partition:
    """Fail fast, before anything is pickled or submitted: sbatch present, partition exists, request fits.

    Raises:
        ClusterError: sbatch/sinfo missing, unknown partition, or too many nodes/GPUs/CPUs, too much time
            or memory for the partition (one line).
    """
    return check_request(
        partitions(),
        partition=slurm.partition,
        nodes=slurm.nodes,
        gpus_per_node=slurm.gpus_per_node,
        tasks_per_node=tasks_per_node or max(1, slurm.gpus_per_node),
        cpus_per_task=slurm.cpus_per_task,
        time_min=time_min if time_min is not None else parse_time(slurm.time),
        mem_gb=slurm.mem_gb,
    )


# ----------------------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------------------
def container_binds(cfg: ExperimentConfig, folder: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """Apptainer ``--bind`` entries a job needs: data, weights, run dir, job folder (+ ``extra``).

    Host paths are bound at the same path inside the container so configs and pickles stay valid. Apart
    from the run dir and job folder (created at submission), only paths that exist are bound (an HF id such as ``facebook/DiT-XL-2-256`` is not a path; the Hugging Face
    cache is bound instead). A path inside another bound path is left out.
    """
    # The run dir and the job folder are created at submission, so they are bound even before they exist.
    paths: list[Path] = [Path(cfg.run_dir).expanduser().absolute(), Path(folder).expanduser().absolute()]
    cands: list[str] = [cfg.data.shards]
    for p in (
        cfg.data.root,
        cfg.model.pretrained,
        cfg.model.vae,
        cfg.model.vae_decoder,
        cfg.pretrain.init,
        cfg.minimax.init,
        cfg.generate.checkpoint,
    ):
        if p:
            cands.append(p)
    hf = (
        os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or str(Path.home() / ".cache/huggingface")
    )
    cands.append(hf)
    for c in cands:
        p = Path(c).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if p.is_file():
            p = p.parent
        paths.append(p)
    paths = sorted(set(paths), key=lambda q: (len(q.parts), str(q)))
    kept: list[Path] = []
    for p in paths:
        if not any(p == k or k in p.parents for k in kept):
            kept.append(p)
    binds = [f"{p}:{p}" for p in kept]
    for e in extra:
        if e not in binds:
            binds.append(e)
    return binds


def container_python(image: str, binds: Sequence[str]) -> str:
    """The shell command submitit runs as ``python`` inside the job (``slurm_python``).

    ``apptainer exec --nv --bind SRC:DST,... IMAGE python``: ``--nv`` exposes the host's NVIDIA driver and
    the GPUs SLURM gave the task (CUDA_VISIBLE_DEVICES passes through, as the whole environment does).
    """
    cmd = ["apptainer", "exec", "--nv"]
    if binds:
        cmd += ["--bind", ",".join(binds)]
    cmd += [str(image), "python"]
    return " ".join(shlex.quote(c) for c in cmd)


# ----------------------------------------------------------------------------------------------------------
# Executors
# ----------------------------------------------------------------------------------------------------------
def job_folder(cfg: ExperimentConfig) -> Path:
    """Where submitit keeps a run's scripts, pickles and logs: ``slurm.folder`` or ``RUN/slurm``."""
    return Path(cfg.slurm.folder or Path(cfg.run_dir) / "slurm").expanduser().absolute()


def slurm_parameters(
    slurm: SlurmConfig,
    *,
    name: str,
    time_min: int,
    tasks_per_node: int,
    gpus_per_node: int,
    dependency: str | None = None,
    comment: str | None = None,
) -> dict[str, Any]:
    """The ``slurm_``-prefixed keyword arguments for :class:`submitit.AutoExecutor` / ``update_parameters``.

    Flags submitit names go as ``slurm_<name>``; sbatch flags it does not know go through
    ``slurm_additional_parameters`` (``slurm.additional`` plus ``dependency``).
    """
    params: dict[str, Any] = {
        "slurm_job_name": name,
        "slurm_partition": slurm.partition,
        "slurm_time": time_min,
        "slurm_nodes": slurm.nodes,
        "slurm_ntasks_per_node": tasks_per_node,
        "slurm_cpus_per_task": slurm.cpus_per_task,
        "slurm_signal_delay_s": slurm.signal_delay_s,
    }
    if gpus_per_node:
        params["slurm_gpus_per_node"] = gpus_per_node
    if slurm.mem_gb is not None:
        params["slurm_mem"] = f"{slurm.mem_gb}GB"
    for key in ("account", "qos", "constraint"):
        if getattr(slurm, key):
            params[f"slurm_{key}"] = getattr(slurm, key)
    if comment:
        params["slurm_comment"] = comment
    if slurm.setup:
        params["slurm_setup"] = list(slurm.setup)
    additional = dict(slurm.additional)
    if dependency:
        additional["dependency"] = dependency
    if additional:
        params["slurm_additional_parameters"] = additional
    return params


def make_executor(
    folder: str | Path,
    slurm: SlurmConfig,
    params: dict[str, Any],
    *,
    python: str | None = None,
    cluster: str | None = None,
):
    """A :class:`submitit.AutoExecutor` for ``folder`` with ``params`` (from :func:`slurm_parameters`).

    ``cluster`` is submitit's: ``None``/"slurm" on a cluster, "local" or "debug" in unit tests (which
    ignore the ``slurm_`` parameters). ``python`` is the command that runs the job's Python (containers).
    """
    import submitit

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctor: dict[str, Any] = {"slurm_max_num_timeout": slurm.max_timeouts}
    if python:
        ctor["slurm_python"] = python
    if cluster not in (None, "slurm"):
        ctor = {}
    # Never let AutoExecutor fall back to running the job locally when it cannot see SLURM.
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster or "slurm", **ctor)
    if ex.cluster == "slurm":
        ex.update_parameters(**params)
    else:
        ex.update_parameters(
            name=params.get("slurm_job_name", "ddkit"), timeout_min=params.get("slurm_time", 5)
        )
    return ex


def sbatch_script(folder: str | Path, params: dict[str, Any], python: str | None = None) -> str:
    """The batch script submitit would write for ``params`` (``--dry-run``; golden tests).

    Built by submitit's own renderer, so it is byte-for-byte what ``sbatch`` receives; no SLURM needed.
    """
    from submitit.slurm import slurm as sl

    # slurm_<name> parameters are the renderer's own keyword arguments (slurm_ntasks_per_node -> ntasks_per_node)
    kwargs = {k[len("slurm_") :]: v for k, v in params.items()}
    py = python or shlex.quote(sys.executable)  # SlurmExecutor's default python
    command = " ".join([py, "-u -m submitit.core._submit", shlex.quote(str(Path(folder)))])
    return sl._make_sbatch_string(
        command=command, folder=folder, **{k: v for k, v in kwargs.items() if v is not None}
    )


# ----------------------------------------------------------------------------------------------------------
# Jobs (pickled by submitit; run on the compute node)
# ----------------------------------------------------------------------------------------------------------
def _job_env() -> dict[str, Any]:
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


def record_event(directory: str | Path, event: str, **info: Any) -> None:
    """Append one line to ``directory/slurm_events.jsonl`` (start, requeue, ...), with SLURM's ids."""
    from ddkit.io import append_jsonl

    append_jsonl(Path(directory) / EVENTS, {"event": event, "time": time.time(), **_job_env(), **info})


def read_events(directory: str | Path) -> list[dict[str, Any]]:
    """The events :func:`record_event` appended (empty when none)."""
    from ddkit.io import read_jsonl

    return read_jsonl(Path(directory) / EVENTS)


def _is_rank0() -> bool:
    from ddkit.dist import dist_env

    return dist_env().is_main


def _checkpoint_step(stage_dir: Path) -> int | None:
    """Step of ``stage_dir/ckpt/last.pt`` (memory-mapped, so a multi-GB checkpoint costs nothing), or None."""
    ckpt = stage_dir / "ckpt" / "last.pt"
    if not ckpt.is_file():
        return None
    try:
        import torch

        return int(torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)["step"])
    except Exception:  # a torn or foreign file: the trainer itself will report it
        return None


def _job_ending() -> bool:
    """Whether SLURM is ending this job's current attempt (state no longer RUNNING: ``scontrol requeue``,
    preemption, ``scancel`` or the time limit), asked of ``squeue``; True when it cannot tell."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return True
    try:
        state = _run(["squeue", "-h", "-j", job, "-o", "%T"], timeout=10).strip()
    except ClusterError:
        return True
    return state != "RUNNING"


@contextlib.contextmanager
def _stop_on_signals():
    """Route SIGTERM and USR2 to :func:`ddkit.train.request_stop` while training; yield the handler USR2
    had (submitit's checkpoint-and-requeue) and put the old handlers back afterwards."""
    import signal
    import threading

    from ddkit.train import request_stop

    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield None
        return
    sigs = (signal.SIGTERM, signal.SIGUSR2)
    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, lambda signum, _frame: request_stop(signum))
    try:
        yield old[signal.SIGUSR2]
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class TrainJob(Checkpointable):
    """``ddkit train`` as a checkpointable SLURM job (submitit's ``Checkpointable`` protocol).

    Calling it runs :func:`ddkit.train.train` with ``resume="auto"``, so a requeued job continues from
    ``RUN/<stage>/ckpt/last.pt``. SIGTERM (``scontrol requeue``, preemption, ``scancel``) and USR2 (the
    time-limit warning, submitit's preemption signal) only ask the loop to stop; every rank stops after
    the same step and one complete checkpoint is written (:class:`ddkit.train.Preempted`). Then rank 0
    requeues through submitit's handler (which calls :meth:`checkpoint` and ``scontrol requeue``) unless
    SLURM is already ending the attempt itself, and every rank exits without a result.
    Returns the checkpoint path (str).
    """

    def __init__(self, cfg: ExperimentConfig, stage: str, max_steps: int | None = None) -> None:
        self.cfg = cfg
        self.stage = stage
        self.max_steps = max_steps

    @property
    def stage_dir(self) -> Path:
        return Path(self.cfg.run_dir) / self.stage

    def __call__(self) -> str:
        from ddkit.train import Preempted, train

        if _is_rank0():
            record_event(self.stage_dir, "start", resume_step=_checkpoint_step(self.stage_dir))
        with _stop_on_signals() as requeue_handler:
            try:
                return str(
                    train(self.cfg, self.stage, resume="auto", max_steps=self.max_steps, progress=False)
                )
            except Preempted as p:
                self._leave(p, requeue_handler)
                raise

    def _leave(self, p: Any, requeue_handler: Any) -> None:
        """After a stop on a signal (checkpoint written by every rank's loop): rank 0 requeues through
        submitit when SLURM does not end the attempt itself; every rank exits without a result pickle."""
        import signal

        from ddkit import dist

        if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
            return  # in-process executors (tests): let Preempted propagate
        names = [signal.Signals(s).name for s in p.signals if s in signal.valid_signals()]
        requeue = signal.SIGUSR2 in p.signals or not _job_ending()
        dist.cleanup()
        if _is_rank0():
            by = "submitit" if requeue else "slurm"
            record_event(self.stage_dir, "stop", step=p.step, signals=names, requeue_by=by)
            if requeue and callable(requeue_handler):
                with contextlib.suppress(SystemExit):  # submitit: checkpoint() + scontrol requeue + exit
                    requeue_handler(signal.SIGUSR2, None)
        # Everything is on disk (atomic files): skip the interpreter's teardown, which took seconds of
        # SLURM's KillWait under srun (measured 4 s) and delayed the requeued attempt.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(255)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        step = None
        with contextlib.suppress(ImportError):
            from ddkit.train import current_trainer

            trainer = current_trainer()
            if trainer is not None:
                trainer.save_checkpoint()
                step = getattr(trainer, "step", None)
        if step is None:  # the loop already stopped and wrote its checkpoint
            step = _checkpoint_step(self.stage_dir)
        record_event(self.stage_dir, "requeue", step=step)
        return DelayedSubmission(type(self)(self.cfg, self.stage, self.max_steps), *args, **kwargs)


class GenerateJob(Checkpointable):
    """One generation job (all ranks of it) or one array task (one shard) as a checkpointable job.

    The time budget counts from this process's start (``t0``), model loading included; after a requeue
    the new attempt gets a fresh budget for the shards still missing, and :func:`record_event` notes the
    requeue so the merged manifest says what happened. Returns the gen dir (str).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        method: str,
        time_limit: float,
        shard: int | None = None,
        num_shards: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.method = method
        self.time_limit = time_limit
        self.shard = shard
        self.num_shards = num_shards

    @property
    def gen_dir(self) -> Path:
        return Path(self.cfg.run_dir) / f"gen-{self.method}"

    def __call__(self) -> str:
        from ddkit.generate import generate, process_start_monotonic

        # The budget clock starts with this process (interpreter start-up and imports count), never with
        # an earlier attempt of the same job, nor with a DDKIT_T0 exported from the submitting shell.
        # In-process executors (tests) start it now.
        os.environ.pop("DDKIT_T0", None)
        in_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        t0 = process_start_monotonic() if in_slurm else time.monotonic()
        kwargs: dict[str, Any] = {
            "method": self.method,
            "time_limit": self.time_limit,
            "progress": False,
            "t0": t0,
        }
        if self.shard is not None:
            # Array tasks are independent processes (no process group): the shard is given explicitly, and
            # the merge job merges, so two tasks finishing together never merge at once.
            kwargs.update(rank=self.shard, world_size=self.num_shards, merge_when_done=False)
        if self.shard is not None or _is_rank0():
            record_event(
                self.gen_dir,
                "start",
                shard=self.shard,
                num_shards=self.num_shards,
                time_limit=self.time_limit,
            )
        return str(generate(self.cfg, **kwargs))

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # Completed shards are on disk (atomic dirs + DONE); the requeued job skips them.
        record_event(
            self.gen_dir, "requeue", shard=self.shard, budget="restarts from the new attempt's start"
        )
        job = type(self)(self.cfg, self.method, self.time_limit, self.shard, self.num_shards)
        return DelayedSubmission(job, *args, **kwargs)


def task_info() -> dict[str, Any]:
    """What one task of a job sees: rank, world size, master address/port (:func:`ddkit.dist.dist_env`),
    its GPUs and host. Submitted as a job it checks how ``srun`` lays out the ranks (tests, debugging)."""
    import socket

    from ddkit.dist import dist_env

    env = dist_env()
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "master_addr": env.master_addr,
        "master_port": env.master_port,
        "launcher": env.launcher,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "host": socket.gethostname(),
        "job_id": os.environ.get("SLURM_JOB_ID"),
    }


def merge_job(gen_dir: str) -> str:
    """Merge the shards of ``gen_dir`` (:func:`ddkit.generate.merge`) and add the SLURM history
    (job ids, restarts, requeues) to ``manifest.json`` under ``"slurm"``. Returns the ``dataset.pt`` path."""
    from ddkit.generate import merge
    from ddkit.io import atomic_write_json, is_done

    # A multi-rank job merges itself when its last rank finishes; merging again would only rewrite.
    out = Path(gen_dir) / "dataset.pt" if is_done(gen_dir) else merge(Path(gen_dir))
    events = read_events(gen_dir)
    manifest = Path(gen_dir) / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        data["slurm"] = {
            "events": events,
            "requeues": sum(e["event"] == "requeue" for e in events),
            "budget": "each SLURM attempt counts the time limit from its own start; completed shards are kept",
        }
        atomic_write_json(manifest, data)
    return str(out)


# ----------------------------------------------------------------------------------------------------------
# Submission
# ----------------------------------------------------------------------------------------------------------
def jobs_index() -> Path:
    """The per-user index of ddkit submissions (``$DDKIT_JOBS_INDEX`` or ``~/.local/state/ddkit/jobs.jsonl``)."""
    env = os.environ.get("DDKIT_JOBS_INDEX")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local/state")
    return Path(base) / "ddkit" / "jobs.jsonl"


def _register(job_id: str, name: str, folder: Path, run_dir: str, kind: str, executor=None) -> None:
    from ddkit.io import append_jsonl

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
        out = _run(["squeue", "--me", "-h", "-o", "%i|%A"], timeout=15)
    except ClusterError:
        return set()
    ids: set[str] = set()
    for line in out.splitlines():
        for part in line.split("|"):
            if part.strip():
                ids.add(part.strip().split("_")[0])
    return ids


def _resolve(cfg: ExperimentConfig, slurm: SlurmConfig | None) -> ExperimentConfig:
    from ddkit.config import replace

    return replace(cfg, slurm=slurm) if slurm is not None else cfg


def _python_for(cfg: ExperimentConfig, folder: Path) -> str | None:
    if not cfg.slurm.container:
        return None
    return container_python(cfg.slurm.container, container_binds(cfg, folder, cfg.slurm.binds))


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
    """
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
    ex = make_executor(folder, s, params, python=_python_for(cfg, folder), cluster=cluster)
    if cluster in (None, "slurm"):
        cleanup_folder(folder)
    job = _submit(ex, TrainJob(cfg, stage, max_steps))
    _register(job.job_id, name, folder, cfg.run_dir, "train", ex)
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
    python = _python_for(cfg, folder)
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
            _register(jobs[0].job_id.split("_")[0], name, folder, cfg.run_dir, "generate-array", ex)
    else:
        jobs = [_submit(ex, GenerateJob(cfg, method, time_limit))]
        _register(jobs[0].job_id, name, folder, cfg.run_dir, "generate", ex)
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
        _register(mjob.job_id, mname, folder, cfg.run_dir, "merge", mex)
        jobs.append(mjob)
    return jobs


def _sbatch_refusal(e: Exception) -> ClusterError:
    lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines() or ["?"]
    return ClusterError(f"sbatch refused the job: {lines[-1].strip()}")


def _submit(ex, fn, *args):
    from submitit.core.utils import FailedJobError

    try:
        return ex.submit(fn, *args)
    except FailedJobError as e:  # sbatch's own refusal, e.g. an account or QOS it rejects
        raise _sbatch_refusal(e) from None


def _submit_array(ex, fns: list) -> list:
    from submitit.core.utils import FailedJobError

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
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return job.results()[0]  # task 0's (rank 0's) result; every task of a multi-GPU job returns one
    except (FailedJobError, UncompletedJobError) as e:
        # submitit's message holds the remote traceback; one line here, the rest in the job's log
        trace = str(e).split("You can check full logs")[0]
        last = [ln for ln in trace.splitlines() if ln.strip() and not ln.startswith("---")][-1:] or ["?"]
        raise ClusterError(
            f"job {job.job_id} failed ({last[0].strip()}); see: ddkit jobs logs {job.job_id} --err"
        ) from None


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
    from ddkit.io import read_jsonl

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
        out = _run(
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
    out = _run(["squeue", "--me", "-h", "-o", "%i|%j|%T|%P|%M|%N"], timeout=30)
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
    from submitit.core.utils import JobPaths

    job_id = str(job_id)
    index = _index_rows()
    rec = index.get(job_id) or index.get(job_id.split("_")[0])
    if rec:
        paths = JobPaths(rec["folder"], job_id=job_id, task_id=0)
        return paths.stdout, paths.stderr
    with contextlib.suppress(ClusterError):
        info = _run(["scontrol", "show", "job", job_id, "-o"], timeout=15)
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
