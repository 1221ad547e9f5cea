"""The sampler of one generation: the loaded backbone (and VAE) with the settings every batch uses.

:func:`load_sampler` loads the weights, D^3HR's class statistics (cached on disk) and the sampling precision
(``precision.json``, first writer wins); :meth:`Sampler.run_items` turns ``(class, index)`` pairs into uint8
images, each seeded by :func:`ddkit.generate.image_seed` only, so the images do not depend on the
sharding; :meth:`Sampler.calibration` gives the workload :func:`ddkit.budget.calibrate` times.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddkit.config import ExperimentConfig
from ddkit.errors import WeightsError
from ddkit.figures import prepare_plotting
from ddkit.generate.layout import checkpoint_for, class_layout, image_seed


@dataclasses.dataclass
class Sampler:
    """A backbone and the settings one generation samples with.

    Attributes:
        model: the backbone (eval mode, on ``device``); ``run_model`` is what is called (``torch.compile``
            of it when ``generate.compile``).
        vae: the decoder of a latent backbone, or None (pixel space).
        settings: the :class:`ddkit.config.GenerateConfig` in effect (D^3HR: its decode settings).
        classes, backbone_labels: class names and the backbone label of each dataset class.
        image_shape: (C, H, W) of a stored image (C = ``data.channels`` and H = 8 × latent size with a VAE).
        sampler, cfg_scale, start_timestep: the chain (D^3HR: DDIM restarted at its inversion timestep).
        precision: the :class:`ddkit.hardware.PrecisionChoice` (``precision.dtype`` is the autocast dtype).
        stats, latents: D^3HR's class statistics and the chosen initial latents {class: float [ipc, C, H, W]}.
        modes: MGD^3's class modes, float [K, k, C, H, W] in the backbone's space (k = IPC kept), or None.
    """

    model: Any
    run_model: Any
    vae: Any
    device: Any
    settings: Any
    method: str
    checkpoint: str
    classes: list[str]
    backbone_labels: list[int]
    image_shape: tuple[int, int, int]
    num_train_timesteps: int
    precision: Any
    sampler: str
    cfg_scale: float
    start_timestep: int | None = None
    stats: Any = None
    latents: dict[int, Any] = dataclasses.field(default_factory=dict)
    modes: Any = None
    config: Any = None  # the ExperimentConfig (MGD^3 reads the real shards and the VAE settings)

    @property
    def mode_clip(self) -> float | None:
        """MGD^3's bound on |x̂_0| in its pull: 1 for pixels in [-1, 1], none for VAE latents
        (:func:`ddkit.methods.modes.guide`)."""
        return 1.0 if self.vae is None else None

    def _sample(self, labels, steps: int, items=None, **kw):
        from ddkit.methods.modes import mode_of
        from ddkit.sampling import sample

        if self.method == "mgd3" and self.modes is not None and items is not None:
            import torch

            k = self.modes.shape[1]
            m = torch.stack([self.modes[c, mode_of(i, k)] for c, i in items]).to(self.device)
            kw.update(modes=m, mode_scale=self.settings.modes.scale, mode_stop=self.settings.modes.stop,
                      mode_clip=self.mode_clip)
        return sample(
            self.run_model,
            labels,
            steps=steps,
            sampler=self.sampler,
            cfg_scale=self.cfg_scale,
            guided_channels=self.settings.guided_channels,
            start_timestep=self.start_timestep,
            num_train_timesteps=self.num_train_timesteps,
            autocast_dtype=self.precision.dtype,
            **kw,
        )

    def _to_images(self, x):
        """Backbone output -> uint8 [B, C, H, W] on the CPU (VAE-decoded for a latent backbone)."""
        from ddkit.sampling import to_uint8

        if self.vae is not None:
            from ddkit.models.vae import decode

            x = decode(self.vae, x)
        return to_uint8(x.float()).cpu()

    def run_items(self, items, steps: int, step_callback: Callable[[int, int], bool | int] | None = None):
        """Sample images ``items`` = ((class, index), ...) with ``steps`` sampling steps.

        Image (c, i) starts from ``torch.Generator`` seeded by ``image_seed(settings.seed, c, i)`` (D^3HR:
        from its chosen latent ``latents[c][i]``). ``step_callback(step, steps)`` runs after every step
        (:meth:`ddkit.budget.Runner.step_ok`).

        Returns:
            uint8 [len(items), *image_shape] on the CPU.

        Raises:
            SamplingAborted: the callback abandoned the batch.
        """
        import torch

        labels = torch.tensor([self.backbone_labels[c] for c, _ in items], dtype=torch.long, device=self.device)
        gens = [
            torch.Generator(device=self.device).manual_seed(image_seed(self.settings.seed, c, i)) for c, i in items
        ]
        latents = None
        if self.stats is not None:
            latents = torch.stack([self.latents[c][i] for c, i in items]).to(self.device)
        x = self._sample(labels, steps, items, generators=gens, latents=latents, step_callback=step_callback)
        return self._to_images(x)

    def calibration(self, batch_size: int) -> tuple[Callable[[int], None], Callable[[], None]]:
        """(``run_steps(n)``: a batch of ``batch_size`` seeds no real image uses, sampled with ``n`` steps;
        ``fixed()``: the per-batch work after the chain, decode and uint8), for :func:`ddkit.budget.calibrate`."""
        import torch

        K, B, device = len(self.classes), batch_size, self.device
        cal_items = [(k % K, 10**9 + k) for k in range(B)]  # seeds no real image uses
        C, S = self.model.in_channels, self.model.input_size
        cal_labels = torch.tensor([self.backbone_labels[c] for c, _ in cal_items], device=device)

        def run_steps(n: int) -> None:
            latents = torch.randn(B, C, S, S, device=device) if self.stats is not None else None
            modes = torch.zeros(B, C, S, S, device=device) if self.method == "mgd3" else None
            if modes is not None:  # time the guided step too (its cost is small but not zero)
                self._sample(cal_labels, n, modes=modes, mode_scale=self.settings.modes.scale,
                             mode_stop=self.settings.modes.stop, mode_clip=self.mode_clip)
            else:
                self._sample(cal_labels, n, latents=latents)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def fixed() -> None:
            self._to_images(torch.zeros(B, C, S, S, device=device))

        return run_steps, fixed

    def choose_latents(self, batches, ipc: int, *, phases: dict[str, float], clock, progress: bool,
                       kept: int | None = None, gen_dir: Path | None = None) -> None:  # fmt: skip
        """D^3HR: the initial latents of the classes in ``batches`` (``ipc`` per class, group search of
        :func:`ddkit.methods.d3hr.select_latents`). MGD^3: the class modes, one per kept image (``kept``,
        default ``ipc``), loaded from ``generate.modes.file`` or fitted and written to ``gen_dir/modes.pt``
        (:func:`class_modes_for`). A no-op for the other methods."""
        if self.method == "mgd3":
            mark = clock()
            self.modes = class_modes_for(self, kept or ipc, gen_dir)
            phases["mgd3_modes"] = clock() - mark
            return
        if self.stats is None:
            return
        from ddkit.methods import d3hr

        gcfg = self.settings
        mark = clock()
        self.latents.clear()
        mine = {c for b in batches for c, _ in b.items}
        got, per_class = d3hr.select_latents(self.stats, mine, ipc, seed=gcfg.seed, cfg=gcfg.d3hr)
        self.latents.update(got)
        phases["d3hr_latents"] = clock() - mark
        phases["d3hr_group_search_s_per_class"] = per_class
        if progress:
            print(f"D^3HR group search: {gcfg.d3hr.num_groups} groups/class, {per_class:.3g} s/class", flush=True)


def _load_models(cfg: ExperimentConfig, model, device) -> tuple[Any, Any, str]:
    """(backbone in eval mode on ``device``, VAE or None, checkpoint name) for ``cfg.generate.method``.

    Raises:
        WeightsError: the checkpoint is missing, or a latent backbone has no VAE.
    """
    checkpoint = "<in-memory model>"
    if model is None:
        from ddkit.models import load_backbone

        checkpoint = checkpoint_for(cfg, cfg.generate.method)
        model, _ = load_backbone(
            checkpoint, use_ema=cfg.generate.use_ema, device=device, timestep_shift=cfg.model.timestep_shift,
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
    return model, vae, checkpoint


def load_sampler(
    cfg: ExperimentConfig, gen_dir: Path, job, *, model=None, device=None, progress: bool, clock, phases: dict
) -> Sampler:
    """Load what ``cfg.generate.method`` samples with, timing the ``load`` and ``d3hr_statistics`` phases.

    Args:
        job: this rank (:class:`ddkit.generate.run.Rank`): D^3HR's class statistics are fitted by class
            k ≡ rank (mod world) and shared through their disk cache (a barrier under a process group).
        model: an already-built backbone (skips loading); device: default this rank's GPU or the CPU.

    Raises:
        WeightsError: missing checkpoint or VAE.
    """
    import torch

    from ddkit import dist

    gcfg, method = cfg.generate, cfg.generate.method
    mark = clock()
    device = torch.device(device) if device is not None else dist.device_for(job.env)
    model, vae, checkpoint = _load_models(cfg, model, device)
    names, backbone_labels = class_layout(cfg, model.num_classes)
    prepare_plotting()
    phases["load"] = clock() - mark

    start_t = None
    stats = None
    if method == "d3hr":
        from ddkit.methods import d3hr

        mark = clock()
        stats = d3hr.class_statistics(
            model, cfg, device=device, cache_dir=Path(cfg.run_dir) / "d3hr-cache", rank=job.rank,
            world_size=job.world, progress=progress,
        )  # fmt: skip
        start_t = d3hr.start_timestep(gcfg.d3hr)
        gcfg = d3hr.decode_settings(gcfg, cfg.model.num_train_timesteps)  # reference grid, all channels guided
        phases["d3hr_statistics"] = clock() - mark

    precision = _sampling_precision(gcfg, model, device, gen_dir)
    # D^3HR restarts a deterministic DDIM chain from its inverted-statistics latents (reference
    # ``group_sampling.py``); the other methods use the configured sampler.
    sampler = "ddim" if method == "d3hr" else gcfg.sampler
    if method == "mgd3" and sampler != "ddpm":
        from ddkit.errors import ConfigError

        raise ConfigError(f"generate.sampler: mgd3 guides DDPM steps (its reference's sampler), got {sampler!r}")
    cfg_scale = gcfg.cfg_scale
    if method == "d3hr" and gcfg.d3hr.cfg_scale is not None:
        cfg_scale = gcfg.d3hr.cfg_scale
    run_model = model
    if gcfg.compile:
        run_model = torch.compile(model)
        for a in ("in_channels", "input_size", "num_classes", "learn_sigma"):
            setattr(run_model, a, getattr(model, a))
    S = model.input_size
    image_shape = (cfg.data.channels, S * 8, S * 8) if vae is not None else (model.in_channels, S, S)
    return Sampler(
        model=model, run_model=run_model, vae=vae, device=device, settings=gcfg, method=method,
        checkpoint=checkpoint, classes=names, backbone_labels=backbone_labels, image_shape=image_shape,
        num_train_timesteps=cfg.model.num_train_timesteps, precision=precision, sampler=sampler,
        cfg_scale=cfg_scale, start_timestep=start_t, stats=stats, config=cfg,
    )  # fmt: skip


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
    # No collective (agree=False): the ranks agree through the record below, first writer wins.
    choice = hw.choose_precision(gcfg.precision, device, role="generate", step=step, agree=False, previous=previous)
    published = publish_json_once(record, choice.to_dict())
    if published.get("requested") != choice.requested or published.get("device") != choice.device:
        return choice  # a different request or device (heterogeneous ranks): decided here
    known = {f.name for f in dataclasses.fields(hw.PrecisionChoice)} - {"warning"}
    return hw.PrecisionChoice(**{k: v for k, v in published.items() if k in known})


def class_modes_for(sampler: Sampler, k: int, gen_dir: Path | None):
    """MGD^3's modes for ``k`` images per class: float32 [K, k, C, H, W] on the CPU.

    From ``generate.modes.file`` when set (the generator bundle's); else the generation's ``modes.pt`` when
    a rank or an earlier attempt already fitted them; else k-means over the real train split in the
    backbone's space (pixels in [-1, 1], or VAE latents sampled with a fixed generator), at most
    ``generate.modes.max_images_per_class`` per class, published to ``gen_dir/modes.pt`` (first writer
    wins, so every rank and restart guides towards the same modes even where float results differ).

    Raises:
        ConfigError: ``generate.modes.file`` missing or unreadable.
        DataError: a modes file for other classes or another number of modes, or unreadable shards.
    """
    import io
    import pickle

    import torch

    from ddkit.errors import ConfigError
    from ddkit.io import publish_bytes_once
    from ddkit.methods.modes import class_modes

    gcfg = sampler.settings
    if gcfg.modes.file:
        try:
            blob = torch.load(gcfg.modes.file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise ConfigError(f"generate.modes.file: {gcfg.modes.file} unreadable ({type(e).__name__})") from None
        return _checked_modes(blob, sampler.classes, k, f"generate.modes.file: {gcfg.modes.file}")
    dest = Path(gen_dir) / "modes.pt" if gen_dir is not None else None
    if dest is not None and dest.is_file():
        return _checked_modes(torch.load(dest, map_location="cpu", weights_only=True), sampler.classes, k, str(dest))
    x, y = _real_inputs(sampler, gcfg.modes.max_images_per_class)
    blob = {"modes": class_modes(x, y, len(sampler.classes), k, seed=gcfg.seed), "classes": list(sampler.classes),
            "k": k}
    if dest is None:
        return blob["modes"]
    buf = io.BytesIO()
    torch.save(blob, buf)
    blob = torch.load(io.BytesIO(publish_bytes_once(dest, buf.getvalue())), map_location="cpu", weights_only=True)
    return _checked_modes(blob, sampler.classes, k, str(dest))


def _checked_modes(blob: dict, classes: list[str], k: int, where: str):
    """``blob["modes"]`` as float32, checked to hold ``k`` modes for exactly ``classes``.

    Raises:
        DataError: other classes or another number of modes (one line naming ``where``).
    """
    from ddkit.errors import DataError

    modes = blob["modes"]
    if list(blob["classes"]) != list(classes) or modes.shape[1] != k:
        raise DataError(f"{where} holds {modes.shape[1]} modes for {len(blob['classes'])} classes; this generation "
                        f"keeps {k} images for {len(classes)}")
    return modes.float()


def _real_inputs(sampler: Sampler, per_class: int | None):
    """(float32 [N, C, H, W] real train images in the backbone's space on the CPU, int64 [N] classes)."""
    import torch

    from ddkit.data import load_tensors
    from ddkit.methods.d3hr.statistics import backbone_inputs

    cfg = sampler.config
    images, labels = load_tensors(cfg.data.shards, "train")
    if per_class is not None:
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(len(sampler.classes))])
        images, labels = images[keep], labels[keep]
    g = torch.Generator(device=sampler.device).manual_seed(cfg.generate.seed)
    out = []
    with torch.no_grad():
        for b in range(0, len(images), 64):
            out.append(backbone_inputs(images[b:b + 64], sampler.model, sampler.vae, cfg, sampler.device, g).cpu())
    return torch.cat(out), labels
