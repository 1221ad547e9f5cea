"""The training loop of one stage (:class:`Trainer`): set-up, epochs and steps, logs, checkpoints.

Its collectives, and the order every rank makes them in, are in :mod:`ddkit.train.ranks`; one step's
parts in :mod:`ddkit.train.step`; resume and preemption are described in :mod:`ddkit.train`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from ddkit import dist, progress
from ddkit import hardware as hw
from ddkit.config import ExperimentConfig, ModelConfig, TrainConfig, check_stages
from ddkit.dist import DistEnv
from ddkit.errors import ConfigError, DataError
from ddkit.hardware import autocast
from ddkit.io import (
    DONE,
    append_jsonl,
    atomic_write_text,
    hardware_info,
    mark_done,
    read_done,
    read_jsonl,
    write_run_config,
)
from ddkit.schedule import scheduler_config
from ddkit.train import ranks
from ddkit.train.stop import STOP, Preempted, set_current

Stage = Literal["pretrain", "minimax"]


class Trainer:
    """One training stage. Build with the config, call :meth:`run`.

    Attributes (after :meth:`setup`): ``model`` (the unwrapped :class:`ddkit.models.Backbone`), ``ema``,
    ``optimizer``, ``step`` (optimizer steps done), ``epoch``/``batch_in_epoch`` (data position of the
    next batch), ``memory`` (this rank's :class:`ddkit.methods.minimax.MinimaxMemory` or None),
    ``stage_dir``, ``ckpt_path``.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        stage: Stage,
        *,
        resume: str = "auto",
        max_steps: int | None = None,
        progress: bool = True,
    ) -> None:
        check_stages((stage,))
        self.cfg = cfg
        self.stage = stage
        self.tcfg: TrainConfig = getattr(cfg, stage)
        self.resume = resume
        self.max_steps = max_steps
        self.progress = progress
        self.stage_dir = Path(cfg.run_dir) / stage
        from ddkit.models.checkpoint import checkpoint_path

        self.ckpt_path = checkpoint_path(self.stage_dir)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.memory = None
        self.made_on: dict[str, Any] | None = None  # the data's record, stored in checkpoints (setup)
        self._ready = False
        self._in_step = False
        self._last_ckpt: Path | None = None
        self._ctl_group = None

    # ------------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Distributed init, data index, model (fresh, initial or resumed), optimizer, RNG and memories."""
        import torch

        from ddkit.data import read_index
        from ddkit.data.classmap import backbone_labels
        from ddkit.models.checkpoint import resume_state
        from ddkit.models.provenance import check_classes, record
        from ddkit.train.backbones import start_backbones
        from ddkit.train.step import data_mode

        self._setup_dist()
        state = resume_state(self.resume, self.ckpt_path, self.stage)
        index = read_index(self.cfg.data.shards)
        self.index = index
        self.num_subset_classes = len(index["classes"])
        model, ema, mcfg = start_backbones(self.cfg, self.stage, state, str(self.ckpt_path))
        self.data_mode = data_mode(mcfg, index, self.cfg.data.shards)
        # Class mapping: memories use the subset index, conditioning the backbone's index.
        labels = backbone_labels(index, mcfg.num_classes, self.cfg.model.class_map)
        start = self.tcfg.init or self.cfg.model.pretrained or self.stage_dir.parent / "pretrain"
        where = (self.ckpt_path if self.resume == "auto" else self.resume) if state else start
        check_classes(model.made_on, index, self.cfg.model.class_map, labels=labels, where=str(where))
        self.made_on = record(index, labels)  # what this stage's checkpoints are made on
        cond = torch.tensor(labels, dtype=torch.long)
        self._init_training(model, ema, mcfg, cond)
        if state is not None:
            self._restore(state)
        self.vae = None
        if self.data_mode == "encode":
            from ddkit.models.vae import load_vae

            self.vae = load_vae(mcfg.vae, device=self.device)
        self._resolve_precision(state)
        self._ready = True

    def _setup_dist(self) -> None:
        """Rank, device, this rank's batch, the stop vote's process group, TF32 on CUDA."""
        import torch

        self.env = dist.init_distributed(dist.dist_env())
        self.device = dist.device_for(self.env)
        self.is_main = self.env.is_main
        world = self.env.world_size
        if self.tcfg.batch_size % world:
            raise ConfigError(
                f"{self.stage}.batch_size: {self.tcfg.batch_size} not divisible by world size {world}"
            )
        self.local_batch = self.tcfg.batch_size // world
        self._ctl_group = ranks.stop_group(self.env)
        if self.device.type == "cuda":
            # As the reference: TF32 matmuls make A100/H100 training much faster at no visible cost.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer, step, data position and this rank's RNG states, memories and unlogged loss sums."""
        from ddkit.models.checkpoint import rank_entry, set_rng_state

        rank, world = self.env.rank, self.env.world_size
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["data_pos"]["epoch"])
        self.batch_in_epoch = int(state["data_pos"]["batch"])
        rng = rank_entry(state, "rng", rank, world)
        if rng is not None:
            set_rng_state(self.generator, rng, self.device)
        else:  # a different world size cannot continue bit-exactly; keep the fresh per-rank seeds
            n = len(state.get("rng") or [])
            self._log_console(f"resume: checkpoint has {n} rank RNG states, world is {world}")
        memory = rank_entry(state, "memories", rank, world)
        if self.memory is not None and memory is not None:
            self.memory.load_state_dict(memory, self.device)
        acc = rank_entry(state, "log_acc", rank, world)
        if acc is not None:
            self._acc = acc["sums"].to(self.device)
            self._acc_n = int(acc["n"])
        self._last_ckpt = self.ckpt_path if self.ckpt_path.is_file() else None

    def _init_training(self, model, ema, mcfg: ModelConfig, cond) -> None:
        """Devices, trainable set, DDP, optimizer, schedule, memories and per-rank RNG (fresh state)."""
        import torch
        from diffusers import DDPMScheduler

        from ddkit.methods.minimax import DiffusionTables, MinimaxMemory
        from ddkit.models.checkpoint import seed_rank

        tcfg = self.tcfg
        self.model_cfg = mcfg
        self.model = model.to(self.device).train()
        self.ema = ema.to(self.device).eval().requires_grad_(False)
        trainable = self.model.trainable_parameters(tcfg.trainable)
        self.trainable_names = [n for n, _ in trainable]
        params = [p for _, p in trainable]
        ema_named = dict(self.ema.named_parameters())
        self._ema_pairs = ([ema_named[n] for n in self.trainable_names], params)
        self.cond_map = cond.to(self.device)
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        else:
            self.ddp = self.model
        self.optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.scheduler = DDPMScheduler(**scheduler_config(mcfg.num_train_timesteps))
        self.tables = DiffusionTables.create(mcfg.num_train_timesteps, self.device)
        self.use_minimax = tcfg.lambda_r > 0 or tcfg.lambda_d > 0
        self.memory = MinimaxMemory(tcfg.memory_size) if self.use_minimax else None
        self._acc = torch.zeros(6, device=self.device, dtype=torch.float64)
        self._acc_n = 0
        # RNG: one generator per rank on the device draws t, ε, flips, label dropout and VAE samples.
        rank_seed = self.cfg.seed * self.env.world_size + self.env.rank  # the reference's per-rank seed
        self.generator = seed_rank(rank_seed, self.device)

    @classmethod
    def from_model(
        cls,
        cfg: ExperimentConfig,
        stage: Stage,
        model,
        *,
        device="cpu",
        data_mode: str = "pixels",
        vae=None,
    ) -> Trainer:
        """A ready single-process Trainer around an in-memory :class:`ddkit.models.Backbone`, without shards
        or checkpoints (benchmarks): feed :meth:`train_step` batches yourself. ``data_mode``: "pixels"
        (batch[0] is x0), "latents" (batch[2] is x0) or "encode" (batch[0] goes through ``vae``)."""
        import torch

        from ddkit.train.backbones import clone_backbone

        tr = cls(cfg, stage, resume="never", progress=False)
        tr.env = DistEnv()
        tr.device = torch.device(device)
        tr.is_main = True
        tr.local_batch = tr.tcfg.batch_size
        tr.data_mode = data_mode
        tr.vae = vae
        mcfg = model.config
        tr._init_training(model, clone_backbone(model, mcfg), mcfg, torch.arange(mcfg.num_classes))
        tr._resolve_precision(None)
        tr._ready = True
        return tr

    def _resolve_precision(self, state: dict[str, Any] | None) -> None:
        """``self.precision`` (:class:`ddkit.hardware.PrecisionChoice`; auto: capabilities + a timed check of
        this model's step) and ``self.scaler`` (a GradScaler, active for fp16; restored on resume)."""
        import torch

        inputs = hw.backbone_inputs(self.model, self.local_batch, self.device)
        step = hw.model_step(self.model, inputs, backward=True)
        prev = state.get("precision") if state is not None else None
        self.precision = hw.choose_precision(self.tcfg.precision, self.device, role="train", step=step, previous=prev)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        if state is not None and state.get("scaler") and self.precision.grad_scaler:
            self.scaler.load_state_dict(state["scaler"])
        self._log_console(f"{self.stage} precision: {self.precision.summary()}")

    # ------------------------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train until ``steps`` (or ``max_steps``); return the checkpoint path. Idempotent: a DONE stage
        returns at once under ``resume="auto"`` (unless ``steps`` was raised since: then it continues)."""

        # An unreadable DONE reads as None (read_done says so): the stage resumes from its checkpoint, which
        # a complete run has at its last step, so the loop only rewrites the checkpoint and DONE.
        done = read_done(self.stage_dir) if self.resume == "auto" else None
        if done is not None and self.ckpt_path.is_file():
            done_step = done.get("step", self.tcfg.steps)
            if isinstance(done_step, int) and done_step >= self.tcfg.steps:  # more steps continue from it
                return self.ckpt_path
        if not self._ready:
            self.setup()
        set_current(self)
        try:
            self._prepare_dir()
            dist.barrier()
            self._loop()
        finally:
            set_current(None)
        return self.ckpt_path

    def _prepare_dir(self) -> None:
        if not self.is_main:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        (self.stage_dir / DONE).unlink(missing_ok=True)
        log = self.stage_dir / "train_log.jsonl"
        if self.step == 0:
            # A fresh start: a stale log or checkpoint of an earlier run must not be resumed later.
            log.unlink(missing_ok=True)
            self.ckpt_path.unlink(missing_ok=True)
        elif log.exists():
            # Lines logged after the checkpoint we resume from would be logged again: drop them.

            keep = [r for r in read_jsonl(log) if int(r.get("step", 0)) <= self.step]
            atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in keep))
        write_run_config(self.stage_dir, self.cfg)

    def _loop(self) -> None:
        """Epochs until ``steps`` (or ``max_steps``) or an agreed stop; then the checkpoint, and ``DONE``
        when all ``steps`` are made (:class:`ddkit.train.Preempted` on a stop)."""

        total = self.tcfg.steps
        stop = total if self.max_steps is None else min(total, self.max_steps)
        self._t_log = self._t_start = time.perf_counter()
        self._step0 = self.step
        stopped: tuple[int, ...] = ()
        show = self.progress and self.is_main
        try:
            with progress.bar(
                f"train {self.stage}", total, enabled=show, fields="{task.fields[speed]} {task.fields[terms]}",
                completed=self.step, transient=False, speed="", terms="",
            ) as bar:  # fmt: skip
                while self.step < stop and not stopped:
                    stopped = self._epoch(stop, bar)
        finally:
            self._in_step = False
        self._checkpoint()
        if stopped:
            raise Preempted(self.step, stopped, self.ckpt_path)
        if self.step >= total and self.is_main:
            mark_done(self.stage_dir, {"step": self.step, "checkpoint": str(self.ckpt_path),
                                       "precision": self.precision.to_dict(), "hardware": hardware_info()})
        dist.barrier()

    def _epoch(self, stop: int, bar) -> tuple[int, ...]:
        """The current epoch's steps from the data position on, until its end, ``stop`` or an agreed stop
        signal; returns the signals (``()`` when none)."""
        from ddkit.data import ShardLoader

        loader = ShardLoader(
            self.cfg.data.shards, "train", self.local_batch, seed=self.cfg.seed, epoch=self.epoch,
            rank=self.env.rank, world_size=self.env.world_size, num_workers=self.cfg.data.num_workers,
            shuffle=True, with_latents=self.data_mode == "latents", drop_last=True,
        )  # fmt: skip
        n_batches = ranks.agree_min(len(loader), self.env, self.device)
        if n_batches <= 0:
            raise DataError(
                f"{self.cfg.data.shards}: fewer train images than one batch of {self.local_batch} per rank"
            )
        it = iter(loader)  # dropped (with its worker processes) on return, before the next epoch's loader
        b = self.batch_in_epoch
        for _ in range(b):  # resume inside an epoch: skip the batches already consumed
            next(it)
        stopped: tuple[int, ...] = ()
        while b < n_batches and self.step < stop:
            if stopped := self._agree_stop():
                break
            batch = next(it)
            self._in_step = True
            self._acc += self.train_step(batch)  # running sums since the last log line (step.TERMS)
            self._acc_n += 1
            b += 1
            # Step count and data position advance together, before the step counts as done.
            self.step += 1
            self.epoch, self.batch_in_epoch = (self.epoch + 1, 0) if b >= n_batches else (self.epoch, b)
            self._in_step = False
            bar()
            self._after_step(stop, bar)
        return stopped

    def _after_step(self, stop: int, bar) -> None:
        """A log line every ``log_every`` steps and at the last; a checkpoint every ``ckpt_every`` steps
        (not at ``stop``: the loop's end writes that one)."""

        if self.step % self.tcfg.log_every == 0 or self.step == self.tcfg.steps:
            now = time.perf_counter()
            rec = self._reduce_log(self._acc, self._acc_n, now - self._t_log)
            self._acc.zero_()
            self._acc_n = 0
            self._t_log = now
            if self.is_main:
                rec["elapsed_s"] = round(now - self._t_start, 3)
                append_jsonl(self.stage_dir / "train_log.jsonl", rec)
                self._show(rec, bar, now)
        if self.step % self.tcfg.ckpt_every == 0 and self.step < stop:
            self._checkpoint()

    def _show(self, rec: dict[str, Any], bar, now: float) -> None:
        """The bar's speed and loss text; without a terminal (batch logs: no live bar) one plain line."""
        if not self.progress:
            return
        from ddkit.train.step import terms_text

        txt, sps = terms_text(rec), rec.get("steps_per_s")
        bar(0, terms=txt, speed=f"{sps:.2f} step/s" if sps else "")
        if not progress.console().is_terminal:
            done = self.step - self._step0
            eta = (self.tcfg.steps - self.step) * (now - self._t_start) / done if done > 0 else None
            progress.console().print(
                f"train {self.stage} step {self.step}/{self.tcfg.steps} {txt}"
                + (f" {sps:.2f} step/s" if sps else "")
                + (f" ETA {eta:.0f}s" if eta is not None else ""),
                highlight=False,
            )

    def train_step(self, batch) -> Any:
        """One optimizer step on a batch ``(images [B,C,H,W] in [-1,1], labels int64 [B][, latents])``,
        composed of the parts in :mod:`ddkit.train.step` (in their order: the random draws follow it).

        Returns float64 [6] on the device: loss (w·L_simple + L_vb, mean), mse, vb, L_r, L_d, total
        (no host sync).
        """
        from ddkit.methods.minimax import minimax_objective
        from ddkit.train import step as S

        tcfg, mcfg, gen = self.tcfg, self.model_cfg, self.generator
        x0, labels, y = S.prepare_batch(
            batch, self.data_mode, self.device, gen, hflip=tcfg.hflip, vae=self.vae, cond_map=self.cond_map,
            class_dropout=tcfg.class_dropout, null_class=mcfg.num_classes,
        )  # fmt: skip
        t, noise, x_t = S.add_noise(x0, self.scheduler, mcfg.num_train_timesteps, gen)
        with autocast(self.device.type, self.precision.precision):
            out = self.ddp(x_t, t, y)
        loss, terms = S.diffusion_loss(out, x0, x_t, t, noise, self.tables, mcfg.learn_sigma, tcfg.loss_weight_cap)
        total, l_r, l_d = minimax_objective(
            loss, x0, terms["x0_pred"], labels, self.memory, tcfg.lambda_r, tcfg.lambda_d
        )
        ema_p, params = self._ema_pairs
        S.optimizer_step(self.optimizer, self.scaler, total, params, self.lr_at(self.step + 1), tcfg.grad_clip)
        S.update_ema(ema_p, params, S.ema_decay(tcfg.ema_decay, tcfg.ema_warmup, self.step))
        return S.step_record(loss, terms, l_r, l_d, total)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based): :func:`ddkit.train.step.warmup_lr`."""
        from ddkit.train.step import warmup_lr

        return warmup_lr(self.tcfg.lr, self.tcfg.warmup_steps, step)

    # ------------------------------------------------------------------------------------------------------
    # Logging, checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _reduce_log(self, acc, n: int, seconds: float) -> dict[str, Any]:
        """The log record of the interval: ``acc`` (float64 [6] sums over ``n`` steps) averaged over steps
        and ranks (:func:`ddkit.train.ranks.mean_over_ranks`)."""
        from ddkit.train.step import log_record

        vals = ranks.mean_over_ranks(acc / max(n, 1), self.env)
        return log_record(
            vals.tolist(), step=self.step, epoch=self.epoch, lr=self.lr_at(self.step), steps=n, seconds=seconds
        )

    def _agree_stop(self) -> tuple[int, ...]:
        """The stop vote at a step boundary (:func:`ddkit.train.ranks.agree_stop` over this process's
        :func:`ddkit.train.request_stop` signals)."""

        return ranks.agree_stop(STOP, self.env, self._ctl_group)

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks (:func:`ddkit.models.checkpoint.rank_state`)."""
        from ddkit.models.checkpoint import rank_state

        return rank_state(self.generator, self.device, self.memory, self._acc, self._acc_n)

    def _state(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint of this state with every rank's :meth:`_rank_state` (rank order)."""
        from ddkit.models.checkpoint import training_state

        return training_state(
            model=self.model, ema=self.ema, optimizer=self.optimizer, scaler=self.scaler, step=self.step,
            data_pos=(self.epoch, self.batch_in_epoch), ranks=ranks, config=self.cfg, model_config=self.model_cfg,
            trainable=self.tcfg.trainable, trainable_names=self.trainable_names, stage=self.stage,
            world_size=self.env.world_size, precision=self.precision, made_on=self.made_on,
        )  # fmt: skip

    def _checkpoint(self) -> Path:
        """Collective periodic checkpoint: gather every rank's RNG state and memories to rank 0, which
        writes ``ckpt/last.pt`` atomically; barrier."""
        from ddkit.models.checkpoint import save_checkpoint

        gathered = ranks.gather_to_main(self._rank_state(), self.env)
        if self.is_main:
            save_checkpoint(self._state(gathered), self.ckpt_path)
        self._last_ckpt = self.ckpt_path
        dist.barrier()
        return self.ckpt_path

    def save_checkpoint(self) -> Path | None:
        """Save now if the state is consistent; return the checkpoint that holds the latest consistent state.

        Safe to call from a signal handler in a single process. State is consistent only between optimizer
        steps: ``_in_step`` is set from the first random draw of a step until its data position is
        advanced. Mid-step, and in multi-rank runs (a collective inside a signal handler could deadlock),
        nothing is written here and the last checkpoint is returned. SLURM jobs do not rely on this: their
        signal handlers call :func:`request_stop`, and the loop itself stops all ranks at one agreed step
        and writes the checkpoint (:meth:`_agree_stop`), mid-step signals included.
        Returns None when no checkpoint exists yet.
        """
        if not self._ready or self._in_step or self.env.distributed:
            return self._last_ckpt
        from ddkit.models.checkpoint import save_checkpoint

        save_checkpoint(self._state([self._rank_state()]), self.ckpt_path)
        self._last_ckpt = self.ckpt_path
        return self.ckpt_path

    def _log_console(self, msg: str) -> None:
        if self.is_main:

            progress.console().print(f"[yellow]{msg}[/]")

