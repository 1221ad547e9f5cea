"""`ddkit train`: pretrain a tiny class-conditional DiT, or minimax-fine-tune a checkpoint.

The minimax stage follows vimar-gu/MinimaxDiffusion ``train_dit.py``: AdamW (lr 1e-3, weight decay 0,
default betas), DiffFit trainable set (``mark_difffit_trainable``), EMA 0.9999 of the weights
(``update_ema``, initialised to the starting weights), label dropout 0.1 for classifier-free guidance,
DiT's diffusion loss (ε-MSE + learned-σ VLB term) plus λr·L_r + λd·L_d from :mod:`ddkit.methods.minimax`
with per-rank memories updated after the loss. The pretrain stage is the same loop with λr = λd = 0 (DiT
``train.py``), starting from DiT's random initialisation.

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

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Literal

from ddkit.config import ExperimentConfig, ModelConfig, TrainConfig, to_dict
from ddkit.errors import ConfigError, DataError, WeightsError

Stage = Literal["pretrain", "minimax"]
_CURRENT: Trainer | None = None
#: Signal numbers received since the process started (appended by :func:`request_stop`, from a handler).
_STOP: list[int] = []


def current_trainer() -> Trainer | None:
    """The :class:`Trainer` whose :meth:`Trainer.run` is executing in this process, or None (used by the
    SLURM checkpoint hook to save on preemption)."""
    return _CURRENT


def request_stop(signum: int) -> None:
    """Ask the training loop of this process to stop at the next step boundary (safe in a signal handler:
    it only appends ``signum``). Every rank's loop then agrees on the step (:meth:`Trainer._agree_stop`),
    writes one complete checkpoint and raises :class:`Preempted`."""
    _STOP.append(int(signum))


class Preempted(Exception):
    """Training stopped on a signal after writing a complete checkpoint at ``step`` (all ranks).

    Attributes: ``step`` (optimizer steps in the checkpoint), ``signals`` (signal numbers any rank had
    received, sorted), ``checkpoint`` (its path).
    """

    def __init__(self, step: int, signals: tuple[int, ...], checkpoint: Path) -> None:
        super().__init__(f"stopped on signal(s) {list(signals)} at step {step}; checkpoint {checkpoint}")
        self.step, self.signals, self.checkpoint = step, signals, checkpoint


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
        if stage not in ("pretrain", "minimax"):
            raise ConfigError(f"--stage: must be 'pretrain' or 'minimax', got {stage!r}")
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

        from ddkit import dist
        from ddkit.data import read_index
        from ddkit.models.checkpoint import load_checkpoint, resolve_checkpoint

        cfg, tcfg = self.cfg, self.tcfg
        self.env = dist.init_distributed(dist.dist_env())
        self.device = dist.device_for(self.env)
        self.is_main = self.env.is_main
        world = self.env.world_size
        if tcfg.batch_size % world:
            raise ConfigError(
                f"{self.stage}.batch_size: {tcfg.batch_size} not divisible by world size {world}"
            )
        self.local_batch = tcfg.batch_size // world
        self._ctl_group = None  # the stop vote runs on CPU tensors: a gloo group beside NCCL
        if self.env.distributed:
            import torch.distributed as tdist

            if tdist.get_backend() == "nccl":
                self._ctl_group = tdist.new_group(backend="gloo")
        if self.device.type == "cuda":
            # As the reference: TF32 matmuls make A100/H100 training much faster at no visible cost.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Which checkpoint to resume from.
        state = None
        if self.resume == "auto":
            if self.ckpt_path.is_file():
                state = load_checkpoint(self.ckpt_path)
        elif self.resume != "never":
            found = resolve_checkpoint(self.resume)
            if found is None:
                raise WeightsError(f"--resume {self.resume}: checkpoint not found")
            state = load_checkpoint(found)
            if state.get("stage") not in (None, self.stage):
                raise WeightsError(
                    f"--resume {self.resume}: a {state.get('stage')} checkpoint, not {self.stage}"
                )

        # Data.
        index = read_index(cfg.data.shards)
        self.index = index
        self.num_subset_classes = len(index["classes"])

        # Model.
        if state is not None:
            from ddkit.models import build_backbone, model_config_from_dict

            mcfg = model_config_from_dict(state["model_config"], str(self.ckpt_path))
            model = build_backbone(mcfg, init=False)
            model.load_state_dict(state["model"])
            ema = build_backbone(mcfg, init=False)
            ema.load_state_dict(state["ema"])
        else:
            model, mcfg = self._initial_model()
            ema = _clone_backbone(model, mcfg)
        self._check_data(mcfg, index)

        # Class mapping: memories use the subset index, conditioning the backbone's index.
        from ddkit.data.classmap import backbone_labels

        cond = torch.tensor(backbone_labels(index, mcfg.num_classes, cfg.model.class_map), dtype=torch.long)
        self._init_training(model, ema, mcfg, cond)

        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = int(state["step"])
            self.epoch = int(state["data_pos"]["epoch"])
            self.batch_in_epoch = int(state["data_pos"]["batch"])
            ranks_rng = state.get("rng") or []
            if len(ranks_rng) == world:
                self._set_rng_state(ranks_rng[self.env.rank])
            else:  # a different world size cannot continue bit-exactly; keep the fresh per-rank seeds
                self._log_console(
                    f"resume: checkpoint has {len(ranks_rng)} rank RNG states, world is {world}"
                )
            mems = state.get("memories") or []
            if self.memory is not None and len(mems) == world and mems[self.env.rank] is not None:
                self.memory.load_state_dict(mems[self.env.rank], self.device)
            accs = state.get("log_acc") or []
            if len(accs) == world:
                self._acc = accs[self.env.rank]["sums"].to(self.device)
                self._acc_n = int(accs[self.env.rank]["n"])
            self._last_ckpt = self.ckpt_path if self.ckpt_path.is_file() else None

        self.vae = None
        if self.data_mode == "encode":
            from ddkit.models.vae import load_vae

            self.vae = load_vae(mcfg.vae, device=self.device)
        self._resolve_precision(state)
        self._ready = True

    def _init_training(self, model, ema, mcfg: ModelConfig, cond) -> None:
        """Devices, trainable set, DDP, optimizer, schedule, memories and per-rank RNG (fresh state)."""
        import numpy as np
        import torch
        from diffusers import DDPMScheduler

        from ddkit.methods.minimax import DiffusionTables, MinimaxMemory
        from ddkit.schedule import scheduler_config

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
        self.scheduler = DDPMScheduler(**scheduler_config(mcfg.num_train_timesteps, mcfg.learn_sigma))
        self.tables = DiffusionTables.create(mcfg.num_train_timesteps, self.device)
        self.use_minimax = tcfg.lambda_r > 0 or tcfg.lambda_d > 0
        self.memory = MinimaxMemory(tcfg.memory_size) if self.use_minimax else None
        self._acc = torch.zeros(6, device=self.device, dtype=torch.float64)
        self._acc_n = 0
        # RNG: one generator per rank on the device draws t, ε, label dropout and VAE samples.
        rank_seed = self.cfg.seed * self.env.world_size + self.env.rank  # the reference's per-rank seed
        self.generator = torch.Generator(self.device).manual_seed(rank_seed)
        torch.manual_seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        random.seed(rank_seed)

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

        from ddkit.dist import DistEnv

        tr = cls(cfg, stage, resume="never", progress=False)
        tr.env = DistEnv()
        tr.device = torch.device(device)
        tr.is_main = True
        tr.local_batch = tr.tcfg.batch_size
        tr.data_mode = data_mode
        tr.vae = vae
        mcfg = model.config
        tr._init_training(model, _clone_backbone(model, mcfg), mcfg, torch.arange(mcfg.num_classes))
        tr._resolve_precision(None)
        tr._ready = True
        return tr

    def _resolve_precision(self, state: dict[str, Any] | None) -> None:
        """``self.precision`` (:class:`ddkit.hardware.PrecisionChoice`; auto: capabilities + a timed check of
        this model's step) and ``self.scaler`` (a GradScaler, active for fp16; restored on resume)."""
        import torch

        from ddkit import hardware as hw

        inputs = hw.backbone_inputs(self.model, self.local_batch, self.device)
        step = hw.model_step(self.model, inputs, backward=True)
        prev = state.get("precision") if state is not None else None
        self.precision = hw.choose_precision(self.tcfg.precision, self.device, role="train", step=step, previous=prev)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        if state is not None and state.get("scaler") and self.precision.grad_scaler:
            self.scaler.load_state_dict(state["scaler"])
        self._log_console(f"{self.stage} precision: {self.precision.summary()}")

    def _initial_model(self):
        """(Backbone, ModelConfig) to start from when not resuming."""
        from ddkit.models import build_backbone, load_backbone, resolve_checkpoint

        cfg, tcfg = self.cfg, self.tcfg
        blocks = tcfg.difffit_blocks if tcfg.trainable == "difffit" else 0
        init = tcfg.init
        if init is None and self.stage == "minimax":
            # model.pretrained first: the weights dit/d3hr sample (generate.checkpoint_for), and a stale
            # RUN/pretrain of an earlier run without them must not be fine-tuned instead.
            pre = Path(cfg.run_dir) / "pretrain"
            if cfg.model.pretrained:
                init = cfg.model.pretrained
            elif resolve_checkpoint(pre) is not None:
                init = str(pre)
            else:
                raise WeightsError(
                    f"minimax: no initial weights (no {pre}/ckpt/last.pt; set minimax.init or model.pretrained)"
                )
        if init is None and cfg.model.pretrained and self.stage == "pretrain":
            init = cfg.model.pretrained
        if init is None:
            mcfg = dataclasses.replace(cfg.model, difffit_blocks=blocks)
            return build_backbone(mcfg, seed=cfg.seed, class_embed_std=tcfg.class_embed_std), mcfg
        model, mcfg = load_backbone(
            init, use_ema=True, device="cpu", difffit_blocks=blocks or None,
            timestep_shift=cfg.model.timestep_shift, expect=cfg.model,
        )
        # Data-side settings (VAE choice) come from this run's config when the source does not say.
        mcfg = dataclasses.replace(
            mcfg,
            vae=mcfg.vae or cfg.model.vae,
            vae_decoder=mcfg.vae_decoder or cfg.model.vae_decoder,
        )
        model.config = mcfg
        return model, mcfg

    def _check_data(self, mcfg: ModelConfig, index: dict) -> None:
        """Decide how batches become x0: pixels, cached latents, or VAE-encoded each step."""
        res, ch = int(index["resolution"]), int(index["channels"])
        if mcfg.in_channels == ch and mcfg.input_size == res:
            self.data_mode = "pixels"
        elif mcfg.in_channels == 4 and mcfg.input_size * 8 == res:
            if index.get("latents"):
                from ddkit.models.vae import check_latent_vae

                check_latent_vae(index.get("latent"), mcfg.vae, f"{self.cfg.data.shards}/dataset.json")
                self.data_mode = "latents"
            elif mcfg.vae:
                self.data_mode = "encode"
            else:
                raise ConfigError(
                    f"model.vae: a latent model on {self.cfg.data.shards} needs a VAE or latent shards"
                )
        else:
            raise ConfigError(
                f"model: {mcfg.arch} sees {mcfg.in_channels}x{mcfg.input_size}px but {self.cfg.data.shards} holds "
                f"{ch}x{res}px images"
            )

    # ------------------------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train until ``steps`` (or ``max_steps``); return the checkpoint path. Idempotent: a DONE stage
        returns at once under ``resume="auto"`` (unless ``steps`` was raised since: then it continues)."""
        global _CURRENT
        from ddkit import dist
        from ddkit.io import is_done

        if self.resume == "auto" and is_done(self.stage_dir) and self.ckpt_path.is_file():
            from ddkit.io import DONE, read_json

            try:
                done_step = int(read_json(self.stage_dir / DONE).get("step", self.tcfg.steps))
            except Exception:
                done_step = self.tcfg.steps
            if done_step >= self.tcfg.steps:  # complete; more steps in the config continue from it
                return self.ckpt_path
        if not self._ready:
            self.setup()
        _CURRENT = self
        try:
            self._prepare_dir()
            dist.barrier()
            self._loop()
        finally:
            _CURRENT = None
        return self.ckpt_path

    def _prepare_dir(self) -> None:
        from ddkit.io import DONE, read_jsonl, write_run_config

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
            from ddkit.io import atomic_write_text

            keep = [r for r in read_jsonl(log) if int(r.get("step", 0)) <= self.step]
            atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in keep))
        write_run_config(self.stage_dir, self.cfg)

    def _loop(self) -> None:
        from ddkit import dist
        from ddkit.data import make_loader
        from ddkit.io import append_jsonl, hardware_info, mark_done

        tcfg = self.tcfg
        total = tcfg.steps
        stop = total if self.max_steps is None else min(total, self.max_steps)
        acc = self._acc  # running sums since the last log line: loss mse vb l_r l_d total
        t_log = time.perf_counter()
        t_start = t_log
        bar = _ProgressBar(self.stage, total, self.step, enabled=self.progress and self.is_main)
        stopped: tuple[int, ...] = ()
        try:
            while self.step < stop and not stopped:
                loader = make_loader(
                    self.cfg.data.shards,
                    "train",
                    self.local_batch,
                    seed=self.cfg.seed,
                    epoch=self.epoch,
                    rank=self.env.rank,
                    world_size=self.env.world_size,
                    num_workers=self.cfg.data.num_workers,
                    shuffle=True,
                    with_latents=self.data_mode == "latents",
                    drop_last=True,
                )
                n_batches = self._agree_min(len(loader))
                if n_batches <= 0:
                    raise DataError(
                        f"{self.cfg.data.shards}: fewer train images than one batch of {self.local_batch} per rank"
                    )
                it = iter(loader)
                b = self.batch_in_epoch
                for _ in range(b):  # resume inside an epoch: skip the batches already consumed
                    next(it)
                while b < n_batches and self.step < stop:
                    if stopped := self._agree_stop():
                        break
                    batch = next(it)
                    self._in_step = True
                    terms = self.train_step(batch)
                    acc += terms
                    self._acc_n += 1
                    b += 1
                    # Step count and data position advance together, before the step counts as done.
                    self.step += 1
                    self.epoch, self.batch_in_epoch = (
                        (self.epoch + 1, 0) if b >= n_batches else (self.epoch, b)
                    )
                    self._in_step = False
                    bar.advance()
                    if self.step % tcfg.log_every == 0 or self.step == total:
                        now = time.perf_counter()
                        rec = self._reduce_log(acc, self._acc_n, now - t_log)
                        acc.zero_()
                        self._acc_n = 0
                        t_log = now
                        if self.is_main:
                            rec["elapsed_s"] = round(now - t_start, 3)
                            append_jsonl(self.stage_dir / "train_log.jsonl", rec)
                            bar.terms(rec)
                    if self.step % tcfg.ckpt_every == 0 and self.step < stop:
                        self._checkpoint()
                # Drop the iterator (worker processes) before the next epoch's loader.
                del it, loader
        finally:
            self._in_step = False
            bar.close()
        self._checkpoint()
        if stopped:
            raise Preempted(self.step, stopped, self.ckpt_path)
        if self.step >= total and self.is_main:
            mark_done(self.stage_dir, {"step": self.step, "checkpoint": str(self.ckpt_path),
                                       "precision": self.precision.to_dict(), "hardware": hardware_info()})
        dist.barrier()

    def train_step(self, batch) -> Any:
        """One optimizer step on a batch ``(images [B,C,H,W] in [-1,1], labels int64 [B][, latents])``.

        Returns float64 [6] on the device: loss (L_simple + L_vb, mean), mse, vb, L_r, L_d, total
        (no host sync).
        """
        import torch

        from ddkit.hardware import autocast
        from ddkit.methods.minimax import diffusion_losses, minimax_terms, timestep_weights

        tcfg, dev, gen = self.tcfg, self.device, self.generator
        images, labels = batch[0], batch[1]
        labels_cpu = labels.to("cpu")
        b = labels_cpu.shape[0]
        flip = torch.rand(b, generator=gen, device=dev) < 0.5 if tcfg.hflip else None
        if self.data_mode == "latents":
            # Flipping a cached latent approximates encoding the flipped image (as fast-DiT's caches).
            x0 = _maybe_flip(batch[2].to(dev, non_blocking=True).float(), flip)
        elif self.data_mode == "encode":
            from ddkit.models.vae import encode

            x = _maybe_flip(images.to(dev, non_blocking=True), flip)
            x0 = encode(self.vae, x, generator=gen).float()
        else:
            x0 = _maybe_flip(images.to(dev, non_blocking=True).float(), flip)
        y = self.cond_map[labels_cpu.to(dev, non_blocking=True)]
        if tcfg.class_dropout > 0:
            drop = torch.rand(b, generator=gen, device=dev) < tcfg.class_dropout
            y = torch.where(drop, torch.full_like(y, self.model_cfg.num_classes), y)
        t = torch.randint(0, self.model_cfg.num_train_timesteps, (b,), generator=gen, device=dev)
        noise = torch.randn(x0.shape, generator=gen, device=dev, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        with autocast(dev.type, self.precision.precision):
            out = self.ddp(x_t, t, y)
        terms = diffusion_losses(out, x0, x_t, t, noise, self.tables, self.model_cfg.learn_sigma)
        w = timestep_weights(t, self.tables, tcfg.loss_weight_cap)  # ones without a cap (DiT)
        loss = (w * terms["mse"] + terms["vb"]).mean()
        total = loss
        zero = loss.detach().new_zeros(())
        l_r = l_d = zero
        if self.memory is not None:
            l_r, l_d, _ = minimax_terms(terms["x0_pred"], labels_cpu, self.memory)
            total = loss + tcfg.lambda_r * l_r + tcfg.lambda_d * l_d
            self.memory.update(x0, terms["x0_pred"], labels_cpu)
        self.optimizer.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step + 1)
        self.scaler.scale(total).backward()  # fp16: loss scaling; otherwise the plain backward
        if tcfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self._ema_pairs[1], tcfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._update_ema()
        return torch.stack(
            [
                loss.detach(),
                terms["mse"].detach().mean(),
                terms["vb"].detach().mean(),
                l_r.detach(),
                l_d.detach(),
                total.detach(),
            ]
        ).double()

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1-based): ``lr·min(1, step/warmup_steps)``, a linear
        warm-up (a function of the step alone, so a resumed run continues it exactly)."""
        w = self.tcfg.warmup_steps
        return self.tcfg.lr * min(1.0, step / w) if w > 0 else self.tcfg.lr

    def _update_ema(self) -> None:
        """ema ← d·ema + (1−d)·θ on the trainable parameters (reference ``update_ema``; frozen ones are equal
        already since the EMA starts as a copy)."""
        import torch

        d = self.tcfg.ema_decay
        if self.tcfg.ema_warmup:
            d = min(d, (1.0 + self.step) / (10.0 + self.step))
        ema_p, p = self._ema_pairs
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, [x.detach() for x in p], 1.0 - d)

    # ------------------------------------------------------------------------------------------------------
    # Logging, checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _reduce_log(self, acc, n: int, seconds: float) -> dict[str, Any]:
        import torch.distributed as tdist

        vals = acc / max(n, 1)
        if self.env.distributed:
            tdist.all_reduce(vals)
            vals = vals / self.env.world_size
        loss, mse, vb, l_r, l_d, tot = vals.tolist()
        rec = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss,
            "mse": mse,
            "vb": vb,
            "l_r": l_r,
            "l_d": l_d,
            "total": tot,
            "lr": self.lr_at(self.step),
            "steps_per_s": n / seconds if seconds > 0 else None,
        }
        return rec

    def _agree_min(self, n: int) -> int:
        """The smallest ``n`` over ranks (every rank must run the same number of steps per epoch)."""
        if not self.env.distributed:
            return n
        import torch
        import torch.distributed as tdist

        t = torch.tensor([n], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t.item())

    def _agree_stop(self) -> tuple[int, ...]:
        """At a step boundary: the signals any rank has received (:func:`request_stop`), or ``()``.

        ONE collective per step boundary: an ``all_reduce(MAX)`` of a 0/1 vector indexed by signal number
        (a union of the ranks' signals, on CPU; a gloo side group under NCCL, so no device sync). Every
        rank gets the same answer at the same step, so all stop after the same step and write one
        checkpoint together; steps lost to a preemption: none.
        """
        import torch

        flags = torch.zeros(65, dtype=torch.int32)
        for s in _STOP:
            flags[min(s, 64)] = 1
        if self.env.distributed:
            import torch.distributed as tdist

            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX, group=self._ctl_group)
        return tuple(int(i) for i in flags.nonzero().flatten())

    def _rng_state(self) -> dict[str, Any]:
        import numpy as np
        import torch

        s = {
            "generator": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if self.device.type == "cuda":
            s["cuda"] = torch.cuda.get_rng_state(self.device)
        return s

    def _set_rng_state(self, s: dict[str, Any]) -> None:
        import numpy as np
        import torch

        self.generator.set_state(s["generator"])
        torch.set_rng_state(s["torch"])
        np.random.set_state(s["numpy"])
        random.setstate(s["python"])
        if "cuda" in s and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda"], self.device)

    def _rank_state(self) -> dict[str, Any]:
        """What differs between ranks: RNG states, minimax memories, the unlogged loss sums."""
        return {
            "rng": self._rng_state(),
            "memories": self.memory.state_dict() if self.memory is not None else None,
            "log_acc": {"sums": self._acc.cpu(), "n": self._acc_n},
        }

    def _state(self, ranks: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": [r["rng"] for r in ranks],
            "data_pos": {"epoch": self.epoch, "batch": self.batch_in_epoch},
            "memories": [r["memories"] for r in ranks],
            "log_acc": [r["log_acc"] for r in ranks],
            "config": to_dict(self.cfg),
            "model_config": to_dict(self.model_cfg),
            "trainable": self.tcfg.trainable,
            "trainable_names": self.trainable_names,
            "stage": self.stage,
            "world_size": self.env.world_size,
            "precision": self.precision.to_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def _checkpoint(self) -> Path:
        """Collective periodic checkpoint: gather every rank's RNG state and memories to rank 0, which
        writes ``ckpt/last.pt`` atomically; barrier."""
        import torch.distributed as tdist

        from ddkit import dist
        from ddkit.models.checkpoint import save_checkpoint

        mine = self._rank_state()
        if self.env.distributed:
            ranks = [None] * self.env.world_size if self.is_main else None
            tdist.gather_object(mine, ranks, dst=0)
        else:
            ranks = [mine]
        if self.is_main:
            save_checkpoint(self._state(ranks), self.ckpt_path)
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
            from ddkit.cli.common import err_console

            err_console.print(f"[yellow]{msg}[/]")


def _maybe_flip(x, flip):
    """Mirror the rows of x [B, C, H, W] where flip [B] is True (reference: ``RandomHorizontalFlip``)."""
    if flip is None:
        return x
    import torch

    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def _clone_backbone(model, mcfg: ModelConfig):
    """A second Backbone with the same weights (the EMA; reference ``deepcopy`` + ``update_ema(decay=0)``)."""
    from ddkit.models import build_backbone

    ema = build_backbone(mcfg, init=False)
    ema.load_state_dict(model.state_dict())
    return ema


class _ProgressBar:
    """rich progress bar (rank 0): steps, steps/s, ETA and the latest logged loss terms."""

    def __init__(self, stage: str, total: int, done: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from ddkit.cli.common import err_console

        self.p = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[terms]}"),
            console=err_console,
            transient=False,
        )
        self.p.start()
        self.task = self.p.add_task(f"train {stage}", total=total, completed=done, speed="", terms="")

    def advance(self) -> None:
        if self.enabled:
            self.p.advance(self.task)

    def terms(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        txt = f"loss {rec['loss']:.4f}"
        if rec.get("vb"):
            txt += f" vb {rec['vb']:.4f}"
        if rec.get("l_r") or rec.get("l_d"):
            txt += f" L_r {rec['l_r']:.4f} L_d {rec['l_d']:.4f}"
        sps = rec.get("steps_per_s")
        self.p.update(self.task, terms=txt, speed=f"{sps:.2f} step/s" if sps else "")
        if not self.p.console.is_terminal:
            # Batch logs (SLURM) get no live bar: one plain line per log interval instead.
            task = self.p.tasks[0]
            eta = task.time_remaining
            self.p.console.print(
                f"{task.description} step {int(task.completed)}/{int(task.total or 0)} {txt}"
                + (f" {sps:.2f} step/s" if sps else "")
                + (f" ETA {eta:.0f}s" if eta is not None else ""),
                highlight=False,
            )

    def close(self) -> None:
        if self.enabled:
            self.p.stop()


__all__ = ["Preempted", "Trainer", "current_trainer", "request_stop", "train"]
