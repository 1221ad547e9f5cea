"""The generation-method interface: what the rest of ddkit asks a method, so that none of it names one.

A method is a class registered in :mod:`ddkit.methods.registry` and built per experiment config. The shared
machinery calls it at fixed points (the flow is :mod:`ddkit.generate`'s):

* **what it reads** (:attr:`GenerationMethod.weights`, :func:`ddkit.methods.registry.sections_read`): the
  weights it samples (the pretrained DiT or this run's minimax checkpoint) and its config section; the
  pipeline graph and the stage fingerprints follow them;
* **sampling settings** (:meth:`GenerationMethod.sampling`): the chain (sampler, CFG scale, a restart
  timestep, the settings in effect);
* **prepare** (:meth:`GenerationMethod.prepare`, before calibration; :meth:`GenerationMethod.on_plan`, once
  steps and IPC are known): what it computes once from real data or weights (D^3HR's statistics and group
  latents, MGD^3's modes, the selection encoder), published first-writer-wins so every rank and restart
  uses the same files, and digested into the generation record;
* **its changes to the sampling step** (:meth:`GenerationMethod.initial_latents`,
  :meth:`GenerationMethod.guidance`, :meth:`GenerationMethod.calibration`);
* **its bundle** (:meth:`GenerationMethod.bundle_files`, :meth:`GenerationMethod.bundle_problem`,
  :meth:`GenerationMethod.saved_images`);
* **its record** (:meth:`GenerationMethod.record`).

The defaults are plain class-conditional DiT sampling; a method overrides what it changes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from ddkit.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The chain a method samples with: ``settings`` (the :class:`ddkit.config.GenerateConfig` in effect),
    ``sampler`` (``ddpm`` | ``ddim``), ``cfg_scale`` and ``start_timestep`` (None: from pure noise)."""

    settings: Any
    sampler: str
    cfg_scale: float
    start_timestep: int | None = None


class GenerationMethod:
    """Plain class-conditional sampling; subclasses override what their method changes (module docstring).

    Attributes:
        name: the registry name; label: its row in results tables; cfg: the experiment.
        fixed_layout: the sampled layout is exactly the plan's IPC per class (no extension batches).
        plan_work_hint: the stage or file that spares :meth:`plan_work`'s one-off work.
        prepared: ``{name: sha256}`` of what :meth:`prepare` / :meth:`on_plan` made (the record's digest).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    fixed_layout: ClassVar[bool] = False
    #: What makes :meth:`plan_work`'s one-off work unnecessary (named when the budget cannot hold it).
    plan_work_hint: ClassVar[str] = ""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.prepared: dict[str, str] = {}

    # -- what it reads -------------------------------------------------------------------------------------
    @property
    def weights(self) -> str:
        """``"pretrained"`` (``model.pretrained`` or RUN/pretrain) or ``"minimax"`` (RUN/minimax)."""
        return "pretrained"

    def checkpoint(self) -> str:
        """The weights it samples: ``generate.checkpoint``, else ``RUN/minimax`` when :attr:`weights` is
        ``"minimax"``, else ``model.pretrained`` or ``RUN/pretrain``."""
        cfg = self.cfg
        if cfg.generate.checkpoint:
            return cfg.generate.checkpoint
        if self.weights == "minimax":
            return str(Path(cfg.run_dir) / "minimax")
        return cfg.model.pretrained or str(Path(cfg.run_dir) / "pretrain")

    @property
    def base(self) -> GenerationMethod:
        """The method that samples (a wrapper's inner method; itself otherwise)."""
        return self

    def ratios(self) -> tuple[float, ...]:
        """Over-generation ratios the planner may choose from (candidates per kept image)."""
        return (1.0,)

    def sample_dir(self, gen_dir: Path) -> Path:
        """Where the sharded sampling writes: ``gen_dir`` itself, or a wrapper's pool below it."""
        return Path(gen_dir)

    def reserve_seconds(self) -> float:
        """Seconds of the budget kept for :meth:`finish` (charged as work before sampling is planned)."""
        return 0.0

    def before_sampling(self, progress: bool) -> None:
        """A wrapper's preparation before its base samples (the selection encoder; a no-op by default); it runs
        before :meth:`reserve_seconds` is read, so it may time what that charges."""

    def finish(self, gen_dir: Path) -> None:
        """A wrapper's last step once its sample dir is merged (selection; a no-op by default)."""

    # -- sampling settings ---------------------------------------------------------------------------------
    def sampling(self, gcfg, num_train_timesteps: int) -> Sampling:
        """The chain for ``gcfg`` (:class:`ddkit.config.GenerateConfig`).

        Raises:
            ConfigError: settings the method cannot sample with.
        """
        return Sampling(gcfg, gcfg.sampler, gcfg.cfg_scale, None)

    # -- prepare -------------------------------------------------------------------------------------------
    def precompute(self, progress: bool) -> None:
        """Before any budget (``ddkit run`` calls it ahead of the generation stage): data made once per model
        and dataset and cached in the run directory, which :meth:`prepare` then only loads (a no-op by
        default)."""

    def precompute_work(self, train_per_class: int) -> tuple[int, int]:
        """(real images per class, backbone forwards per image) that :meth:`precompute` runs, for
        :mod:`ddkit.estimate`; ``train_per_class``: what the dataset has. (0, 0) by default."""
        return 0, 0

    def prepare(self, sampler, job, *, progress: bool, phases: dict[str, float], clock) -> None:
        """Before calibration, inside the budget: what does not depend on the plan (a no-op by default)."""

    def on_plan(self, sampler, batches, ipc: int, kept: int, *, gen_dir: Path, progress: bool,
                phases: dict[str, float], clock) -> None:  # fmt: skip
        """Once the plan is known (``ipc`` sampled and ``kept`` kept per class; ``batches`` this rank's):
        what depends on it (a no-op by default)."""

    # -- the sampling step ---------------------------------------------------------------------------------
    def initial_latents(self, sampler, items) -> Any:
        """float [len(items), C, H, W] starting latents for ``items`` ((class, index), ...), or None: each
        image's own seeded noise (:func:`ddkit.generate.image_seed`)."""
        return None

    def guidance(self, sampler, items) -> dict[str, Any]:
        """Extra keyword arguments of :func:`ddkit.sampling.sample` for ``items`` (its step changes)."""
        return {}

    def calibration(self, sampler, batch_size: int) -> dict[str, Any]:
        """The keyword arguments that make a calibration batch of ``batch_size`` cost what a real one does
        (:meth:`initial_latents` and :meth:`guidance` stand-ins)."""
        return {}

    def plan_work(self, sampler, ipc: int, kept: int, *, gen_dir: Path) -> tuple[float, float]:
        """(seconds per planned image, seconds once) of the work :meth:`on_plan` does once the plan is known,
        measured at calibration for at most ``ipc`` images (``kept`` kept) per class, so the planner charges
        the first with each batch and takes the second off the time it plans; (0, 0) when there is none."""
        return 0.0, 0.0

    # -- bundle and record ---------------------------------------------------------------------------------
    def bundle_files(self, d, weights: Path) -> dict[str, tuple[Path, str]]:
        """``{config key: (file, name in the bundle)}`` the generator bundle must ship for this method to sample without real data
        (``d``: the :class:`ddkit.distilled.Distilled` set packaged; ``weights``: the backbone it ships).

        Raises:
            PackageError: a prepared file is missing.
        """
        return {}

    def bundle_problem(self, cfg: ExperimentConfig, values: dict[str, Any]) -> str | None:
        """Why a bundle config cannot sample this method (``values``: its bundle path keys), or None."""
        return None

    def saved_images(self, images):
        """uint8 [N, C, H, W] as image files hold them (a method's reference may resize on save)."""
        return images

    def record(self) -> dict[str, Any]:
        """What this method adds to the generation record (:mod:`ddkit.generate.record`)."""
        return {"prepared": dict(sorted(self.prepared.items()))}
