"""Budgets that hold at 100 classes (issue 24, item 3): ``ddkit generate RUN -m METHOD --time-limit 60`` on a
100-class stand-in, for every registered method, timed from outside the process.

The stand-in: ``ddkit.models.tiny``'s latent DiT (DiT-XL/2's 1,000 class embeddings, 2 blocks, 4x4 latents,
random weights) with its tiny VAE, over synthetic shards of 100 classes x 8 random 32 px training images; the
minimax checkpoint is the same backbone saved as ``RUN/minimax``. Every method either ends inside the limit
with a balanced set, or stops inside it with one line naming the stage or file that would make it fit,
before spending the budget on sampling. Slow (one real minute per method at most).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddkit.methods import registry

K = 100
LIMIT = 60.0
TRAIN, TEST = 8, 1


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> tuple[Path, list[str]]:
    """(run dir holding the minimax checkpoint, the ``--set`` flags of the stand-in)."""
    from PIL import Image

    from ddkit.config import DataConfig, ModelConfig, to_dict
    from ddkit.data import shard_dataset
    from ddkit.models import build_backbone, save_checkpoint
    from ddkit.models.tiny import TINY_MODEL_SETTINGS, build_tiny_pipeline

    root = tmp_path_factory.mktemp("scale100")
    pipe = build_tiny_pipeline(root / "pipe", sample_size=4).resolve()
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("val", TEST)):
        for c in range(K):
            d = root / "folder" / split / f"c{c:03d}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    shards = shard_dataset(
        DataConfig(dataset="imagefolder", root=str(root / "folder"), resolution=32, channels=3),
        root / "shards",
    )
    settings = {**TINY_MODEL_SETTINGS, "input_size": 4}
    model = build_backbone(ModelConfig(**settings), seed=0)
    sd = model.state_dict()
    run = root / "run"
    save_checkpoint(
        {"model": sd, "ema": sd, "model_config": to_dict(model.config), "step": 0},
        run / "minimax" / "ckpt" / "last.pt",
    )
    sets = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    sets += [f"model.pretrained={pipe}", f"model.vae={pipe}", f"model.vae_decoder={pipe}", "model.class_map=identity",
             f"data.shards={shards}", "data.dataset=imagefolder", "data.resolution=32", "data.channels=3",
             "generate.precision=fp32", "generate.ipc_max=10", "generate.steps_min=2", "generate.steps_max=20",
             "generate.dsr_min_steps_quality=5"]  # fmt: skip
    return run, sets


def _generate(run: Path, sets: list[str], method: str) -> tuple[subprocess.CompletedProcess, float]:
    """``ddkit generate RUN -m METHOD --time-limit 60`` in its own process; (result, wall seconds from spawn)."""
    code = "import sys\nfrom ddkit.cli import main\nsys.argv[0] = 'ddkit'\nmain()\n"
    args = ["generate", str(run), "-m", method, "--time-limit", str(LIMIT), "--no-progress"]
    for kv in sets:
        args += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("DDKIT_T0", None)
    t = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=3 * LIMIT
    )
    return res, time.monotonic() - t


@pytest.mark.slow
@pytest.mark.parametrize("method", registry.names())
def test_every_method_holds_a_60s_budget_at_100_classes(standin, method):
    run, sets = standin
    res, seconds = _generate(run, sets, method)
    out = (res.stdout + res.stderr).strip()
    print(f"\n{method}: rc {res.returncode}, {seconds:.1f} s wall; {out.splitlines()[-1] if out else ''}")
    assert seconds <= LIMIT, f"{method}: {seconds:.1f} s > {LIMIT} s\n{out[-2000:]}"
    gen = run / f"gen-{method}"
    if res.returncode != 0:  # a preparation that cannot fit: one line naming what would make it fit
        assert not (gen / "dataset.pt").exists()
        last = out.splitlines()[-1]
        assert "Traceback" not in out and ("generate." in last or "/" in last), out[-2000:]
        return
    ds = torch.load(gen / "dataset.pt")
    counts = torch.bincount(ds["labels"], minlength=K)
    assert ds["ipc"] >= 1 and (counts == ds["ipc"]).all(), counts
