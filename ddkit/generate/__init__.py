"""Budgeted, sharded generation of the distilled set (``ddkit generate``).

Flow of one rank (:func:`generate`, in :mod:`ddkit.generate.run`); the method (:mod:`ddkit.methods.registry`)
is asked at each point, never named:

0. **Decide** like ``ddkit run`` (:func:`ddkit.stages.enter`): an unchanged stage fingerprint skips, a
   changed one sets the old directory aside under ``RUN/.stale/`` and reruns, an interrupted run resumes.
1. **Clock.** The budget starts at ``t0`` (:func:`ddkit.dist.budget_start`): the CLI passes the process
   start; ``DDKIT_T0`` (Unix epoch seconds) overrides it so every rank of a job shares ONE deadline; under a
   process group the earliest start of all ranks is used. A wrapper (``+select``) keeps
   :meth:`~ddkit.methods.base.GenerationMethod.reserve_seconds` of it for its last step.
2. **Load** the :class:`Sampler` (:func:`load_sampler`): backbone, VAE, the method's chain, the sampling
   precision (``precision.json``, first writer wins); then the method **prepares** what does not depend on
   the plan (D^3HR's class statistics, cached on disk so a requeued attempt only loads them).
3. **Calibrate** the real sampler at the real batch size with the method's stand-in latents and guidance
   (:func:`calibrate`) and what follows the last batch on this filesystem (:func:`ddkit.writecost.finish_seconds`),
   then **plan** steps, IPC and ratio (:func:`plan`). Under a process group all ranks adopt the slowest
   rank's cost and the largest reserve. The first rank to plan publishes the **generation record**
   (:mod:`ddkit.generate.record`); every other rank and every restart adopts it whole, so the merged set is
   the one an uninterrupted run makes. The method then prepares what depends on the plan (D^3HR's group
   latents, MGD^3's modes, published first-writer-wins).
4. **Sample** this rank's batches (global batch ``b`` -> rank ``b % world``), re-planning before each
   (:func:`run_budget`, :class:`ddkit.budget.Runner`). Image ``(class c, index i)`` is seeded by
   :func:`image_seed` only, so the images do not depend on the sharding.
5. **Shard** ``gen-<method>/shard-<rank>/images.pt`` + ``DONE`` carrying the record (:func:`save_shard`).
6. **Merge** (:func:`merge`, by whichever rank sees every shard done, or ``ddkit generate --merge``): refuses
   shards of different records, writes a class-major ``dataset.pt`` cut to a balanced IPC, ``manifest.json``
   (with the record), ``grid.png``, ``budget.png`` and ``DONE`` (stamped with the stage fingerprint); a
   wrapper then finishes (``+select`` selects from its merged pool).
"""

from __future__ import annotations

from ddkit.dist import process_start_monotonic
from ddkit.figures import write_budget_plot, write_grid
from ddkit.generate.layout import SHARD_FILE, checkpoint_for, class_layout, gen_dir_for, image_seed
from ddkit.generate.run import Rank, calibrate, generate, merge_generation, plan, run_budget
from ddkit.generate.sampler import Sampler, _sampling_precision, load_sampler
from ddkit.generate.shards import merge, save_shard, shard_record

__all__ = [
    "SHARD_FILE",
    "Rank",
    "Sampler",
    "_sampling_precision",
    "calibrate",
    "checkpoint_for",
    "class_layout",
    "gen_dir_for",
    "generate",
    "image_seed",
    "load_sampler",
    "merge",
    "merge_generation",
    "plan",
    "process_start_monotonic",
    "run_budget",
    "save_shard",
    "shard_record",
    "write_budget_plot",
    "write_grid",
]
