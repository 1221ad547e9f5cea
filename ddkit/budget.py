"""Time-budget planning for generation: Diffusion Step Reduction (DSR) under a hard deadline.

The ECCV 2024 DD Challenge gives a fixed wall time for the whole generation, model loading included. The
planner turns that into two numbers — sampling steps and images per class (IPC) — and then keeps the run
inside the deadline while it executes (:class:`Runner`, in :mod:`ddkit.budget_runner`). Everything here is
pure: the clock is injected (``clock()`` returns seconds, e.g. ``time.monotonic``), and so is the
calibration workload, so the tests drive it with a fake clock and a fake machine.

Model of the machine (calibrated on the real hardware, at the real batch size)::

    seconds(batch at s steps) = s · step_seconds + batch_seconds

``step_seconds`` is one sampling step of a full batch (the CFG-doubled forward + scheduler step) and
``batch_seconds`` the per-batch fixed cost (noise, VAE decode, uint8 conversion). A partial last batch is
charged as a full one (on a GPU it costs about the same).

Quality model:
* ``"dsr"`` — the Diffusion Step Reduction rule (ECCV 2024 DD Challenge, 2nd place): hold the fewest
  steps that keep quality (``dsr_min_steps_quality``, clipped to [steps_min, steps_max]) and spend the rest
  of the budget on IPC; steps drop below it only when even ``ipc_min`` does not fit, and rise above it only
  once ``ipc_max`` is reached.
* a table ``{(steps, ipc): accuracy}`` of measured results: the feasible (steps, IPC) with the best
  accuracy, where a point takes the value of the best table entry it dominates (at least as many steps
  and images), ties broken towards more IPC, then more steps.

Work order: images are numbered index-major, ``item k = (class k % K, index k // K)``, cut into global
batches of ``batch_size``; batch ``b`` belongs to rank ``b % world_size``. Whatever prefix of the batches
gets done, classes stay within one image of each other, and the merge cuts every class to the same IPC
(dropping the highest indices — deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ddkit.assets import asset_path

# The shared types and the executor have their own modules (the runner does not import the planner: no
# cycle); re-exported so ``from ddkit.budget import Runner, CostModel, ...`` keeps working.
from ddkit.budget_runner import Event, Runner
from ddkit.budget_types import Batch, Clock, CostModel, Plan
from ddkit.errors import BudgetError, ConfigError, WeightsError


# ----------------------------------------------------------------------------------------------------------
# Calibration (the cost model itself: ddkit.budget_types)
# ----------------------------------------------------------------------------------------------------------
def calibrate(
    run_steps: Callable[[int], None],
    *,
    clock: Clock,
    batch_size: int,
    steps: tuple[int, int] = (1, 3),
    fixed: Callable[[], None] | None = None,
) -> CostModel:
    """Time the real workload at the real batch size.

    ``run_steps(n)`` must sample one full batch with ``n`` steps (everything but the per-batch fixed work).
    It is called once untimed at ``steps[0]`` (warm-up: allocator, kernels, lazy init), then timed at
    ``steps[0]`` and ``steps[1]``: ``step_seconds`` is the slope, and the intercept (noise, scheduler setup)
    plus one timed ``fixed()`` call (VAE decode, uint8 conversion) is ``batch_seconds``. Timing noise can
    make the slope too small, so it is floored at ``t(steps[1]) / steps[1] / 2``.

    Args:
        run_steps: callable sampling a batch of ``batch_size`` with the given number of steps.
        clock: seconds (monotonic).
        batch_size: images per batch (stored in the result for the per-image figure).
        steps: the two step counts timed (``steps[1] > steps[0] >= 1``).
        fixed: per-batch work outside the sampler (decode), timed once; None: none.

    Returns:
        The calibrated :class:`CostModel` (seconds).
    """
    lo, hi = steps
    run_steps(lo)
    t = clock()
    run_steps(lo)
    t_lo = clock() - t
    t = clock()
    run_steps(hi)
    t_hi = clock() - t
    slope = max((t_hi - t_lo) / (hi - lo), t_hi / hi / 2, 1e-9)
    intercept = max(0.0, t_hi - slope * hi)
    fixed_s = 0.0
    if fixed is not None:
        t = clock()
        fixed()
        fixed_s = clock() - t
    return CostModel(step_seconds=slope, batch_seconds=intercept + fixed_s, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------------
# Work layout
# ----------------------------------------------------------------------------------------------------------
def make_batches(num_classes: int, ipc: int, batch_size: int) -> list[Batch]:
    """All global batches for ``ipc`` images of each of ``num_classes`` classes (index-major order)."""
    total = num_classes * ipc
    items = [(k % num_classes, k // num_classes) for k in range(total)]
    return [Batch(b, tuple(items[s : s + batch_size])) for b, s in enumerate(range(0, total, batch_size))]


def split_plan(num_classes: int, ipc: int, ipc_cap: int, batch_size: int, rank: int, world_size: int):
    """This rank's planned batches and its extension batches (for early finishes), on ONE global layout.

    The layout is :func:`make_batches` at ``ipc_cap``; a batch is planned when it starts within the first
    ``num_classes × ipc`` images (the last planned batch may carry a few images beyond ``ipc``; the merge
    cuts the set to a balanced IPC). Because the layout does not depend on ``ipc``, images and batches are
    the same whatever the plan, the rank or the world size.

    Returns:
        ``(planned, extra)``: lists of :class:`Batch` for ``rank``.
    """
    ipc_cap = max(ipc, ipc_cap)
    n_planned = math.ceil(num_classes * ipc / batch_size)
    mine = rank_batches(make_batches(num_classes, ipc_cap, batch_size), rank, world_size)
    return [b for b in mine if b.index < n_planned], [b for b in mine if b.index >= n_planned]


def rank_batches(batches: Sequence[Batch], rank: int, world_size: int) -> list[Batch]:
    """The batches of ``rank``: global batch ``b`` goes to rank ``b % world_size`` (deterministic)."""
    return [b for b in batches if b.index % world_size == rank]


def batches_per_rank(num_classes: int, ipc: int, batch_size: int, world_size: int) -> int:
    """Batches of the busiest rank (rank 0) for a given IPC."""
    n = math.ceil(num_classes * ipc / batch_size)
    return math.ceil(n / world_size)


def balanced_ipc(counts: Mapping[int, int] | Sequence[int]) -> int:
    """IPC of the class-balanced set: the smallest per-class count (surplus is dropped)."""
    vals = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    return min(vals) if vals else 0


# ----------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """Search box for (steps, IPC) from ``GenerateConfig``."""

    steps_min: int
    steps_max: int
    ipc_min: int
    ipc_max: int
    dsr_steps: int = 25


class QualityTable(dict):
    """``{(steps, ipc[, ratio]): accuracy (%)}`` as read by :func:`load_quality_table`, plus
    ``measured_with``: the generation method whose samples were scored (None: the file does not say), and
    ``made_on``: the dataset and classes they were scored on (:mod:`ddkit.models.provenance`; None: unsaid)."""

    measured_with: str | None = None
    made_on: dict | None = None


def load_quality_table(path, *, index: dict | None = None, class_map: str = "auto") -> QualityTable:
    """Read a YAML/JSON table of measured accuracies.

    ``path`` is a file, or ``ddkit:NAME/FILE``: a table shipped with a model (:mod:`ddkit.assets`).
    Accepted forms: a list of ``{steps, ipc, accuracy}`` mappings (optionally with ``ratio``, the
    over-generation ratio of a ``+select`` method: ``ratio × ipc`` candidates per class, ``ipc`` kept); a
    mapping ``"steps,ipc": accuracy`` / ``"steps,ipc,ratio": accuracy``; or ``{method: NAME, rows: LIST}``,
    which also names the method whose samples were scored (``bench/quality.py`` writes this form), and may
    carry ``made_on``: the dataset and classes it was measured on (:mod:`ddkit.models.provenance`).

    Args:
        path: the table (``generate.quality``).
        index, class_map: the run's shard index (:func:`ddkit.data.read_index`) and ``model.class_map``:
            when given, a table measured on other classes is refused
            (:func:`ddkit.models.provenance.check_classes`).

    Returns:
        ``{(steps, ipc): accuracy}``, or ``{(steps, ipc, ratio): accuracy}`` when any row gives a ratio,
        as a :class:`QualityTable` (a dict) whose ``measured_with`` is the named method or None and
        ``made_on`` its record or None.

    Raises:
        ConfigError: file missing or malformed (names the file); measured on other classes than ``index``'s
            with ``class_map`` ``auto`` (one line naming both datasets and ``model.class_map``).
    """

    from ddkit.models.provenance import check_classes, check_record

    try:
        p = Path(asset_path(str(path)))
    except WeightsError as e:
        raise ConfigError(f"generate.quality: {e}") from None
    if not p.is_file():
        raise ConfigError(f"generate.quality: table file {p} not found (use 'dsr' or a YAML/JSON table)")
    data = yaml.safe_load(p.read_text())
    method = made_on = None
    if isinstance(data, dict) and "rows" in data:
        method, made_on, data = data.get("method"), data.get("made_on"), data["rows"]
        if method is not None and not isinstance(method, str):
            raise ConfigError(f"{p}: 'method' must be a method name, got {method!r}")
        if made_on is not None:
            check_record(made_on, str(p), ConfigError)
    if index is not None:
        check_classes(made_on, index, class_map, what="quality table", where=str(p))
    try:
        rows = _quality_rows(data)
    except (KeyError, ValueError, TypeError, AttributeError):
        raise ConfigError(
            f"{p}: expected a list of {{steps, ipc[, ratio], accuracy}}, 'steps,ipc[,ratio]: accuracy'"
            " or {method, rows}"
        ) from None
    if not rows:
        raise ConfigError(f"{p}: empty quality table")
    if any(r is not None for _, _, r, _ in rows):
        table = QualityTable({(s, i, 1.0 if r is None else r): a for s, i, r, a in rows})
    else:
        table = QualityTable({(s, i): a for s, i, _, a in rows})
    table.measured_with, table.made_on = method, made_on
    return table


def _quality_rows(data) -> list[tuple[int, int, float | None, float]]:
    rows: list[tuple[int, int, float | None, float]] = []
    if isinstance(data, list):
        for row in data:
            r = row.get("ratio")
            rows.append((int(row["steps"]), int(row["ipc"]), None if r is None else float(r), float(row["accuracy"])))
    elif isinstance(data, dict):
        for k, v in data.items():
            parts = str(k).split(",")
            if len(parts) not in (2, 3):
                raise ValueError
            r = float(parts[2]) if len(parts) == 3 else None
            rows.append((int(parts[0]), int(parts[1]), r, float(v)))
    else:
        raise ValueError
    return rows


def plan(
    available_seconds: float,
    cost: CostModel,
    bounds: Bounds,
    *,
    num_classes: int,
    batch_size: int,
    world_size: int = 1,
    quality: str | Mapping[tuple, float] = "dsr",
    ratios: Sequence[float] = (1.0,),
) -> Plan:
    """Choose (steps, IPC, over-generation ratio) for the sampling time left.

    The third axis is over-generation (ddkit's, after CaO2 / D^3HR's group selection): at ratio r a plan
    samples ``ceil(r · ipc)`` candidates per class and a ``+select`` method keeps ``ipc`` of them
    (:mod:`ddkit.methods.selected`). Sampling cost scales with the candidates, so r competes with steps and IPC.

    Args:
        available_seconds: wall seconds every rank may spend sampling (deadline − margin − reserve − now).
        cost: calibrated :class:`CostModel` (the slowest rank's, when ranks share one plan).
        bounds: [steps_min, steps_max] × [ipc_min, ipc_max] (IPC *kept*) and the DSR steps.
        num_classes: K.
        batch_size: images per batch.
        world_size: ranks sampling in parallel (batches are dealt round-robin).
        quality: ``"dsr"`` or a table ``{(steps, ipc[, ratio]): accuracy}`` (module docstring); a point takes
            the best entry of its own ratio that it dominates in steps and IPC. When no feasible point
            dominates any entry (a table measured at larger steps or IPC) the DSR rule plans instead.
        ratios: the over-generation ratios allowed (>= 1). DSR has no quality model for them and takes the
            largest that fits ``steps_min`` × ``ipc_min``; a table picks the best measured.

    Returns:
        The :class:`Plan`: ``ipc`` candidates per class to sample, ``kept_ipc`` and ``ratio``.

    Raises:
        BudgetError: even ``steps_min`` steps at ``ipc_min`` (smallest ratio) do not fit; or a bad ratio.
    """
    rs = sorted({float(r) for r in ratios})
    if not rs or rs[0] < 1.0:
        raise BudgetError(f"generate.select.ratio: ratios must be >= 1, got {list(ratios)}")

    def seconds(s: int, i: int, r: float) -> float:
        return batches_per_rank(num_classes, math.ceil(r * i), batch_size, world_size) * cost.batch_cost(s)

    def fits(s: int, i: int, r: float) -> bool:
        return seconds(s, i, r) <= available_seconds

    b = bounds
    if not fits(b.steps_min, b.ipc_min, rs[0]):
        need = seconds(b.steps_min, b.ipc_min, rs[0])
        raise BudgetError(
            f"generate.time_limit: {available_seconds:.1f} s left for sampling, but steps_min={b.steps_min} at "
            f"ipc_min={b.ipc_min} needs {need:.1f} s ({cost.step_seconds:.3g} s/step per batch of "
            f"{batch_size}, {num_classes} classes, {world_size} rank(s)); raise the limit or lower the minimums"
        )

    def max_ipc(s: int, r: float) -> int:
        return _max_ipc(b, lambda i: fits(s, i, r))

    if isinstance(quality, str) and quality != "dsr":
        raise BudgetError(f"generate.quality: unknown quality model {quality!r} (use 'dsr' or a table)")
    picked = None if isinstance(quality, str) else _plan_table(b, dict(quality), rs, max_ipc)
    if picked is not None:
        s, i, r, reason = picked
        name = "table"
    else:
        r = max(x for x in rs if fits(b.steps_min, b.ipc_min, x))
        s, i, reason = _plan_dsr(b, lambda s_: max_ipc(s_, r), lambda s_, i_: fits(s_, i_, r))
        if not isinstance(quality, str):  # a table measured elsewhere in (steps, IPC): no point to rank
            reason = f"table: no measured point within these bounds, so the {reason}"
        name = "dsr"
    n = math.ceil(r * i)
    if r > 1.0:
        reason += f"; over-generate {r:g}x: {n} candidates per class, keep {i}"
    return Plan(
        steps=s, ipc=n, num_classes=num_classes, batch_size=batch_size, world_size=world_size,
        batches_per_rank=batches_per_rank(num_classes, n, batch_size, world_size),
        available_seconds=available_seconds, predicted_seconds=seconds(s, i, r), quality=name, reason=reason,
        ratio=r, kept_ipc=i,
    )  # fmt: skip


def _max_ipc(b: Bounds, fits: Callable[[int], bool]) -> int:
    """The largest IPC in [ipc_min, ipc_max] with ``fits(ipc)`` (monotone: binary search), else ipc_min - 1."""
    lo = b.ipc_min
    if not fits(lo):
        return lo - 1
    hi = b.ipc_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _plan_dsr(b: Bounds, max_ipc: Callable[[int], int], fits: Callable[[int, int], bool]) -> tuple[int, int, str]:
    """The DSR rule (module docstring) at one ratio: (steps, kept IPC, reason)."""
    s = min(max(b.dsr_steps, b.steps_min), b.steps_max)
    i = max_ipc(s)
    if i < b.ipc_min:
        while s > b.steps_min and max_ipc(s) < b.ipc_min:
            s -= 1
        i = max_ipc(s)  # a partial last batch may hold more than ipc_min at no extra cost
        return s, i, f"DSR: {b.dsr_steps} steps do not fit ipc_min; lowered to {s} steps (IPC {i})"
    if i >= b.ipc_max:
        i = b.ipc_max
        while s < b.steps_max and fits(s + 1, i):
            s += 1
        return s, i, f"DSR: ipc_max={i} reached; spare time raised steps to {s}"
    return s, i, f"DSR: hold {s} steps, spend the rest on IPC={i}"


def _plan_table(
    b: Bounds, table: dict[tuple, float], ratios: list[float], max_ipc: Callable[[int, float], int]
) -> tuple[int, int, float, str] | None:
    """The best measured feasible (steps, kept IPC, ratio); ties go to more IPC, more steps, less ratio.
    None when no feasible point dominates a table entry (the caller falls back to the DSR rule)."""
    entries = [(k[0], k[1], float(k[2]) if len(k) > 2 else 1.0, a) for k, a in table.items()]

    def q(s: int, i: int, r: float) -> float:
        dominated = [a for ts, ti, tr, a in entries if ts <= s and ti <= i and tr == r]
        return max(dominated) if dominated else -math.inf

    best = None
    for r in ratios:
        for s in range(b.steps_min, b.steps_max + 1):
            for i in range(b.ipc_min, max_ipc(s, r) + 1):
                key = (q(s, i, r), i, s, -r)
                if best is None or key > best[0]:
                    best = (key, s, i, r)
    assert best is not None  # (steps_min, ipc_min, smallest ratio) fits
    (qv, *_), s, i, r = best
    if qv == -math.inf:
        return None
    return s, i, r, f"table: best measured accuracy {qv:g} reachable at steps={s}, ipc={i}, ratio={r:g}"


__all__ = [
    "Batch", "Bounds", "Clock", "CostModel", "Event", "Plan", "Runner", "balanced_ipc", "batches_per_rank",
    "QualityTable", "calibrate", "load_quality_table", "make_batches", "plan", "rank_batches", "split_plan",
]  # fmt: skip
