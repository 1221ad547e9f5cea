"""The types the budget planner (:mod:`ddkit.budget`) and its executor (:mod:`ddkit.budget_runner`) share:
the clock, the cost model of the machine, a batch of the work layout and the plan. A leaf module, so the
runner needs nothing from the planner (no import cycle); :mod:`ddkit.budget` re-exports every name.

Model of the machine (calibrated on the real hardware, at the real batch size; :func:`ddkit.budget.calibrate`)::

    seconds(batch at s steps) = s · step_seconds + batch_seconds
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

#: Seconds, monotonic (``time.monotonic`` in a run, a fake clock in the tests).
Clock = Callable[[], float]


@dataclass(frozen=True)
class CostModel:
    """Seconds per full batch: ``steps * step_seconds + batch_seconds`` (see module docstring)."""

    step_seconds: float
    batch_seconds: float = 0.0
    batch_size: int = 1

    def batch_cost(self, steps: int) -> float:
        """Predicted seconds for one batch at ``steps`` sampling steps."""
        return steps * self.step_seconds + self.batch_seconds

    @property
    def image_step_seconds(self) -> float:
        """Seconds per image per step at this batch size (reported in manifests)."""
        return self.step_seconds / max(1, self.batch_size)

    def scaled(self, factor: float) -> CostModel:
        return CostModel(self.step_seconds * factor, self.batch_seconds * factor, self.batch_size)


@dataclass(frozen=True)
class Batch:
    """One global batch: ``items`` = ((class, index), ...) in index-major order."""

    index: int
    items: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Plan:
    """What the planner chose, and why (serialised into the manifest)."""

    steps: int
    ipc: int
    num_classes: int
    batch_size: int
    world_size: int
    batches_per_rank: int
    available_seconds: float  # for sampling, after margin and reserve
    predicted_seconds: float  # busiest rank
    quality: str
    reason: str
    ratio: float = 1.0  # over-generation: ``ipc`` candidates per class are made, ``kept_ipc`` are selected
    kept_ipc: int | None = None  # images per class after selection (None: ``ipc``, no selection)

    def to_dict(self) -> dict:
        return asdict(self)
