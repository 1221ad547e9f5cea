"""MGD^3 mode guidance as a generation method (``mgd3``; Chan-Santiago et al., ICML 2025).

Prepared once the plan is known: the k-means modes of each class's real data in the backbone's space, one per
kept image (:func:`class_modes_for`), published first-writer-wins to ``gen_dir/modes.pt`` so every rank and
restart guides towards the same modes. Each guided DDPM step then pulls image i of class c towards mode
``i mod k`` (:func:`ddkit.methods.modes.guide`). The formulas are :mod:`ddkit.methods.modes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError, DataError, PackageError
from ddkit.methods.base import GenerationMethod, Sampling

MODES_FILE = "modes.pt"


class MGD3(GenerationMethod):
    """Mode guidance on the pretrained DiT (the reference) or the minimax checkpoint (``generate.modes.weights``)."""

    name = "mgd3"
    label = "MGD^3 mode guidance"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.modes = None  # float32 [K, k, C, H, W] once on_plan ran

    @property
    def weights(self) -> str:
        return self.cfg.generate.modes.weights

    def sampling(self, gcfg, num_train_timesteps: int) -> Sampling:
        if gcfg.sampler != "ddpm":
            raise ConfigError(f"generate.sampler: mgd3 guides DDPM steps (its reference's sampler), got {gcfg.sampler!r}")
        return super().sampling(gcfg, num_train_timesteps)

    def on_plan(self, sampler, batches, ipc, kept, *, gen_dir, progress, phases, clock) -> None:
        mark = clock()
        self.modes = class_modes_for(sampler, kept or ipc, gen_dir)
        src = Path(self.cfg.generate.modes.file or Path(gen_dir) / MODES_FILE)
        if src.is_file():
            from ddkit.io import sha256_file

            self.prepared["modes"] = sha256_file(src)
        phases["mgd3_modes"] = clock() - mark

    def _pull(self, sampler, modes) -> dict[str, Any]:
        m = self.cfg.generate.modes
        # x̂_0 is clipped to the data range in the pull for pixel backbones only (ADM's clip_denoised);
        # latents stay unclipped as in the latent-space reference.
        from ddkit.methods.modes import mode_step_guide

        clip = 1.0 if sampler.vae is None else None
        return {"step_guide": mode_step_guide(modes, float(m.scale), float(m.stop), clip)}

    def guidance(self, sampler, items) -> dict[str, Any]:
        import torch

        from ddkit.methods.modes import mode_of

        if self.modes is None:
            raise DataError("mgd3: no class modes loaded before sampling (on_plan was not run)")
        k = self.modes.shape[1]
        m = torch.stack([self.modes[c, mode_of(i, k)] for c, i in items]).to(sampler.device)
        return self._pull(sampler, m)

    def calibration(self, sampler, batch_size: int) -> dict[str, Any]:
        import torch

        C, S = sampler.model.in_channels, sampler.model.input_size
        return self._pull(sampler, torch.zeros(batch_size, C, S, S, device=sampler.device))

    def bundle_files(self, d, weights: Path) -> dict[str, tuple[Path, str]]:
        gen_dir = d.gen_dir
        modes = next((p for p in (gen_dir / MODES_FILE, gen_dir / "pool" / MODES_FILE) if p.is_file()), None)
        if modes is None:
            raise PackageError(f"{gen_dir}: no {MODES_FILE}; the MGD^3 bundle ships the run's class modes")
        return {"generate.modes.file": (modes, MODES_FILE)}

    def bundle_problem(self, cfg, values) -> str | None:
        if not values.get("generate.modes.file"):
            return "MGD^3 without generate.modes.file: the bundle has no real data to cluster"
        return None


def class_modes_for(sampler, k: int, gen_dir: Path | None):
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

    from ddkit.io import publish_bytes_once
    from ddkit.methods.modes import class_modes

    gcfg = sampler.config.generate
    if gcfg.modes.file:
        try:
            blob = torch.load(gcfg.modes.file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:
            raise ConfigError(f"generate.modes.file: {gcfg.modes.file} unreadable ({type(e).__name__})") from None
        return _checked_modes(blob, sampler.classes, k, f"generate.modes.file: {gcfg.modes.file}")
    dest = Path(gen_dir) / MODES_FILE if gen_dir is not None else None
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
    modes = blob["modes"]
    if list(blob["classes"]) != list(classes) or modes.shape[1] != k:
        raise DataError(f"{where} holds {modes.shape[1]} modes for {len(blob['classes'])} classes; this generation "
                        f"keeps {k} images for {len(classes)}")
    return modes.float()


def _real_inputs(sampler, per_class: int | None):
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
