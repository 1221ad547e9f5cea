"""The sampler of one generation: the loaded backbone (and VAE), the method, and the settings every batch uses.

:func:`load_sampler` loads the weights and the sampling precision (``precision.json``, first writer wins) and
asks the method for its chain (:meth:`ddkit.methods.base.GenerationMethod.sampling`); :meth:`Sampler.run_items`
turns ``(class, index)`` pairs into uint8 images, each seeded by :func:`ddkit.generate.image_seed` only, so the
images do not depend on the sharding, with the method's initial latents and step changes;
:meth:`Sampler.calibration` gives the workload :func:`ddkit.budget.calibrate` times.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddkit import dist
from ddkit import hardware as hw
from ddkit.config import ExperimentConfig
from ddkit.errors import WeightsError
from ddkit.figures import prepare_plotting
from ddkit.generate.layout import class_layout, image_seed
from ddkit.io import publish_json_once


@dataclasses.dataclass
class Sampler:
    """A backbone, a method and the settings one generation samples with.

    Attributes:
        model: the backbone (eval mode, on ``device``); ``run_model`` is what is called (``torch.compile``
            of it when ``generate.compile``).
        vae: the decoder of a latent backbone, or None (pixel space).
        settings: the :class:`ddkit.config.GenerateConfig` in effect (the method's, e.g. D^3HR's decode grid).
        method: the :class:`ddkit.methods.base.GenerationMethod`.
        classes, backbone_labels: class names and the backbone label of each dataset class.
        image_shape: (C, H, W) of a stored image (C = ``data.channels`` and H = 8 × latent size with a VAE).
        sampler, cfg_scale, start_timestep: the chain (:class:`ddkit.methods.base.Sampling`).
        precision: the :class:`ddkit.hardware.PrecisionChoice` (``precision.dtype`` is the autocast dtype).
        config: the :class:`ddkit.config.ExperimentConfig`.
    """

    model: Any
    run_model: Any
    vae: Any
    device: Any
    settings: Any
    method: Any
    checkpoint: str
    classes: list[str]
    backbone_labels: list[int]
    image_shape: tuple[int, int, int]
    num_train_timesteps: int
    precision: Any
    sampler: str
    cfg_scale: float
    start_timestep: int | None = None
    config: Any = None

    def _sample(self, labels, steps: int, **kw):
        from ddkit.sampling import sample

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

        Image (c, i) starts from ``torch.Generator`` seeded by ``image_seed(settings.seed, c, i)``, or from the
        method's initial latent (D^3HR); the method's guidance changes the steps (MGD^3).
        ``step_callback(step, steps)`` runs after every step (:meth:`ddkit.budget.Runner.step_ok`).

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
        latents = self.method.initial_latents(self, items)
        x = self._sample(labels, steps, generators=gens, latents=latents, step_callback=step_callback,
                         **self.method.guidance(self, items))  # fmt: skip
        return self._to_images(x)

    def calibration(self, batch_size: int) -> tuple[Callable[[int], None], Callable[[], None]]:
        """(``run_steps(n)``: a batch of ``batch_size`` seeds no real image uses, sampled with ``n`` steps and
        the method's stand-in latents and guidance; ``fixed()``: the per-batch work after the chain, decode
        and uint8), for :func:`ddkit.budget.calibrate`."""
        import torch

        K, B, device = len(self.classes), batch_size, self.device
        cal_items = [(k % K, 10**9 + k) for k in range(B)]  # seeds no real image uses
        C, S = self.model.in_channels, self.model.input_size
        cal_labels = torch.tensor([self.backbone_labels[c] for c, _ in cal_items], device=device)

        def run_steps(n: int) -> None:
            self._sample(cal_labels, n, **self.method.calibration(self, B))
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def fixed() -> None:
            self._to_images(torch.zeros(B, C, S, S, device=device))

        return run_steps, fixed


def _load_models(cfg: ExperimentConfig, method, model, device) -> tuple[Any, Any, str]:
    """(backbone in eval mode on ``device``, VAE or None, checkpoint name) for ``method``.

    Raises:
        WeightsError: the checkpoint is missing, or a latent backbone has no VAE.
    """
    checkpoint = "<in-memory model>"
    if model is None:
        from ddkit.models import load_backbone

        checkpoint = method.checkpoint()
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
    cfg: ExperimentConfig, method, gen_dir: Path, job, *, model=None, device=None, clock, phases: dict
) -> Sampler:
    """Load what ``method`` samples with, timing the ``load`` phase.

    Args:
        method: the :class:`ddkit.methods.base.GenerationMethod`; job: this rank
            (:class:`ddkit.generate.run.Rank`); model: an already-built backbone (skips loading);
            device: default this rank's GPU or the CPU.

    Raises:
        WeightsError: missing checkpoint or VAE.
        ConfigError: settings the method cannot sample with.
    """
    import torch

    mark = clock()
    device = torch.device(device) if device is not None else dist.device_for(job.env)
    model, vae, checkpoint = _load_models(cfg, method, model, device)
    names, backbone_labels = class_layout(cfg, model.num_classes)
    index = shard_index(cfg)
    if index is not None:  # weights made on other classes need an explicit model.class_map
        from ddkit.models.provenance import check_classes

        check_classes(getattr(model, "made_on", None), index, cfg.model.class_map, labels=backbone_labels,
                      where=str(checkpoint))  # fmt: skip
    prepare_plotting()
    chain = method.sampling(cfg.generate, cfg.model.num_train_timesteps)
    precision = _sampling_precision(chain.settings, model, device, gen_dir)
    run_model = model
    if chain.settings.compile:
        run_model = torch.compile(model)
        for a in ("in_channels", "input_size", "num_classes", "learn_sigma"):
            setattr(run_model, a, getattr(model, a))
    S = model.input_size
    image_shape = (cfg.data.channels, S * 8, S * 8) if vae is not None else (model.in_channels, S, S)
    phases["load"] = clock() - mark
    return Sampler(
        model=model, run_model=run_model, vae=vae, device=device, settings=chain.settings, method=method,
        checkpoint=checkpoint, classes=names, backbone_labels=backbone_labels, image_shape=image_shape,
        num_train_timesteps=cfg.model.num_train_timesteps, precision=precision, sampler=chain.sampler,
        cfg_scale=chain.cfg_scale, start_timestep=chain.start_timestep, config=cfg,
    )  # fmt: skip


def shard_index(cfg: ExperimentConfig) -> dict | None:
    """The shard set's ``dataset.json`` (:func:`ddkit.data.read_index`), or None without one (a bundle-less
    test, a benchmark on random classes)."""
    if not (Path(cfg.data.shards) / "dataset.json").is_file():
        return None
    from ddkit.data import read_index

    return read_index(cfg.data.shards)


def _sampling_precision(gcfg, model, device, gen_dir: Path):
    """``generate.precision`` resolved for this model (auto: :mod:`ddkit.hardware`, a timed no-grad forward
    of the CFG-doubled batch), once per generation: the first rank to decide publishes its choice in
    ``gen_dir/precision.json`` and every rank and every requeued restart adopts it. A timed check is noisy
    under load, and a set sampled partly in bf16 and partly in fp32 would differ from an uninterrupted run."""

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
