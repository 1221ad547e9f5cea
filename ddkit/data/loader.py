"""Streaming loader over a shard set: WebDataset pipeline with explicit rank and worker splitting.

Splitting is explicit and deterministic, never left to environment variables:

1. the shard list of the split is permuted with a generator seeded by ``(seed, epoch)`` (identical on every
   rank, so ranks agree on the assignment);
2. rank ``r`` of ``W`` takes shards ``r, r+W, r+2W, ...`` of that permutation (node splitting);
3. DataLoader worker ``k`` of ``K`` takes every ``K``-th of the rank's shards (worker splitting);
4. each worker shuffles samples in a buffer with a generator seeded by ``(seed, epoch, rank, worker)``.

The epoch length is fixed in advance: every rank yields ``len(loader)`` batches built from
``N // world_size`` samples (N = samples of the split), split evenly over its workers. When shard sizes are
equal and divide evenly (the default ``shard_size`` 1000 and MNIST-5k's 4,000 train images), every sample is
seen exactly once per epoch across all ranks and workers; otherwise a worker that runs short cycles through
its shards again, so all ranks still take the same number of steps (needed by DDP).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ddkit.data.shards import counted_samples, decode_moments, decode_sample, read_index, shard_paths
from ddkit.errors import DataError

DEFAULT_SHUFFLE_BUFFER = 1000  # samples held per worker; ~one default shard


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of non-negative ints (numpy ``SeedSequence``: well mixed, stable)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def assign_shards(
    urls: list[str],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    shuffle: bool,
) -> list[str]:
    """The shards one (rank, worker) reads in an epoch (steps 1-3 of the module docstring)."""
    order = list(urls)
    if shuffle:
        perm = np.random.default_rng(derive_seed(seed, epoch)).permutation(len(order))
        order = [order[i] for i in perm]
    mine = order[rank::world_size]
    return mine[worker::num_workers]


class _WorkerSamples:
    """Pipeline source: raw samples of this rank/worker's shards, pass after pass.

    Each pass reads the worker's shards (reshuffled per pass) through ``webdataset.tarfile_samples`` and a
    seeded shuffle buffer that is drained at the end of the pass, so a pass never mixes in samples of the
    next one: with even shards the first pass alone fills the epoch and every sample appears once.
    """

    def __init__(
        self,
        urls: list[str],
        counts: dict[str, int],
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        bufsize: int,
    ):
        self.urls, self.counts, self.seed, self.epoch = urls, counts, seed, epoch
        self.rank, self.world_size, self.shuffle, self.bufsize = rank, world_size, shuffle, bufsize

    def __call__(self) -> Iterator[dict[str, Any]]:  # webdataset calls a source stage with no arguments
        return iter(self)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        worker, num_workers = _worker()
        mine = assign_shards(
            self.urls, seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size,
            worker=worker, num_workers=num_workers, shuffle=self.shuffle,
        )  # fmt: skip
        if sum(self.counts.get(Path(u).name, 1) for u in mine) == 0:
            # cycling over empty shards would never end
            raise DataError(
                f"{mine[0] if mine else 'shards'}: rank {self.rank} worker {worker} got only empty shards"
            )
        for p in itertools.count():
            order = list(mine)
            if self.shuffle and p > 0:
                rng = np.random.default_rng(derive_seed(self.seed, self.epoch, self.rank, worker, p, 0))
                order = [order[i] for i in rng.permutation(len(order))]
            # webdataset's tar reader, shard by shard, with each shard's sample count checked
            stream = counted_samples(order, self.counts)
            if self.shuffle:
                rng_s = random.Random(derive_seed(self.seed, self.epoch, self.rank, worker, p))
                stream = wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng_s)(stream)
            yield from stream


class _Stage:
    """Base for callable pipeline stages that need this worker's id when iteration starts."""

    def __call__(self, src: Iterator[Any]) -> Iterator[Any]:
        worker, num_workers = _worker()
        return self.run(src, worker, num_workers)

    def run(self, src: Iterator[Any], worker: int, num_workers: int) -> Iterator[Any]:  # pragma: no cover
        raise NotImplementedError


class _Decode(_Stage):
    def __init__(self, resolution: int, channels: int, with_latents: bool):
        self.resolution, self.channels, self.with_latents = resolution, channels, with_latents

    def run(self, src, worker, num_workers):
        for s in src:
            arr, label = decode_sample(s, self.resolution, self.channels)
            yield arr, label, (decode_moments(s) if self.with_latents else None)


class _Take(_Stage):
    """Exactly this worker's share of the rank's ``per_rank`` samples (the fixed epoch length)."""

    def __init__(self, per_rank: int):
        self.per_rank = per_rank

    def run(self, src, worker, num_workers):
        return itertools.islice(src, worker_quota(self.per_rank, worker, num_workers))


class _Batch(_Stage):
    def __init__(
        self, batch_size: int, drop_last: bool, latent_scale: float, seed: int, epoch: int, rank: int
    ):
        self.batch_size, self.drop_last, self.latent_scale = batch_size, drop_last, latent_scale
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def run(self, src, worker, num_workers):
        import torch

        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, worker, 1))
        while True:
            chunk = list(itertools.islice(src, self.batch_size))
            if not chunk or (self.drop_last and len(chunk) < self.batch_size):
                return
            x = torch.from_numpy(np.stack([c[0] for c in chunk])).permute(0, 3, 1, 2)
            # [0, 255] -> [-1, 1], DiT's Normalize(mean=0.5, std=0.5) (facebookresearch/DiT train.py)
            x = x.float().div_(127.5).sub_(1.0)
            y = torch.tensor([c[1] for c in chunk], dtype=torch.int64)
            if chunk[0][2] is None:
                yield x, y
                continue
            moments = torch.from_numpy(np.stack([c[2] for c in chunk]))
            mean, logvar = moments.chunk(2, dim=1)
            # z ~ N(mean, exp(logvar)) scaled by 0.18215: DiT train.py vae.encode(x).latent_dist.sample().mul_(0.18215)
            eps = torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
            yield x, y, (mean + torch.exp(0.5 * logvar) * eps) * self.latent_scale


def worker_quota(per_rank: int, worker: int, num_workers: int) -> int:
    """Samples worker ``worker`` of ``num_workers`` contributes to a rank's ``per_rank`` samples."""
    return per_rank // num_workers + (1 if worker < per_rank % num_workers else 0)


class ShardLoader:
    """A streaming loader over ``shard_dir``'s ``split`` for one rank and one epoch; ``len()`` is the
    number of batches on this rank, :meth:`set_epoch` re-seeds for the next epoch.

    Args:
        shard_dir: a shard set written by :func:`ddkit.data.shard_dataset`.
        split: ``"train"`` or ``"test"``.
        batch_size: images per batch on this rank.
        seed, epoch, rank, world_size: seed the shard permutation ``(seed, epoch)``, the per-worker shuffle
            buffer and latent noise ``(seed, epoch, rank, worker)``; rank/world_size split the shards.
        num_workers: DataLoader worker processes (0: iterate in this process).
        shuffle: permute shards and shuffle samples; False reads shards in key order.
        with_latents: also yield latents sampled from the stored VAE moments.
        drop_last: drop each worker's final partial batch.
        shuffle_buffer: samples held per worker in the shuffle buffer (default
            :data:`DEFAULT_SHUFFLE_BUFFER`).

    Yields:
        ``(images float32 [B, C, H, W] in [-1, 1], labels int64 [B])``, plus ``latents float32
        [B, Cz, h, w]`` (sampled from the stored moments, x0.18215) when ``with_latents``.

    Raises:
        DataError: fewer shards than ``world_size * max(1, num_workers)``, missing/corrupt index or shard
            (raised while iterating, naming the tar), no latents stored, or no full batch possible.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        with_latents: bool = False,
        drop_last: bool = True,
        shuffle_buffer: int | None = None,
    ):
        self.shard_dir = Path(shard_dir)
        self.index = read_index(self.shard_dir)
        where = f"{self.shard_dir}"
        if batch_size <= 0:
            raise DataError(f"{where}: batch_size must be > 0, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"{where}: rank {rank} outside world_size {world_size}")
        if num_workers < 0:
            raise DataError(f"{where}: num_workers must be >= 0, got {num_workers}")
        self.urls = [str(p) for p in shard_paths(self.shard_dir, split, self.index)]
        need = world_size * max(1, num_workers)
        if len(self.urls) < need:
            raise DataError(
                f"{where}: split '{split}' has {len(self.urls)} shard(s), fewer than world_size {world_size} x "
                f"max(1, num_workers {num_workers}) = {need}; reshard with a smaller --shard-size or use fewer workers"
            )
        if with_latents and not self.index.get("latents"):
            raise DataError(f"{where}/dataset.json: no VAE latents stored (shard with --encode-latents)")
        self.split, self.batch_size, self.seed, self.epoch = split, batch_size, seed, epoch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle, self.with_latents, self.drop_last = shuffle, with_latents, drop_last
        self.shuffle_buffer = shuffle_buffer or DEFAULT_SHUFFLE_BUFFER
        self.num_samples = int(self.index["totals"][split]) // world_size  # per rank per epoch
        self._len = self._batches()
        if self._len == 0:
            raise DataError(
                f"{where}: split '{split}' gives no full batch of {batch_size} per worker "
                f"({self.num_samples} samples per rank, {max(1, num_workers)} worker(s))"
            )

    def _batches(self) -> int:
        k = max(1, self.num_workers)
        per = [worker_quota(self.num_samples, w, k) for w in range(k)]
        f = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: math.ceil(n / self.batch_size))
        return sum(f(n) for n in per)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (shard permutation, shuffle buffer and latent noise)."""
        self.epoch = epoch

    def pipeline(self):
        """The ``webdataset.DataPipeline`` of one worker's stream (``len`` = this rank's batches)."""
        import webdataset as wds

        latent = self.index.get("latent") or {}
        stages: list[Any] = [
            _WorkerSamples(
                self.urls, self.index.get("shard_counts", {}), self.seed, self.epoch, self.rank, self.world_size,
                self.shuffle, self.shuffle_buffer,
            ),
            _Decode(int(self.index["resolution"]), int(self.index["channels"]), self.with_latents),
            _Take(self.num_samples),
            _Batch(self.batch_size, self.drop_last, float(latent.get("scale", 0.18215)), self.seed, self.epoch, self.rank),
        ]  # fmt: skip
        return wds.DataPipeline(*stages).with_length(self._len, silent=True)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        pipe = self.pipeline()
        if self.num_workers == 0:
            return iter(pipe)
        import torch.utils.data

        # batch_size=None: batches are built inside the workers; the DataLoader round-robins over them,
        # so the order is deterministic given (seed, epoch, rank) and the worker count.
        return iter(
            torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=self.num_workers, shuffle=False)
        )


#: The loader's function-style name (``ddkit.data.make_loader``, used by tests and benchmarks): the class.
make_loader = ShardLoader
