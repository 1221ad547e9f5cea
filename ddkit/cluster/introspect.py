"""What SLURM and the node say: time strings, partitions from ``sinfo``, whether a request fits, and
what one task of a job sees (rank, GPUs, host).

Every SLURM client command ddkit runs goes through :func:`run_slurm`, which turns a missing command, a
silent ``slurmctld`` or a refusal into one :class:`~ddkit.errors.ClusterError` line.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ddkit import dist
from ddkit.config import SlurmConfig
from ddkit.errors import ClusterError


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


def run_slurm(cmd: Sequence[str], timeout: float = 30) -> str:
    """Run a SLURM client command (``sinfo``, ``squeue``, ``sacct``, ``scontrol``) and return its stdout.

    Raises:
        ClusterError: the command is missing, got no answer within ``timeout`` seconds, or failed (its
            last error line).
    """
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
    return parse_sinfo(run_slurm(["sinfo", "-h", "-a", "-o", "%P|%l|%G|%D|%c|%m|%a"]))


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
# What one task of a job sees
# ----------------------------------------------------------------------------------------------------------
def task_info() -> dict[str, Any]:
    """What one task of a job sees: rank, world size, master address/port (:func:`ddkit.dist.dist_env`),
    its GPUs and host. Submitted as a job it checks how ``srun`` lays out the ranks (tests, debugging)."""

    env = dist.dist_env()
    return {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "master_addr": env.master_addr,
        "master_port": env.master_port,
        "launcher": env.launcher,
        "cuda_visible_devices": dist.cuda_visible_devices(),
        "host": socket.gethostname(),
        "job_id": dist.slurm_job_id(),
    }
