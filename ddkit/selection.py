"""Over-generate-and-select generation (method ``<base>+select``, e.g. ``dit+select``).

``RUN/gen-<base>+select/`` holds ``pool/`` (an ordinary budgeted generation of ``ratio × IPC`` images per
class by the base method, :func:`ddkit.generate.generate`), then the chosen ``dataset.pt`` (IPC per class,
class-major), ``manifest.json`` (the pool's manifest plus the selection record), ``grid.png``,
``selection.png`` (per class: the chosen images, then the rejected ones) and ``DONE``.

Budget: the pool is generated under the method's own time limit minus what the selection costs (measured
on the encoder's calibration, charged as work). The encoder is trained on the real train split before the
clock matters, like D^3HR's class statistics: it is data, cached in ``RUN/select-encoder-<key>.pt``.
The selection rule itself is :mod:`ddkit.methods.select`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from ddkit.config import ExperimentConfig
from ddkit.errors import ConfigError
from ddkit.io import atomic_torch_save, atomic_write_json, is_done, mark_done, read_json

SUFFIX = "+select"


def split_method(method: str) -> tuple[str, bool]:
    """``"dit+select"`` -> ``("dit", True)``; ``"dit"`` -> ``("dit", False)``."""
    if method.endswith(SUFFIX):
        return method[: -len(SUFFIX)], True
    return method, False


def encoder_for(cfg: ExperimentConfig) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The selector's encoder for ``cfg.data.shards`` (trained once, cached in the run dir) and the real
    class means in its feature space.

    Returns:
        (encoder in eval mode, float [K, D] real class means, cache file path).

    Raises:
        DataError: unreadable shards.
    """
    from ddkit.data import load_tensors, read_index
    from ddkit.evaluate.networks import ConvNet
    from ddkit.methods.select import encode, train_encoder

    scfg = cfg.generate.select
    index = read_index(cfg.data.shards)
    k = len(index["classes"])
    key = hashlib.sha256(
        json.dumps(
            {"sha": index.get("sha256", {}), "epochs": scfg.encoder_epochs, "width": scfg.encoder_width,
             "seed": cfg.seed},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:12]
    path = Path(cfg.run_dir) / f"select-encoder-{key}.pt"
    x, y = load_tensors(cfg.data.shards, "train")
    if path.is_file():
        net = ConvNet(int(index["channels"]), k, int(index["resolution"]), width=scfg.encoder_width)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.eval()
    else:
        net = train_encoder(
            x, y, num_classes=k, epochs=scfg.encoder_epochs, seed=cfg.seed, width=scfg.encoder_width
        )
        atomic_torch_save(net.state_dict(), path)
    feats, _ = encode(net, x)
    means = torch.stack([feats[y == c].mean(0) for c in range(k)])
    return net, means, str(path)


def generate_selected(
    cfg: ExperimentConfig,
    method: str,
    *,
    time_limit: float | None = None,
    out_dir: str | Path | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    t0: float | None = None,
) -> Path:
    """Generate ``ratio × IPC`` candidates per class with the base method, then keep IPC per class.

    Args:
        cfg: the experiment; ``generate.select`` gives ratio, criterion and confidence threshold.
        method: ``<base>+select`` with base ``minimax``, ``dit`` or ``d3hr``.
        time_limit, rank, world_size, progress, t0: as :func:`ddkit.generate.generate` (the pool's generation
            is sharded like any other; whichever process merges the pool also selects).
        out_dir: default ``RUN/gen-<method>``.

    Returns:
        ``out_dir`` with ``dataset.pt`` (``{"images": uint8 [K·ipc, C, H, W], "labels": int64,
        "classes", "ipc"}``), ``manifest.json``, ``grid.png``, ``selection.png``, ``DONE`` once selected.

    Raises:
        ConfigError: not a ``+select`` method; BudgetError / WeightsError from the pool's generation.
    """
    from ddkit.generate import generate

    base, selected = split_method(method)
    if not selected:
        raise ConfigError(f"generate.method: {method!r} is not a '<base>{SUFFIX}' method")
    gcfg, scfg = cfg.generate, cfg.generate.select
    out = Path(out_dir) if out_dir is not None else Path(cfg.run_dir) / f"gen-{method}"
    if is_done(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    encoder_for(cfg)  # trained once per dataset and cached, before the pool's clock unless t0 says otherwise
    # The planner picks the ratio with steps and IPC (budget.plan's third axis): with the DSR rule the
    # configured ratio when it fits, with a quality table the best measured (steps, ipc, ratio).
    ratios = {1.0, float(scfg.ratio)}
    if gcfg.quality != "dsr":
        from ddkit.budget import load_quality_table

        ratios |= {float(k[2]) for k in load_quality_table(gcfg.quality) if len(k) > 2 and k[2] <= scfg.ratio}
    limit = float(time_limit if time_limit is not None else gcfg.time_limit)
    # Selection's own cost (encode + greedy choice) is charged as work: ~2 ms per candidate on a CPU.
    select_reserve = 1.0 + 0.002 * math.ceil(scfg.ratio * gcfg.ipc_max) * cfg.model.num_classes
    pool = out / "pool"
    generate(cfg, method=base, out_dir=pool, progress=progress, select_ratios=tuple(sorted(ratios)),
             time_limit=max(1e-3, limit - select_reserve), rank=rank, world_size=world_size, t0=t0)
    if (pool / "dataset.pt").exists():
        return select_pool(cfg, method, out)
    return out


def select_pool(cfg: ExperimentConfig, method: str, out_dir: str | Path | None = None) -> Path:
    """Select from ``out_dir/pool`` (merging its shards first if needed) and write the distilled set.

    Returns:
        ``out_dir`` (default ``RUN/gen-<method>``), as :func:`generate_selected`.

    Raises:
        DataError: the pool's shards are not all done (from :func:`ddkit.generate.merge`).
    """
    from ddkit.figures import write_grid, write_selection_grid
    from ddkit.generate import merge
    from ddkit.methods.select import encode, select_per_class

    scfg = cfg.generate.select
    out = Path(out_dir) if out_dir is not None else Path(cfg.run_dir) / f"gen-{method}"
    pool = out / "pool"
    if not (pool / "dataset.pt").exists():
        merge(pool)
    t0 = time.monotonic()
    encoder, real_means, encoder_path = encoder_for(cfg)
    encoder_s = time.monotonic() - t0
    t1 = time.monotonic()
    data = torch.load(pool / "dataset.pt", map_location="cpu", weights_only=True)
    the_plan = read_json(pool / "manifest.json")["plan"]
    # A pool cut short by the deadline keeps its planned IPC only while it has the candidates.
    ipc = max(1, min(int(the_plan.get("kept_ipc") or data["ipc"]), int(data["ipc"])))
    feats, logits = encode(encoder, data["images"])
    sel = select_per_class(
        feats, logits, data["labels"], ipc, criterion=scfg.criterion,
        min_confidence=scfg.min_confidence, real_means=real_means,
    )
    chosen = {
        "images": data["images"][sel.keep].contiguous(),
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
    mark_done(out, {"images": int(sel.keep.numel()), "ipc": ipc})
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
            "per_class_kept": [int(kept[labels == c].sum()) for c in range(int(labels.max()) + 1)],
        },
    }
