"""Estimates of a full-scale run before it is started (``ddkit run CONFIG --dry-run``): per stage,

    seconds = FLOPs ÷ (devices × throughput per device),   FLOPs = FLOPs per forward × forwards

where the forwards are steps × images (× 2 for classifier-free guidance, × the training factor for a
training step), and the throughput is either measured (``python bench/gpu.py --json FILE``: the achieved
transformer TFLOP/s of its best generation variant, and its minimax training images/s) or the accelerator's
stated dense bf16 peak at an assumed utilisation. Every assumption an estimate rests on is returned with it
(:attr:`Estimate.assumptions`), so the CLI prints them. Real-data passes also have a loading time (images ÷
an assumed loader rate per device); a stage takes the larger of its compute and loading times (they overlap).

Formulas are pure functions of numbers; :func:`estimate_run` reads only the config (no data, no weights).
The generation stage is planned with the run's own planner (:func:`ddkit.budget.plan`) on a cost model made
from these FLOPs, so the estimate spends a time budget exactly as the run would.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddkit.budget import Bounds, CostModel, plan
from ddkit.config import ExperimentConfig
from ddkit.errors import BudgetError, ConfigError
from ddkit.methods.registry import build

#: Dense bf16 tensor-core peak, FLOP/s per device (NVIDIA data sheets; no sparsity). bench/gpu.py keeps the
#: same figures keyed by ``torch.cuda.get_device_name`` substrings.
ACCELERATORS: dict[str, float] = {
    "h100": 989e12,  # H100 SXM
    "h100-pcie": 756e12,
    "h200": 989e12,
    "gh200": 989e12,
    "a100": 312e12,
    "l40s": 362e12,
    "a10": 125e12,
}
#: CPU peak per core: 2 FMA units × 8 fp32 lanes (AVX2) × 2 FLOP per FMA at an assumed 2.5 GHz.
CPU_FLOPS_PER_CORE = 2 * 8 * 2 * 2.5e9

#: Assumed share of the peak reached, per kind of work (printed with every estimate that uses one).
#: sample: bench/gpu.py's goal for DiT-XL/2 sampling (40 %); train: a DiT training step with its optimizer
#: and minimax memories; vae: convolutions at 256 px; cnn: a ResNet-18-sized student (small convolutions,
#: normalisation and augmentation are memory-bound: ~5,000 images/s on an H100 is ~7 % of peak).
UTILISATION: dict[str, float] = {"sample": 0.40, "train": 0.30, "vae": 0.30, "cnn": 0.08}

#: SD-VAE (``stabilityai/sd-vae-ft-ema`` layout, diffusers ``AutoencoderKL``) FLOPs per image at 256 px,
#: counted with ``torch.utils.flop_counter`` on meta tensors; they scale with the pixel count.
SD_VAE_ENCODE_FLOPS_256 = 272.7e9
SD_VAE_DECODE_FLOPS_256 = 622.2e9
#: DiT paper (Peebles & Xie 2023), Table 4: DiT-XL/2 at 256 px is 118.6 G multiply-adds per forward.
DIT_XL2_PAPER_FLOPS = 2 * 118.6e9

#: (classes, train images) of the registry's datasets (ddkit.data.DATASETS); imagefolder has none.
DATASET_SIZES: dict[str, tuple[int, int]] = {
    "mnist5k": (10, 4000),
    "cifar100": (100, 50_000),
    "tinyimagenet": (200, 100_000),
    "imagenette": (10, 9469),
    "imagewoof": (10, 9025),
    "imageidc": (10, 13_000),
}
IMAGENET1K_TRAIN = 1_281_167  # ILSVRC-2012 train split
LOADER_IMAGES_PER_S = 2000.0  # per device: JPEG decode + crop with ~8 loader workers (assumed)


# ----------------------------------------------------------------------------------------------------------
# FLOPs (pure)
# ----------------------------------------------------------------------------------------------------------
def dit_forward_flops(
    depth: int, hidden: int, heads: int, patch: int, input_size: int, in_channels: int = 4,
    learn_sigma: bool = True,
) -> float:
    """FLOPs (2 per multiply-add) of one DiT forward of one image, counted from its shape.

    With N = (input_size / patch)² tokens and width h, per block: qkv, output projection and the 4h MLP,
    2N(3h² + h² + 8h²) = 24Nh²; attention scores and their product with V, 4N²h; adaLN-Zero's 6h
    modulation, 12h². Plus the patch embedding 2N·p²C·h, the timestep MLP 2(256h + h²), and the final
    layer's 2h modulation and projection, 4h² + 2N·h·p²C_out. Gives 237.3 GFLOP for DiT-XL/2 at 32×32
    latents, the DiT paper's 118.6 G multiply-adds (Table 4; ``torch.utils.flop_counter``: 237.3 G). ``heads``
    does not change the count. Returns FLOPs (float).
    """
    del heads
    n = (input_size // patch) ** 2
    c_out = 2 * in_channels if learn_sigma else in_channels
    block = 24 * n * hidden**2 + 4 * n**2 * hidden + 12 * hidden**2
    embed = 2 * n * patch**2 * in_channels * hidden + 2 * (256 * hidden + hidden**2)
    final = 4 * hidden**2 + 2 * n * hidden * patch**2 * c_out
    return float(depth * block + embed + final)


def model_forward_flops(arch: str, input_size: int, in_channels: int, learn_sigma: bool) -> float:
    """:func:`dit_forward_flops` of a ``model.arch`` name (registry or ``custom(...)``).

    Raises:
        ConfigError: unknown architecture (:func:`ddkit.models.backbone.arch_spec`).
    """
    from ddkit.models.backbone import arch_spec

    s = arch_spec(arch)
    return dit_forward_flops(s.depth, s.hidden, s.heads, s.patch, input_size, in_channels, learn_sigma)


def train_factor(trainable: str) -> float:
    """Training FLOPs per image ÷ forward FLOPs. Backward = activation gradients (1 forward) + weight
    gradients (1 forward) (Kaplan et al. 2020, C ≈ 6N per token = 2N forward + 4N backward): 3 for full
    training; DiffFit trains only biases, norms, embeddings and scales, so weight gradients of the frozen
    matrices are skipped: 2."""
    return 2.0 if trainable == "difffit" else 3.0


def cfg_factor(cfg_scale: float) -> int:
    """Forwards per image and step: classifier-free guidance runs the conditional and the null-class
    forward in one doubled batch (DiT ``forward_with_cfg``), unless the scale is 1."""
    return 1 if cfg_scale == 1.0 else 2


def vae_flops(resolution: int, decode: bool) -> float:
    """SD-VAE FLOPs per image at ``resolution`` px (pixel count scaling of the 256-px counts)."""
    base = SD_VAE_DECODE_FLOPS_256 if decode else SD_VAE_ENCODE_FLOPS_256
    return base * (resolution / 256) ** 2


def student_forward_flops(network: str, channels: int, num_classes: int, resolution: int) -> float:
    """FLOPs of one student forward (``torch.utils.flop_counter`` on meta tensors: no memory, no weights).

    Raises:
        ConfigError: unknown network (:func:`ddkit.evaluate.networks.build`).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddkit.evaluate.networks import build

    with torch.device("meta"):
        m = build(network, channels, num_classes, resolution)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.empty(1, channels, resolution, resolution))
    return float(fc.get_total_flops())


# ----------------------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Throughput:
    """FLOP/s per device for one kind of work, and where the figure comes from (printed)."""

    flops_per_s: float
    source: str


def peak_flops(accelerator: str, cpu_cores: int | None = None) -> float:
    """Stated dense bf16 peak FLOP/s of one device (:data:`ACCELERATORS`), or for ``cpu`` the AVX2 fp32
    peak of ``cpu_cores`` (default: the usable cores) at 2.5 GHz.

    Raises:
        ConfigError: unknown accelerator (names the known ones).
    """
    key = accelerator.lower()
    if key == "cpu":
        return (cpu_cores or len(os.sched_getaffinity(0))) * CPU_FLOPS_PER_CORE
    if key not in ACCELERATORS:
        raise ConfigError(f"--accelerator {accelerator}: unknown (known: {', '.join(ACCELERATORS)}, cpu)")
    return ACCELERATORS[key]


def load_gpu_bench(path: str | Path) -> dict[str, Any]:
    """The result file of ``python bench/gpu.py --json FILE``.

    Raises:
        ConfigError: missing or unreadable file, or one without the figures used here (names the file).
    """
    p = Path(path)
    try:
        res = json.loads(p.read_text())
        ok = isinstance(res, dict) and float(res["forward_gflop"]) > 0 and bool(res["generation"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--gpu-bench {p}: not a bench/gpu.py --json result ({e!r})") from None
    if not ok:
        raise ConfigError(f"--gpu-bench {p}: not a bench/gpu.py --json result (no generation figures)")
    return res


def throughput(
    kind: str, accelerator: str, *, bench: dict[str, Any] | None = None, utilisation: dict[str, float] | None = None,
    cpu_cores: int | None = None,
) -> Throughput:
    """FLOP/s per device for ``kind`` (a key of :data:`UTILISATION`).

    From a bench/gpu.py result when given: ``sample`` and ``vae`` take its best generation variant's achieved
    transformer TFLOP/s (the VAE decode is in that time but not in its FLOPs: a lower bound), ``train`` its
    best minimax training images/s × ``2`` (DiffFit, :func:`train_factor`) × its forward FLOPs. Otherwise,
    and for ``cnn`` (the bench has no student), the stated peak × the assumed utilisation.
    """
    util = {**UTILISATION, **(utilisation or {})}
    dev = (bench or {}).get("device_name", "?")
    if bench and kind in ("sample", "vae"):
        best = max(float(r["tflops"]) for r in bench["generation"].values())
        return Throughput(best * 1e12, f"measured {best:.1f} TFLOP/s (bench/gpu.py on {dev})")
    if bench and kind == "train" and bench.get("training"):
        ips = max(float(r["images_per_s"]) for r in bench["training"].values())
        f = ips * train_factor("difffit") * float(bench["forward_gflop"]) * 1e9
        return Throughput(f, f"measured {ips:.1f} img/s minimax = {f / 1e12:.1f} TFLOP/s (bench/gpu.py on {dev})")
    peak = peak_flops(accelerator, cpu_cores)
    return Throughput(
        peak * util[kind], f"{100 * util[kind]:.0f} % (assumed) of the {accelerator} peak, {peak / 1e12:.0f} TFLOP/s"
    )


# ----------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageEstimate:
    """One stage: its work in words, FLOPs, compute and loading seconds (wall, all devices together)."""

    stage: str
    work: str
    flops: float
    compute_s: float
    data_s: float
    source: str

    @property
    def seconds(self) -> float:
        """Compute and loading overlap: the stage takes the longer of the two."""
        return max(self.compute_s, self.data_s)


@dataclass
class Estimate:
    """Every stage's estimate and the assumptions they rest on."""

    accelerator: str
    devices: int
    stages: list[StageEstimate] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


def compute_seconds(flops: float, devices: int, tp: Throughput) -> float:
    """``flops ÷ (devices × tp.flops_per_s)``: data-parallel work split evenly (seconds)."""
    return flops / (max(1, devices) * tp.flops_per_s)


def generation_flops(images: int, steps: int, forward: float, cfg: int, decode: float) -> float:
    """FLOPs of sampling ``images`` at ``steps`` steps: images × steps × cfg × forward + images × decode."""
    return images * (steps * cfg * forward + decode)


def training_flops(steps: int, batch: int, forward: float, factor: float) -> float:
    """FLOPs of ``steps`` optimizer steps of ``batch`` images: steps × batch × factor × forward."""
    return steps * batch * factor * forward


def dataset_size(cfg: ExperimentConfig, classes: int | None, train_images: int | None) -> tuple[int, int, str]:
    """(classes, train images, how they were found) for a config, without reading data.

    The registry datasets have known sizes (:data:`DATASET_SIZES`); an ``imagefolder`` takes the backbone's
    class count, and ImageNet-1K's train split when that is 1,000 (else 1,300 per class, ImageNet's ceiling);
    ``classes`` / ``train_images`` override either.
    """
    known = DATASET_SIZES.get(cfg.data.dataset)
    if known:
        k, n, how = *known, f"{cfg.data.dataset}: {known[0]} classes, {known[1]:,} train images"
    else:
        k = cfg.model.num_classes
        n = IMAGENET1K_TRAIN if k == 1000 else 1300 * k
        how = f"{cfg.data.dataset}: assumed {k} classes (model.num_classes) and {n:,} train images"
    if classes:
        n, k = (train_images or round(n / k * classes)), classes
        how = f"{k} classes and {n:,} train images (given)"
    elif train_images:
        n, how = train_images, f"{k} classes, {train_images:,} train images (given)"
    return k, n, how


def _gen_stage(cfg: ExperimentConfig, method: str, k: int, fwd: float, tp: Throughput, devices: int) -> StageEstimate:
    """One ``gen-METHOD``: planned by :func:`ddkit.budget.plan` on the FLOP cost model at the config's
    bounds and time limit, so DSR spends the budget as the run would; a plan that does not fit says so."""

    meth = build(method, cfg)
    chain = meth.sampling(cfg.generate, cfg.model.num_train_timesteps)
    g = chain.settings
    cfgx = cfg_factor(chain.cfg_scale)
    # A chain restarted at a timestep (D^3HR: from its class Gaussian) runs only that share of the schedule.
    T = cfg.model.num_train_timesteps
    share = min(1.0, chain.start_timestep / T) if chain.start_timestep is not None else 1.0
    B = g.batch_size
    decode = vae_flops(cfg.data.resolution, decode=True) if cfg.model.vae else 0.0
    step_s = B * cfgx * share * fwd / tp.flops_per_s
    cost = CostModel(step_seconds=step_s, batch_seconds=B * decode / tp.flops_per_s, batch_size=B)
    bounds = Bounds(g.steps_min, g.steps_max, g.ipc_min, g.ipc_max, g.dsr_min_steps_quality)
    avail = g.time_limit * (1.0 - g.safety_margin)
    ratios = meth.ratios()
    try:
        p = plan(avail, cost, bounds, num_classes=k, batch_size=B, world_size=devices, ratios=ratios)
    except BudgetError as e:
        return StageEstimate(f"gen-{method}", f"does not fit: {e}", math.nan, math.nan, 0.0, tp.source)
    images = k * p.ipc
    flops = generation_flops(images, p.steps, fwd * share, cfgx, decode)
    kept = f", keep {p.kept_ipc}" if p.ratio > 1 else ""
    work = f"{images:,} images (IPC {p.ipc}{kept}) x {p.steps} steps x CFG {cfgx}" + (
        f" x {share:.2f} of the chain" if share < 1 else ""
    )
    return StageEstimate(f"gen-{method}", work, flops, p.predicted_seconds, 0.0, tp.source)


def _eval_stage(cfg: ExperimentConfig, k: int, n_train: int, n_sets: int, tp: Throughput, devices: int,
                loader: float) -> StageEstimate:
    """``evaluate``: every distilled set and the baselines, ``repeats`` students each (+ RDED's teacher)."""
    from ddkit.evaluate.protocols import get_protocol

    e, proto = cfg.evaluate, get_protocol(cfg.evaluate.protocol)
    net = e.network or proto.network
    ipc = cfg.generate.ipc_max
    epochs = e.epochs or proto.epochs_for(ipc)
    res, ch = cfg.data.resolution, cfg.data.channels
    student = student_forward_flops(net, ch, k, res)
    soft = getattr(proto, "labels", "hard") == "soft"
    teacher = student_forward_flops(getattr(proto, "teacher_network", None) or net, ch, k, res) if soft else 0.0
    per_image = 3 * student + teacher  # a training step; soft labels add a teacher forward per image
    sets = n_sets + ("random_real" in e.baselines)
    student_images = sets * e.repeats * epochs * k * (e.ipc or ipc)
    flops = student_images * per_image
    real_passes = 0
    work = f"{sets} sets x {e.repeats} runs x {epochs} epochs x {k * ipc:,} images, {net} at {res} px"
    if "full" in e.baselines:
        full_epochs = e.full_epochs or epochs
        flops += e.repeats * full_epochs * n_train * per_image
        real_passes += e.repeats * full_epochs * n_train
        work += f"; full data {e.repeats} x {full_epochs} epochs"
    if soft:
        t_epochs = e.teacher_epochs or getattr(proto, "teacher_epochs", 0)
        flops += t_epochs * n_train * 3 * teacher
        real_passes += t_epochs * n_train
        work += f"; teacher {t_epochs} epochs on {n_train:,} real"
    return StageEstimate("evaluate", work, flops, compute_seconds(flops, devices, tp),
                         real_passes / (devices * loader), tp.source)


def minimax_memory_bytes(memory_size: int, feature_dim: int, classes: int, bytes_per: int = 4) -> int:
    """Bytes of Minimax's two per-class memories on each rank (:class:`ddkit.methods.minimax.MinimaxMemory`:
    real and generated, ``memory_size`` flattened x0 of ``feature_dim`` each, float32): 2·M·D·K·bytes."""
    return 2 * memory_size * feature_dim * classes * bytes_per


def _train_stage(name: str, tc, fwd: float, tp: Throughput, devices: int) -> StageEstimate:
    f = train_factor(tc.trainable)
    flops = training_flops(tc.steps, tc.batch_size, fwd, f)
    work = f"{tc.steps:,} steps x batch {tc.batch_size} x {f:g} forwards ({tc.trainable})"
    return StageEstimate(name, work, flops, compute_seconds(flops, devices, tp), 0.0, tp.source)


def estimate_run(
    cfg: ExperimentConfig, accelerator: str = "h100", devices: int = 1, *, bench: dict[str, Any] | None = None,
    classes: int | None = None, train_images: int | None = None, loader_images_per_s: float = LOADER_IMAGES_PER_S,
    utilisation: dict[str, float] | None = None,
) -> Estimate:
    """Per-stage time of ``ddkit run`` on ``devices`` × ``accelerator`` from the config alone (module doc).

    Args:
        cfg: the experiment; nothing it names (data, weights) needs to exist.
        accelerator: a key of :data:`ACCELERATORS` or ``cpu``; devices: data-parallel devices (ranks).
        bench: a ``bench/gpu.py --json`` result (:func:`load_gpu_bench`), measured on this accelerator.
        classes, train_images: override the dataset size (:func:`dataset_size`).
        loader_images_per_s: real images decoded per second per device (assumed).
        utilisation: overrides of :data:`UTILISATION`.

    Returns:
        An :class:`Estimate` (seconds are wall time, all devices together).

    Raises:
        ConfigError: unknown accelerator, architecture or network.
    """
    k, n_train, how = dataset_size(cfg, classes, train_images)
    est = Estimate(accelerator, devices, assumptions=[how])
    tp = {kind: throughput(kind, accelerator, bench=bench, utilisation=utilisation) for kind in UTILISATION}
    m = cfg.model
    fwd = model_forward_flops(m.arch, m.input_size, m.in_channels, m.learn_sigma)
    loader = loader_images_per_s
    est.assumptions += [
        f"{m.arch} at {m.input_size}x{m.input_size}x{m.in_channels}: {fwd / 1e9:.4g} GFLOP per forward"
        + (f" (DiT paper: {DIT_XL2_PAPER_FLOPS / 1e9:.1f})" if m.arch == "DiT-XL/2" and m.input_size == 32 else ""),
        f"data loading: {loader:,.0f} real images/s per device; compute and loading overlap",
        f"{devices} device(s), data-parallel work split evenly, no communication cost",
        *(f"{kind}: {t.source}" for kind, t in tp.items()),
    ]
    vae = bool(cfg.data.encode_latents)
    enc = n_train * vae_flops(cfg.data.resolution, decode=False) if vae else 0.0
    est.stages.append(StageEstimate(
        "shard", f"{n_train:,} train images" + (" + SD-VAE encode" if vae else ""), enc,
        compute_seconds(enc, devices, tp["vae"]), n_train / (devices * loader), tp["vae"].source,
    ))  # fmt: skip
    if not m.pretrained:
        est.stages.append(_train_stage("pretrain", cfg.pretrain, fwd, tp["train"], devices))

    methods = [build(x, cfg) for x in cfg.methods]
    if any(x.weights == "minimax" for x in methods):
        est.stages.append(_train_stage("minimax", cfg.minimax, fwd, tp["train"], devices))
        mem = minimax_memory_bytes(cfg.minimax.memory_size, m.in_channels * m.input_size**2, k)
        est.assumptions.append(
            f"minimax memories at {k} classes: 2 x {cfg.minimax.memory_size} x {m.in_channels * m.input_size**2}"
            f" x {k} x 4 B = {mem / 2**30:.2f} GiB per rank"
        )
    done: set[str] = set()
    for x in methods:  # what a method computes once from real data (D^3HR: DDIM inversion), once per base
        per_class, forwards = x.precompute_work(n_train // k)
        if not per_class or x.base.name in done:
            continue
        done.add(x.base.name)
        flops = k * per_class * forwards * fwd
        est.stages.append(StageEstimate(
            f"{x.base.name}-precompute", f"{k * per_class:,} real images x {forwards} backbone forwards", flops,
            compute_seconds(flops, devices, tp["sample"]), k * per_class / (devices * loader), tp["sample"].source,
        ))  # fmt: skip
    for method in cfg.methods:
        est.stages.append(_gen_stage(cfg, method, k, fwd, tp["sample"], devices))
    if any(x.base is not x for x in methods):
        est.assumptions.append("+select: the selection encoder's training and encoding are not estimated")
    est.stages.append(_eval_stage(cfg, k, n_train, len(cfg.methods), tp["cnn"], devices, loader))
    return est


def format_seconds(s: float) -> str:
    """``90`` -> ``1.5 min``, ``7200`` -> ``2.0 h``; NaN -> ``-``."""
    if math.isnan(s):
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
