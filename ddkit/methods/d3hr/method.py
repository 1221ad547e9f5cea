"""D^3HR as a generation method (``d3hr``): the interface's hooks over :mod:`ddkit.methods.d3hr`.

* prepare (before calibration): the per-class Gaussians of DDIM-inverted real latents
  (:func:`~ddkit.methods.d3hr.class_statistics`; cached in ``RUN/d3hr-cache`` and fitted by class
  k ≡ rank (mod world), or read from ``generate.d3hr.statistics`` in a bundle);
* on the plan: the representative group of IPC latents per class (:func:`~ddkit.methods.d3hr.select_latents`);
* sampling: a DDIM chain restarted at the reference's timestep from those latents, on the reference's grid
  (:func:`~ddkit.methods.d3hr.decode_settings`), CFG ``generate.d3hr.cfg_scale`` when set;
* bundle: the statistics file made for the shipped weights; packaging resizes 256 px images to 224 with
  LANCZOS as the reference saves them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ddkit.errors import PackageError
from ddkit.methods.base import GenerationMethod, Sampling
from ddkit.methods.d3hr.decode import SAVE_SIZE, decode_settings, reference_save_resize
from ddkit.methods.d3hr.groups import group_search_seconds, select_latents
from ddkit.methods.d3hr.inversion import start_timestep, stored_timesteps
from ddkit.methods.d3hr.statistics import class_statistics, precompute_statistics, tensor_digest


class D3HR(GenerationMethod):
    """Zhao et al., ICML 2025 (reference lin-zhao-resoLve/D3HR ``generation/``)."""

    name = "d3hr"
    label = "D^3HR"
    fixed_layout = True  # one representative group of the planned IPC per class: no extension batches

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.stats = None
        self.latents: dict[int, Any] = {}

    def sampling(self, gcfg, num_train_timesteps: int) -> Sampling:
        d = gcfg.d3hr
        settings = decode_settings(gcfg, num_train_timesteps)  # reference grid, all channels guided
        # D^3HR restarts a deterministic DDIM chain from its inverted-statistics latents (group_sampling.py).
        cfg_scale = d.cfg_scale if d.cfg_scale is not None else gcfg.cfg_scale
        return Sampling(settings, "ddim", cfg_scale, start_timestep(d, num_train_timesteps))

    def precompute(self, progress: bool) -> None:
        precompute_statistics(self.cfg, progress)

    def precompute_work(self, train_per_class: int) -> tuple[int, int]:
        d, T = self.cfg.generate.d3hr, self.cfg.model.num_train_timesteps
        if d.statistics:  # shipped statistics: nothing to invert
            return 0, 0
        steps = math.ceil(d.inversion_steps * d.store_to / T)  # the reference stops after store_to
        return min(d.max_images_per_class or train_per_class, train_per_class), steps * (1 if d.inversion_cfg_scale == 1.0 else 2)

    def plan_work(self, sampler, ipc: int, kept: int, *, gen_dir: Path) -> tuple[float, float]:
        """The group search of :meth:`on_plan` per image: m groups of ``ipc`` latents scored per class
        (:func:`~ddkit.methods.d3hr.groups.group_search_seconds`, one chunk timed), divided by ``ipc``; its
        cost grows with ``ipc``, so the largest IPC's price per image bounds every smaller plan's."""

        dim = sampler.model.in_channels * sampler.model.input_size**2
        return group_search_seconds(dim, ipc, self.cfg.generate.d3hr, device=sampler.device) / max(1, ipc), 0.0

    def prepare(self, sampler, job, *, progress, phases, clock) -> None:
        mark = clock()
        self.stats = class_statistics(
            sampler.model, self.cfg, device=sampler.device, cache_dir=Path(self.cfg.run_dir) / "d3hr-cache",
            rank=job.rank, world_size=job.world, progress=progress,
            budget=(clock, job.t0 + sampler.config.generate.time_limit),
        )  # fmt: skip
        self.prepared["d3hr_statistics"] = self.stats.key
        phases["d3hr_statistics"] = clock() - mark

    def on_plan(self, sampler, batches, ipc, kept, *, gen_dir, progress, phases, clock) -> None:
        d = self.cfg.generate.d3hr
        mark = clock()
        mine = {c for b in batches for c, _ in b.items}
        self.latents, per_class = select_latents(self.stats, mine, ipc, seed=self.cfg.generate.seed, cfg=d)
        phases["d3hr_latents"] = clock() - mark
        phases["d3hr_group_search_s_per_class"] = per_class
        if progress:
            print(f"D^3HR group search: {d.num_groups} groups/class, {per_class:.3g} s/class", flush=True)

    def initial_latents(self, sampler, items):
        import torch

        return torch.stack([self.latents[c][i] for c, i in items]).to(sampler.device)

    def calibration(self, sampler, batch_size: int) -> dict[str, Any]:
        import torch

        C, S = sampler.model.in_channels, sampler.model.input_size
        return {"latents": torch.randn(batch_size, C, S, S, device=sampler.device)}

    def bundle_files(self, d, weights: Path) -> dict[str, tuple[Path, str]]:
        return {"generate.d3hr.statistics": (find_statistics(d, self.cfg, weights), "d3hr-stats.pt")}

    def bundle_problem(self, cfg, values) -> str | None:
        if not values.get("generate.d3hr.statistics"):
            return "D^3HR without generate.d3hr.statistics: the bundle has no images to invert"
        return None

    def saved_images(self, images):
        if tuple(images.shape[-2:]) != (256, 256):
            return images
        return reference_save_resize(images, SAVE_SIZE)


def find_statistics(d, cfg, weights: Path) -> Path:
    """The run's D^3HR statistics file made for the bundled backbone ``weights`` and the run's classes.

    Candidates are ``RUN/d3hr-cache/d3hr-stats-*.pt``; the one whose recorded inputs name the same classes,
    inversion settings and backbone weights (:func:`ddkit.methods.d3hr.tensor_digest` of ``weights`` loaded
    as generation loads it) is taken, the newest when several do.

    Raises:
        PackageError: none matches (generate with D^3HR first).
    """
    import torch

    from ddkit.data import read_index
    from ddkit.models import load_backbone

    cache = d.gen_dir.parent / "d3hr-cache"
    cands = sorted(cache.glob("d3hr-stats-*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not cands:
        raise PackageError(f"{cache}: no D^3HR statistics (d3hr-stats-*.pt); the bundle ships the run's")
    model, _ = load_backbone(weights, use_ema=cfg.generate.use_ema, timestep_shift=cfg.model.timestep_shift,
                             expect=cfg.model)
    shards = Path(cfg.data.shards)
    shards = shards if shards.is_absolute() or shards.exists() else d.gen_dir.parent / shards
    want = {"model": tensor_digest(model), "classes": list(read_index(shards)["classes"]),
            "store": stored_timesteps(cfg.generate.d3hr, cfg.model.num_train_timesteps)}
    for p in cands:
        inputs = torch.load(p, map_location="cpu", weights_only=False).get("inputs") or {}
        got = {"model": inputs.get("model"), "classes": (inputs.get("data") or {}).get("classes"),
               "store": (inputs.get("inversion") or {}).get("store")}
        if got == want:
            return p
    raise PackageError(f"{cache}: none of {len(cands)} D^3HR statistics files was made for the sampled weights, "
                       f"classes and stored timesteps {want['store']} (generate with D^3HR first)")
