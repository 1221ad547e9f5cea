"""The submitit side of a submission: where a run's job files go, the ``slurm_`` parameters, the executor,
the batch script it writes (``--dry-run``), and the ``python`` command that runs a job inside Apptainer.

SLURM parameters submitit names go with the ``slurm_`` prefix (``slurm_partition``,
``slurm_gpus_per_node``, ...); anything else through ``slurm_additional_parameters``.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm import slurm as sl

from ddkit import dist
from ddkit.config import ExperimentConfig, SlurmConfig


# ----------------------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------------------
def container_binds(cfg: ExperimentConfig, folder: str | Path, extra: Sequence[str] = ()) -> list[str]:
    """Apptainer ``--bind`` entries a job needs: data, weights, run dir, job folder (+ ``extra``).

    Host paths are bound at the same path inside the container so configs and pickles stay valid. Apart
    from the run dir and job folder (created at submission), only paths that exist are bound (an HF id
    such as ``facebook/DiT-XL-2-256`` is not a path; the Hugging Face cache, :func:`ddkit.dist.hf_cache_dir`,
    is bound instead). A path inside another bound path is left out.
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
    cands.append(dist.hf_cache_dir())
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


def job_python(cfg: ExperimentConfig, folder: Path) -> str | None:
    """The ``python`` command of ``cfg``'s jobs: :func:`container_python` when ``slurm.container`` is set
    (binds from :func:`container_binds`, job folder ``folder``), else None (submitit's default)."""
    if not cfg.slurm.container:
        return None
    return container_python(cfg.slurm.container, container_binds(cfg, folder, cfg.slurm.binds))


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

    # slurm_<name> parameters are the renderer's own keyword arguments (slurm_ntasks_per_node -> ntasks_per_node)
    kwargs = {k[len("slurm_") :]: v for k, v in params.items()}
    py = python or shlex.quote(sys.executable)  # SlurmExecutor's default python
    command = " ".join([py, "-u -m submitit.core._submit", shlex.quote(str(Path(folder)))])
    return sl._make_sbatch_string(
        command=command, folder=folder, **{k: v for k, v in kwargs.items() if v is not None}
    )
