"""Budgeted, sharded generation of the distilled set (``ddkit generate``).

Flow of one rank (:func:`generate`, in :mod:`ddkit.generate.run`):

1. **Clock.** The budget starts at ``t0`` (:func:`ddkit.dist.budget_start`): the CLI passes the process
   start; ``DDKIT_T0`` (Unix epoch seconds, e.g. ``export DDKIT_T0=$(date +%s)`` in the sbatch script before
   ``srun``/array tasks) overrides it so every rank of a job shares ONE deadline ``t0 + time_limit``; under a
   process group (torchrun, srun) the earliest start of all ranks is used. Model loading and D^3HR class
   statistics (cached on disk, so a requeued attempt only loads them) are inside the budget.
2. **Load** the :class:`Sampler` (:func:`load_sampler`, :mod:`ddkit.generate.sampler`): backbone, VAE,
   D^3HR statistics, the sampling precision (``precision.json``, first writer wins).
3. **Calibrate** the real sampler at the real batch size (:func:`calibrate`: :func:`ddkit.budget.calibrate`)
   and what follows the last batch on this filesystem (:func:`ddkit.writecost.finish_seconds`: shard save,
   merge, plots, timed with the real writers), **plan** steps and IPC with the DSR rule or a quality table
   (:func:`plan`: :func:`ddkit.budget.plan`; :class:`BudgetError` before any sampling if even the minimums
   do not fit). Under a process group all ranks adopt the slowest rank's cost and the largest reserve so
   they agree on one plan; a rank whose peers' shards are already done (a requeued job) adopts their plan
   (:func:`ddkit.generate.layout.plan_bounds`), so the merged set is the one an uninterrupted run makes.
4. **Sample** this rank's batches (global batch ``b`` -> rank ``b % world``), re-planning before each
   (:func:`run_budget`, :class:`ddkit.budget.Runner`). Image ``(class c, index i)`` is seeded by
   :func:`image_seed` only, so the images do not depend on the sharding. Latent models are decoded with
   the VAE; images are stored uint8.
5. **Shard** ``gen-<method>/shard-<rank>/images.pt`` + ``DONE`` (:func:`save_shard`). A rerun skips
   completed shards; under a process group the ranks decide that with one collective (all done: skip;
   otherwise the done ranks take part in every collective with no batches of their own).
6. **Merge** (:func:`merge`, :mod:`ddkit.generate.shards`, by whichever rank sees every shard done, or
   ``ddkit generate --merge``): a class-major ``dataset.pt`` cut to a balanced IPC, ``manifest.json``,
   ``grid.png``, ``budget.png`` (:mod:`ddkit.figures`), ``DONE``.
"""

from __future__ import annotations

from ddkit.dist import process_start_monotonic
from ddkit.figures import write_budget_plot, write_grid
from ddkit.generate.layout import SHARD_FILE, checkpoint_for, class_layout, gen_dir_for, image_seed
from ddkit.generate.run import Rank, calibrate, generate, plan, run_budget
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
    "plan",
    "process_start_monotonic",
    "run_budget",
    "save_shard",
    "shard_record",
    "write_budget_plot",
    "write_grid",
]
