"""D^3HR step 2: per-class diagonal Gaussians of DDIM-inverted training latents, cached on disk under a
sha256 of everything they depend on (see :mod:`ddkit.methods.d3hr`).

The cache file of :func:`class_statistics` is ``cache_dir/d3hr-stats-<key[:16]>.pt``, key = sha256 of
:func:`statistics_inputs` (model weights digest, VAE digest, training-shard sha256s from ``read_index``,
schedule, inversion settings, class mapping — not the group-sampling settings or ``timestep``, which only
select among the stored timesteps). Per-class partial results go to ``cache_dir/d3hr-stats-<key[:16]>.parts/``
so an interrupted run resumes (removed once a single process has written the full file). With
``world_size > 1`` rank r fits classes k ≡ r (mod world_size), waits at ``ddkit.dist.barrier`` and then fills
in anything still missing itself, so the result never depends on the other ranks having finished.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddkit import dist
from ddkit.budget_runner import PreparationGuard
from ddkit.errors import ConfigError, DataError, WeightsError
from ddkit.io import atomic_torch_save, tensor_digest
from ddkit.methods.d3hr.decode import reference_input_resize
from ddkit.methods.d3hr.groups import group_seed
from ddkit.methods.d3hr.inversion import ddim_invert, stored_timesteps
from ddkit.methods.d3hr.precomputed import checked_statistics as checked
from ddkit.methods.registry import build
from ddkit.progress import bar
from ddkit.schedule import scheduler_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ddkit.config import ExperimentConfig

CACHE_VERSION = 2  # 2: non-native inputs resized as the reference (Resize + CenterCrop), not bicubic


@dataclass
class D3HRStats:
    """Per-class diagonal Gaussians of DDIM-inverted training latents.

    Attributes:
        mean: float32 [K, C, H, W] class means μ_k at ``timestep``.
        var: float32 [K, C, H, W] unbiased class variances σ_k² at ``timestep``.
        timestep: the timestep of ``mean``/``var``.
        timesteps: all stored timesteps (ascending).
        all_mean, all_var: float32 [S, K, C, H, W] for every stored timestep.
        counts: int64 [K] real images per class that entered the fit.
        classes: class names in class-index order.
        key: sha256 hex of the inputs (the cache key).
        seconds: wall time the statistics took to compute (seconds; from the cache file when reused).
        computed: True when this call computed them, False when they came from the cache.
        path: the cache file.
        inputs: :func:`statistics_inputs`, what the statistics were computed from.
    """

    mean: torch.Tensor
    var: torch.Tensor
    timestep: int
    timesteps: list[int]
    all_mean: torch.Tensor
    all_var: torch.Tensor
    counts: torch.Tensor
    classes: list[str]
    key: str
    seconds: float = 0.0
    computed: bool = False
    path: Path | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def std(self) -> torch.Tensor:
        """float32 [K, C, H, W] σ_k = √var."""
        return self.var.clamp_min(0).sqrt()


def backbone_labels(index: dict[str, Any], model, class_map: str = "auto") -> list[int]:
    """Backbone class index for each dataset class: :func:`ddkit.data.classmap.backbone_labels`, the rule
    training and generation use, so inversion and sampling condition on the same label."""
    from ddkit.data.classmap import backbone_labels as labels_for

    return labels_for(index, model.num_classes, class_map)


def statistics_inputs(model, cfg: ExperimentConfig, index: dict[str, Any], vae=None) -> dict[str, Any]:
    """Everything the statistics depend on (JSON-safe); its sha256 is the cache key."""

    d = cfg.generate.d3hr
    train = {Path(f).name for f in index.get("shards", {}).get("train", [])}
    shas = {k: v for k, v in sorted(index.get("sha256", {}).items()) if not train or Path(k).name in train}
    return {
        "version": CACHE_VERSION,
        "model": tensor_digest(model),
        "model_attrs": [model.in_channels, model.input_size, model.num_classes, bool(model.learn_sigma)],
        "vae": None if vae is None else [cfg.model.vae, tensor_digest(vae), cfg.model.latent_scale],
        "schedule": scheduler_config(cfg.model.num_train_timesteps),
        "data": {"dataset": index.get("dataset"), "classes": list(index["classes"]), "sha256": shas},
        "labels": backbone_labels(index, model, cfg.model.class_map),
        "inversion": {
            "steps": d.inversion_steps,
            "cfg_scale": d.inversion_cfg_scale,
            "store": stored_timesteps(d, cfg.model.num_train_timesteps),
            "max_images_per_class": d.max_images_per_class,
        },
    }


def statistics_key(inputs: dict[str, Any]) -> str:
    """sha256 hex of :func:`statistics_inputs` (canonical JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def backbone_inputs(
    images_u8: torch.Tensor, model, vae, cfg: ExperimentConfig, device, generator=None
) -> torch.Tensor:
    """uint8 [B, C, H, W] -> the clean latent the backbone diffuses (float32 on device).

    Images not at the backbone's native resolution (256 for DiT-XL/2) go through the reference's
    ``Resize`` + ``CenterCrop`` first (:func:`reference_input_resize`). Latent models sample z ~ q(z | x)
    like the reference (``latent_dist.sample()``), from ``generator`` so the statistics are reproducible.
    """
    size = model.input_size * 8 if vae is not None else model.input_size
    if images_u8.shape[-1] != size or images_u8.shape[-2] != size:
        images_u8 = reference_input_resize(images_u8, size)
    x = images_u8.to(device).float() / 127.5 - 1.0
    if vae is not None:
        from ddkit.models.vae import encode

        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return encode(vae, x, generator=generator).float()
    if x.shape[1] != model.in_channels:
        raise DataError(
            f"{cfg.data.shards}: images have {x.shape[1]} channels, backbone expects {model.in_channels}"
        )
    return x


def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan, Golub & LeVeque (1979) pairwise merge of (count, mean, sum of squared deviations)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b / n)
    return n, mean, m2


def _class_fit(model, vae, images, y_backbone: int, cfg: ExperimentConfig, device, store) -> dict[str, Any]:
    import torch

    d = cfg.generate.d3hr
    n, mean, m2 = 0, None, None
    gen = None
    if vae is not None:
        gen = torch.Generator(device=device).manual_seed(group_seed(cfg.seed, y_backbone))
    for lo in range(0, len(images), d.batch_size):
        z0 = backbone_inputs(images[lo : lo + d.batch_size], model, vae, cfg, device, gen)
        y = torch.full((z0.shape[0],), y_backbone, dtype=torch.int64, device=device)
        lat = ddim_invert(model, z0, y, cfg=d, num_train_timesteps=cfg.model.num_train_timesteps, store=store)
        lat = lat.to(torch.float64)  # [S, B, C, H, W]
        b_mean = lat.mean(1)
        b_m2 = (lat - b_mean[:, None]).square().sum(1)
        if mean is None:
            n, mean, m2 = lat.shape[1], b_mean, b_m2
        else:
            n, mean, m2 = _merge(n, mean, m2, lat.shape[1], b_mean, b_m2)
    return {"n": n, "mean": mean.float().cpu(), "var": (m2 / (n - 1)).float().cpu()}


def class_statistics(
    model,
    cfg: ExperimentConfig,
    *,
    device,
    cache_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    budget: tuple[Callable[[], float], float] | None = None,
) -> D3HRStats:
    """Per-class Gaussian statistics of DDIM-inverted training latents, cached on disk.

    Reads the train split one class at a time (:class:`ddkit.data.ClassReader`), encodes with
    ``cfg.model.vae`` for latent
    models (``ddkit.models.vae.encode``), inverts every image (at most ``max_images_per_class`` per class,
    the first ones in the loader's deterministic order) with :func:`ddim_invert` under its class label and
    fits mean/unbiased variance per class and stored timestep.

    Cache, resume and ranks: see the module docstring.

    Args:
        model: Backbone (put in eval mode here).
        cfg: experiment config (``data``, ``model``, ``generate.d3hr``).
        device: torch device for the model and VAE.
        cache_dir: directory for the cache (created).
        rank, world_size: this process's share of the classes.
        progress: show a rich progress bar over classes.
        budget: ``(clock, deadline)`` when the statistics run inside a generation's time budget: after each
            class the time of this rank's remaining classes is projected from the classes fitted so far, and
            the fit stops (its finished classes kept for a rerun) when it would leave less than
            :data:`SAMPLING_SHARE` of the budget's remaining time at the start for sampling.

    Returns:
        :class:`D3HRStats` at ``cfg.generate.d3hr.timestep`` (tensors on CPU).

    Raises:
        DataError: a class has fewer than 2 training images (no unbiased variance), or the shards/classes do
            not match the backbone.
        ConfigError: the stored timesteps are not on the inversion grid.
        BudgetError: with ``budget``, the statistics would not leave time to sample (one line naming the
            stage, the cache file and what makes it fit).
        WeightsError: the VAE cannot be loaded (from ``ddkit.models.vae.load_vae``), or inversion gives
            non-finite latents.
    """
    if cfg.generate.d3hr.statistics:  # precomputed (the generator bundle ships them): no inversion

        d = cfg.generate.d3hr
        return _stats_from_blob(checked(model, cfg), d.timestep, Path(d.statistics), computed=False)
    import torch

    from ddkit.data import read_index

    d = cfg.generate.d3hr
    store = stored_timesteps(d, cfg.model.num_train_timesteps)
    index = read_index(cfg.data.shards)
    model = model.to(device).eval()
    vae = _load_vae(cfg, device)
    inputs = statistics_inputs(model, cfg, index, vae)
    key = statistics_key(inputs)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"d3hr-stats-{key[:16]}.pt"
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        if blob.get("key") == key:
            return _stats_from_blob(blob, d.timestep, path, computed=False)

    t0 = time.perf_counter()
    parts = cache_dir / f"d3hr-stats-{key[:16]}.parts"
    guard = None if budget is None else PreparationGuard(
        *budget, share=STATISTICS_SHARE, what=("D^3HR statistics", "class"),
        advice=f"make {path} before the budget (ddkit run, or ddkit generate without --time-limit; the {{done}} "
        "classes fitted are kept for it), ship it as generate.d3hr.statistics, or lower "
        "generate.d3hr.max_images_per_class",
    )
    fits = _fit_classes(
        model, vae, cfg, index, parts, device=device, rank=rank, world_size=world_size, progress=progress,
        guard=guard,
    )  # fmt: skip
    blob = {
        "key": key,
        "inputs": inputs,
        "timesteps": store,
        **fits,  # mean, var, counts
        "classes": list(index["classes"]),
        "seconds": time.perf_counter() - t0,
    }
    if rank == 0:
        atomic_torch_save(blob, path)
        if world_size == 1:  # with several ranks another one may still be reading the parts
            shutil.rmtree(parts, ignore_errors=True)
    return _stats_from_blob(blob, d.timestep, path, computed=True)


def _load_vae(cfg: ExperimentConfig, device):
    """The latent model's VAE in eval mode on ``device``, or None for a pixel model."""
    if cfg.model.vae is None:
        return None
    from ddkit.models.vae import load_vae

    return load_vae(cfg.model.vae, device=device).eval()


STATISTICS_SHARE = 0.75  # of the time left when the statistics start; the rest: calibration, sampling, merge


def _fit_classes(
    model, vae, cfg: ExperimentConfig, index, parts: Path, *, device, rank, world_size, progress, guard=None
) -> dict[str, torch.Tensor]:
    """:func:`_class_fit` of every class, each saved to ``parts/class-KKKKK.pt`` (an existing part is kept:
    the resume): this rank's share k ≡ rank (mod world_size) first, then whatever another rank did not
    finish. Returns float32 ``mean``/``var`` [S, K, C, H, W] and int64 ``counts`` [K]."""
    import torch

    from ddkit.data import ClassReader

    d = cfg.generate.d3hr
    store = stored_timesteps(d, cfg.model.num_train_timesteps)
    classes = list(index["classes"])
    ylab = backbone_labels(index, model, cfg.model.class_map)
    parts.mkdir(parents=True, exist_ok=True)
    # built on the first class to fit: a resumed run with every part reads nothing
    reader: list[ClassReader] = []

    def fit(k: int) -> bool:
        part = parts / f"class-{k:05d}.pt"
        if part.is_file():
            return False
        if not reader:
            reader.append(ClassReader(cfg.data.shards, "train"))
        images = reader[0].images(k, d.max_images_per_class)  # one class in memory, in key order
        if len(images) < 2:
            raise DataError(
                f"{cfg.data.shards}: class {classes[k]!r} has {len(images)} training images, need >= 2"
            )
        fitted = _class_fit(model, vae, images, ylab[k], cfg, device, store)
        if not (torch.isfinite(fitted["mean"]).all() and torch.isfinite(fitted["var"]).all()):
            raise WeightsError(
                f"DDIM inversion of class {classes[k]!r} gave non-finite latents (check the backbone)"
            )
        atomic_torch_save(fitted, part)
        return True

    mine = [k for k in range(len(classes)) if k % world_size == rank]
    todo = sum(not (parts / f"class-{k:05d}.pt").is_file() for k in mine)
    done = 0
    with bar("D3HR inversion", len(mine), enabled=progress) as update:
        for k in mine:
            done += fit(k)
            if guard is not None:
                guard(done, todo - done)
            update()
    if world_size > 1:
        dist.barrier()
    for k in range(len(classes)):
        fit(k)
    fits = [torch.load(parts / f"class-{k:05d}.pt", map_location="cpu") for k in range(len(classes))]
    return {
        "mean": torch.stack([f["mean"] for f in fits], 1).contiguous(),
        "var": torch.stack([f["var"] for f in fits], 1).contiguous(),
        "counts": torch.tensor([f["n"] for f in fits], dtype=torch.int64),
    }


def _stats_from_blob(blob: dict[str, Any], timestep: int, path: Path, computed: bool) -> D3HRStats:
    ts = [int(t) for t in blob["timesteps"]]
    if timestep not in ts:
        raise ConfigError(f"generate.d3hr.timestep: {timestep} not stored in {path} (stored: {ts})")
    i = ts.index(timestep)
    return D3HRStats(
        mean=blob["mean"][i],
        var=blob["var"][i],
        timestep=timestep,
        timesteps=ts,
        all_mean=blob["mean"],
        all_var=blob["var"],
        counts=blob["counts"],
        classes=list(blob["classes"]),
        key=blob["key"],
        seconds=float(blob.get("seconds", 0.0)),
        computed=computed,
        path=path,
        inputs=blob.get("inputs", {}),
    )


def precompute_statistics(cfg: ExperimentConfig, progress: bool = False) -> D3HRStats:
    """D^3HR's per-class statistics (DDIM inversion of the real train split) for ``ddkit run``: data made
    once per model and dataset and cached in ``RUN/d3hr-cache`` (:func:`class_statistics`), so ``ddkit run``
    makes them before the method's generation budget starts, as training comes before it. ``ddkit generate
    --method d3hr`` on its own spends its budget on them when no cache exists; the challenge's bundle ships
    them (``generate.d3hr.statistics``).

    Raises:
        WeightsError: the backbone or VAE cannot be loaded; as :func:`class_statistics` otherwise.
    """
    from ddkit.models import load_backbone

    device = dist.device_for(dist.dist_env())
    model, _ = load_backbone(
        build("d3hr", cfg).checkpoint(), use_ema=cfg.generate.use_ema, device=device,
        timestep_shift=cfg.model.timestep_shift, expect=cfg.model,
    )  # fmt: skip
    return class_statistics(model, cfg, device=device, cache_dir=Path(cfg.run_dir) / "d3hr-cache", progress=progress)
