"""IGD as a generation method (``igd``): the interface's hooks over :mod:`ddkit.methods.igd`.

* precompute (``ddkit run``, before the budget) and prepare: the surrogate trajectory and each class's
  real-gradient memory (:mod:`ddkit.methods.igd.surrogate`), cached in ``RUN/igd-cache`` and published
  first-writer-wins, or read from ``generate.igd.surrogate`` (the bundle's);
* on the plan: the deviation memory (:func:`class_memory`), published to ``gen_dir/igd-memory.pt``;
* sampling: DDPM steps changed by :class:`ddkit.methods.igd.guide.InfluenceGuide`;
* bundle: the surrogate file (the memory is remade from the shipped DiT, it needs no real data).

Departure from the reference's memory, and why: the reference samples a class's images one after another and
image i deviates from the (at most 64) images generated before it. A ddkit set must not depend on how the work
is cut up (ranks, arrays, requeues: the invariance promise), and images of one class are sampled concurrently
by several ranks, so "the images generated before it" cannot be read at sampling time. Image i of a class
deviates instead from the unguided samples of the same seeds j < i (at most ``memory_size``): the class's
earlier images as plain DiT draws them, sampled once per generation with ``generate.steps_max`` steps, before
IGD's guidance moves them. Image 0 has no memory, as in the reference.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

from ddkit.errors import ConfigError, DataError, PackageError
from ddkit.generate import record
from ddkit.generate.layout import image_seed
from ddkit.io import publish_bytes_once, sha256_file
from ddkit.methods.base import GenerationMethod, Sampling
from ddkit.methods.igd.surrogate import CACHE_DIR, build_net, load_or_make

MEMORY_FILE = "igd-memory.pt"
SURROGATE_NAME = "igd-surrogate.pt"


class IGD(GenerationMethod):
    """Chen et al., ICLR 2025 (reference mchen725/DD_IGD ``sample_mp.sh``) on the pretrained DiT or the minimax
    checkpoint (``generate.igd.weights``)."""

    name = "igd"
    label = "IGD influence guidance"
    plan_work_hint = "the deviation memory igd-memory.pt of an earlier attempt in the generation directory"
    fixed_layout = True  # one memory of the planned IPC per class: no extension batches

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.blob: dict[str, Any] | None = None
        self.net = None
        self.memory = None  # float32 [K, n, C, H, W] once on_plan ran

    @property
    def weights(self) -> str:
        return self.cfg.generate.igd.weights

    def sampling(self, gcfg, num_train_timesteps: int) -> Sampling:
        if gcfg.sampler != "ddpm":
            raise ConfigError(f"generate.sampler: igd guides DDPM steps (its reference's sampler), got {gcfg.sampler!r}")
        return super().sampling(gcfg, num_train_timesteps)

    def precompute(self, progress: bool) -> None:
        load_or_make(self.cfg, progress)

    def precompute_work(self, train_per_class: int) -> tuple[int, int]:
        """(0, 0): the surrogate's training is no backbone work; its seconds are timed (the cache file's
        ``seconds``, the ``igd_surrogate`` phase)."""
        return 0, 0

    def prepare(self, sampler, job, *, progress, phases, clock) -> None:
        mark = clock()
        blob, path = load_or_make(self.cfg, progress, budget=(clock, job.t0 + sampler.config.generate.time_limit))
        s, inputs = self.cfg.generate.igd, blob["inputs"]["data"]
        self.net = build_net(s.network, s.width, inputs["channels"], len(blob["classes"]), inputs["resolution"])
        self.net = self.net.to(sampler.device).eval()
        self.blob = {"checkpoints": blob["checkpoints"].to(sampler.device), "real": blob["real"].to(sampler.device),
                     "resolution": inputs["resolution"], "channels": inputs["channels"]}  # fmt: skip
        self.prepared["igd_surrogate"] = sha256_file(path)
        phases["igd_surrogate"] = clock() - mark
        phases["igd_surrogate_made_s"] = float(blob.get("seconds", 0.0))

    def plan_work(self, sampler, ipc: int, kept: int, *, gen_dir: Path) -> tuple[float, float]:
        """The deviation memory, once (:func:`class_memory`): K·(ipc − 1) unguided images at ``steps_max``
        steps, priced from one timed unguided step of a full batch; nothing when the memory file exists."""
        n, K = max(0, ipc - 1), len(sampler.classes)
        if n == 0 or (Path(gen_dir) / MEMORY_FILE).is_file():
            return 0.0, 0.0
        return 0.0, math.ceil(K * n / sampler.settings.batch_size) * sampler.settings.steps_max * \
            unguided_step_seconds(sampler, min(sampler.settings.batch_size, K * n))

    def on_plan(self, sampler, batches, ipc, kept, *, gen_dir, progress, phases, clock) -> None:
        mark = clock()
        self.memory = class_memory(sampler, ipc, gen_dir)
        self.prepared["igd_memory"] = sha256_file(Path(gen_dir) / MEMORY_FILE)
        phases["igd_memory"] = clock() - mark

    def _guide(self, sampler, classes, memories, window=None):
        from ddkit.methods.igd.guide import InfluenceGuide
        from ddkit.methods.igd.influence import guided_window

        if self.blob is None:
            raise DataError("igd: no surrogate loaded before sampling (prepare was not run)")
        s = self.cfg.generate.igd
        window = window or guided_window(s.low, s.high, s.reference_steps, sampler.num_train_timesteps)
        return {"step_guide": InfluenceGuide(
            self.net, list(self.blob["checkpoints"]), self.blob["real"], classes, memories, window, s.scale,
            s.dev_scale, lambda x0: to_pixels(sampler, x0, self.blob["channels"], self.blob["resolution"]),
        )}  # fmt: skip

    def guidance(self, sampler, items) -> dict[str, Any]:
        if self.memory is None:
            raise DataError("igd: no deviation memory before sampling (on_plan was not run)")
        M = self.cfg.generate.igd.memory_size
        return self._guide(sampler, [c for c, _ in items], [self.memory[c, max(0, i - M) : i] for c, i in items])

    def calibration(self, sampler, batch_size: int) -> dict[str, Any]:
        """Every calibration step guided (window: all timesteps), with a full memory: the few steps calibration
        times may all lie outside the guided window, and a guided step costs several plain ones, so a step
        is priced as a guided one; the plan errs towards fewer steps, never over the budget."""
        import torch

        K, C, S = len(sampler.classes), sampler.model.in_channels, sampler.model.input_size
        n = min(self.cfg.generate.igd.memory_size, max(0, sampler.settings.ipc_max - 1))
        mem = torch.zeros(n, C, S, S)
        return self._guide(sampler, [k % K for k in range(batch_size)], [mem] * batch_size,
                           window=(0, sampler.num_train_timesteps))

    def bundle_files(self, d, weights: Path) -> dict[str, tuple[Path, str]]:
        return {"generate.igd.surrogate": (find_surrogate(d, self.cfg), SURROGATE_NAME)}

    def bundle_problem(self, cfg, values) -> str | None:
        if not values.get("generate.igd.surrogate"):
            return "IGD without generate.igd.surrogate: the bundle has no real data to train the surrogate on"
        return None


def to_pixels(sampler, x0, channels: int, resolution: int):
    """x̂_0 float [B, C, H, W] in the backbone's space -> the surrogate's input float [B, channels, r, r] in
    [-1, 1], differentiable: a latent backbone's VAE decoder (the reference decodes its latents), or a clamp
    to the data range for a pixel backbone (:mod:`ddkit.methods.igd.guide`); resized when the sizes differ."""
    import torch.nn.functional as F

    if sampler.vae is not None:
        from ddkit.models.vae import LATENT_SCALE

        x = sampler.vae.decode(x0.to(sampler.vae.dtype) / LATENT_SCALE).sample.float()
        if channels == 1 and x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
    else:
        x = x0.clamp(-1, 1)
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x


def unguided_step_seconds(sampler, batch: int) -> float:
    """Seconds of one plain (unguided) sampling step of ``batch`` images on this machine: a one-step chain
    with fixed seeds, timed once (the memory's batches are plain DiT sampling)."""
    import torch

    labels = torch.tensor([sampler.backbone_labels[k % len(sampler.classes)] for k in range(batch)],
                          device=sampler.device)  # fmt: skip
    gens = [torch.Generator(device=sampler.device).manual_seed(k) for k in range(batch)]
    start = time.perf_counter()
    sampler._sample(labels, 1, generators=gens)
    return time.perf_counter() - start


def class_memory(sampler, ipc: int, gen_dir: Path):
    """The deviation memory: float32 [K, ipc − 1, C, H, W], the unguided samples of seeds (c, j), j < ipc − 1
    (module docstring), in the backbone's space on the CPU.

    Read from ``gen_dir/igd-memory.pt`` when a rank or an earlier attempt made it; else sampled with the plain
    chain at ``generate.steps_max`` steps and published there, first writer wins.

    Raises:
        DataError: a memory file for other classes or another IPC.
    """

    import torch

    dest, K, n = Path(gen_dir) / MEMORY_FILE, len(sampler.classes), max(0, ipc - 1)
    steps = int(sampler.settings.steps_max)
    if not dest.is_file():
        C, S = sampler.model.in_channels, sampler.model.input_size
        items = [(c, j) for j in range(n) for c in range(K)]  # index-major, as the set's layout
        mem = torch.zeros(K, n, C, S, S)
        B = sampler.settings.batch_size
        for s in range(0, len(items), B):
            part = items[s : s + B]
            labels = torch.tensor([sampler.backbone_labels[c] for c, _ in part], device=sampler.device)
            gens = [torch.Generator(device=sampler.device).manual_seed(image_seed(sampler.settings.seed, c, j))
                    for c, j in part]  # fmt: skip
            x = sampler._sample(labels, steps, generators=gens).float().cpu()
            for (c, j), xi in zip(part, x, strict=True):
                mem[c, j] = xi
        buf = io.BytesIO()
        torch.save({"memory": mem, "classes": list(sampler.classes), "ipc": ipc, "steps": steps}, buf)
        publish_bytes_once(dest, buf.getvalue())
    blob = torch.load(dest, map_location="cpu", weights_only=True)
    if list(blob["classes"]) != list(sampler.classes) or int(blob["ipc"]) != ipc:
        raise DataError(f"{dest}: IGD memory for {len(blob['classes'])} classes at IPC {blob['ipc']}; this "
                        f"generation samples {ipc} for {K}")
    return blob["memory"].float()


def find_surrogate(d, cfg) -> Path:
    """The surrogate file the set ``d`` (:class:`ddkit.distilled.Distilled`) was guided with: the run's
    ``igd-cache`` file (beside the generation, or in ``run_dir``) whose sha256 is the generation record's
    ``prepared.igd_surrogate``, or
    ``generate.igd.surrogate`` when set.

    Raises:
        PackageError: none matches (generate with IGD first).
    """

    rec = record.read(d.gen_dir) or record.read(Path(d.gen_dir) / "pool") or {}
    want = (rec.get("prepared") or {}).get("igd_surrogate")
    dirs = dict.fromkeys([Path(d.gen_dir).parent / CACHE_DIR, Path(cfg.run_dir) / CACHE_DIR])
    cands = [p for c in dirs for p in sorted(c.glob("igd-surrogate-*.pt"))]
    if cfg.generate.igd.surrogate:
        cands.insert(0, Path(cfg.generate.igd.surrogate))
    for p in cands:
        if p.is_file() and (want is None or sha256_file(p) == want):
            return p
    raise PackageError(f"{d.gen_dir}: no IGD surrogate file with the record's digest {want} in "
                       f"{', '.join(map(str, dirs))} (generate with IGD first)")
