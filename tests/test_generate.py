"""Budgeted, sharded generation end to end on CPU with a tiny DiT (real sampler, real files)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ddkit.config import ModelConfig, load_config
from ddkit.errors import BudgetError, DataError
from ddkit.generate import generate, image_seed, merge
from ddkit.io import is_done

K = 10


def tiny_model(seed: int = 0):
    from ddkit.models import build_backbone

    mcfg = ModelConfig(arch="DiT-T/4", in_channels=1, input_size=16, num_classes=K, learn_sigma=True)
    return build_backbone(mcfg, seed=seed).eval()


def make_cfg(tmp_path, *sets):
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.shards={tmp_path / 'no-shards'}",  # no shard index: classes are the backbone's 0..K-1
            "model.input_size=16",
            "generate.batch_size=10",
            "generate.precision=fp32",  # images are compared between runs: no timed auto choice
            *sets,
        ],
    )


def test_time_limit_30_gives_a_balanced_set(tmp_path):
    t0 = time.monotonic()  # the budget includes building the model, as the CLI's includes loading it
    model = tiny_model()
    cfg = make_cfg(
        tmp_path,
        "generate.steps_min=2",
        "generate.steps_max=20",
        "generate.dsr_min_steps_quality=10",
        "generate.ipc_max=200",
    )
    gen_dir = generate(cfg, time_limit=30, model=model, progress=False, t0=t0)
    man = json.loads((gen_dir / "manifest.json").read_text())
    ds = torch.load(gen_dir / "dataset.pt")
    ipc = ds["ipc"]
    assert ipc >= 1 and ds["images"].dtype == torch.uint8 and ds["images"].shape == (K * ipc, 1, 16, 16)
    counts = torch.bincount(ds["labels"], minlength=K)
    assert (counts == ipc).all()  # every class the same IPC
    assert torch.equal(ds["labels"], torch.arange(K).repeat_interleave(ipc))  # class-major
    assert man["ipc"] == ipc and 2 <= man["steps"]["min"] <= man["steps"]["max"] <= 20
    assert (gen_dir / "grid.png").stat().st_size > 0 and (gen_dir / "budget.png").stat().st_size > 0
    assert is_done(gen_dir) and is_done(gen_dir / "shard-0")
    assert set(man["phases"]["rank0"]) >= {"load", "calibrate", "sample", "save"}
    assert man["hardware"]["device"] == "cpu"


FIXED = (
    "generate.steps_min=2",
    "generate.steps_max=2",
    "generate.ipc_min=2",
    "generate.ipc_max=2",
    "generate.batch_size=4",
)


def test_two_shards_give_the_same_images_as_one_process(tmp_path):
    model = tiny_model(seed=1)
    one = generate(make_cfg(tmp_path / "a", *FIXED), time_limit=600, model=model, progress=False)
    cfg2 = make_cfg(tmp_path / "b", *FIXED)
    d = generate(cfg2, time_limit=600, model=model, progress=False, rank=1, world_size=2)
    assert is_done(d / "shard-1") and not is_done(d)  # rank 0 is still missing: no merge yet
    with pytest.raises(DataError, match="shard-0"):
        merge(d)
    d = generate(cfg2, time_limit=600, model=model, progress=False, rank=0, world_size=2)
    assert is_done(d)  # the last rank to finish merged
    a, b = torch.load(one / "dataset.pt"), torch.load(d / "dataset.pt")
    assert a["ipc"] == b["ipc"] == 2
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["images"], b["images"])
    shard0 = torch.load(d / "shard-0" / "images.pt", weights_only=False)
    assert 0 < shard0["images"].shape[0] < 20  # really split (5 batches of 4: 3 on rank 0, 2 on rank 1)
    # Rerun skips completed shards (and the finished merge).
    mtime = (d / "shard-0" / "images.pt").stat().st_mtime_ns
    generate(cfg2, time_limit=600, model=model, progress=False, rank=0, world_size=2)
    assert (d / "shard-0" / "images.pt").stat().st_mtime_ns == mtime
    man = json.loads((d / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["seeds"]["per_image"][:2] == [[0, 0], [0, 1]]
    seeds = [image_seed(0, 0, 0), image_seed(0, 0, 1), image_seed(1, 0, 0), image_seed(0, 1, 0)]
    assert len(set(seeds)) == len(seeds)  # every pair differs (base seed, class and index each count)


def test_too_short_budget_is_refused_before_sampling(tmp_path):
    model = tiny_model()
    cfg = make_cfg(
        tmp_path,
        "generate.steps_min=50",
        "generate.steps_max=50",
        "generate.ipc_min=100",
        "generate.ipc_max=100",
    )
    with pytest.raises(BudgetError, match="steps_min=50 at ipc_min=100 needs"):
        generate(cfg, time_limit=5, model=model, progress=False)
    gen_dir = tmp_path / "run" / "gen-minimax"
    assert not (gen_dir / "shard-0").exists() and not (gen_dir / "dataset.pt").exists()


def test_cli_merge_reports_missing_shards(tmp_path):
    from typer.testing import CliRunner

    from ddkit.cli import app

    gen = tmp_path / "run" / "gen-minimax"
    (gen / "shard-0").mkdir(parents=True)
    res = CliRunner().invoke(app, ["generate", str(tmp_path / "run"), "--merge"])
    assert res.exit_code == 2 and "shard-0" in res.output


# A filesystem far slower than a local disk, injected into the child process: every atomic file costs
# 0.6 s plus 1 MB/s. After the last batch generation writes ~7 files (shard, DONE, dataset, grid, budget
# plot, manifest, DONE): ~4.5 s, three times what a fixed 1.5 s reserve assumed.
SLOW_WRITER = """
import contextlib, time
import ddkit.io as io
_file, _bytes = io.atomic_file, io.atomic_write_bytes
@contextlib.contextmanager
def slow_file(path):
    with _file(path) as tmp:
        yield tmp
        time.sleep(0.6 + tmp.stat().st_size / 1e6)
def slow_bytes(path, data):
    time.sleep(0.6 + len(data) / 1e6)
    return _bytes(path, data)
io.atomic_file, io.atomic_write_bytes = slow_file, slow_bytes
"""


def _generate_process(tmp_path, time_limit: float, *sets: str, prelude: str = ""):
    """``ddkit generate RUN --time-limit T`` as its own process from a saved tiny checkpoint, timed from
    OUTSIDE (wall clock from spawn to exit). Returns (completed process, seconds, gen dir)."""
    import os
    import subprocess
    import sys

    from ddkit.config import to_dict
    from ddkit.models import save_checkpoint

    model = tiny_model()
    run = tmp_path / "run"
    sd = model.state_dict()
    save_checkpoint(
        {"model": sd, "ema": sd, "model_config": to_dict(model.config), "step": 0},
        run / "minimax" / "ckpt" / "last.pt",
    )
    code = prelude + "\nimport sys\nfrom ddkit.cli import main\nsys.argv[0] = 'ddkit'\nmain()\n"
    args = ["generate", str(run), "--time-limit", str(time_limit), "--no-progress",
            "--set", f"data.shards={tmp_path / 'none'}", "--set", "model.input_size=16",
            "--set", "generate.batch_size=10", "--set", "generate.steps_min=2",
            "--set", "generate.steps_max=10", "--set", "generate.dsr_min_steps_quality=5"]  # fmt: skip
    for kv in sets:
        args += ["--set", kv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DDKIT_T0", None)
    t = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )
    return res, time.monotonic() - t, run / "gen-minimax"


def _balanced(gen_dir) -> int:
    ds = torch.load(gen_dir / "dataset.pt")
    assert (torch.bincount(ds["labels"], minlength=K) == ds["ipc"]).all() and ds["ipc"] >= 1
    return ds["ipc"]


def test_cli_generate_from_a_checkpoint_ends_inside_the_limit(tmp_path):
    """The process, start-up and model loading included, ends inside --time-limit by the wall clock."""
    res, seconds, gen = _generate_process(tmp_path, 20)
    assert res.returncode == 0, res.stderr[-2000:]
    print(f"\nddkit generate --time-limit 20: {seconds:.2f}s wall clock")
    assert seconds <= 20.0
    man = json.loads((gen / "manifest.json").read_text())
    assert man["checkpoint"].endswith("minimax") and _balanced(gen) == man["ipc"]


def test_slow_writer_never_overruns(tmp_path):
    """An injected slow filesystem: the reserve is measured with the real (slow) writers, so the process
    still ends inside the limit by the wall clock."""
    # 45 s: start-up alone (torch + diffusers imports, model load) takes ~10 s on a 2-core AVX2 EPYC, the
    # slow writes ~5 s more, and the budget must still leave room for sampling.
    res, seconds, gen = _generate_process(tmp_path, 45, "generate.ipc_max=1000", prelude=SLOW_WRITER)
    assert res.returncode == 0, res.stderr[-2000:]
    man = json.loads((gen / "manifest.json").read_text())
    reserve = torch.load(gen / "shard-0" / "images.pt", weights_only=False)["reserve_seconds"]
    print(f"\nslow writer: {seconds:.2f}s wall clock for a 45 s limit; measured reserve {reserve:.2f}s")
    assert reserve >= 7 * 0.6  # the writes after the last batch, as measured (not an assumed constant)
    assert seconds <= 45.0
    assert _balanced(gen) == man["ipc"]


# ----------------------------------------------------------------------------------------------------------
# Two ranks in one process group (gloo): a requeue that finds one shard done must not hang, D^3HR included
# ----------------------------------------------------------------------------------------------------------
def _two_rank_d3hr_worker(rank: int, port: int, tmp: str, shards: str) -> None:
    import os
    import shutil
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from ddkit import dist
    from ddkit.models import build_backbone

    model = build_backbone(
        ModelConfig(arch="DiT-T/4", in_channels=1, input_size=32, num_classes=K, learn_sigma=True), seed=3
    ).eval()

    def run(name: str):
        cfg = load_config(None, [
            f"run_dir={Path(tmp) / name}", f"data.shards={shards}", "model.input_size=32", *FIXED,
            "generate.d3hr.inversion_steps=10", "generate.d3hr.store_from=500", "generate.d3hr.store_to=700",
            "generate.d3hr.timestep=600", "generate.d3hr.max_images_per_class=2",
        ])  # fmt: skip
        return generate(cfg, method="d3hr", time_limit=600, model=model, progress=False)

    run("ref")
    gen = run("int")
    dist.barrier()
    if rank == 0:  # requeued after shard 0 was done: shard 1, the merge and the statistics cache are gone
        shutil.rmtree(gen / "shard-1")
        shutil.rmtree(Path(tmp) / "int" / "d3hr-cache")
        for f in ("DONE", "dataset.pt", "manifest.json"):
            (gen / f).unlink()
        (Path(tmp) / "mtime").write_text(str((gen / "shard-0" / "images.pt").stat().st_mtime_ns))
    dist.barrier()
    run("int")
    dist.barrier()
    dist.cleanup()


def test_two_ranks_d3hr_rerun_with_one_shard_done_finishes_without_hang(tmp_path, mnist_shards):
    """One collective decides the skip: the rank whose shard is done still meets the statistics barrier,
    the cost vote and the merge barriers, so the job ends (deadline: a hang fails instead of blocking) and
    the merged set equals an uninterrupted run's."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_two_rank_d3hr_worker, args=(port, str(tmp_path), str(mnist_shards)), nprocs=2,
                             join=False, start_method="spawn")  # fmt: skip
    limit = 300.0
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(
                f"2-rank D^3HR rerun still running after {limit:.0f} s: the ranks' collectives do not pair"
            )
    ref = torch.load(tmp_path / "ref" / "gen-d3hr" / "dataset.pt")
    got = torch.load(tmp_path / "int" / "gen-d3hr" / "dataset.pt")
    assert got["ipc"] == ref["ipc"] == 2
    assert torch.equal(got["labels"], ref["labels"]) and torch.equal(got["images"], ref["images"])
    shard0 = tmp_path / "int" / "gen-d3hr" / "shard-0" / "images.pt"
    assert str(shard0.stat().st_mtime_ns) == (tmp_path / "mtime").read_text()  # kept, not regenerated


def test_budget_start_prefers_ddkit_t0_then_the_given_start_then_now():
    from ddkit.dist import budget_start
    from ddkit.errors import ConfigError

    clock = lambda: 1000.0  # noqa: E731
    assert budget_start(5.0, clock, environ={}) == 5.0
    assert budget_start(None, clock, environ={}) == 1000.0
    # DDKIT_T0 ten seconds ago (epoch) -> ten seconds before now on the injected clock, whatever the start
    t = budget_start(5.0, clock, environ={"DDKIT_T0": str(time.time() - 10)})
    assert 989.0 < t <= 990.5
    with pytest.raises(ConfigError, match="DDKIT_T0"):
        budget_start(5.0, clock, environ={"DDKIT_T0": "soon"})
