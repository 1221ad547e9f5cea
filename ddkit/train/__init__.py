"""`ddkit train`: pretrain a tiny class-conditional DiT, or minimax-fine-tune a checkpoint.

The minimax stage follows vimar-gu/MinimaxDiffusion ``train_dit.py``: AdamW (lr 1e-3, weight decay 0,
default betas), DiffFit trainable set (``mark_difffit_trainable``), EMA 0.9999 of the weights
(``update_ema``, initialised to the starting weights), label dropout 0.1 for classifier-free guidance,
DiT's diffusion loss (ε-MSE + learned-σ VLB term) plus λr·L_r + λd·L_d from :mod:`ddkit.methods.minimax`
with per-rank memories updated after the loss. The pretrain stage is the same loop with λr = λd = 0 (DiT
``train.py``), starting from DiT's random initialisation.

Layout: this module is the entry point (:func:`train`) and the preemption hooks; :mod:`ddkit.train.trainer`
holds :class:`Trainer` (set-up, the loop, the ranks' agreement, checkpoints); :mod:`ddkit.train.step` the
parts of one optimizer step; :mod:`ddkit.models.checkpoint` the checkpoint format and RNG states.

One code path for a single process, ``torchrun`` and SLURM ``srun``: :mod:`ddkit.dist` gives rank and world
size; the model is wrapped in DDP when the world has more than one rank; rank 0 alone writes
``train_log.jsonl``, ``config.yaml``, the checkpoint and ``DONE``, followed by a barrier.

Exact resume: a checkpoint holds everything the next step depends on — weights, EMA, optimizer moments,
step, each rank's RNG states and minimax memories, and the data position (epoch, batch-in-epoch). The data
loader is deterministic per (seed, epoch, rank), so resuming rebuilds the epoch's loader and skips the
batches already consumed; the resumed run then computes bit-identical steps (CPU) to an uninterrupted one.

Preemption (SLURM ``scontrol requeue``/preemption SIGTERM, time-limit USR2): the job's signal handlers only
call :func:`request_stop`; at every step boundary the ranks vote once (:meth:`Trainer._agree_stop`), all
stop after the same step, write one checkpoint (rank 0, atomically) and raise :class:`Preempted`, so no
step is lost, whatever the moment of the signal.
"""

from __future__ import annotations

from pathlib import Path

from ddkit.config import ExperimentConfig
from ddkit.train.stop import Preempted, current_trainer, request_stop
from ddkit.train.trainer import Stage, Trainer


def train(
    cfg: ExperimentConfig,
    stage: Stage,
    *,
    resume: str = "auto",
    max_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Run one training stage; return the checkpoint path ``RUN/<stage>/ckpt/last.pt``.

    Args:
        cfg: the experiment; reads ``data``, ``model`` and the ``pretrain``/``minimax`` section.
        stage: ``"pretrain"`` (tiny DiT from scratch, or from ``pretrain.init``) or ``"minimax"``
            (fine-tunes ``minimax.init``, else ``model.pretrained``, else ``RUN/pretrain/ckpt/last.pt``).
        resume: ``"auto"`` continues from the stage's checkpoint when there is one (and returns at once when
            the stage is DONE with at least ``steps`` steps: a DONE stage whose ``steps`` grew trains on from
            its last checkpoint, the same steps a run with the larger count makes); ``"never"`` starts over;
            a path resumes from that checkpoint.
        max_steps: stop once the run has made this many optimizer steps in total, checkpoint, and return
            WITHOUT marking the stage DONE (tests, preemption simulation).
        progress: show the rich progress bar (rank 0).

    Raises:
        ConfigError, DataError, WeightsError: bad config, missing shards, missing initial weights.
        Preempted: :func:`request_stop` was called (SIGTERM/USR2 under SLURM); the checkpoint is written.
    """
    trainer = Trainer(cfg, stage, resume=resume, max_steps=max_steps, progress=progress)
    return trainer.run()


__all__ = ["Preempted", "Stage", "Trainer", "current_trainer", "request_stop", "train"]
