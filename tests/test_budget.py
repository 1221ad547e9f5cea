"""The DSR budget planner against a fake clock and a fake machine (no torch, no sleeps)."""

from __future__ import annotations

import random

import pytest

from ddkit.budget import (
    Bounds,
    CostModel,
    Runner,
    balanced_ipc,
    calibrate,
    make_batches,
    plan,
    rank_batches,
    split_plan,
)
from ddkit.errors import BudgetError


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeMachine:
    """Sampling a batch advances the fake clock; ``slow`` maps a clock time to a slowdown factor."""

    def __init__(
        self, clock: FakeClock, step_s: float, fixed_s: float, slow=lambda t: 1.0, noise=0.0, rng=None
    ):
        self.clock, self.step_s, self.fixed_s, self.slow = clock, step_s, fixed_s, slow
        self.noise, self.rng = noise, rng or random.Random(0)

    def run(self, steps: int, fixed: bool = True) -> None:
        # Integrate in small slices so a slowdown can start in the middle of a batch.
        work = steps * self.step_s + (self.fixed_s if fixed else 0.0)
        work *= 1.0 + (self.rng.uniform(-self.noise, self.noise) if self.noise else 0.0)
        while work > 1e-12:
            f = self.slow(self.clock.t)
            dt = min(work, 0.05)
            self.clock.t += dt * f
            work -= dt


BOUNDS = Bounds(steps_min=10, steps_max=50, ipc_min=1, ipc_max=50, dsr_steps=25)
WIDE = Bounds(steps_min=10, steps_max=50, ipc_min=1, ipc_max=10_000, dsr_steps=25)


def simulate(limit, machine, clock, *, K=10, B=20, bounds=BOUNDS, margin=0.1, reserve=1.0, world=1, rank=0):
    t0 = clock()
    machine.run(0, fixed=True)  # "model loading"
    cost = calibrate(
        lambda n: machine.run(n, fixed=False), clock=clock, batch_size=B, fixed=lambda: machine.run(0)
    )
    deadline = t0 + limit
    avail = deadline - margin * limit - reserve - clock()
    p = plan(avail, cost, bounds, num_classes=K, batch_size=B, world_size=world)
    planned, extra = split_plan(K, p.ipc, min(bounds.ipc_max, 4 * p.ipc + 8), B, rank, world)
    runner = Runner(
        plan=p,
        cost=cost,
        batches=planned,
        extra=extra,
        deadline=deadline,
        clock=clock,
        steps_min=bounds.steps_min,
        t0=t0,
        margin_seconds=margin * limit,
        reserve_seconds=reserve,
    )
    done_items = []
    while (nxt := runner.next()) is not None:
        batch, steps = nxt
        aborted = False
        i, n = 0, steps
        while i < n:  # the sampler's loop with its per-step callback
            machine.run(1, fixed=False)
            verdict = runner.step_ok(i, n)
            if verdict is False:
                runner.abort()
                aborted = True
                break
            if type(verdict) is int:
                n = i + 1 + verdict  # the rest of the chain respaced to fewer steps
            i += 1
        if aborted:
            break
        machine.run(0)  # per-batch fixed work (decode)
        runner.done()
        done_items.extend(batch.items)
    clock.t += reserve  # save + merge
    return p, runner, done_items, clock() - t0


def test_dsr_holds_steps_and_spends_rest_on_ipc():
    cost = CostModel(step_seconds=0.1, batch_seconds=0.5, batch_size=20)
    # 30 s, 3 s per batch of 20 at 25 steps: DSR holds 25 steps and spends the rest on IPC (10 batches).
    p2 = plan(30.0, cost, BOUNDS, num_classes=10, batch_size=20)
    assert p2.steps == 25 and p2.ipc == 20 and p2.predicted_seconds <= 30.0
    # 100 s: IPC 50 (25 batches, 75 s) reaches ipc_max, so the spare time goes to steps: 25 x 4 s = 100 s.
    p = plan(100.0, cost, BOUNDS, num_classes=10, batch_size=20)
    assert p.ipc == 50 and p.steps == 35 and p.predicted_seconds <= 100.0
    # Too little for IPC 1 at 25 steps: steps drop towards steps_min.
    p3 = plan(2.0, cost, BOUNDS, num_classes=10, batch_size=20)
    assert p3.ipc == 2 and 10 <= p3.steps < 25  # one batch of 20 holds 2 per class at the same cost


def test_too_short_budget_is_refused_with_reason():
    cost = CostModel(step_seconds=1.0, batch_seconds=0.0, batch_size=10)
    with pytest.raises(BudgetError, match="steps_min=10 at ipc_min=1 needs 10.0 s"):
        plan(5.0, cost, BOUNDS, num_classes=10, batch_size=10)


def test_quality_table_picks_best_measured_point():
    cost = CostModel(step_seconds=0.1, batch_seconds=0.0, batch_size=10)
    table = {(50, 1): 20.0, (25, 2): 30.0, (10, 4): 28.0, (25, 10): 45.0}
    p = plan(10.0, cost, BOUNDS, num_classes=10, batch_size=10, quality=table)
    # 10 s: (25 steps, ipc 4) fits (4 batches x 2.5 s), (25, 10) does not -> best reachable is 30 at (25, 2+).
    assert p.quality == "table" and p.steps >= 25
    assert (p.steps, p.ipc) != (50, 1)
    assert p.predicted_seconds <= 10.0


def test_machine_turning_3x_slower_lowers_steps_and_never_overruns():
    clock = FakeClock()
    machine = FakeMachine(clock, step_s=0.1, fixed_s=0.1, slow=lambda t: 3.0 if t > 20.0 else 1.0)
    limit = 60.0
    p, runner, items, elapsed = simulate(limit, machine, clock, K=10, B=20)
    assert elapsed <= limit
    steps = [e.steps for e in runner.events]
    assert steps[0] == p.steps == 25
    assert min(steps) < p.steps  # re-planned down after the slowdown
    assert min(steps) >= BOUNDS.steps_min
    # Every started batch finished before the deadline, and the set can be balanced.
    assert all(e.end <= limit for e in runner.events)
    counts = {c: 0 for c in range(10)}
    for c, _ in items:
        counts[c] += 1
    ipc = balanced_ipc(counts)
    assert ipc >= 1 and max(counts.values()) - ipc <= 1


def test_no_slowdown_uses_budget_and_finishes_all_batches():
    clock = FakeClock()
    machine = FakeMachine(clock, step_s=0.1, fixed_s=0.1)
    p, runner, items, elapsed = simulate(60.0, machine, clock)
    assert elapsed <= 60.0
    assert not runner.dropped and len(items) == 10 * p.ipc
    assert all(e.steps == p.steps for e in runner.events)


def test_machine_turning_faster_spends_the_spare_time_on_more_images():
    clock = FakeClock()
    machine = FakeMachine(clock, step_s=0.1, fixed_s=0.1, slow=lambda t: 0.5 if t > 10.0 else 1.0)
    p, runner, items, elapsed = simulate(60.0, machine, clock)
    assert elapsed <= 60.0
    assert len(items) > 10 * p.ipc  # extension batches ran
    assert all(e.steps == p.steps for e in runner.events)  # at the planned (DSR) steps
    counts = [sum(1 for c, _ in items if c == k) for k in range(10)]
    assert max(counts) - min(counts) <= 1


def test_slowdown_inside_the_last_batches_abandons_a_batch_before_the_deadline():
    clock = FakeClock()
    machine = FakeMachine(clock, step_s=0.1, fixed_s=0.1, slow=lambda t: 20.0 if t > 45.0 else 1.0)
    p, runner, items, elapsed = simulate(60.0, machine, clock)
    assert elapsed <= 60.0
    # The batch running when the machine turned 20x slower was shortened (fewer steps) or abandoned.
    assert runner.shortened or runner.dropped


def test_zero_overruns_over_many_random_runs():
    rng = random.Random(1234)
    overruns, used = 0, []
    for _ in range(300):
        clock = FakeClock()
        change_at = rng.uniform(0, 60)
        factor = rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])
        machine = FakeMachine(
            clock,
            step_s=rng.uniform(0.005, 0.05),
            fixed_s=rng.uniform(0.0, 0.3),
            slow=lambda t, c=change_at, f=factor: f if t > c else 1.0,
            noise=0.2,
            rng=rng,
        )
        K = rng.choice([5, 10, 100])
        try:
            p, runner, items, elapsed = simulate(
                60.0, machine, clock, K=K, B=rng.choice([10, 25, 50]), bounds=WIDE
            )
        except BudgetError:
            continue
        overruns += elapsed > 60.0
        used.append(elapsed / 60.0)
    assert overruns == 0
    assert len(used) >= 200
    assert sum(used) / len(used) > 0.75  # the budget is actually used, not just respected


def test_sharded_layout_covers_every_item_once_and_is_balanced_by_prefix():
    batches = make_batches(7, 5, 4)
    r0, r1 = rank_batches(batches, 0, 2), rank_batches(batches, 1, 2)
    all_items = [it for b in r0 + r1 for it in b.items]
    assert sorted(all_items) == sorted((c, i) for c in range(7) for i in range(5))
    # Any prefix of the index-major order keeps classes within one image of each other.
    flat = [it for b in batches for it in b.items]
    for n in range(len(flat) + 1):
        counts = [sum(1 for c, _ in flat[:n] if c == k) for k in range(7)]
        assert max(counts) - min(counts) <= 1


def test_calibrate_recovers_cost_model():
    clock = FakeClock()
    machine = FakeMachine(clock, step_s=0.2, fixed_s=0.7)
    cost = calibrate(
        lambda n: machine.run(n, fixed=False), clock=clock, batch_size=8, fixed=lambda: machine.run(0)
    )
    assert cost.step_seconds == pytest.approx(0.2, rel=1e-6)
    assert cost.batch_seconds == pytest.approx(0.7, rel=1e-6)
    assert cost.image_step_seconds == pytest.approx(0.025)


# ----------------------------------------------------------------------------------------------------------
# The third axis: over-generation ratio (``+select`` methods)
# ----------------------------------------------------------------------------------------------------------
def test_dsr_takes_the_largest_ratio_that_fits_and_samples_ratio_times_ipc():
    cost = CostModel(step_seconds=0.1, batch_seconds=0.0, batch_size=10)
    bounds = Bounds(10, 50, 10, 10, 25)
    # ipc 10 kept at ratio 4 = 40 candidates x 10 classes = 40 batches of 10 at >= 10 steps = 40 s
    p = plan(45.0, cost, bounds, num_classes=10, batch_size=10, ratios=(1.0, 4.0))
    assert (p.ratio, p.kept_ipc, p.ipc) == (4.0, 10, 40)
    assert p.predicted_seconds <= 45.0 and "over-generate 4x" in p.reason
    p = plan(20.0, cost, bounds, num_classes=10, batch_size=10, ratios=(1.0, 4.0))
    assert (p.ratio, p.ipc) == (1.0, 10)  # 4x does not fit even at steps_min: plain generation


def test_table_trades_steps_against_ratio():
    cost = CostModel(step_seconds=0.1, batch_seconds=0.0, batch_size=10)
    bounds = Bounds(10, 50, 10, 10, 25)
    table = {(50, 10, 1.0): 80.0, (10, 10, 1.0): 70.0, (20, 10, 4.0): 85.0, (10, 10, 4.0): 75.0}
    # 10 classes x 10 kept: ratio 1 at 50 steps costs 50 s; ratio 4 at 20 steps costs 80 s
    p = plan(85.0, cost, bounds, num_classes=10, batch_size=10, quality=table, ratios=(1.0, 4.0))
    # the (20, 10, 4) entry is the best; ties go to more steps: 21 x 40 batches x 0.1 s = 84 s fits
    assert (p.steps, p.ratio, p.ipc, p.kept_ipc) == (21, 4.0, 40, 10)
    p = plan(60.0, cost, bounds, num_classes=10, batch_size=10, quality=table, ratios=(1.0, 4.0))
    assert (p.steps, p.ratio) == (50, 1.0)  # ratio 4 fits only at 10-15 steps, worth 75 < 80
    p = plan(85.0, cost, bounds, num_classes=10, batch_size=10, quality=table, ratios=(1.0,))
    assert p.ratio == 1.0  # a plain method never over-generates


def test_quality_table_with_ratios_round_trips(tmp_path):
    from ddkit.budget import load_quality_table
    from ddkit.errors import ConfigError

    f = tmp_path / "q.yaml"
    f.write_text("- {steps: 10, ipc: 10, accuracy: 70}\n- {steps: 20, ipc: 10, ratio: 4, accuracy: 85}\n")
    assert load_quality_table(f) == {(10, 10, 1.0): 70.0, (20, 10, 4.0): 85.0}
    f.write_text("'10,10': 70\n")
    assert load_quality_table(f) == {(10, 10): 70.0}
    f.write_text("'10': 70\n")
    with pytest.raises(ConfigError, match="steps,ipc"):
        load_quality_table(f)
    with pytest.raises(BudgetError, match=">= 1"):
        plan(10.0, CostModel(0.1, 0.0, 10), Bounds(10, 50, 1, 10, 25), num_classes=10, batch_size=10,
             ratios=(0.5,))


def test_a_table_names_the_method_it_scored_and_other_methods_plans_say_so(tmp_path):
    """``{method, rows}`` (bench/quality.py's form): a plan for another method notes that the accuracy it
    quotes is the scored method's; a plan for that method, or its +select, does not."""
    from ddkit.budget import load_quality_table
    from ddkit.errors import ConfigError
    from ddkit.generate.run import _note_table_method

    f = tmp_path / "q.yaml"
    f.write_text("method: dit\nrows:\n- {steps: 10, ipc: 10, ratio: 1, accuracy: 70}\n")
    table = load_quality_table(f)
    assert table == {(10, 10, 1.0): 70.0} and table.measured_with == "dit"
    p = plan(1e6, CostModel(0.01, 0.0, 10), Bounds(10, 10, 10, 10, 10), num_classes=10, batch_size=10,
             quality=table)
    assert "accuracy 70" in _note_table_method(p, table, "dit+select").reason
    assert "scored" not in _note_table_method(p, table, "dit+select").reason
    noted = _note_table_method(p, table, "mgd3").reason
    assert noted.startswith(p.reason) and "scored dit samples of this model, not mgd3" in noted
    f.write_text("'10,10': 70\n")
    assert load_quality_table(f).measured_with is None
    f.write_text("method: [dit]\nrows: []\n")
    with pytest.raises(ConfigError, match="'method' must be a method name"):
        load_quality_table(f)


def test_table_without_a_reachable_measured_point_falls_back_to_dsr():
    """A table measured at IPC 10 says nothing about IPC 1-5: the DSR rule plans, and the reason says so."""
    cost = CostModel(step_seconds=0.1, batch_seconds=0.0, batch_size=10)
    bounds = Bounds(10, 50, 1, 5, 25)
    table = {(10, 10, 1.0): 70.0, (50, 10, 4.0): 90.0}
    p = plan(30.0, cost, bounds, num_classes=10, batch_size=10, quality=table, ratios=(1.0, 4.0))
    dsr = plan(30.0, cost, bounds, num_classes=10, batch_size=10, ratios=(1.0, 4.0))
    assert (p.steps, p.ipc, p.ratio, p.quality) == (dsr.steps, dsr.ipc, dsr.ratio, "dsr")
    assert p.reason.startswith("table: no measured point") and "DSR" in p.reason


def test_the_table_shipped_with_the_demo_model_loads_and_plans():
    """``generate.quality: ddkit:mnist-dit-t4/quality.yaml`` (configs/mnist.yaml): made by bench/quality.py."""
    from ddkit.budget import load_quality_table
    from ddkit.errors import ConfigError

    table = load_quality_table("ddkit:mnist-dit-t4/quality.yaml")
    assert table.measured_with == "dit"
    assert {k[2] for k in table} >= {1.0, 4.0} and all(0 < a <= 100 for a in table.values())
    p = plan(1e6, CostModel(0.01, 0.0, 100), Bounds(10, 50, 10, 10, 25), num_classes=10, batch_size=100,
             quality=table, ratios=(1.0, 2.0, 4.0))
    best = max(a for (s, i, _), a in table.items() if i <= 10)
    assert p.quality == "table" and f"accuracy {best:g}" in p.reason  # nothing binds: the best entry
    with pytest.raises(ConfigError, match="no such file shipped with ddkit:mnist-dit-t4"):
        load_quality_table("ddkit:mnist-dit-t4/nope.yaml")


# ----------------------------------------------------------------------------------------------------------
# The runner's speed estimate after a cut batch, and budgets at ImageNet-1K's 1,000 classes
# ----------------------------------------------------------------------------------------------------------
def test_speed_estimate_after_a_cut_batch_uses_the_steps_actually_run():
    """A batch shortened mid-way (step_ok) is judged against the cost of the steps it ran, not the planned
    ones: the machine turned 4x slower, and the next plan must believe 4x (dividing by the 10 planned steps
    read 2x, and the runner then under-planned its next batches)."""
    clock = FakeClock()
    cost = CostModel(step_seconds=1.0, batch_seconds=0.0, batch_size=10)
    p = plan(30.0, cost, Bounds(2, 10, 1, 2, 10), num_classes=10, batch_size=10)
    assert (p.steps, p.ipc) == (10, 2)
    runner = Runner(plan=p, cost=cost, batches=make_batches(10, 2, 10), deadline=30.0, clock=clock, steps_min=2)
    for step_s in (1.0, 4.0):  # the machine turns 4x slower before the second batch
        _, n = runner.next()
        i = 0
        while i < n:
            clock.t += step_s
            verdict = runner.step_ok(i, n)
            assert verdict is not False
            if type(verdict) is int:
                n = i + 1 + verdict
            i += 1
        ev = runner.done()
    assert runner.shortened and ev.steps == 5 and ev.end == pytest.approx(30.0)
    assert runner.speed_factor == pytest.approx(4.0)
    assert ev.predicted == pytest.approx(5.0)  # the calibrated cost of the 5 steps run


IMAGENET_BOUNDS = Bounds(steps_min=10, steps_max=50, ipc_min=1, ipc_max=50, dsr_steps=25)


@pytest.mark.parametrize(
    "slow",
    [lambda t: 1.0, lambda t: 2.0 if t > 400.0 else 1.0, lambda t: 1.0 + t / 600.0],
    ids=["steady", "2x-slower-at-400s", "slowing-steadily"],
)
def test_imagenet_1k_budget_holds_and_turns_90_percent_of_the_limit_into_images(slow):
    """K = 1,000 classes, batches of 100 (DiT-XL/2 + CFG: ~0.12 s a step on an H100, 0.5 s of VAE decode),
    a 20-minute limit: the planner + runner end inside the limit, spend >= 90 % of it on finished batches,
    keep the classes within one image of each other, and re-plan when the machine slows mid-run."""
    clock = FakeClock()
    machine = FakeMachine(clock, step_s=0.12, fixed_s=0.5, slow=slow)
    limit = 1200.0
    p, runner, items, elapsed = simulate(
        limit, machine, clock, K=1000, B=100, bounds=IMAGENET_BOUNDS, margin=0.02, reserve=5.0
    )
    assert elapsed <= limit and all(e.end <= limit for e in runner.events)  # 0 overruns
    sampling = sum(e.end - e.start for e in runner.events)
    assert sampling >= 0.9 * limit, f"{sampling:.0f} s of {limit:.0f} s turned into images"
    counts = [0] * 1000
    for c, _ in items:
        counts[c] += 1
    assert min(counts) >= 1 and max(counts) - min(counts) <= 1
    if slow(limit) > 1.0:
        assert min(e.steps for e in runner.events) < p.steps  # re-planned to fewer steps, not overrun


# ----------------------------------------------------------------------------------------------------------
# The one guard of a method's one-off preparation inside a budget (D^3HR statistics, the IGD surrogate)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("warmup", [0.0, 30.0])
def test_preparation_guard_refuses_at_the_first_projection_past_its_share(warmup):
    """Units of 1 s after a first unit of 1 + ``warmup`` s, 100 s left and a share of 0.5: 50 units would
    fit, 60 do not. The warm-up is not mistaken for the rate, and the refusal comes after two units."""
    from ddkit.budget_runner import PreparationGuard

    now = [0.0]
    guard = PreparationGuard(lambda: now[0], 100.0, share=0.5, what=("X", "class"), advice="make F ({done} kept)")
    now[0] += 1 + warmup
    guard(1, 59)
    now[0] += 1
    if warmup:  # 31 s for the first unit + 59 at 1 s: past the 50-s share at the second
        with pytest.raises(BudgetError, match=r"X need ~90 s for 60 classes \(1.000 s/class measured\), "
                                              r"100 s were left; make F \(2 kept\)"):
            guard(2, 58)
        return
    with pytest.raises(BudgetError, match="X need ~60 s for 60 classes"):
        guard(2, 58)
    fits = PreparationGuard(lambda: now[0], now[0] + 100.0, share=0.5, what=("X", "batch"), advice="")
    for done in range(1, 41):  # 40 units of 1 s against a 50-s share
        now[0] += 1
        fits(done, 40 - done)
