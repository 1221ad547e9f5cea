"""The stage graph and the one rule every entry point follows: skip an unchanged stage, rerun a changed one.

:func:`graph` declares, per stage, the config keys it reads, the upstream stages whose outputs it reads and
the weights paths it loads (:class:`Node`); :func:`node_inputs` turns that into the flat input mapping that
:mod:`ddkit.fingerprint` hashes. ``ddkit run`` (:mod:`ddkit.pipeline`) walks the whole graph; a stage run
by its own command (``ddkit train``, ``ddkit generate``, their SLURM jobs) goes through :func:`guard`, so
both answer a config change the same way:

* an unchanged fingerprint skips, with the reason;
* a changed one sets the old directory aside under ``RUN/.stale/`` and reruns (or, for a training stage
  whose only change is a larger step count, continues from its checkpoint);
* an interrupted run with the same inputs resumes.

Several processes (ranks, array tasks, a requeued attempt racing its predecessor) may enter :func:`guard`
for one stage at once: an exclusive lock beside the stage directory makes the decide-and-set-aside step
happen once, and the others then find the new ``fingerprint.json`` and resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddkit.config import TRAIN_STAGES, ExperimentConfig, to_dict
from ddkit.dist import dist_env
from ddkit.errors import ConfigError
from ddkit.fingerprint import (
    Decision,
    code_identity,
    decide,
    file_digest,
    fingerprint,
    path_identity,
    read_records,
    select,
    table_identity,
    write_start,
)
from ddkit.io import mark_done, read_done, set_aside
from ddkit.methods import registry

# Keys that change when logs and checkpoints are written, not the weights: not part of a training fingerprint.
_CADENCE = ("log_every", "ckpt_every")
STALE = ".stale"  # RUN/.stale/<stage>: the last directory set aside because its inputs changed
# Bookkeeping a job writes into a stage directory before the stage starts (its SLURM history): not an
# output, and carried into the fresh directory when the old one is set aside.
BOOKKEEPING = ("slurm_events.jsonl",)


@dataclass(frozen=True)
class Node:
    """One stage of the graph and exactly what it reads.

    ``reads``/``ignores``: config sections or dotted keys (:func:`ddkit.fingerprint.select`); ``upstream``:
    stages whose outputs it reads; ``paths``: config keys naming weights it loads (their files count);
    ``growable``: the step count whose growth continues training; ``off``: why the stage does not apply;
    ``tables``: config keys naming small files read whole (their bytes count).
    """

    name: str
    group: str
    reads: tuple[str, ...] = ()
    ignores: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    growable: str | None = None
    off: str | None = None
    tables: tuple[str, ...] = ()


def generation_node(cfg: ExperimentConfig, method: str) -> Node:
    """The ``gen-<method>`` stage: the ``generate`` section minus the sections of other methods
    (:func:`ddkit.methods.registry.sections_ignored`), upon the weights the method samples.

    Raises:
        ConfigError: an unknown method.
    """
    from_pre = () if cfg.model.pretrained else ("pretrain",)
    on_minimax = registry.build(method, cfg).weights == "minimax"
    up = () if cfg.generate.checkpoint else ("minimax",) if on_minimax else from_pre
    ignores = ("generate.method",) + registry.sections_ignored(method)
    return Node(f"gen-{method}", "generate", ("seed", "model", "generate"), ignores, ("shard", *up),
                ("generate.checkpoint", "model.pretrained"), tables=("generate.quality",))  # fmt: skip


def graph(cfg: ExperimentConfig) -> list[Node]:
    """The stages of ``cfg`` in run order, each with the inputs it reads (module docstring).

    Raises:
        ConfigError: an unknown method in ``methods`` or ``package.method``.
    """

    nodes = graph_base(cfg)
    nodes += [generation_node(cfg, m) for m in cfg.methods]
    gens = tuple(f"gen-{m}" for m in cfg.methods)
    nodes.append(Node("evaluate", "evaluate", ("evaluate", "methods"), upstream=("shard", *gens)))
    if cfg.package.method is not None and cfg.package.method not in cfg.methods:
        raise ConfigError(f"package.method: {cfg.package.method!r} is not one of methods {list(cfg.methods)}")
    nodes.append(Node("package", "package", ("package", "data.dataset"), upstream=(f"gen-{packaged(cfg)}",)))
    nodes.append(Node("report", "report"))
    return nodes


def packaged(cfg: ExperimentConfig) -> str:
    """The method whose set ``ddkit run`` packages: ``package.method``, else the first of ``methods``."""
    return cfg.package.method or cfg.methods[0]


def version() -> str:
    """ddkit's code identity in every fingerprint (:func:`ddkit.fingerprint.code_identity`: the version and a
    digest of the installed sources and assets)."""
    return code_identity()


def node_inputs(node: Node, cfgd: dict[str, Any], fps: dict[str, str], code: str) -> dict[str, Any]:
    """The flat input mapping of ``node`` (:mod:`ddkit.fingerprint`): config keys, upstream fingerprints,
    identities of the weights paths it names, the tables it reads and ddkit's code identity ``code``."""
    inputs = select(cfgd, node.reads, node.ignores)
    inputs.update({f"upstream.{u}": fps.get(u, "<pending>") for u in node.upstream})
    for key in node.paths:
        value = select(cfgd, (key,)).get(key)
        if value:
            inputs[f"path.{key}"] = path_identity(value)
    inputs.update({f"file.{k}": v for k in node.tables if (v := table_identity(select(cfgd, (k,)).get(k)))})
    inputs["ddkit"] = code
    return inputs


def stage_dir(cfg: ExperimentConfig, node: Node) -> Path:
    """Where a stage keeps its ``DONE`` record (the package stage: ``RUN/package/``, beside its output)."""
    run = Path(cfg.run_dir)
    return {"shard": Path(cfg.data.shards), "evaluate": run / "eval"}.get(node.name, run / node.name)


def remember(cfg: ExperimentConfig, node: Node, fps: dict[str, str]) -> None:
    """A skipped stage's fingerprint, as recorded on disk, for the stages downstream of it."""
    if node.name == "shard":
        index = Path(cfg.data.shards) / "dataset.json"
        if index.is_file():
            fps["shard"] = file_digest(index)
    elif node.name != "report" and not node.off:
        rec = read_done(stage_dir(cfg, node))
        if rec and "fingerprint" in rec:
            fps[node.name] = rec["fingerprint"]


def inputs_on_disk(cfg: ExperimentConfig, node: Node) -> dict[str, Any]:
    """``node``'s inputs with its upstream fingerprints as the run directory records them (a stage run by its
    own command: what ``ddkit run`` would compute for it)."""
    fps: dict[str, str] = {}
    for n in graph_base(cfg):
        if n.name in node.upstream:
            remember(cfg, n, fps)
    return node_inputs(node, to_dict(cfg), fps, version())


def graph_base(cfg: ExperimentConfig) -> list[Node]:
    """The shard and training stages of ``cfg`` (what any generation or training stage reads from)."""
    pre = "model.pretrained given" if cfg.model.pretrained else None
    from_pre = () if cfg.model.pretrained else ("pretrain",)  # the weights minimax starts from
    nodes = [Node("shard", "shard", ("data",))]
    for st in TRAIN_STAGES:
        up = from_pre if st == "minimax" and cfg.minimax.init is None else ()
        nodes.append(
            Node(
                st, st, ("seed", "model", st, "data.num_workers"), tuple(f"{st}.{k}" for k in _CADENCE),
                ("shard", *up), (f"{st}.init", "model.pretrained"), f"{st}.steps", pre if st == "pretrain" else None,
            )
        )  # fmt: skip
    return nodes


@contextlib.contextmanager
def _locked(sdir: Path) -> Iterator[None]:
    """An exclusive lock on ``sdir``'s lock file (beside it, so setting the directory aside keeps it)."""
    lock = sdir.parent / f".{sdir.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def enter(cfg: ExperimentConfig, node: Node, sdir: Path, *, force: bool = False, has_output: Callable[[], bool],
          log: Callable[[str], None] = print) -> tuple[Decision, dict[str, Any]]:  # fmt: skip
    """Decide ``node`` in ``sdir`` for a stage run by its own command, and make the directory fit the decision:
    ``skip`` leaves it; ``run`` sets an existing one aside under ``RUN/.stale/`` (never resumed, never mixed
    with new shards); ``run``, ``resume`` and ``continue`` record the inputs (``fingerprint.json``) first.
    One process at a time (:func:`_locked`); the reason is logged.

    Returns:
        (the decision, the inputs to stamp into the stage's DONE once it is complete).
    """
    inputs = inputs_on_disk(cfg, node)
    with _locked(sdir):
        done, started = read_records(sdir)
        partial = sdir.is_dir() and any(p.name not in BOOKKEEPING for p in sdir.iterdir())
        d = decide(inputs, done, started, forced=force, growable=node.growable, has_output=has_output(),
                   has_partial=partial)  # fmt: skip
        if d.runs:
            if d.action == "run" and (done is not None or started is not None or partial):
                _set_aside_keeping(sdir, Path(cfg.run_dir) / STALE)
            sdir.mkdir(parents=True, exist_ok=True)
            write_start(sdir, inputs)
    if d.action != "skip" or done is not None:
        log(f"[{node.name}] {d.action}: {d.reason}")
    return d, inputs


def _set_aside_keeping(sdir: Path, stale: Path) -> None:
    """:func:`ddkit.io.set_aside`, then the :data:`BOOKKEEPING` files copied back into a fresh ``sdir``."""

    moved = set_aside(sdir, stale)
    sdir.mkdir(parents=True, exist_ok=True)
    for name in BOOKKEEPING:
        if moved is not None and (moved / name).is_file():
            shutil.copy2(moved / name, sdir / name)


def stamp(sdir: Path, inputs: dict[str, Any]) -> None:
    """Add the fingerprint of ``inputs`` to ``sdir``'s DONE record (a later run or command skips the stage)."""
    rec = read_done(sdir)
    if rec is not None and rec.get("fingerprint") != fingerprint(inputs):
        mark_done(sdir, rec, fingerprint=fingerprint(inputs), inputs=inputs)


@contextlib.contextmanager
def outside_run(cfg: ExperimentConfig, name: str, *, force: bool = False) -> Iterator[Decision | None]:
    """Around a training stage run by its own command (``ddkit train``, ``submit train``; rank 0 decides):
    :func:`enter`, then the fingerprint stamped into the new ``DONE``, so ``ddkit run`` and the command
    answer a config change alike. Yields the decision (None on other ranks, which follow rank 0's directory)."""
    from ddkit.models.checkpoint import checkpoint_path

    node = next((n for n in graph_base(cfg) if n.name == name and not n.off), None)
    if node is None or not dist_env().is_main:
        yield None
        return
    sdir = stage_dir(cfg, node)
    d, inputs = enter(cfg, node, sdir, force=force, has_output=lambda: checkpoint_path(sdir).exists())
    yield d
    stamp(sdir, inputs)
