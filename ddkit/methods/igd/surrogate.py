"""IGD's surrogate trajectory, prepared once per dataset: the file guidance reads.

:func:`surrogate_trajectory` trains the surrogate classifier on the real train split, keeping its parameters
after every epoch (and at initialisation) as the reference's ``train_ckpts.sh`` keeps its expert trajectory,
selects the checkpoints guidance uses (:func:`~ddkit.methods.igd.influence.select_checkpoints`) and computes
each class's real-gradient memory at them (:func:`~ddkit.methods.igd.influence.real_gradients`). The result is
cached as ``RUN/igd-cache/igd-surrogate-<key[:16]>.pt`` (key: sha256 of every input, the train shards' digests
included), published first-writer-wins so every rank and every restart reads the same bytes; ``ddkit run``
makes it before the generation budget (:meth:`ddkit.methods.igd.method.IGD.precompute`). The generator bundle
ships it as ``generate.igd.surrogate``.

Reference settings (``train.py``'s trainer: AdamW lr 1e-3, weight decay 0.01, MultiStepLR ×0.2 at 2/3 and 5/6
of the epochs; ``train_ckpt.sh``: 50 epochs; ``sample_mp.sh``: 200 real images per class for the gradient
memory; ``test_ckpts_grad_sim.py``: 80 images per class to select checkpoints, threshold 0.7). Departures,
each a ``generate.igd`` key: the network (``ConvNet-3`` for 32 px, where the reference trains ConvNet-6 on 256
px latents-decoded ImageNet), batch size 64 (the reference's loader is not in its repository), no mixup.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any

from ddkit.budget_runner import PreparationGuard
from ddkit.config import ExperimentConfig
from ddkit.errors import ConfigError, DataError
from ddkit.io import publish_bytes_once

CACHE_VERSION = 2  # 2: the training streams the shards (ShardLoader) instead of permuting the split in memory
CACHE_DIR = "igd-cache"


def surrogate_inputs(cfg: ExperimentConfig, index: dict[str, Any]) -> dict[str, Any]:
    """Everything the trajectory depends on (JSON-safe); its sha256 is the cache key."""
    s = cfg.generate.igd
    train = {Path(f).name for f in index.get("shards", {}).get("train", [])}
    shas = {k: v for k, v in sorted(index.get("sha256", {}).items()) if not train or Path(k).name in train}
    return {
        "version": CACHE_VERSION,
        "data": {"dataset": index.get("dataset"), "classes": list(index["classes"]), "sha256": shas,
                 "resolution": int(index["resolution"]), "channels": int(index["channels"])},
        "surrogate": {"network": s.network, "width": s.width, "epochs": s.epochs, "batch_size": s.batch_size,
                      "lr": s.lr, "weight_decay": s.weight_decay, "seed": s.seed, "grad_ipc": s.grad_ipc,
                      "grad_batch": s.grad_batch, "select_ipc": s.select_ipc, "threshold": s.threshold},
    }  # fmt: skip


def build_net(network: str, width: int, channels: int, num_classes: int, resolution: int):
    """The surrogate: ``ConvNet-D`` of :mod:`ddkit.evaluate.networks` at ``width`` channels.

    Raises:
        ConfigError: a network other than ConvNet-D.
    """

    from ddkit.evaluate.networks import ConvNet

    m = re.fullmatch(r"ConvNet-(\d+)", network)
    if not m:
        raise ConfigError(f"generate.igd.network: the surrogate is a ConvNet-D (the reference's), got {network!r}")
    return ConvNet(channels, num_classes, resolution, depth=int(m.group(1)), width=width)


def train_trajectory(batches, cfg: ExperimentConfig, *, channels: int, resolution: int, num_classes: int,
                     per_epoch: int, check=None) -> list:  # fmt: skip
    """The surrogate's flat parameters at initialisation and after each epoch: ``epochs + 1`` float32 [P].
    AdamW with the reference's MultiStepLR (``train.py``: milestones at 2/3 and 5/6 of the epochs, γ 0.2).

    Args:
        batches: ``batches(epoch)`` yields (float [B, C, H, W] real train images in [-1, 1], int64 [B]),
            shuffled per epoch as the reference's DataLoader: a streaming :class:`ddkit.data.ShardLoader`,
            so memory is bounded by its shuffle buffer at any split size.
        channels, resolution: C and H = W of the images; num_classes: K.
        per_epoch: batches per epoch (for ``check``'s count of what is left).
        check: ``check(batches_done, batches_left)`` after every batch (a budget guard; it may raise).
    """
    import torch
    import torch.nn.functional as F

    from ddkit.methods.igd.influence import flatten

    s = cfg.generate.igd
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = build_net(s.network, s.width, channels, num_classes, resolution)
        opt = torch.optim.AdamW(net.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2 * s.epochs // 3, 5 * s.epochs // 6], gamma=0.2)
        traj, done = [flatten(net)], 0
        for epoch in range(s.epochs):
            net.train()
            for x, y in batches(epoch):
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if check is not None:
                    check(done, s.epochs * per_epoch - done)
            sched.step()
            traj.append(flatten(net))
    return traj


def _class_images(reader, c: int, n: int):
    """float [n, C, H, W] in [-1, 1]: the first ``n`` real images of class ``c`` in sample-key order (the
    reference's ``get_grads`` reads an unshuffled loader), one class in memory."""
    return reader.images(c, limit=n).float() / 127.5 - 1.0


def compute_surrogate(
    cfg: ExperimentConfig, index: dict[str, Any], progress: bool = False, check=None
) -> dict[str, Any]:
    """Train, select and compute the real-gradient memory (module docstring): the blob the cache holds
    (``check``: :func:`train_trajectory`'s budget guard). The train split is streamed for the training and
    read one class at a time for the gradients.

    Returns:
        ``{"key", "inputs", "classes", "shapes", "selected": [int], "checkpoints": float32 [T, P],
        "real": float32 [K, T, P], "seconds"}``.

    Raises:
        DataError: a class without train images.
    """
    import torch

    from ddkit.data import ClassReader, ShardLoader
    from ddkit.methods.igd.influence import real_gradients, select_checkpoints

    s, K = cfg.generate.igd, len(index["classes"])
    C, R = int(index["channels"]), int(index["resolution"])
    t0 = time.perf_counter()
    reader = ClassReader(cfg.data.shards, "train")
    for c in range(K):
        if reader.count(c) == 0:
            raise DataError(f"{cfg.data.shards}: class {index['classes'][c]!r} has no train images for IGD's surrogate")

    def batches(epoch: int):
        return ShardLoader(cfg.data.shards, "train", s.batch_size, seed=s.seed, epoch=epoch, drop_last=False)

    traj = train_trajectory(batches, cfg, channels=C, resolution=R, num_classes=K, per_epoch=len(batches(0)),
                            check=check)  # fmt: skip
    net = build_net(s.network, s.width, C, K, R).eval()
    if progress:
        print(f"IGD surrogate: {s.epochs} epochs in {time.perf_counter() - t0:.0f} s", flush=True)

    def class_grads(j: int):
        return torch.stack([real_gradients(net, [traj[j]], _class_images(reader, c, s.select_ipc), c,
                                           batch=s.select_ipc)[0] for c in range(K)])  # fmt: skip

    selected = select_checkpoints(class_grads, len(traj), s.threshold)
    ckpts = [traj[j] for j in selected]
    real = torch.stack([real_gradients(net, ckpts, _class_images(reader, c, s.grad_ipc), c, batch=s.grad_batch)
                        for c in range(K)])  # fmt: skip
    inputs = surrogate_inputs(cfg, index)
    return {
        "key": surrogate_key(inputs), "inputs": inputs, "classes": list(index["classes"]),
        "shapes": [[n, list(p)] for n, p in _shapes(net)], "selected": selected,
        "checkpoints": torch.stack(ckpts), "real": real, "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _shapes(net):
    from ddkit.methods.igd.influence import param_shapes

    return param_shapes(net)


def surrogate_key(inputs: dict[str, Any]) -> str:
    """sha256 hex of :func:`surrogate_inputs` (canonical JSON)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def surrogate_path(cfg: ExperimentConfig) -> tuple[Path, dict[str, Any]]:
    """(the cache file for this run's data and settings, the shard index)."""
    from ddkit.data import read_index

    index = read_index(cfg.data.shards)
    key = surrogate_key(surrogate_inputs(cfg, index))
    return Path(cfg.run_dir) / CACHE_DIR / f"igd-surrogate-{key[:16]}.pt", index


def load_or_make(cfg: ExperimentConfig, progress: bool = False, budget=None) -> tuple[dict[str, Any], Path]:
    """The surrogate blob and its file: ``generate.igd.surrogate`` (a bundle's), else the run's cache, else
    computed now and published first-writer-wins (every rank and restart then reads the winner's bytes).

    ``budget``: ``(clock, deadline)`` when it is made inside a generation's time budget: the training is
    projected from its batches so far and stops, before it spends the budget, when it would end past
    :data:`TRAINING_SHARE` of the time left.

    Raises:
        BudgetError: with ``budget``, the training would not leave time to sample (one line naming the file
            that spares it).
        ConfigError: ``generate.igd.surrogate`` missing or unreadable.
        DataError: a file made for other classes.
    """
    import torch

    if cfg.generate.igd.surrogate:
        path = Path(cfg.generate.igd.surrogate)
        try:
            blob = torch.load(path, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"generate.igd.surrogate: {path} unreadable ({type(e).__name__})") from None
        return _checked(blob, cfg, str(path)), path
    path, index = surrogate_path(cfg)
    if not path.is_file():
        buf = io.BytesIO()
        check = None if budget is None else PreparationGuard(
            *budget, share=TRAINING_SHARE, what=("the IGD surrogate's training", "batch"),
            advice=f"make {path} before the budget (ddkit run prepares it ahead of the generation budget) or "
            "ship it as generate.igd.surrogate",
        )
        torch.save(compute_surrogate(cfg, index, progress, check), buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        publish_bytes_once(path, buf.getvalue())
    return _checked(torch.load(path, map_location="cpu", weights_only=False), cfg, str(path)), path


TRAINING_SHARE = 0.5  # of the time left when the surrogate starts; the rest: its gradients, calibration, sampling


def _checked(blob: dict[str, Any], cfg: ExperimentConfig, where: str) -> dict[str, Any]:
    """``blob``, checked to be made for this run's classes.

    Raises:
        DataError: other classes (one line naming ``where``).
    """
    from ddkit.data import read_index

    if (Path(cfg.data.shards) / "dataset.json").is_file():
        classes = list(read_index(cfg.data.shards)["classes"])
        if list(blob.get("classes", [])) != classes:
            raise DataError(f"{where}: IGD surrogate made for classes {blob.get('classes')}, this run has {classes}")
    return blob
