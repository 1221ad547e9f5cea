"""Stopping a training run on a signal: the handler only records it (:func:`request_stop`); every rank's loop
then agrees on one step boundary (:meth:`ddkit.train.Trainer._agree_stop`), writes one complete checkpoint
and raises :class:`Preempted`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Signal numbers received since the process started (appended by :func:`request_stop`, from a handler).
STOP: list[int] = []
#: The Trainer whose run is executing in this process (set and cleared by ``Trainer.run``).
_CURRENT: Any = None


def current_trainer() -> Any:
    """The :class:`ddkit.train.Trainer` whose ``run`` is executing in this process, or None (used by the
    SLURM checkpoint hook to save on preemption)."""
    return _CURRENT


def set_current(trainer: Any) -> None:
    """Record the running :class:`ddkit.train.Trainer` (None when its run ends)."""
    global _CURRENT
    _CURRENT = trainer


def request_stop(signum: int) -> None:
    """Ask the training loop of this process to stop at the next step boundary (safe in a signal handler:
    it only appends ``signum``)."""
    STOP.append(int(signum))


class Preempted(Exception):
    """Training stopped on a signal after writing a complete checkpoint at ``step`` (all ranks).

    Attributes: ``step`` (optimizer steps in the checkpoint), ``signals`` (signal numbers any rank had
    received, sorted), ``checkpoint`` (its path).
    """

    def __init__(self, step: int, signals: tuple[int, ...], checkpoint: Path) -> None:
        super().__init__(f"stopped on signal(s) {list(signals)} at step {step}; checkpoint {checkpoint}")
        self.step, self.signals, self.checkpoint = step, signals, checkpoint
