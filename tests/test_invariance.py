"""The promise to cluster users, tested over every registered method × every way of cutting a run up.

A distilled set does not depend on how the work was cut up: one process, two ranks of one process group
(torchrun's environment, gloo), a two-task array in either order, or an interruption at any phase (then a
rerun, as a requeued SLURM job reruns) all give the same
``dataset.pt`` and the same generation record as one uninterrupted process. The methods come from
:mod:`ddkit.methods.registry` (every base and every ``<base>+select``), so a new method is covered without
editing this file. Precision and plan are pinned (two runs would otherwise time ``auto`` separately).
Real SLURM requeues (srun ranks and arrays) are ``tests/test_slurm_integration.py``'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import digit_shards

from ddkit.methods import registry

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("start", "prepare", "calibrate", "plan", "batch", "shard", "merge")
WAYS = ("ranks-2", "array-01", "array-10", *(f"requeue-{p}" for p in PHASES))


class Killed(Exception):
    """Stands for a SIGKILL or a requeue at a phase: nothing after it runs in this attempt."""


K = 10  # classes


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    """A config on real MNIST digits (10 classes × 12, sharded at 16 px by the real sharder) and a tiny
    random DiT, every method cheap and its plan and precision pinned."""

    from ddkit.config import load_config

    tmp = tmp_path_factory.mktemp("inv")
    data = digit_shards(tmp, K)
    sets = [
        f"run_dir={tmp / 'run'}", *data, "model.arch=custom(depth=1,hidden=16,heads=1,patch=4)",
        "model.input_size=16", "model.in_channels=1", f"model.num_classes={K}", "model.pretrained=null",
        "generate.precision=fp32", "generate.quality=dsr", "generate.batch_size=8",
        "generate.steps_min=3", "generate.steps_max=3", "generate.ipc_min=2", "generate.ipc_max=2",
        "generate.cfg_scale=1.0", "generate.select.ratio=2", "generate.select.encoder_epochs=1",
        "generate.select.encoder_width=8",
        "generate.d3hr.inversion_steps=10", "generate.d3hr.store_from=500", "generate.d3hr.store_to=700",
        "generate.d3hr.timestep=600", "generate.d3hr.max_images_per_class=2", "generate.d3hr.num_groups=64",
        "generate.modes.max_images_per_class=10",
    ]  # fmt: skip
    return load_config(None, sets)


@pytest.fixture(scope="module")
def model(pinned):
    from ddkit.models import build_backbone

    return build_backbone(pinned.model, seed=0).eval()


def _run(cfg, method: str, out: Path, **kw) -> Path:
    from ddkit.generate import generate

    return generate(cfg, method=method, time_limit=600, out_dir=out, progress=False, model=MODEL[0], **kw)


MODEL: list = []  # the module's tiny backbone (generate(model=...): no weights to load)


def _killer(phase: str):
    seen = {"n": 0}

    def on_phase(name: str) -> None:
        if name == phase:
            seen["n"] += 1
            if seen["n"] == 1:
                raise Killed(phase)

    return on_phase, seen


def _result(gen: Path) -> tuple[dict, dict]:
    data = torch.load(gen / "dataset.pt", weights_only=False)
    man = json.loads((gen / "manifest.json").read_text())
    return data, man["record"]


@pytest.fixture(scope="module")
def reference(pinned, model, tmp_path_factory):
    """The uninterrupted single-process set of each method, made once."""
    MODEL[:] = [model]
    cache: dict[str, tuple[dict, dict]] = {}
    root = tmp_path_factory.mktemp("ref")

    def get(method: str):
        if method not in cache:
            cache[method] = _result(_run(pinned, method, root / method))
        return cache[method]

    return get


def _two_rank_worker(rank: int, port: int, cfg, state: dict, root: str, methods: list[str]) -> None:
    """One of two torchrun-style ranks (env rendezvous, gloo): every method into ``root/<method>``."""
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from ddkit.generate import generate
    from ddkit.models import build_backbone

    model = build_backbone(cfg.model, seed=0).eval()
    model.load_state_dict(state)
    for m in methods:
        generate(cfg, method=m, time_limit=600, out_dir=Path(root) / m, progress=False, model=model)


@pytest.fixture(scope="module")
def two_ranks(pinned, model, tmp_path_factory):
    """Every method generated once by two ranks of one process group (spawned once for all methods)."""
    import socket
    import time

    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, pinned, model.state_dict(), str(root), list(registry.names()))
    ctx = mp.start_processes(_two_rank_worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 900
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two ranks still running after 900 s: their collectives do not pair")
    return root


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("method", registry.names())
def test_the_same_set_however_the_run_is_cut(pinned, reference, tmp_path, method, way, request):
    out = tmp_path / "gen"
    if way == "ranks-2":
        out = request.getfixturevalue("two_ranks") / method
    elif way.startswith("array"):
        order = (0, 1) if way == "array-01" else (1, 0)
        for r in order:  # two array tasks, one after the other: the second merges
            _run(pinned, method, out, rank=r, world_size=2)
    else:
        phase = way.removeprefix("requeue-")
        on_phase, seen = _killer(phase)
        with pytest.raises(Killed):
            _run(pinned, method, out, on_phase=on_phase)
        assert seen["n"] == 1
        _run(pinned, method, out)  # the requeued attempt
    ref_data, ref_record = reference(method)
    data, rec = _result(out)
    assert rec == ref_record, registry_diff(rec, ref_record)
    assert torch.equal(data["labels"], ref_data["labels"])
    assert torch.equal(data["images"], ref_data["images"])
    assert data["ipc"] == 2 and rec["method"] == registry.build(method, pinned).base.name


def registry_diff(a: dict, b: dict) -> str:
    from ddkit.generate.record import differences

    return "; ".join(differences(a, b))
