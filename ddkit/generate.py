"""Budgeted, sharded generation of the distilled set (``ddkit generate``).

Flow of one rank (``generate``):

1. **Clock.** The budget starts at ``t0``: the CLI passes the process start; ``DDKIT_T0`` (Unix epoch
   seconds, e.g. ``export DDKIT_T0=$(date +%s)`` in the sbatch script before ``srun``/array tasks) overrides
   it so every rank of a job shares ONE deadline ``t0 + time_limit``; under a process group (torchrun,
   srun) the earliest start of all ranks is used. Model loading and D^3HR class statistics (cached on
   disk, so a requeued attempt only loads them) are inside the budget.
2. **Calibrate** the real sampler at the real batch size (:func:`ddkit.budget.calibrate`) and what follows
   the last batch on this filesystem (:func:`ddkit.writecost.finish_seconds`: shard save, merge, plots,
   timed with the real writers), **plan** steps and IPC with the DSR rule or a quality table
   (:func:`ddkit.budget.plan`; :class:`BudgetError` before any sampling if even the minimums do not fit).
   Under a process group all ranks adopt the slowest rank's cost and the largest reserve so they agree on
   one plan; a rank whose peers' shards are already done (a requeued job) adopts their plan
   (:func:`_bounds`), so the merged set is the one an uninterrupted run makes.
3. **Sample** this rank's batches (global batch ``b`` -> rank ``b % world``), re-planning before each
   (:class:`ddkit.budget.Runner`). Image ``(class c, index i)`` is seeded by :func:`image_seed` only, so
   the images do not depend on the sharding. Latent models are decoded with the VAE; images are stored
   uint8.
4. **Shard** ``gen-<method>/shard-<rank>/images.pt`` + ``DONE``. A rerun skips completed shards; under a
   process group the ranks decide that with one collective (all done: skip; otherwise the done ranks
   take part in every collective with no batches of their own).
5. **Merge** (:func:`merge`, by whichever rank sees every shard done, or ``ddkit generate --merge``): a
   class-major ``dataset.pt`` cut to a balanced IPC, ``manifest.json``, ``grid.png``, ``budget.png``,
   ``DONE``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddkit.config import ExperimentConfig, replace
from ddkit.errors import DataError, WeightsError
from ddkit.io import (
    atomic_file,
    atomic_torch_save,
    atomic_write_json,
    hardware_info,
    is_done,
    mark_done,
    write_run_config,
)

SHARD_FILE = "images.pt"


# ----------------------------------------------------------------------------------------------------------
# Clock and seeds
# ----------------------------------------------------------------------------------------------------------
def process_start_monotonic() -> float:
    """``time.monotonic()`` value at which this process started (interpreter start-up and imports count).

    Linux: from ``/proc/self/stat`` (start time in clock ticks since boot) and ``/proc/uptime``; elsewhere
    the current time.
    """
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5); two fields precede the split point
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 86400:
            return time.monotonic() - age
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic()


def resolve_t0(t0: float | None, clock: Callable[[], float] = time.monotonic) -> float:
    """The budget's start on ``clock``: ``DDKIT_T0`` (epoch seconds) if set, else ``t0``, else now.

    Raises:
        ConfigError: ``DDKIT_T0`` is not a number.
    """
    env = os.environ.get("DDKIT_T0")
    if env:
        from ddkit.errors import ConfigError

        try:
            epoch = float(env)
        except ValueError:
            raise ConfigError(f"DDKIT_T0: expected Unix epoch seconds, got {env!r}") from None
        return clock() - (time.time() - epoch)
    return clock() if t0 is None else t0


def image_seed(seed: int, class_index: int, index: int) -> int:
    """64-bit seed of image ``index`` of class ``class_index`` (blake2b of the triple; sharding-free)."""
    h = hashlib.blake2b(f"ddkit/{seed}/{class_index}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def gen_dir_for(cfg: ExperimentConfig, method: str) -> Path:
    return Path(cfg.run_dir) / f"gen-{method}"


def checkpoint_for(cfg: ExperimentConfig, method: str) -> str:
    """The weights a method samples from: ``generate.checkpoint``, else ``RUN/minimax`` for minimax, else
    ``model.pretrained`` or ``RUN/pretrain`` (dit, d3hr)."""
    if cfg.generate.checkpoint:
        return cfg.generate.checkpoint
    if method == "minimax":
        return str(Path(cfg.run_dir) / "minimax")
    return cfg.model.pretrained or str(Path(cfg.run_dir) / "pretrain")


def class_layout(cfg: ExperimentConfig, num_backbone_classes: int) -> tuple[list[str], list[int]]:
    """(class names, backbone label per class) from the shard index (``model.class_map``, see
    :mod:`ddkit.data.classmap`), or ``0..K-1`` without shards.

    Raises:
        ConfigError: no usable class map (one line naming ``model.class_map``).
    """
    idx_file = Path(cfg.data.shards) / "dataset.json"
    if idx_file.is_file():
        from ddkit.data import read_index
        from ddkit.data.classmap import backbone_labels

        index = read_index(cfg.data.shards)
        names = list(index["classes"])
        return names, backbone_labels(index, num_backbone_classes, cfg.model.class_map)
    names = [str(i) for i in range(num_backbone_classes)]
    return names, list(range(num_backbone_classes))


def _shard_dirs(gen_dir: Path) -> list[Path]:
    return sorted(p for p in gen_dir.glob("shard-*") if p.is_dir())


def _all_shards_done(gen_dir: Path, world_size: int) -> bool:
    return all(is_done(gen_dir / f"shard-{r}") for r in range(world_size))


def _bounds(gcfg, gen_dir: Path, ratios: tuple[float, ...] = (1.0,)):
    """The planner's search box and over-generation ratios: the config's, capped at the plan (steps, kept
    IPC, ratio) of shards already done in ``gen_dir`` (recorded in their DONE), so the remaining ranks
    sample the same layout and chains."""
    import json

    from ddkit import budget

    steps_max, ipc_max = gcfg.steps_max, gcfg.ipc_max
    for d in _shard_dirs(gen_dir):
        if is_done(d):
            plan = json.loads((d / "DONE").read_text() or "{}").get("plan")
            if plan:
                kept = plan.get("kept_ipc") or plan["ipc"]
                steps_max, ipc_max = min(steps_max, plan["steps"]), min(ipc_max, kept)
                ratios = (float(plan.get("ratio", 1.0)),)
    bounds = budget.Bounds(
        min(gcfg.steps_min, steps_max), steps_max, min(gcfg.ipc_min, ipc_max), ipc_max, gcfg.dsr_min_steps_quality
    )
    return bounds, ratios


# ----------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------
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
    select_ratios: tuple[float, ...] = (1.0,),
) -> Path:
    """Generate this rank's share of the distilled set inside the time budget.

    Args:
        cfg: the experiment; reads ``generate``, ``model``, ``data`` (class names, resolution).
        method: ``minimax`` | ``dit`` | ``d3hr`` (default ``cfg.generate.method``).
        time_limit: seconds for the whole job, model loading included (default ``generate.time_limit``).
        out_dir: generation dir (default ``RUN/gen-<method>``).
        rank, world_size: shard of this process (default from ``ddkit.dist.dist_env()``; pass them for
            SLURM array tasks).
        progress: rich progress bar (images, steps, time left).
        t0: budget start on ``clock`` (the CLI passes the process start); ``DDKIT_T0`` overrides.
        model: an already-built backbone (skips loading; tests, benchmarks).
        device: torch device (default: this rank's GPU or the CPU).
        clock: monotonic seconds (injected for tests).
        merge_when_done: merge when every shard is done (off for benchmarks that only sample).
        select_ratios: over-generation ratios the planner may choose from (the pool of a ``+select``
            method, :mod:`ddkit.selection`); the plan in the manifest records the ratio and kept IPC.

    Returns:
        The generation directory (``RUN/gen-<method>``), holding ``shard-<rank>/`` and, once merged,
        ``dataset.pt``, ``manifest.json``, ``grid.png``, ``budget.png`` and ``DONE``.

    Raises:
        BudgetError: the budget cannot fit ``steps_min`` × ``ipc_min`` (before any sampling).
        WeightsError: the checkpoint is missing.
        ConfigError: invalid method or ``DDKIT_T0``.
    """
    from ddkit import dist
    from ddkit.errors import ConfigError

    t0 = resolve_t0(t0, clock)
    gcfg = cfg.generate
    method = method or gcfg.method
    if method not in ("minimax", "dit", "d3hr"):
        raise ConfigError(f"generate.method: must be minimax, dit or d3hr, got {method!r}")
    limit = float(time_limit if time_limit is not None else gcfg.time_limit)
    if limit <= 0:
        raise ConfigError(f"generate.time_limit: must be > 0, got {limit}")
    cfg = replace(cfg, generate=replace(gcfg, method=method, time_limit=limit))
    gcfg = cfg.generate
    gen_dir = Path(out_dir) if out_dir is not None else gen_dir_for(cfg, method)
    if is_done(gen_dir):
        return gen_dir

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
    if all_done:
        if group:
            if rank == 0 and merge_when_done:
                merge(gen_dir)
            dist.barrier()
        elif merge_when_done and _all_shards_done(gen_dir, world):
            merge(gen_dir)
        return gen_dir

    deadline = t0 + limit
    phases: dict[str, float] = {}
    mark = clock()

    device = torch.device(device) if device is not None else dist.device_for(env)
    checkpoint = "<in-memory model>"
    if model is None:
        from ddkit.models import load_backbone

        checkpoint = checkpoint_for(cfg, method)
        model, _ = load_backbone(
            checkpoint, use_ema=gcfg.use_ema, device=device, timestep_shift=cfg.model.timestep_shift,
            expect=cfg.model,
        )
    model = model.to(device).eval()
    vae = None
    vae_name = cfg.model.vae_decoder or cfg.model.vae
    if vae_name and model.in_channels == 4:
        from ddkit.models.vae import load_vae

        vae = load_vae(vae_name, device=device)
    if vae is None and model.in_channels == 4 and cfg.data.channels == 3:
        raise WeightsError("model.vae: a 4-channel latent backbone needs model.vae or model.vae_decoder")
    names, backbone_labels = class_layout(cfg, model.num_classes)
    K = len(names)
    _prepare_plotting()
    phases["load"] = clock() - mark

    start_t = None
    stats = None
    if method == "d3hr":
        from ddkit.methods import d3hr

        mark = clock()
        stats = d3hr.class_statistics(
            model,
            cfg,
            device=device,
            cache_dir=Path(cfg.run_dir) / "d3hr-cache",
            rank=rank,
            world_size=world,
            progress=progress,
        )
        start_t = d3hr.start_timestep(gcfg.d3hr)
        gcfg = d3hr.decode_settings(gcfg, cfg.model.num_train_timesteps)  # reference grid, all channels guided
        phases["d3hr_statistics"] = clock() - mark

    from ddkit import budget
    from ddkit.sampling import SamplingAborted, sample, to_uint8

    precision = _sampling_precision(gcfg, model, device, gen_dir)
    autocast = precision.dtype
    # D^3HR restarts a deterministic DDIM chain from its inverted-statistics latents (reference
    # ``group_sampling.py``); the other methods use the configured sampler.
    sampler = "ddim" if method == "d3hr" else gcfg.sampler
    cfg_scale = gcfg.cfg_scale
    if method == "d3hr" and gcfg.d3hr.cfg_scale is not None:
        cfg_scale = gcfg.d3hr.cfg_scale
    run_model = model
    if gcfg.compile:
        run_model = torch.compile(model)
        for a in ("in_channels", "input_size", "num_classes", "learn_sigma"):
            setattr(run_model, a, getattr(model, a))
    latent_cache: dict[int, torch.Tensor] = {}

    def run_items(items, steps: int, step_callback=None) -> torch.Tensor:
        labels = torch.tensor([backbone_labels[c] for c, _ in items], dtype=torch.long, device=device)
        gens = [torch.Generator(device=device).manual_seed(image_seed(gcfg.seed, c, i)) for c, i in items]
        latents = None
        if stats is not None:
            latents = torch.stack([latent_cache[c][i] for c, i in items]).to(device)
        x = sample(
            run_model,
            labels,
            steps=steps,
            sampler=sampler,
            cfg_scale=cfg_scale,
            guided_channels=gcfg.guided_channels,
            generators=gens,
            latents=latents,
            start_timestep=start_t,
            num_train_timesteps=cfg.model.num_train_timesteps,
            autocast_dtype=autocast,
            step_callback=step_callback,
        )
        if vae is not None:
            from ddkit.models.vae import decode

            x = decode(vae, x)
        return to_uint8(x.float()).cpu()

    # --- calibrate at the real batch size -------------------------------------------------------------
    mark = clock()
    B = max(1, min(gcfg.batch_size, math.ceil(K * gcfg.ipc_max / world)))
    cal_items = [(k % K, 10**9 + k) for k in range(B)]  # seeds no real image uses
    C, S = model.in_channels, model.input_size
    cal_labels = torch.tensor([backbone_labels[c] for c, _ in cal_items], device=device)

    def cal_run(n: int) -> None:
        sample(
            run_model,
            cal_labels,
            steps=n,
            sampler=sampler,
            cfg_scale=cfg_scale,
            guided_channels=gcfg.guided_channels,
            latents=torch.randn(B, C, S, S, device=device) if stats is not None else None,
            start_timestep=start_t,
            num_train_timesteps=cfg.model.num_train_timesteps,
            autocast_dtype=autocast,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def cal_fixed() -> None:
        x = torch.zeros(B, C, S, S, device=device)
        if vae is not None:
            from ddkit.models.vae import decode

            x = decode(vae, x)
        to_uint8(x.float()).cpu()

    from ddkit import writecost

    if mine_done:  # nothing left to sample here: the peers' cost decides (MAX below)
        cost, reserve = budget.CostModel(0.0, 0.0, B), 0.0
    else:
        cost = budget.calibrate(cal_run, clock=clock, batch_size=B, fixed=cal_fixed)
        out_px = cfg.data.channels * (S * 8) ** 2 if vae is not None else C * S * S
        ipc_w = math.ceil(gcfg.ipc_max * max(select_ratios))  # a selection pool writes all its candidates
        reserve = writecost.finish_seconds(
            gen_dir, shard_bytes=K * ipc_w * out_px // world, merged_bytes=K * ipc_w * out_px,
            merges=merge_when_done and (rank == 0 or not group), grid=(K, min(gcfg.ipc_max, 10), out_px),
            clock=clock,
        )  # fmt: skip
    if group:  # one plan for all ranks: the slowest rank's cost and the largest reserve
        c = torch.tensor([cost.step_seconds, cost.batch_seconds, reserve], dtype=torch.float64)
        torch.distributed.all_reduce(c, op=torch.distributed.ReduceOp.MAX)
        cost, reserve = budget.CostModel(float(c[0]), float(c[1]), B), float(c[2])
    phases["calibrate"] = clock() - mark

    # --- plan -------------------------------------------------------------------------------------------
    quality: Any = gcfg.quality
    if quality != "dsr":
        quality = budget.load_quality_table(quality)
    bounds, select_ratios = _bounds(gcfg, gen_dir, select_ratios)
    margin = gcfg.safety_margin * limit
    plan_at = clock()
    available = deadline - margin - reserve - plan_at
    the_plan = budget.plan(
        available, cost, bounds, num_classes=K, batch_size=B, world_size=world, quality=quality,
        ratios=select_ratios,
    )
    # Extension batches (for a machine faster than calibrated) reach at most ipc_max, or 4x the plan, so
    # the layout stays small for 1000-class runs.
    ipc_cap = min(gcfg.ipc_max, max(4 * the_plan.ipc, the_plan.ipc + 8))
    if stats is not None or the_plan.ratio > 1:
        # A selection pool is sized by its plan; D^3HR latents are one group of the planned IPC per class.
        ipc_cap = the_plan.ipc
    my_batches, extra = budget.split_plan(K, the_plan.ipc, ipc_cap, B, rank, world)
    if mine_done:  # its shard is on disk: take part in the collectives only
        my_batches, extra = [], []

    if stats is not None:
        from ddkit.methods import d3hr

        mark = clock()
        latent_cache.clear()
        mine = {c for b in my_batches for c, _ in b.items}
        got, per_class = d3hr.select_latents(stats, mine, the_plan.ipc, seed=gcfg.seed, cfg=gcfg.d3hr)
        latent_cache.update(got)
        phases["d3hr_latents"] = clock() - mark
        phases["d3hr_group_search_s_per_class"] = per_class
        if progress:
            print(f"D^3HR group search: {gcfg.d3hr.num_groups} groups/class, {per_class:.3g} s/class", flush=True)

    runner = budget.Runner(
        plan=the_plan,
        cost=cost,
        batches=my_batches,
        extra=extra,
        deadline=deadline,
        clock=clock,
        steps_min=gcfg.steps_min,
        t0=t0,
        margin_seconds=margin,
        reserve_seconds=reserve,
    )

    # --- sample -----------------------------------------------------------------------------------------
    mark = clock()
    images, labels, indices, steps_used = [], [], [], []
    total = sum(len(b.items) for b in my_batches)
    with _progress(progress, total, deadline, clock, rank) as (prog, task):
        while (nxt := runner.next()) is not None:
            batch, steps = nxt
            if prog is not None:
                prog.update(
                    task,
                    total=max(total, sum(len(b.items) for b in runner.batches)),
                    steps=steps,
                    left=max(0.0, deadline - clock()),
                )

            def check(i: int, n: int) -> bool | int:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                return runner.step_ok(i, n)

            try:
                out = run_items(batch.items, steps, check)
            except SamplingAborted:
                runner.abort()
                break
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ev = runner.done()
            images.append(out)
            labels.extend(c for c, _ in batch.items)
            indices.extend(i for _, i in batch.items)
            steps_used.extend([ev.steps] * len(batch.items))
            if prog is not None:
                prog.update(task, advance=len(batch.items), left=max(0.0, deadline - clock()))
    phases["sample"] = clock() - mark

    # --- shard ------------------------------------------------------------------------------------------
    mark = clock()
    out_channels = cfg.data.channels if vae is not None else C
    empty = torch.zeros(
        0,
        out_channels,
        S * (8 if vae is not None else 1),
        S * (8 if vae is not None else 1),
        dtype=torch.uint8,
    )
    shard = {
        "images": torch.cat(images) if images else empty,
        "labels": torch.tensor(labels, dtype=torch.long),
        "index": torch.tensor(indices, dtype=torch.long),
        "steps": torch.tensor(steps_used, dtype=torch.long),
        "rank": rank,
        "world_size": world,
        "classes": names,
        "method": method,
        "sampler": sampler,
        "start_timestep": start_t,
        "cfg_scale": cfg_scale,
        "checkpoint": checkpoint,
        "seed": gcfg.seed,
        "time_limit": limit,
        "plan": the_plan.to_dict(),
        "cost": {
            "step_seconds": cost.step_seconds,
            "batch_seconds": cost.batch_seconds,
            "batch_size": B,
            "image_step_seconds": cost.image_step_seconds,
        },
        "events": [vars(e) for e in runner.events],
        "dropped_batches": list(runner.dropped),
        "speed_factor": runner.speed_factor,
        "shortened_batches": runner.shortened,
        "plan_time": plan_at - t0,
        "deadline": deadline - t0,
        "margin_seconds": margin,
        "reserve_seconds": reserve,
        "hardware": hardware_info(),
        "precision": precision.to_dict(),
    }
    phases["save"] = clock() - mark  # the save itself is measured into the DONE marker below
    shard["phases"] = dict(phases)
    shard["finished"] = clock() - t0
    if not mine_done:
        shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(shard, shard_dir / SHARD_FILE)
        plan = {"steps": the_plan.steps, "ipc": the_plan.ipc}  # a requeued peer adopts it (_bounds)
        mark_done(shard_dir, {"images": int(shard["images"].shape[0]), "finished": clock() - t0, "plan": plan})

    if group:
        dist.barrier()
        if rank == 0 and merge_when_done:
            merge(gen_dir, t0=t0, clock=clock)
        dist.barrier()
    elif merge_when_done and _all_shards_done(gen_dir, world):
        merge(gen_dir, t0=t0, clock=clock)
    return gen_dir


def _sampling_precision(gcfg, model, device, gen_dir: Path):
    """``generate.precision`` resolved for this model (auto: :mod:`ddkit.hardware`, a timed no-grad forward
    of the CFG-doubled batch), once per generation: the first rank to decide publishes its choice in
    ``gen_dir/precision.json`` and every rank and every requeued restart adopts it. A timed check is noisy
    under load, and a set sampled partly in bf16 and partly in fp32 would differ from an uninterrupted run."""
    from ddkit import hardware as hw
    from ddkit.io import publish_json_once

    record = gen_dir / "precision.json"
    previous = json.loads(record.read_text()) if record.is_file() else None
    inputs = hw.backbone_inputs(model, 2 * gcfg.batch_size, device)
    step = hw.model_step(model, inputs, backward=False)
    # No collective: ranks whose shard is done do not come here (see their collectives above).
    choice = hw.choose_precision(gcfg.precision, device, role="generate", step=step, agree=False, previous=previous)
    published = publish_json_once(record, choice.to_dict())
    if published.get("requested") != choice.requested or published.get("device") != choice.device:
        return choice  # a different request or device (heterogeneous ranks): decided here
    known = {f.name for f in dataclasses.fields(hw.PrecisionChoice)} - {"warning"}
    return hw.PrecisionChoice(**{k: v for k, v in published.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------------------
def merge(
    gen_dir: str | Path, *, t0: float | None = None, clock: Callable[[], float] = time.monotonic
) -> Path:
    """Merge every ``shard-<k>/images.pt`` into one class-major, class-balanced ``dataset.pt``.

    The IPC is the smallest per-class count over all shards; each class keeps its lowest image indices
    (surplus dropped deterministically). Also writes ``manifest.json``, ``grid.png``, ``budget.png`` and
    ``DONE``.

    Args:
        gen_dir: the generation directory.
        t0: the budget start on ``clock`` when merging in the generating process (adds the merge to the
            budget share); None for a separate ``--merge`` step.

    Returns:
        Path of ``dataset.pt`` = ``{"images": uint8 [N,C,H,W], "labels": int64 [N], "classes": list[str],
        "ipc": int}`` with N = ipc × K, class-major.

    Raises:
        DataError: no shards, a shard missing or not done (names it), or shards from different runs.
    """
    import torch

    gen_dir = Path(gen_dir)
    dirs = _shard_dirs(gen_dir)
    if not dirs:
        raise DataError(f"{gen_dir}: no shard-<rank> directories to merge")
    first = torch.load(dirs[0] / SHARD_FILE, weights_only=False) if is_done(dirs[0]) else None
    if first is None:
        raise DataError(f"{dirs[0]}: shard not done (no DONE marker); rerun generation for it")
    world = int(first["world_size"])
    shards = []
    for r in range(world):
        d = gen_dir / f"shard-{r}"
        if not is_done(d):
            raise DataError(f"{d}: shard missing or not done (world size {world}); rerun that rank")
        s = first if d == dirs[0] else torch.load(d / SHARD_FILE, weights_only=False)
        if s["world_size"] != world or s["classes"] != first["classes"]:
            raise DataError(f"{d / SHARD_FILE}: from a different run (world size or classes differ)")
        shards.append(s)
    classes = list(first["classes"])
    K = len(classes)
    images = torch.cat([s["images"] for s in shards])
    labels = torch.cat([s["labels"] for s in shards])
    index = torch.cat([s["index"] for s in shards])
    steps = torch.cat([s["steps"] for s in shards])
    counts = [int((labels == k).sum()) for k in range(K)]
    ipc = min(counts) if counts else 0
    # Class-major, and within a class by image index; keep the first ipc of each class.
    order = sorted(range(len(labels)), key=lambda j: (int(labels[j]), int(index[j])))
    keep, seen = [], [0] * K
    for j in order:
        c = int(labels[j])
        if seen[c] < ipc:
            keep.append(j)
            seen[c] += 1
    keep_t = torch.tensor(keep, dtype=torch.long)
    dataset = {
        "images": images[keep_t].contiguous(),
        "labels": labels[keep_t].contiguous(),
        "classes": classes,
        "ipc": ipc,
    }
    out = gen_dir / "dataset.pt"
    atomic_torch_save(dataset, out)

    mark = clock()
    write_grid(gen_dir / "grid.png", dataset["images"], dataset["labels"], classes, ipc)
    write_budget_plot(gen_dir / "budget.png", shards)
    plots_s = clock() - mark
    limit = float(first["time_limit"])
    finished = max(float(s["finished"]) for s in shards)
    elapsed = (clock() - t0) if t0 is not None else None
    made = int(sum(s["images"].shape[0] for s in shards))
    possible = 0
    for s in shards:
        p, c = s["plan"], s["cost"]
        per_batch = c["step_seconds"] * p["steps"] + c["batch_seconds"]
        window = max(0.0, float(s["deadline"]) - s["plan_time"] - s["margin_seconds"])
        possible += int(window // per_batch) * c["batch_size"] if per_batch > 0 else 0
    kept_steps = steps[keep_t] if len(keep) else steps
    manifest = {
        "method": first["method"],
        "sampler": first.get("sampler"),
        "start_timestep": first.get("start_timestep"),
        "cfg_scale": first.get("cfg_scale"),
        "checkpoint": first["checkpoint"],
        "ipc": ipc,
        "num_classes": K,
        "classes": classes,
        "images": len(keep),
        "images_generated": made,
        "images_dropped_for_balance": made - len(keep),
        "steps": {
            "planned": first["plan"]["steps"],
            "min": int(kept_steps.min()) if len(kept_steps) else None,
            "max": int(kept_steps.max()) if len(kept_steps) else None,
            "per_image": [int(v) for v in kept_steps],
        },
        "seeds": {
            "base": first["seed"],
            "rule": "image (class c, index i) uses torch.Generator seeded by ddkit.generate.image_seed(base, c, i)",
            "per_image": [[int(labels[j]), int(index[j])] for j in keep],
        },
        "plan": first["plan"],
        "cost": first["cost"],
        "time_limit": limit,
        "phases": {f"rank{s['rank']}": s["phases"] for s in shards} | {"merge_plots": plots_s},
        "rank_finished_seconds": [float(s["finished"]) for s in shards],
        "elapsed_seconds": elapsed if elapsed is not None else finished,  # budget seconds
        "budget_share_used": (elapsed if elapsed is not None else finished) / limit,
        "budget_use_images": made / possible if possible else None,
        "images_possible": possible,
        "dropped_batches": {f"rank{s['rank']}": s["dropped_batches"] for s in shards},
        "world_size": world,
        "hardware": first["hardware"],
        "precision": first.get("precision"),
    }
    atomic_write_json(gen_dir / "manifest.json", manifest)
    if ipc == 0:
        from ddkit.errors import BudgetError

        raise BudgetError(
            f"{gen_dir}: the budget ended before every class had one image ({made} images made; counts per "
            f"class {counts}); raise generate.time_limit or lower generate.steps_min"
        )
    mark_done(gen_dir, {"ipc": ipc, "images": len(keep)})
    return out


# ----------------------------------------------------------------------------------------------------------
# Figures and progress
# ----------------------------------------------------------------------------------------------------------
def _prepare_plotting() -> None:
    """Import matplotlib (Agg) while the budget still has slack, not after the last batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def write_grid(
    path: Path, images, labels, classes: list[str], ipc: int, max_cols: int = 10, max_rows: int = 100
) -> Path:
    """PNG grid: one row per class (first ``max_rows`` classes), its first ``max_cols`` images.

    Args:
        images: uint8 [N,C,H,W], class-major; labels: int64 [N].
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    K = min(len(classes), max_rows)
    cols = max(1, min(ipc, max_cols))
    if len(images) == 0:
        C, H, W = 1, 8, 8
    else:
        C, H, W = images.shape[1:]
    canvas = np.full((K * (H + 2), cols * (W + 2), 3), 255, dtype=np.uint8)
    for k in range(K):
        idx = (labels == k).nonzero().flatten()[:cols]
        for j, n in enumerate(idx.tolist()):
            img = images[n].permute(1, 2, 0).numpy()
            if C == 1:
                img = np.repeat(img, 3, axis=2)
            canvas[k * (H + 2) + 1 : k * (H + 2) + 1 + H, j * (W + 2) + 1 : j * (W + 2) + 1 + W] = img
    fig_h = max(2.0, 0.5 * K)
    fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * cols + 1.5), fig_h))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([k * (H + 2) + H / 2 for k in range(K)])
    ax.set_yticklabels([str(c)[:20] for c in classes[:K]], fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"IPC {ipc}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_budget_plot(path: Path, shards: list[dict]) -> Path:
    """PNG: planned vs actual cumulative images over time (seconds since the budget start), per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    limit = float(shards[0]["deadline"])  # the time limit
    for s in shards:
        ev = s["events"]
        p, c = s["plan"], s["cost"]
        per_batch = c["step_seconds"] * p["steps"] + c["batch_seconds"]
        t_start = ev[0]["start"] if ev else s["plan_time"]
        n_batches = p["batches_per_rank"]
        planned_t, planned_n, n = [t_start], [0], 0
        sizes = [e["images"] for e in ev] + [c["batch_size"]] * max(0, n_batches - len(ev))
        for b in range(n_batches):
            n += sizes[b] if b < len(sizes) else c["batch_size"]
            planned_t.append(t_start + (b + 1) * per_batch)
            planned_n.append(n)
        ax.plot(
            planned_t, planned_n, "--", label=f"rank {s['rank']} planned ({p['steps']} steps, IPC {p['ipc']})"
        )
        at, an, n = [t_start], [0], 0
        for e in ev:
            n += e["images"]
            at.append(e["end"])
            an.append(n)
        ax.plot(at, an, "-", marker=".", label=f"rank {s['rank']} actual")
    ax.axvline(limit, color="red", label="deadline")
    ax.axvline(
        limit - float(shards[0]["margin_seconds"]), color="orange", linestyle=":", label="safety margin"
    )
    ax.set_xlabel("seconds since budget start")
    ax.set_ylabel("images generated (this rank)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


class _progress:
    """rich progress bar (images, steps, time left) or a no-op."""

    def __init__(self, enabled: bool, total: int, deadline: float, clock, rank: int) -> None:
        self.enabled, self.total, self.deadline, self.clock, self.rank = enabled, total, deadline, clock, rank
        self.prog = None

    def __enter__(self):
        if not self.enabled:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.prog = Progress(
            TextColumn(f"[bold]generate[/] rank {self.rank}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images · {task.fields[steps]} steps · {task.fields[left]:.0f} s left"),
            transient=False,
        )
        self.prog.__enter__()
        task = self.prog.add_task("gen", total=self.total, steps=0, left=self.deadline - self.clock())
        return self.prog, task

    def __exit__(self, *exc):
        if self.prog is not None:
            self.prog.__exit__(*exc)
        return False
