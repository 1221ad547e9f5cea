"""The jobs ddkit pickles for submitit and runs on the compute node, and the events they record.

Preemption and time limits (submitit's protocol): SLURM sends ``USR2`` ``signal_delay_s`` seconds before
the limit (or at preemption); submitit calls the job's ``checkpoint`` on global rank 0, which writes an
atomic checkpoint and returns the job to resubmit; submitit then runs ``scontrol requeue``. The requeued
training job restarts with ``resume="auto"``; a requeued generation job skips its completed shards and
starts a fresh time budget, recorded in ``slurm_events.jsonl`` and in the merged ``manifest.json``.

A job whose work is done ignores those signals from then on (:func:`_ignore_stop_signals`): a warning that
arrives after the last step must neither requeue a finished job nor kill it while Python shuts down,
which SLURM records as ``FAILED`` (signal 12) although the job completed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from ddkit import dist
from ddkit.cluster.introspect import run_slurm
from ddkit.config import ExperimentConfig
from ddkit.dist import process_start_monotonic
from ddkit.errors import ClusterError
from ddkit.generate import generate, merge
from ddkit.io import append_jsonl, atomic_write_json, is_done, read_jsonl
from ddkit.stages import outside_run
from ddkit.train import Preempted, current_trainer, request_stop, train

EVENTS = "slurm_events.jsonl"  # per stage/gen dir: requeues and restarts, appended by the jobs


def record_event(directory: str | Path, event: str, **info: Any) -> None:
    """Append one line to ``directory/slurm_events.jsonl`` (start, requeue, ...), with SLURM's ids."""

    append_jsonl(
        Path(directory) / EVENTS, {"event": event, "time": time.time(), **dist.slurm_job_ids(), **info}
    )


def read_events(directory: str | Path) -> list[dict[str, Any]]:
    """The events :func:`record_event` appended (empty when none)."""

    return read_jsonl(Path(directory) / EVENTS)


def _is_rank0() -> bool:
    return dist.dist_env().is_main


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
    job = dist.slurm_job_id()
    if not job:
        return True
    try:
        state = run_slurm(["squeue", "-h", "-j", job, "-o", "%T"], timeout=10).strip()
    except ClusterError:
        return True
    return state != "RUNNING"


def _ignore_stop_signals() -> bool:
    """Ignore SLURM's stop signals (SIGTERM, USR2) from now on, in a submitit job on SLURM whose work is
    done (every rank past its last barrier); returns whether it did (False: in-process executors, threads).

    Why: until the process exits, submitit's USR2 handler would checkpoint and ``scontrol requeue`` the
    finished job and exit 255 (before its result is pickled: one more attempt); and once Python shuts down
    it puts the default action back on every signal it handles, so a time-limit warning sent then kills
    the process: SLURM records the step ``CANCELLED`` by signal 12 and the job ``FAILED`` (``ExitCode
    12:0``), although the job completed. An ignored signal stays ignored through the shutdown, so the
    process exits 0 and the job reads ``COMPLETED``.
    """

    if not dist.submitit_on_slurm() or threading.current_thread() is not threading.main_thread():
        return False
    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    return True


@contextlib.contextmanager
def _stop_on_signals():
    """Route SIGTERM and USR2 to :func:`ddkit.train.request_stop` while training; yield the handler USR2
    had (submitit's checkpoint-and-requeue). Afterwards the old handlers come back, except after a job
    on SLURM that finished: those signals are then ignored (:func:`_ignore_stop_signals`), with no moment
    in between at which submitit's handler could requeue the finished job."""

    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread only
        yield None
        return
    sigs = (signal.SIGTERM, signal.SIGUSR2)
    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, lambda signum, _frame: request_stop(signum))
    finished = False
    try:
        yield old[signal.SIGUSR2]
        finished = True
    finally:
        if not (finished and _ignore_stop_signals()):
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
        if _is_rank0():
            record_event(self.stage_dir, "start", resume_step=_checkpoint_step(self.stage_dir))
        with _stop_on_signals() as requeue_handler:
            try:
                with outside_run(self.cfg, self.stage):  # a later `ddkit run` skips or resumes this stage
                    ckpt = train(self.cfg, self.stage, resume="auto", max_steps=self.max_steps, progress=False)
                return str(ckpt)
            except Preempted as p:
                self._leave(p, requeue_handler)
                raise

    def _leave(self, p: Any, requeue_handler: Any) -> None:
        """After a stop on a signal (checkpoint written by every rank's loop): rank 0 requeues through
        submitit when SLURM does not end the attempt itself; every rank exits without a result pickle."""

        if not dist.submitit_on_slurm():
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

        # The budget clock starts with this process (interpreter start-up and imports count), never with
        # an earlier attempt of the same job, nor with a DDKIT_T0 exported from the submitting shell.
        # In-process executors (tests) start it now.
        dist.drop_budget_start()
        in_slurm = dist.submitit_on_slurm()
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
        out = generate(self.cfg, **kwargs)
        _ignore_stop_signals()  # done (every rank past the merge barrier): a late warning must not requeue
        return str(out)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        # Completed shards are on disk (atomic dirs + DONE); the requeued job skips them.
        record_event(
            self.gen_dir, "requeue", shard=self.shard, budget="restarts from the new attempt's start"
        )
        job = type(self)(self.cfg, self.method, self.time_limit, self.shard, self.num_shards)
        return DelayedSubmission(job, *args, **kwargs)


def merge_job(gen_dir: str) -> str:
    """Merge the shards of ``gen_dir`` (:func:`ddkit.generate.merge`) and add the SLURM history
    (job ids, restarts, requeues) to ``manifest.json`` under ``"slurm"``. Returns the ``dataset.pt`` path."""

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
    _ignore_stop_signals()  # merged: a late warning must neither requeue nor fail the job
    return str(out)
