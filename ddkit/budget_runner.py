"""Executing a generation plan against the deadline: :class:`Runner` hands out a rank's batches and
re-plans their step counts before and during every batch (the planning itself is :mod:`ddkit.budget`).

Pure, like the planner: the clock is injected (``clock()`` returns seconds), so the tests drive it with a
fake clock and a fake machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ddkit.budget_types import Batch, Clock, CostModel, Plan
from ddkit.errors import BudgetError


@dataclass
class Event:
    """One finished batch, for the manifest and the budget plot (times relative to ``t0``, seconds).

    ``steps`` are the steps it ran (fewer than planned when cut short) and ``predicted`` the calibrated
    cost of those steps (speed factor 1), so ``(end - start) / predicted`` is its observed slowdown.
    """

    batch: int
    steps: int
    images: int
    start: float
    end: float
    predicted: float


@dataclass
class Runner:
    """Hands out this rank's batches with their step counts, re-planning against the deadline.

    Before every batch (``next()``):
    1. the speed estimate is the ratio of observed to predicted time of the latest batches (the worst of the
       last two, so a machine that slows down is believed at once and a single fast batch is not);
    2. steps for the remaining batches = the most, up to the plan's, that let them all finish by the soft
       deadline (``deadline − margin − reserve``); never below ``steps_min``;
    3. if even ``steps_min`` does not fit, batches are dropped from the tail (highest image indices first);
    4. the next batch starts only if its predicted time × ``start_headroom`` ends before the hard deadline
       (``deadline − reserve``); otherwise the run stops;
    5. inside a batch, :meth:`step_ok` after every step shortens the rest of its chain (or, if not even one
       step fits, abandons it and stops) when the speed observed in it says it would end after the hard
       deadline;
    6. when the planned batches are done early (the machine got faster), batches from ``extra`` (the
       continuation of the same index-major layout, up to ``ipc_max``) run at the planned steps while each
       still ends before the soft deadline.

    Attributes:
        plan, cost, batches: the plan, the calibrated cost model and this rank's batches (in order).
        deadline: absolute clock time of the end of the budget (seconds).
        margin_seconds: the safety margin kept free when planning.
        reserve_seconds: time needed after the last batch (save, merge, plots).
    """

    plan: Plan
    cost: CostModel
    batches: list[Batch]
    deadline: float
    clock: Clock
    steps_min: int
    t0: float = 0.0
    margin_seconds: float = 0.0
    reserve_seconds: float = 0.0
    start_headroom: float = 1.0
    extra: list[Batch] = field(default_factory=list)  # batches beyond the plan, run only when ahead
    events: list[Event] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    _pos: int = 0
    _ratios: list[float] = field(default_factory=list)
    _current: tuple[Batch, int, float] | None = None  # (batch, planned steps, start time)
    _last_step: float | None = None
    _steps_done: int = 0
    shortened: int = 0  # batches whose chain was respaced to fewer steps mid-way

    @property
    def speed_factor(self) -> float:
        """Observed ÷ predicted time (1 = as calibrated, 3 = three times slower)."""
        return max(self._ratios[-2:]) if self._ratios else 1.0

    def remaining(self) -> list[Batch]:
        return self.batches[self._pos :]

    def _steps_for(self, n_batches: int, seconds: float, cost: CostModel) -> int | None:
        if n_batches == 0:
            return self.plan.steps
        per_batch = seconds / n_batches
        s = (
            math.floor((per_batch - cost.batch_seconds) / cost.step_seconds)
            if cost.step_seconds > 0
            else self.plan.steps
        )
        s = min(self.plan.steps, s)
        return s if s >= self.steps_min else None

    def next(self) -> tuple[Batch, int] | None:
        """The next batch and its step count, or None when the run must stop (done or out of time)."""
        now = self.clock()
        cost = self.cost.scaled(self.speed_factor)
        if self._pos >= len(self.batches):
            # Ahead of schedule: DSR spends spare time on more images at the planned steps, one batch at a
            # time, while it still ends before the soft deadline.
            soft_end = self.deadline - self.margin_seconds - self.reserve_seconds
            if not self.extra or now + cost.batch_cost(self.plan.steps) > soft_end:
                return None
            self.batches.append(self.extra.pop(0))
        soft = self.deadline - self.margin_seconds - self.reserve_seconds - now
        rem = self.batches[self._pos :]
        steps = self._steps_for(len(rem), soft, cost)
        while steps is None and len(rem) > 1:
            # Even steps_min cannot finish everything: drop the tail (highest indices) until it can.
            self.dropped.append(rem[-1].index)
            rem = rem[:-1]
            steps = self._steps_for(len(rem), soft, cost)
        self.batches = self.batches[: self._pos] + rem
        steps = self.steps_min if steps is None else steps
        predicted = cost.batch_cost(steps)
        if now + predicted * self.start_headroom > self.deadline - self.reserve_seconds:
            self.dropped.extend(b.index for b in self.batches[self._pos :])
            self.batches = self.batches[: self._pos]
            return None
        batch = self.batches[self._pos]
        self._current = (batch, steps, now)
        self._last_step = None
        self._steps_done = 0
        return batch, steps

    def step_ok(self, step: int, steps: int) -> bool | int:
        """Mid-batch check after ``step`` (0-based) of ``steps`` (the sampler's ``step_callback``).

        At the speed of the latest step (the first step of a batch, which may pay for new kernels, counts
        at most twice the expected time), the rest of the batch, including its per-batch work scaled by
        the same slowdown, must end before the hard deadline (``deadline − reserve``). Returns True when it
        does; otherwise the number k >= 1 of remaining steps that still fits (the sampler respaces the rest
        of the chain from the current timestep: fewer steps, same images), or False when not even one step
        fits (the batch is abandoned, :meth:`abort`).
        """
        assert self._current is not None, "step_ok() without next()"
        _, _, start = self._current
        now = self.clock()
        last = now - (self._last_step if self._last_step is not None else start)
        self._last_step = now
        self._steps_done += 1
        expected = self.cost.step_seconds * self.speed_factor  # per step, from calibration + past batches
        # The latest step is the best estimate of the machine now; only the batch's first step may be a
        # one-off (new shapes' kernels), so it is trusted up to twice the expected time.
        per_step = max(min(last, 2 * expected) if step == 0 else last, 1e-9)
        slowdown = max(1.0, per_step / expected) if expected > 0 else 1.0
        remaining = steps - step - 1
        left = (
            self.deadline
            - self.reserve_seconds
            - now
            - self.cost.scaled(self.speed_factor * slowdown).batch_seconds
        )
        if per_step * remaining <= left:
            return True
        k = math.floor(left / per_step)
        if k < 1:
            return False
        self.shortened += 1
        return k

    def abort(self) -> None:
        """The current batch was abandoned (see :meth:`step_ok`): drop it and every later one."""
        assert self._current is not None, "abort() without next()"
        self.dropped.extend(b.index for b in self.batches[self._pos :])
        self.batches = self.batches[: self._pos]
        self._current = None

    def done(self, images: int | None = None) -> Event:
        """Record that the batch from the last :meth:`next` finished now.

        The speed ratio it records is the batch's wall time over the calibrated cost of the steps it RAN
        (``_steps_done``, counted by :meth:`step_ok`; the planned steps when the sampler gave no callback):
        a chain cut short by :meth:`step_ok` ran fewer steps than planned, and dividing by the planned
        steps' cost would read the machine as faster exactly when it has slowed.
        """
        assert self._current is not None, "done() without next()"
        batch, planned, start = self._current
        end = self.clock()
        steps = self._steps_done or planned
        predicted_base = self.cost.batch_cost(steps)  # at calibrated speed (speed factor 1)
        self._ratios.append(max((end - start) / predicted_base, 1e-6) if predicted_base > 0 else 1.0)
        ev = Event(
            batch=batch.index,
            steps=steps,
            images=len(batch.items) if images is None else images,
            start=start - self.t0,
            end=end - self.t0,
            predicted=predicted_base,
        )
        self.events.append(ev)
        self._pos += 1
        self._current = None
        return ev


class PreparationGuard:
    """Stops a method's one-off preparation (D^3HR's class statistics, IGD's surrogate training) before it
    spends a generation's budget: called as ``guard(done, left)`` after every unit of work (a class, a batch),
    it projects the end from the units done and raises once that end passes ``share`` of the time left at
    its start (the rest is kept for calibration, sampling and the merge).

    The rate is measured from the second unit on: the first pays one-off warm-ups (D^3HR on the 100-class
    stand-in of tests/test_scale_budget.py: 0.40 s for the first class against 0.23 s on average).

    Args:
        clock: seconds, the generation's clock; deadline: its end, on that clock.
        share: the fraction of the time left at the start that the preparation may take (0 < share < 1).
        what: the preparation and its unit for the refusal, e.g. ``("D^3HR statistics", "class")``.
        advice: the refusal's tail, naming the file or stage that spares the work; ``{done}`` is replaced by
            the units done when it raised.
    """

    def __init__(self, clock: Clock, deadline: float, *, share: float, what: tuple[str, str], advice: str) -> None:
        if not 0.0 < share < 1.0:
            raise ValueError(f"PreparationGuard: share must be in (0, 1), got {share}")
        self.clock, self.deadline, self.what, self.advice = clock, deadline, what, advice
        self.start = clock()
        self.stop_at = self.start + share * (deadline - self.start)
        self.first: float | None = None  # when the first unit was done: its time includes the warm-up

    def __call__(self, done: int, left: int) -> None:
        """After ``done`` units of this call, ``left`` still to do.

        Raises:
            BudgetError: the projected end is past the preparation's share (one line: the projected seconds,
                the measured rate, the seconds that were left, and ``advice``).
        """
        now = self.clock()
        if done >= 1 and self.first is None:
            self.first = now
        if left <= 0 or done < 2 or self.first is None:
            return
        per = (now - self.first) / (done - 1)
        if now + per * left <= self.stop_at:
            return
        need = (self.first - self.start) + per * (done + left - 1)
        name, unit = self.what
        raise BudgetError(
            f"generate.time_limit: {name} need ~{need:.0f} s for {done + left} {unit}es ({per:.3f} s/{unit} "
            f"measured), {self.deadline - self.start:.0f} s were left; {self.advice.format(done=done)}"
        )
