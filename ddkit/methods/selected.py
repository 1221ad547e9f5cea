"""Over-generate, then select (``<base>+select``): a wrapper around any registered method.

``RUN/gen-<base>+select/`` holds ``pool/`` (an ordinary budgeted generation of ``ratio × IPC`` images per
class by the base method), then the chosen ``dataset.pt`` (IPC per class, class-major), ``manifest.json``
(the pool's manifest plus the selection record), ``grid.png``, ``selection.png`` (per class: the chosen
images, then the rejected ones) and ``DONE``.

Budget: the pool is generated under the method's time limit minus what the selection costs (charged as work,
:meth:`Selected.reserve_seconds`, with the dataset's class count). The encoder is trained on the real train
split before sampling: it is data, cached in ``RUN/select-encoder-<key>.pt`` (``ddkit run`` makes it before
the budget, :meth:`Selected.precompute`). The selection rule itself is :mod:`ddkit.methods.select`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ddkit.budget import load_quality_table
from ddkit.config import ExperimentConfig
from ddkit.errors import DataError
from ddkit.figures import write_grid, write_selection_grid
from ddkit.generate.record import mark_done_stamped
from ddkit.io import atomic_torch_save, atomic_write_json, read_json
from ddkit.methods.base import GenerationMethod, Sampling
from ddkit.methods.registry import label
from ddkit.methods.select import encode, select_class, select_streamed, train_encoder
from ddkit.rows import gather_rows

POOL = "pool"
ENCODER_BATCH = 64  # Adam's batch for the selector's encoder
SECONDS_PER_CANDIDATE = 0.002  # before the encoder exists (a dry plan); once it does, the cost is timed
SELECTION_FIXED_SECONDS = 1.0  # loading the pool, writing dataset.pt, grid.png and selection.png


class Selected(GenerationMethod):
    """``<base>+select``: ``base`` samples ``ratio`` × IPC candidates per class; a real-data classifier's
    filter and herding / k-center keep IPC (:mod:`ddkit.methods.select`)."""

    def __init__(self, base: GenerationMethod, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self._base = base
        self.prepared_seconds: dict[str, float] = {}
        self.name = f"{base.name}+select"
        self.label = label(self.name)

    @property
    def base(self) -> GenerationMethod:
        return self._base

    @property
    def weights(self) -> str:
        return self._base.weights

    def checkpoint(self) -> str:
        return self._base.checkpoint()

    def sampling(self, gcfg, num_train_timesteps: int) -> Sampling:
        return self._base.sampling(gcfg, num_train_timesteps)

    def ratios(self) -> tuple[float, ...]:
        """1, ``generate.select.ratio`` and, with a quality table, every measured ratio up to it: the planner
        picks the ratio with steps and IPC (budget.plan's third axis)."""
        gcfg, scfg = self.cfg.generate, self.cfg.generate.select
        ratios = {1.0, float(scfg.ratio)}
        if gcfg.quality != "dsr":

            ratios |= {float(k[2]) for k in load_quality_table(gcfg.quality) if len(k) > 2 and k[2] <= scfg.ratio}
        return tuple(sorted(ratios))

    def sample_dir(self, gen_dir: Path) -> Path:
        return Path(gen_dir) / POOL

    def reserve_seconds(self) -> float:
        """Selection's own cost, charged as work: seconds per candidate (measured on this machine by
        :meth:`before_sampling`, else :data:`SECONDS_PER_CANDIDATE`) × ``ratio · ipc_max`` candidates of each
        of the dataset's classes (the backbone may have many more, e.g. DiT-XL/2's 1,000 for a 10-class
        subset), plus :data:`SELECTION_FIXED_SECONDS`."""
        gcfg = self.cfg.generate
        per = self.prepared_seconds.get("select_per_candidate_s", SECONDS_PER_CANDIDATE)
        return SELECTION_FIXED_SECONDS + per * math.ceil(gcfg.select.ratio * gcfg.ipc_max) * _num_classes(self.cfg)

    def precompute(self, progress: bool) -> None:
        self._base.precompute(progress)
        encoder_for(self.cfg)

    def precompute_work(self, train_per_class: int) -> tuple[int, int]:
        return self._base.precompute_work(train_per_class)

    def before_sampling(self, progress: bool) -> None:
        """The encoder (trained once per dataset and cached), then one class's selection timed on it."""
        from ddkit.data import read_index

        encoder, means, _ = encoder_for(self.cfg)
        gcfg, index = self.cfg.generate, read_index(self.cfg.data.shards)
        shape = (int(index["channels"]), int(index["resolution"]), int(index["resolution"]))
        self.prepared_seconds["select_per_candidate_s"] = selection_seconds_per_candidate(
            encoder, means, shape, math.ceil(gcfg.select.ratio * gcfg.ipc_max), gcfg.ipc_max, gcfg.select
        )

    def finish(self, gen_dir: Path) -> None:
        select_pool(self.cfg, self.name, Path(gen_dir))

    def record(self) -> dict[str, Any]:
        s = self.cfg.generate.select
        return {**self._base.record(), "select": {"criterion": s.criterion, "min_confidence": s.min_confidence}}

    def bundle_files(self, d, weights: Path):
        return self._base.bundle_files(d, weights)

    def bundle_problem(self, cfg, values):
        return self._base.bundle_problem(cfg, values)

    def saved_images(self, images):
        return self._base.saved_images(images)

    # The base samples the pool: its hooks run through sampler.method = base (ddkit.generate.run).


def _num_classes(cfg: ExperimentConfig) -> int:
    """The dataset's class count (its shard index), else the config's ``model.num_classes``."""
    from ddkit.data import read_index

    try:
        return len(read_index(cfg.data.shards)["classes"])
    except (DataError, OSError):  # no shards yet (a dry plan): the backbone's count bounds it
        return int(cfg.model.num_classes)


def encoder_for(cfg: ExperimentConfig) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The selector's encoder for ``cfg.data.shards`` (trained once, cached in the run dir) and the real
    class means in its feature space.

    Returns:
        (encoder in eval mode, float [K, D] real class means, cache file path).

    Raises:
        DataError: unreadable shards.
    """
    from ddkit.data import ClassReader, ShardLoader, read_index
    from ddkit.evaluate.networks import ConvNet

    scfg = cfg.generate.select
    index = read_index(cfg.data.shards)
    k = len(index["classes"])
    key = hashlib.sha256(
        json.dumps(
            {"sha": index.get("sha256", {}), "epochs": scfg.encoder_epochs, "width": scfg.encoder_width,
             "seed": cfg.seed, "batch": ENCODER_BATCH, "cache": 3},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    path = Path(cfg.run_dir) / f"select-encoder-{key}.pt"
    net = ConvNet(int(index["channels"]), k, int(index["resolution"]), width=scfg.encoder_width)
    if path.is_file():  # the weights and the real class means: the train split is read once per run
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(blob["state"])
        return net.eval(), blob["means"], str(path)
    def batches(epoch: int):  # streamed: memory bounded by the loader's shuffle buffer, not the split
        return ShardLoader(cfg.data.shards, "train", ENCODER_BATCH, seed=cfg.seed, epoch=epoch, drop_last=False)

    net = train_encoder(batches, channels=int(index["channels"]), resolution=int(index["resolution"]), num_classes=k,
                        epochs=scfg.encoder_epochs, seed=cfg.seed, width=scfg.encoder_width)  # fmt: skip
    means = real_class_means(net, ClassReader(cfg.data.shards, "train"))
    atomic_torch_save({"state": net.state_dict(), "means": means}, path)
    return net, means, str(path)


def selection_seconds_per_candidate(encoder: torch.nn.Module, means: torch.Tensor, shape: tuple[int, int, int],
                                    n: int, ipc: int, scfg, clock=time.perf_counter) -> float:  # fmt: skip
    """Seconds per candidate of :func:`select_pool`'s work, timed on one class: encode ``n`` candidates of
    ``shape`` (C, H, W; capped at one encode batch of 500, encoding is linear in them) and choose
    ``min(ipc, n)`` of them by ``scfg.criterion`` (:class:`ddkit.config.SelectConfig`) towards
    ``means[0]`` (float [K, D]). Seeded noise images: the cost does not depend on what they show."""
    n = max(1, min(n, 500))
    x = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    t0 = clock()
    feats, logits = encode(encoder, x)
    conf = torch.softmax(logits.float(), 1)[:, 0]
    select_class(feats, conf, min(ipc, n), criterion=scfg.criterion, min_confidence=scfg.min_confidence,
                 target=means[0])  # fmt: skip
    return (clock() - t0) / n


def real_class_means(net: torch.nn.Module, reader) -> torch.Tensor:
    """float32 [K, D]: each class's mean encoder feature over its real train images, read and encoded one
    class at a time (``reader``: a :class:`ddkit.data.ClassReader`), so memory holds one class's images."""

    return torch.stack([encode(net, images)[0].mean(0) for _, images in reader.classes()])


def select_pool(cfg: ExperimentConfig, method: str, out: Path) -> Path:
    """Select from the merged pool ``out/pool`` and write the distilled set into ``out`` (module docstring).

    Returns:
        ``out``.

    Raises:
        DataError: the pool is not merged.
    """

    scfg = cfg.generate.select
    pool = out / POOL
    if not (pool / "dataset.pt").exists():
        raise DataError(f"{pool}: the pool is not merged yet (ddkit generate --merge)")
    t0 = time.monotonic()
    encoder, real_means, encoder_path = encoder_for(cfg)
    encoder_s = time.monotonic() - t0
    t1 = time.monotonic()
    # mmap: the pool (ratio x the set) stays on disk; select_streamed reads it one encode batch at a time
    data = torch.load(pool / "dataset.pt", map_location="cpu", weights_only=True, mmap=True)
    the_plan = read_json(pool / "manifest.json")["plan"]
    # A pool cut short by the deadline keeps its planned IPC only while it has the candidates.
    ipc = max(1, min(int(the_plan.get("kept_ipc") or data["ipc"]), int(data["ipc"])))
    sel = select_streamed(
        encoder, data["images"], data["labels"], ipc, criterion=scfg.criterion,
        min_confidence=scfg.min_confidence, real_means=real_means,
    )
    chosen = {
        "images": gather_rows([data["images"]], sel.keep, out),  # file-backed: the set adds no anonymous memory
        "labels": data["labels"][sel.keep].contiguous(),
        "classes": data["classes"],
        "ipc": ipc,
    }
    atomic_torch_save(chosen, out / "dataset.pt")
    write_grid(out / "grid.png", chosen["images"], chosen["labels"], list(data["classes"]), ipc)
    write_selection_grid(out / "selection.png", data["images"], data["labels"], sel.keep, ipc)
    manifest = _manifest(read_json(pool / "manifest.json"), method, sel, data, ipc, encoder_path,
                         encoder_s, time.monotonic() - t1, scfg, the_plan.get("ratio", 1.0))
    atomic_write_json(out / "manifest.json", manifest)
    mark_done_stamped(out, {"images": int(sel.keep.numel()), "ipc": ipc}, first=manifest.get("record"))
    return out


def _manifest(pool: dict[str, Any], method, sel, data, ipc, encoder_path, encoder_s, select_s, scfg, ratio) -> dict:
    labels = data["labels"]
    conf = sel.confidence
    kept = torch.zeros_like(conf, dtype=torch.bool)
    kept[sel.keep] = True
    return {
        **pool,
        "method": method,
        "ipc": ipc,
        "images": int(sel.keep.numel()),
        "selection": {
            "criterion": scfg.criterion,
            "min_confidence": scfg.min_confidence,
            "source": "CaO2-style classifier filter + herding/k-center (ddkit.methods.select)",
            "ratio": ratio,
            "pool_ipc": int(data["ipc"]),
            "encoder": encoder_path,
            "encoder_seconds": round(encoder_s, 2),
            "select_seconds": round(select_s, 3),
            "pool_judge_accuracy": float((conf > 0.5).float().mean()),
            "kept_mean_confidence": float(conf[kept].mean()) if kept.any() else None,
            "rejected_mean_confidence": float(conf[~kept].mean()) if (~kept).any() else None,
            "per_class_kept": torch.bincount(labels[sel.keep], minlength=int(labels.max()) + 1).tolist(),
        },
    }
