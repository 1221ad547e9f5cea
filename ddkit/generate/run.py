"""One rank's budgeted generation: :func:`generate` = join the job, :func:`load_sampler`, :func:`calibrate`,
:func:`plan`, :func:`run_budget`, :func:`save_shard`, merge (see :mod:`ddkit.generate` for the flow).

Under a process group every rank meets the same collectives in the same order, whether or not its own shard
is already done: the start/done vote (MIN), D^3HR's statistics barrier, the cost vote (MAX), and the two
barriers round the merge (one when every shard was already done).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddkit import budget, dist, stages, writecost
from ddkit.config import ExperimentConfig, replace
from ddkit.errors import BudgetError, ConfigError
from ddkit.fingerprint import fingerprint
from ddkit.generate import record
from ddkit.generate.layout import all_shards_done, gen_dir_for
from ddkit.generate.sampler import Sampler, load_sampler, shard_index
from ddkit.generate.shards import merge, save_shard
from ddkit.io import is_done, write_run_config
from ddkit.methods import registry
from ddkit.progress import bar
from ddkit.rows import RowSpool


@dataclasses.dataclass(frozen=True)
class Rank:
    """This process's place in the generation.

    Attributes:
        rank, world: shard index and number of shards; group: a process group (torchrun, srun) is running.
        env: the launcher's :class:`ddkit.dist.DistEnv`.
        mine_done, all_done: this rank's shard / every shard is already done (a requeued job).
        t0: the budget start on the generation's clock (under a group: the earliest of all ranks).
    """

    rank: int
    world: int
    group: bool
    env: Any
    mine_done: bool
    all_done: bool
    t0: float


def _settings(cfg: ExperimentConfig, method: str | None, time_limit: float | None) -> tuple[ExperimentConfig, str]:
    """(``cfg`` with ``generate.method`` (a pseudo-method resolved: :func:`ddkit.methods.registry.resolve`),
    its quality table and ``generate.time_limit`` resolved, the resolution's note for the plan's reason).

    Raises:
        ConfigError: invalid method or a time limit <= 0.
    """

    gcfg = cfg.generate
    method, quality, note = registry.resolve(method or gcfg.method, cfg)
    limit = float(time_limit if time_limit is not None else gcfg.time_limit)
    if limit <= 0:
        raise ConfigError(f"generate.time_limit: must be > 0, got {limit}")
    return replace(cfg, generate=replace(gcfg, method=method, quality=quality, time_limit=limit)), note


def _join(cfg: ExperimentConfig, gen_dir: Path, rank: int | None, world_size: int | None, t0: float, clock) -> Rank:
    """Find this rank (from ``ddkit.dist.dist_env()`` unless given), start the process group, write
    ``config.yaml``, and decide with the peers whether every shard is done.

    Raises:
        ConfigError: ``rank`` outside ``[0, world_size)``.
    """

    env = dist.dist_env()
    explicit = rank is not None or world_size is not None
    rank = env.rank if rank is None else rank
    world = env.world_size if world_size is None else world_size
    if not 0 <= rank < world:
        raise ConfigError(f"--rank: {rank} outside [0, {world})")
    group = False
    if world > 1 and not explicit and env.launcher != "none":
        dist.init_distributed(env)
        group = True
    shard_dir = gen_dir / f"shard-{rank}"
    gen_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0 or not (gen_dir / "config.yaml").exists():
        write_run_config(gen_dir, cfg)
    mine_done = is_done(shard_dir)
    import torch

    if group:
        # ONE collective decides for every rank: MIN of (budget start, shard done) -> the job's earliest
        # start (one deadline) and whether every shard is done. A rank whose shard is done but whose
        # peers are not keeps going with no batches of its own, so it meets every later collective
        # (D^3HR statistics, cost, barriers) exactly as the others do.
        vote = torch.tensor([time.time() - (clock() - t0), float(mine_done)], dtype=torch.float64)
        torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN)
        t0 = clock() - (time.time() - float(vote[0]))
        all_done = bool(vote[1])
    else:
        all_done = mine_done
    return Rank(rank, world, group, env, mine_done, all_done, t0)


def _merge_when_complete(gen_dir: Path, job: Rank, merge_when_done: bool, phase, **merge_kw) -> None:
    """Under a process group rank 0 merges and every rank meets one barrier after it; otherwise whichever
    process sees every shard done merges."""

    if job.group:
        if job.rank == 0 and merge_when_done:
            phase("merge")
            merge(gen_dir, **merge_kw)
        dist.barrier()
    elif merge_when_done and all_shards_done(gen_dir, job.world):
        phase("merge")
        merge(gen_dir, **merge_kw)


def generate(
    cfg: ExperimentConfig,
    *,
    method: str | None = None,
    time_limit: float | None = None,
    out_dir: str | Path | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    t0: float | None = None,
    model: Any = None,
    device: Any = None,
    clock: Callable[[], float] = time.monotonic,
    merge_when_done: bool = True,
    follow_changes: bool = True,
    force: bool = False,
    merge_if_complete: bool = False,
    on_phase: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Generate this rank's share of the distilled set inside the time budget.

    Args:
        cfg: the experiment; reads ``generate``, ``model``, ``data`` (class names, resolution).
        method: a registered method, ``<base>+select`` or the pseudo-method ``best`` (default ``cfg.generate.method``;
            :mod:`ddkit.methods.registry`).
        time_limit: seconds for the whole job, model loading included (default ``generate.time_limit``).
        out_dir: generation dir (default ``RUN/gen-<method>``).
        rank, world_size: shard of this process (default from ``ddkit.dist.dist_env()``; pass them for
            SLURM array tasks).
        progress: progress bar (images, steps, time left).
        t0: budget start on ``clock`` (the CLI passes the process start); ``DDKIT_T0`` overrides
            (:func:`ddkit.dist.budget_start`).
        model: an already-built backbone (skips loading; tests, benchmarks).
        device: torch device (default: this rank's GPU or the CPU).
        clock: monotonic seconds (injected for tests).
        merge_when_done: merge when every shard is done (off for array tasks, whose merge job merges).
        follow_changes: decide the stage as ``ddkit run`` does (:func:`ddkit.stages.enter`): an unchanged
            fingerprint skips, a changed one sets the old directory aside and reruns (off when the caller
            decided it: ``ddkit run``).
        force: rerun even when unchanged (``--force``).
        merge_if_complete: a single process whose peers' shards are all done merges too (``ddkit run``).
        on_phase: called with ``start``, ``prepare``, ``calibrate``, ``plan``, ``batch`` (after each),
            ``shard`` and ``merge`` as the generation reaches them (tests interrupt there).
        log: where the skip / rerun decision goes (default: printed with ``progress``).

    Returns:
        The generation directory (``RUN/gen-<method>``), holding ``shard-<rank>/``, ``record.json`` and,
        once merged, ``dataset.pt``, ``manifest.json``, ``grid.png``, ``budget.png`` and ``DONE``.

    Raises:
        BudgetError: the budget cannot fit ``steps_min`` × ``ipc_min`` (before any sampling).
        WeightsError: the checkpoint is missing.
        ConfigError: invalid method or ``DDKIT_T0``.
    """

    t0 = dist.budget_start(t0, clock)
    cfg, note = _settings(cfg, method, time_limit)
    if note and (log or progress):
        (log or print)(note)
    meth = registry.build(cfg.generate.method, cfg)
    gen_dir = Path(out_dir) if out_dir is not None else gen_dir_for(cfg, meth.name)
    inputs = None
    if follow_changes:
        decision, inputs = _follow(cfg, meth.name, gen_dir, force, log or (print if progress else None))
        if not decision.runs:
            return gen_dir
    elif is_done(gen_dir):
        return gen_dir

    fp = fingerprint(inputs) if inputs is not None else None
    phase = on_phase or (lambda name: None)
    phase("start")
    sample_dir = meth.sample_dir(gen_dir)
    if sample_dir != gen_dir:  # a wrapper (+select): its base samples a pool, then the wrapper finishes
        gen_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(gen_dir, cfg)
        meth.before_sampling(progress)  # first: it may time what reserve_seconds charges
    limit = cfg.generate.time_limit - meth.reserve_seconds()
    base_cfg = replace(cfg, generate=replace(cfg.generate, method=meth.base.name, time_limit=max(1e-3, limit)))
    _sample(base_cfg, meth, sample_dir, rank=rank, world_size=world_size, t0=t0, clock=clock, model=model,
            device=device, progress=progress, fp=fp, phase=phase, note=note,
            merge=merge_when_done or merge_if_complete)  # fmt: skip
    if sample_dir != gen_dir and is_done(sample_dir) and not is_done(gen_dir):
        phase("merge")
        meth.finish(gen_dir)
    return gen_dir


def merge_generation(cfg: ExperimentConfig, method: str | None = None, gen_dir: str | Path | None = None) -> Path:
    """``ddkit generate --merge``: merge the finished shards of ``gen_dir`` (default ``RUN/gen-<method>``),
    then let a wrapper finish (``+select`` selects from its merged pool).

    Returns:
        The generation directory.

    Raises:
        DataError: a shard missing or not done, or shards sampled under different records.
    """
    cfg, _ = _settings(cfg, method, None)
    meth = registry.build(cfg.generate.method, cfg)
    gen_dir = Path(gen_dir) if gen_dir is not None else gen_dir_for(cfg, meth.name)
    sample_dir = meth.sample_dir(gen_dir)
    if not is_done(sample_dir):
        merge(sample_dir)
    if sample_dir != gen_dir and not is_done(gen_dir):
        meth.finish(gen_dir)
    return gen_dir


def _follow(cfg: ExperimentConfig, name: str, gen_dir: Path, force: bool, log):
    """:func:`ddkit.stages.enter` for generation ``name`` in ``gen_dir`` (its output: ``dataset.pt``)."""

    log = log or (lambda line: None)
    node = stages.generation_node(cfg, name)
    return stages.enter(cfg, node, gen_dir, force=force, has_output=lambda: (gen_dir / "dataset.pt").exists(),
                        log=log)  # fmt: skip


def _sample(cfg, meth, gen_dir: Path, *, rank, world_size, t0, clock, model, device, progress, fp, phase,
            merge: bool, note: str = "") -> None:  # fmt: skip
    """One sharded, budgeted sampling of ``meth.base`` into ``gen_dir`` (module docstring), then the merge."""

    if is_done(gen_dir):
        return
    job = _join(cfg, gen_dir, rank, world_size, t0, clock)
    if job.all_done:
        _merge_when_complete(gen_dir, job, merge, phase)
        return
    deadline = job.t0 + cfg.generate.time_limit
    phases: dict[str, float] = {}
    sampler = load_sampler(cfg, meth.base, gen_dir, job, model=model, device=device, clock=clock, phases=phases)
    phase("prepare")
    meth.base.prepare(sampler, job, progress=progress, phases=phases, clock=clock)
    phase("calibrate")
    cost, reserve, upfront = calibrate(sampler, gen_dir, job, select_ratios=meth.ratios(), merge_when_done=merge,
                              clock=clock, phases=phases)  # fmt: skip
    phase("plan")
    runner, plan_at, rec = plan(sampler, cost, reserve, gen_dir, job, deadline=deadline, ratios=meth.ratios(),
                                clock=clock, fingerprint=fp, upfront=upfront, note=note)  # fmt: skip
    meth.base.on_plan(sampler, runner.batches, runner.plan.ipc, runner.plan.kept_ipc or runner.plan.ipc,
                      gen_dir=gen_dir, progress=progress, phases=phases, clock=clock)  # fmt: skip
    rec = {**rec, **meth.base.record()}  # with what on_plan prepared (MGD^3's modes digest)
    mark = clock()
    samples = run_budget(sampler, runner, progress=progress, rank=job.rank, phase=phase, scratch_dir=gen_dir)
    phases["sample"] = clock() - mark
    save_shard(gen_dir / f"shard-{job.rank}", sampler, runner, samples, job, plan_at=plan_at, phases=phases,
               clock=clock, record=rec)  # fmt: skip
    phase("shard")
    if job.group:
        dist.barrier()
    _merge_when_complete(gen_dir, job, merge, phase, t0=job.t0, clock=clock)


def calibrate(
    sampler: Sampler, gen_dir: Path, job: Rank, *, select_ratios, merge_when_done: bool, clock, phases: dict
) -> tuple[Any, float]:
    """Time the real sampler at the real batch size (:func:`ddkit.budget.calibrate`) and what follows the
    last batch on this filesystem (:func:`ddkit.writecost.finish_seconds`: shard save, merge, plots, timed
    with the real writers). Under a process group every rank adopts the slowest rank's cost and the largest
    reserve (one MAX), so they agree on one plan; a rank whose shard is done brings zeros to that vote.

    Returns:
        (:class:`ddkit.budget.CostModel` at batch size ``B`` = min(batch_size, ⌈K·ipc_max / world⌉),
        reserve seconds after the last batch, seconds of the method's one-off ``on_plan`` work before the
        first: :meth:`~ddkit.methods.base.GenerationMethod.plan_work`).
    """
    import torch

    gcfg, K = sampler.settings, len(sampler.classes)
    mark = clock()
    B = max(1, min(gcfg.batch_size, math.ceil(K * gcfg.ipc_max / job.world)))
    if job.mine_done:  # nothing left to sample here: the peers' cost decides (MAX below)
        cost, reserve, once = budget.CostModel(0.0, 0.0, B), 0.0, 0.0
    else:
        run_steps, fixed = sampler.calibration(B)
        cost = budget.calibrate(run_steps, clock=clock, batch_size=B, fixed=fixed)
        out_px = math.prod(sampler.image_shape)
        ipc_w = math.ceil(gcfg.ipc_max * max(select_ratios))  # a selection pool writes all its candidates
        # on_plan's work (D^3HR's group search, MGD^3's modes) is charged with each batch and held back once,
        # so the plan holds it
        per_image, once = sampler.method.plan_work(sampler, ipc_w, gcfg.ipc_max, gen_dir=gen_dir)
        cost = budget.CostModel(cost.step_seconds, cost.batch_seconds + B * per_image, B)
        reserve = writecost.finish_seconds(
            gen_dir, shard_bytes=K * ipc_w * out_px // job.world, merged_bytes=K * ipc_w * out_px,
            merges=merge_when_done and (job.rank == 0 or not job.group), grid=(K, min(gcfg.ipc_max, 10), out_px),
            clock=clock,
        )  # fmt: skip
    if job.group:  # one plan for all ranks: the slowest rank's cost and the largest reserve
        c = torch.tensor([cost.step_seconds, cost.batch_seconds, reserve, once], dtype=torch.float64)
        torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX)
        cost, reserve, once = budget.CostModel(float(c[0]), float(c[1]), B), float(c[2]), float(c[3])
    phases["calibrate"] = clock() - mark
    return cost, reserve, once


def plan(
    sampler: Sampler, cost, reserve: float, gen_dir: Path, job: Rank, *, deadline: float, ratios, clock,
    fingerprint: str | None = None, upfront: float = 0.0, note: str = "",
) -> tuple[Any, float, dict[str, Any]]:
    """Plan steps, IPC and ratio for the time left (:func:`ddkit.budget.plan`: the DSR rule or a quality
    table) and lay out this rank's batches (global batch ``b`` -> rank ``b % world``; none for a rank whose
    shard is done). A generation whose record is published (another rank or an earlier attempt planned)
    adopts it (:func:`ddkit.generate.record.bounds`); a rank that loses the race to publish re-plans inside
    the winner's record, so every shard samples one plan. ``upfront`` seconds (the method's ``on_plan`` work)
    come off the time planned for sampling, not off the runner's end reserve.

    Returns:
        (:class:`ddkit.budget.Runner` over this rank's batches, the clock time of the plan, the record).

    Raises:
        BudgetError: even ``steps_min`` × ``ipc_min`` does not fit (before any sampling).
    """

    gcfg, K, B = sampler.settings, len(sampler.classes), cost.batch_size
    quality: Any = gcfg.quality
    if quality != "dsr":  # a table measured on other classes needs an explicit model.class_map
        quality = budget.load_quality_table(quality, index=shard_index(sampler.config),
                                            class_map=sampler.config.model.class_map)  # fmt: skip
    margin = gcfg.safety_margin * gcfg.time_limit
    published = record.read(gen_dir)
    for _ in range(2):
        bounds, rs = record.bounds(gcfg, published, tuple(ratios))
        plan_at = clock()
        try:
            the_plan = budget.plan(deadline - margin - reserve - upfront - plan_at, cost, bounds, num_classes=K,
                                   batch_size=B, world_size=job.world, quality=quality, ratios=rs)  # fmt: skip
        except BudgetError as e:
            raise BudgetError(_held_back(str(e), sampler.method, upfront, reserve)) from None
        mine = record.make(sampler, the_plan, fingerprint)
        if published is None:
            published = record.publish(gen_dir, mine)
        if not record.differences(published, mine, record.PLAN_KEYS):
            break
    the_plan = _note_table_method(the_plan, quality, sampler.method.name)
    if note:  # a pseudo-method's choice (generate.method: best): which method and why
        the_plan = dataclasses.replace(the_plan, reason=f"{note}; {the_plan.reason}")
    # Extension batches (for a machine faster than calibrated) reach at most ipc_max, or 4x the plan, so
    # the layout stays small for 1000-class runs; a selection pool is sized by its plan, and a method with a
    # fixed layout (D^3HR: one group of the planned IPC per class) samples exactly the plan.
    ipc_cap = min(gcfg.ipc_max, max(4 * the_plan.ipc, the_plan.ipc + 8))
    if sampler.method.fixed_layout or the_plan.ratio > 1:
        ipc_cap = the_plan.ipc
    my_batches, extra = budget.split_plan(K, the_plan.ipc, ipc_cap, B, job.rank, job.world)
    if job.mine_done:  # its shard is on disk: take part in the collectives only
        my_batches, extra = [], []
    runner = budget.Runner(
        plan=the_plan, cost=cost, batches=my_batches, extra=extra, deadline=deadline, clock=clock,
        steps_min=gcfg.steps_min, t0=job.t0, margin_seconds=margin, reserve_seconds=reserve,
    )  # fmt: skip
    return runner, plan_at, published


def _held_back(message: str, method, upfront: float, reserve: float) -> str:
    """``message`` plus what the budget held back before sampling: the method's one-off work once the plan is
    known (and what would spare it) and the reserve after the last batch."""
    parts = []
    if upfront > 0:
        hint = f"; provide {method.plan_work_hint} to skip it" if method.plan_work_hint else ""
        parts.append(f"{upfront:.1f} s for {method.name}'s preparation once the plan is known{hint}")
    if reserve > 0:
        parts.append(f"{reserve:.1f} s reserved for writing, merging and selecting after the last batch")
    return message + (f" (held back: {'; '.join(parts)})" if parts else "")


def _note_table_method(the_plan, quality, method: str):
    """A shipped table is the model's, scored on one method's samples (``measured_with``): where this
    method differs, its plan's reason says that the accuracy it quotes is not this method's own."""
    scored = getattr(quality, "measured_with", None)
    if the_plan.quality != "table" or scored is None or method.split("+")[0] == scored.split("+")[0]:
        return the_plan
    note = (f"; the table scored {scored} samples of this model, not {method}: it ranks steps, IPC and ratio, "
            f"and {method}'s own accuracy is the evaluation's")
    return dataclasses.replace(the_plan, reason=the_plan.reason + note)


def run_budget(sampler: Sampler, runner, *, progress: bool, rank: int, scratch_dir: Path, phase=None) -> dict[str, Any]:
    """Sample the runner's batches until it stops (done, or out of time: :class:`ddkit.budget.Runner`
    re-plans steps before each batch and may shorten or abandon one mid-chain).

    Returns:
        ``{"images": RowSpool, "labels": [class, ...], "index": [image index, ...], "steps": [steps, ...]}``,
        one entry per image finished, in sampling order. The images (uint8 [N, C, H, W], ``.rows()``) are
        spooled to an unlinked file in ``scratch_dir`` (:class:`ddkit.rows.RowSpool`), so a rank holds one
        batch of them in memory however large its share.
    """
    import torch

    from ddkit.sampling import SamplingAborted

    device, clock, deadline = sampler.device, runner.clock, runner.deadline
    total = sum(len(b.items) for b in runner.batches)
    # mapped at the planned size: a sparse file, whose blocks are written only as images arrive
    out: dict[str, Any] = {"images": RowSpool(scratch_dir, sampler.image_shape, torch.uint8, capacity=total),
                           "labels": [], "index": [], "steps": []}  # fmt: skip

    def check(i: int, n: int) -> bool | int:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return runner.step_ok(i, n)

    fields = "images · {task.fields[steps]} steps · {task.fields[left]:.0f} s left"
    left = deadline - clock() if progress else 0.0  # the clock is read only for a drawn bar
    with bar(f"[bold]generate[/] rank {rank}", total, enabled=progress, fields=fields, transient=False,
             steps=0, left=left) as update:  # fmt: skip
        while (nxt := runner.next()) is not None:
            batch, steps = nxt
            if progress:
                grown = max(total, sum(len(b.items) for b in runner.batches))  # extension batches
                update(0, total=grown, steps=steps, left=max(0.0, deadline - clock()))
            try:
                images = sampler.run_items(batch.items, steps, check)
            except SamplingAborted:
                runner.abort()
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ev = runner.done()
            out["images"].append(images)
            out["labels"].extend(c for c, _ in batch.items)
            out["index"].extend(i for _, i in batch.items)
            out["steps"].extend([ev.steps] * len(batch.items))
            if progress:
                update(len(batch.items), left=max(0.0, deadline - clock()))
            if phase is not None:
                phase("batch")
    return out
