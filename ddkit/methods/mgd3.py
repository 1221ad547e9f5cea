"""MGD^3 mode guidance as a generation method (``mgd3``; Chan-Santiago et al., ICML 2025).

Prepared once the plan is known: the k-means modes of each class's real data in the backbone's space, one per
kept image (:func:`class_modes_for`), published first-writer-wins to ``gen_dir/modes.pt`` so every rank and
restart guides towards the same modes. Each guided DDPM step then pulls image i of class c towards mode
``i mod k`` (:func:`ddkit.methods.modes.guide`). The formulas are :mod:`ddkit.methods.modes`.
"""

from __future__ import annotations

import io
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError, DataError, PackageError
from ddkit.io import publish_bytes_once, sha256_file
from ddkit.methods.base import GenerationMethod, Sampling
from ddkit.methods.d3hr.statistics import backbone_inputs

MODES_FILE = "modes.pt"


class MGD3(GenerationMethod):
    """Mode guidance on the pretrained DiT (the reference) or the minimax checkpoint (``generate.modes.weights``)."""

    name = "mgd3"
    label = "MGD^3 mode guidance"
    plan_work_hint = "generate.modes.file (modes fitted ahead: an earlier run's gen-mgd3/modes.pt)"

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

            self.prepared["modes"] = sha256_file(src)
        phases["mgd3_modes"] = clock() - mark

    def plan_work(self, sampler, ipc: int, kept: int, *, gen_dir: Path) -> tuple[float, float]:
        """Mode fitting, once (:func:`modes_seconds`), unless the modes come from a file."""
        if self.cfg.generate.modes.file or (Path(gen_dir) / MODES_FILE).is_file():
            return 0.0, 0.0
        return 0.0, modes_seconds(sampler, kept)

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

    import torch

    from ddkit.methods.modes import modes_of_class

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
    fitted = [modes_of_class(xc, k, c, seed=gcfg.seed) for c, xc in _real_inputs(sampler, gcfg.modes.max_images_per_class)]
    blob = {"modes": torch.stack(fitted), "classes": list(sampler.classes), "k": k}
    if dest is None:
        return blob["modes"]
    buf = io.BytesIO()
    torch.save(blob, buf)
    blob = torch.load(io.BytesIO(publish_bytes_once(dest, buf.getvalue())), map_location="cpu", weights_only=True)
    return _checked_modes(blob, sampler.classes, k, str(dest))


def modes_seconds(sampler, k: int) -> float:
    """Seconds :func:`class_modes_for` will take to fit ``k`` modes per class from the train split: the
    per-class index (built once) and the first class, both timed once, plus the second class's time for
    each further class. The first class pays one-off warm-ups: multiplied by the 100 classes of
    ``tests/test_scale_budget.py``, they put a first-class-only estimate past the 60 s budget for a fit that
    takes seconds.
    """

    import torch

    from ddkit.data import ClassReader
    from ddkit.methods.modes import modes_of_class

    cfg = sampler.config
    g = torch.Generator(device=sampler.device).manual_seed(cfg.generate.seed)
    t0 = time.perf_counter()
    reader = ClassReader(cfg.data.shards, "train")

    def fit(c: int) -> float:
        mark = time.perf_counter()
        images = reader.images(c, cfg.generate.modes.max_images_per_class)
        with torch.no_grad():
            z = [backbone_inputs(images[b : b + ENCODE_BATCH], sampler.model, sampler.vae, cfg, sampler.device, g)
                 for b in range(0, len(images), ENCODE_BATCH)]  # fmt: skip
        if z:
            modes_of_class(torch.cat(z).cpu(), min(k, len(images)), c, seed=cfg.generate.seed)
        return time.perf_counter() - mark

    fit(0)
    first = time.perf_counter() - t0
    K = len(sampler.classes)
    return first + (fit(1) * (K - 1) if K > 1 else 0.0)


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


ENCODE_BATCH = 64  # images per backbone_inputs call; batches span class boundaries (the VAE noise order)


def _real_inputs(sampler, per_class: int | None) -> Iterator[tuple[int, Any]]:
    """``(c, float32 [n_c, C, H, W])``: class c's real train images in the backbone's space on the CPU, class
    by class, so at most one class's images and two classes' inputs are held (:class:`ddkit.data.ClassReader`).

    Each class contributes its first ``per_class`` images (all when None) in sample-key order. They are
    encoded in batches of :data:`ENCODE_BATCH` over the class-major stream (a batch may hold the end of one
    class and the start of the next), with one generator for the VAE's posterior sample: the batches, and
    so the draws, that slicing the whole class-major split into batches would give. With a cap that is what
    the in-memory version did (byte-identical modes); without one it took the draws in the shards' mixed key
    order, which no per-class stream can reproduce, so an uncapped latent backbone's modes changed once
    (pixel backbones draw nothing and are unchanged).
    """
    import torch

    from ddkit.data import ClassReader

    cfg = sampler.config
    reader = ClassReader(cfg.data.shards, "train")
    g = torch.Generator(device=sampler.device).manual_seed(cfg.generate.seed)
    pending: list[tuple[int, Any]] = []  # (class, uint8 rows) not encoded yet, < ENCODE_BATCH rows in all
    done: dict[int, list] = {}  # class -> encoded row blocks
    left: dict[int, int] = {}  # class -> rows still to encode

    def encode() -> None:
        x = torch.cat([rows for _, rows in pending])
        with torch.no_grad():
            z = backbone_inputs(x, sampler.model, sampler.vae, cfg, sampler.device, g).cpu()
        at = 0
        for c, rows in pending:
            done[c].append(z[at : at + len(rows)])
            left[c] -= len(rows)
            at += len(rows)
        pending.clear()

    for c in range(len(sampler.classes)):
        images = reader.images(c, per_class)
        done[c], left[c] = [], len(images)
        at = 0
        while at < len(images):
            room = ENCODE_BATCH - sum(len(rows) for _, rows in pending)
            pending.append((c, images[at : at + room]))
            at += room
            if sum(len(rows) for _, rows in pending) == ENCODE_BATCH:
                encode()
        yield from _finished(done, left)
    if pending:
        encode()
    yield from _finished(done, left)


def _finished(done: dict, left: dict) -> Iterator[tuple[int, Any]]:
    """Pop and yield, in class order, the classes whose rows are all encoded (an empty class as [0, ...])."""
    import torch

    for c in sorted(done):
        if left[c] > 0:
            return
        blocks = done.pop(c)
        del left[c]
        yield c, torch.cat(blocks) if blocks else torch.zeros(0)
