"""Evaluation: networks, DSA, protocol presets, a real ConvNet-3 run on MNIST, the CLI and bad inputs.

All on the embedded MNIST-5k shards (``mnist_shards``, real digits). Kept small for a 2-core CI machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddkit.evaluate import augment as A
from ddkit.evaluate.networks import build
from ddkit.evaluate.protocols import PROTOCOLS, ECCV2024Protocol, IDCProtocol, RDEDProtocol, get_protocol


@pytest.fixture(scope="module")
def real(mnist_shards):
    from ddkit.data import load_tensors, read_index

    idx = read_index(mnist_shards)
    tx, ty = load_tensors(mnist_shards, "train")
    sx, sy = load_tensors(mnist_shards, "test")
    return {"dir": mnist_shards, "index": idx, "train": (tx, ty), "test": (sx, sy)}


def _subset(real, ipc=10, seed=0):
    from ddkit.evaluate import random_real_subset

    tx, ty = real["train"]
    return random_real_subset(tx, ty, ipc, seed, 10)


# ----------------------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,channels,res",
    [
        ("ConvNet-3", 1, 32),
        ("ConvNet-3", 1, 28),
        ("ConvNet-4", 3, 64),
        ("ConvNet-6", 3, 128),
        ("ResNetAP-10", 1, 32),
        ("ResNet-18", 3, 32),
        ("ResNet-18-IN", 1, 32),
    ],
)
def test_networks_map_images_to_logits(name, channels, res):
    torch.manual_seed(0)
    net = build(name, channels, 7, res).eval()
    out = net(torch.randn(2, channels, res, res))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_instance_norm_is_groupnorm_c_c_and_no_batchnorm():
    for name in ("ConvNet-3", "ResNetAP-10", "ResNet-18-IN"):
        net = build(name, 1, 10, 32)
        norms = [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all(m.num_groups == m.num_channels for m in norms), name
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), name
    conv3 = build("ConvNet-3", 1, 10, 32)
    convs = [m for m in conv3.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 128]
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in conv3.modules()) == 3


def test_unknown_network_is_a_config_error():
    from ddkit.errors import ConfigError

    with pytest.raises(ConfigError, match="VGG-11"):
        build("VGG-11", 3, 10, 32)


# ----------------------------------------------------------------------------------------------------------
# DSA and the other augmentations
# ----------------------------------------------------------------------------------------------------------
def test_dsa_ops_keep_shape_and_change_images():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    p = A.DSAParams()
    for name, fns in A.AUGMENT_FNS.items():
        for f in fns:
            y = f(x, p)
            assert y.shape == x.shape, (name, f.__name__)
            assert not torch.allclose(y, x), (name, f.__name__)
    for mode in ("S", "M"):
        assert A.dsa(x, A.DSA_STRATEGY, A.DSAParams(aug_mode=mode)).shape == x.shape


def test_dsa_ops_are_identity_at_zero_strength():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    z = A.DSAParams.zero()
    for f in (A.rand_flip, A.rand_scale, A.rand_rotate, A.rand_crop, A.rand_cutout, A.rand_brightness):
        torch.testing.assert_close(f(x, z), x, atol=1e-5, rtol=0, msg=f.__name__)
    z_all = A.DSAParams(
        aug_mode="M", prob_flip=0.0, ratio_scale=1.0, ratio_rotate=0.0, ratio_crop_pad=0.0, ratio_cutout=0.0
    )
    torch.testing.assert_close(A.dsa(x, "crop_cutout_flip_scale_rotate", z_all), x, atol=1e-5, rtol=0)
    # Saturation/contrast have no zero strength in the reference parametrisation; they keep the means.
    s = A.rand_saturation(x, A.DSAParams())
    torch.testing.assert_close(s.mean(1), x.mean(1), atol=1e-5, rtol=0)
    c = A.rand_contrast(x, A.DSAParams())
    torch.testing.assert_close(c.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="blur"):
        A.dsa(x, "blur_flip")


def test_idc_transforms_and_cutmix():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    y = A.idc_train_transform(x, 32)
    assert y.shape == x.shape and not torch.allclose(y, x)
    g = A.idc_train_transform(torch.rand(6, 1, 28, 28), 24)
    assert g.shape == (6, 1, 24, 24)
    torch.testing.assert_close(A.color_jitter(x, 0, 0, 0), x)
    torch.testing.assert_close(A.lighting(x, 0.0), x)
    mixed, perm, ratio = A.cutmix(x, 1.0)
    assert mixed.shape == x.shape and 0.0 < ratio < 1.0  # seed 0 draws a box neither empty nor whole
    moved = perm != torch.arange(6)
    assert moved.any()
    changed = (mixed != x).any(dim=1)  # [B, H, W] pixels taken from the partner image
    assert not changed[~moved].any()
    # One box for the batch: every image with another partner has the same pixels replaced, 1 - ratio of them.
    assert (changed[moved] == changed[moved][0]).all()
    assert changed[moved][0].float().mean().item() == pytest.approx(1.0 - ratio, abs=1e-9)
    box = changed.unsqueeze(1).expand_as(x)
    torch.testing.assert_close(mixed[box], x[perm][box], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------
def test_presets_equal_the_sources():
    e = get_protocol("eccv2024")
    assert isinstance(e, ECCV2024Protocol)
    assert (e.network, e.optimizer, e.lr, e.momentum, e.weight_decay, e.batch_size, e.epochs) == (
        "ConvNet-3",
        "sgd",
        0.01,
        0.9,
        5e-4,
        256,
        1000,
    )
    assert (e.lr_decay, e.fresh_optimizer_at_decay, e.decay_epoch(1000), e.extra_epoch) == (
        0.1,
        True,
        501,
        True,
    )
    assert e.dsa_strategy == "color_crop_cutout_flip_scale_rotate" and e.dsa.aug_mode == "S"
    d = e.dsa
    assert (
        d.prob_flip,
        d.ratio_scale,
        d.ratio_rotate,
        d.ratio_crop_pad,
        d.ratio_cutout,
        d.brightness,
        d.saturation,
        d.contrast,
    ) == (0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5)
    assert (e.labels, e.normalised_input, e.repeats) == ("hard", True, 3)

    i = get_protocol("idc")
    assert isinstance(i, IDCProtocol)
    assert (i.network, i.lr, i.momentum, i.weight_decay, i.batch_size, i.gamma, i.cutmix_beta) == (
        "ResNetAP-10",
        0.01,
        0.9,
        5e-4,
        64,
        0.2,
        1.0,
    )
    assert (i.rrc_scale, i.jitter, i.lighting) == ((0.5, 1.0), 0.4, 0.1)
    assert [i.epochs_for(n) for n in (1, 10, 11, 50, 51, 100)] == [2000, 2000, 1500, 1500, 1000, 1000]
    assert i.milestone_epochs(2000) == [1333, 1666]

    r = get_protocol("rded")
    assert isinstance(r, RDEDProtocol)
    assert (r.optimizer, r.lr, r.weight_decay, r.temperature, r.epochs, r.cutmix_beta, r.labels) == (
        "adamw",
        1e-3,
        0.01,
        20.0,
        300,
        1.0,
        "soft",
    )
    assert r.lr_factor(0, 300) == 1.0 and abs(r.lr_factor(300, 300) - 0.5) < 1e-12
    assert [r.batch_size_for(n, 10) for n in (1, 10, 50)] == [10, 50, 100]
    assert r.batch_size_for(10, 100) == 100
    assert set(PROTOCOLS) == {"eccv2024", "idc", "rded"}


# ----------------------------------------------------------------------------------------------------------
# Training on real data
# ----------------------------------------------------------------------------------------------------------
def test_convnet3_on_10_real_images_per_class_is_far_above_chance(real):
    from ddkit.evaluate.trainer import train_student

    xs, ys = _subset(real)
    sx, sy = real["test"]
    idx = real["index"]
    res = train_student(
        get_protocol("eccv2024"),
        "ConvNet-3",
        xs.float() / 255,
        ys,
        sx.float() / 255,
        sy,
        mean=idx["mean"],
        std=idx["std"],
        num_classes=10,
        epochs=30,
        batch_size=256,
        seed=0,
    )
    assert res.final > 50.0, res  # chance is 10 %
    assert res.train_images == 31 * 100  # the scorer's range(epochs + 1)


def test_runs_are_reproducible_and_idc_rded_loops_run(real):
    from ddkit.evaluate.trainer import train_student

    xs, ys = _subset(real, ipc=2)
    sx, sy = real["test"]
    sx, sy = sx[:200].float() / 255, sy[:200]
    kw = dict(mean=real["index"]["mean"], std=real["index"]["std"], num_classes=10, batch_size=256)
    a = train_student(
        get_protocol("eccv2024"), "ConvNet-3", xs.float() / 255, ys, sx, sy, epochs=3, seed=5, **kw
    )
    b = train_student(
        get_protocol("eccv2024"), "ConvNet-3", xs.float() / 255, ys, sx, sy, epochs=3, seed=5, **kw
    )
    assert a.final == b.final and a.history == b.history
    assert a.history == [(4, a.final)] and a.best == a.final  # the scorer tests once, after epochs + 1
    # IDC tests after every epoch at this length; on 10 real digits per class it learns in a few epochs.
    x10, y10 = _subset(real, ipc=10)
    kw64 = {**kw, "batch_size": 64}
    x10 = x10.float() / 255
    i = train_student(get_protocol("idc"), "ConvNet-3", x10, y10, sx, sy, epochs=8, seed=0, **kw64)
    assert [h[0] for h in i.history] == list(range(1, 9))
    assert i.final == i.history[-1][1] and i.best == max(acc for _, acc in i.history)
    assert i.best > 25.0, i  # chance is 10 %
    # RDED tests the last eval_last epochs only (an untrained teacher: this checks the loop, not learning).
    torch.manual_seed(0)
    teacher = build("ConvNet-3", 1, 10, 32)
    rded = get_protocol("rded")
    r = train_student(
        rded, "ConvNet-3", xs.float() / 255, ys, sx, sy, epochs=11, seed=0, teacher=teacher, **kw
    )
    assert [h[0] for h in r.history] == list(range(11 - rded.eval_last + 1, 12)) and r.epochs == 11
    assert r.final == r.history[-1][1] and r.best == max(acc for _, acc in r.history)
    with pytest.raises(ValueError, match="teacher"):
        train_student(get_protocol("rded"), "ConvNet-3", xs.float() / 255, ys, sx, sy, epochs=1, seed=0, **kw)


# ----------------------------------------------------------------------------------------------------------
# Distilled-set files and the CLI
# ----------------------------------------------------------------------------------------------------------
def _write_set(real, path: Path, ipc=10, seed=1) -> Path:
    xs, ys = _subset(real, ipc=ipc, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"images": xs, "labels": ys, "classes": list(real["index"]["classes"]), "ipc": ipc}, path)
    return path


def test_load_distilled_formats(real, tmp_path):
    from ddkit.evaluate import load_distilled

    idx = real["index"]
    p = _write_set(real, tmp_path / "gen-a" / "dataset.pt")
    s = load_distilled(p.parent, idx)
    assert s.name == "gen-a" and s.ipc == 10 and s.images.shape == (100, 1, 32, 32)
    assert 0.0 <= float(s.images.min()) and float(s.images.max()) <= 1.0
    # The challenge format: a bare normalised float tensor, labels implied class-major.
    mean = torch.tensor(idx["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(idx["std"]).view(1, -1, 1, 1)
    xs, _ = _subset(real)
    torch.save((xs.float() / 255 - mean) / std, tmp_path / "mnist.pt")
    b = load_distilled(tmp_path / "mnist.pt", idx)
    torch.testing.assert_close(b.images, xs.float() / 255, atol=1e-5, rtol=0)
    assert b.labels.tolist() == [c for c in range(10) for _ in range(10)]
    # Any set trains, as it is: unequal counts and label order kept (packaging alone holds the contract).
    xs, ys = _subset(real, ipc=3)
    keep = torch.cat([torch.arange(3), torch.arange(3, len(ys), 3)])  # class 0 keeps 3, the others 1
    order = keep.flip(0)
    torch.save({"images": xs[order], "labels": ys[order], "classes": idx["classes"]}, tmp_path / "odd.pt")
    odd = load_distilled(tmp_path / "odd.pt", idx)
    assert odd.ipc == 3 and odd.labels.tolist() == ys[order].tolist()
    from ddkit.errors import PackageError
    from ddkit.package import load_distilled as load_for_packaging

    with pytest.raises(PackageError, match="unequal IPC"):
        load_for_packaging(tmp_path / "odd.pt")


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda real, p: None, "not found"),
        (
            lambda real, p: torch.save(
                {
                    "images": torch.zeros(20, 3, 32, 32, dtype=torch.uint8),
                    "labels": torch.arange(10).repeat(2),
                },
                p,
            ),
            "channels",
        ),
        (
            lambda real, p: torch.save(
                {
                    "images": torch.zeros(20, 1, 16, 16, dtype=torch.uint8),
                    "labels": torch.arange(10).repeat(2),
                },
                p,
            ),
            "px",
        ),
        (
            lambda real, p: torch.save(
                {
                    "images": torch.zeros(20, 1, 32, 32, dtype=torch.uint8),
                    "labels": torch.arange(10).repeat(2),
                    "classes": list("abcdefghij"),
                },
                p,
            ),
            "classes",
        ),
        (
            lambda real, p: torch.save(
                {"images": torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "labels": torch.tensor([0, 12])}, p
            ),
            "labels",
        ),
        (lambda real, p: torch.save(torch.zeros(15, 1, 32, 32), p), "multiple"),
        (lambda real, p: p.write_bytes(b"not a torch file"), "readable"),
    ],
)
def test_bad_distilled_sets_give_one_line_errors(real, tmp_path, make, needle):
    from ddkit.cli import app

    p = tmp_path / "bad.pt"
    make(real, p)
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(p),
            "--real",
            str(real["dir"]),
            "--out",
            str(tmp_path / "ev"),
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--no-progress",
        ],
    )
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert len(text.splitlines()) == 1 and "bad.pt" in text and needle in text, text


def test_cli_writes_results_with_baselines_and_resumes(real, tmp_path):
    from ddkit.cli import app

    ds = _write_set(real, tmp_path / "gen-demo" / "dataset.pt", seed=3)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        f"demo={ds}",
        "--real",
        str(real["dir"]),
        "--protocol",
        "eccv2024",
        "--epochs",
        "2",
        "--repeats",
        "2",
        "--out",
        str(out),
        "--set",
        "evaluate.full_epochs=1",
        "--set",
        "evaluate.baselines=[random_real]",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    sets = data["sets"]
    assert set(sets) == {"demo", "random_real"} and data["meta"]["order"] == ["demo", "random_real"]
    recorded = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    for name, r in sets.items():
        assert (
            len(r["runs"]) == 2
            and r["ipc"] == 10
            and r["protocol"] == "eccv2024"
            and r["network"] == "ConvNet-3"
        )
        assert r["epochs"] == 2
        # eccv2024 reports each run's final accuracy (its one test, after epochs + 1), in repeat order.
        runs = [x["result"] for x in recorded if x["set"] == name]
        assert [x["seed"] for x in recorded if x["set"] == name] == [0, 1]
        assert all(x["history"] == [[3, x["final"]]] and x["best"] == x["final"] for x in runs)
        assert r["runs"] == r["last_runs"] == [x["final"] for x in runs]
        a, b = r["runs"]
        assert r["mean"] == pytest.approx((a + b) / 2) and r["std"] == pytest.approx(abs(a - b) / 2)
    # The scorer's printout: one fraction per round, then the per-dataset line.
    fractions = [round(r * 1000 / 100.0) / 1000 for r in sets["demo"]["runs"]]  # correct / 1000 test digits
    lines = result.output.splitlines()
    assert all(str(f) in lines for f in fractions)
    assert f"Performance on demo dataset is {(0.0 + fractions[0] + fractions[1]) / 2}" in lines
    # scores.txt is the official one line (the printout goes to scorer_log.txt).
    assert (out / "scores.txt").read_text() == f"correct: {(0.0 + fractions[0] + fractions[1]) / 2}"
    assert str(fractions[0]) in (out / "scorer_log.txt").read_text().splitlines()
    assert (out / "table.md").read_text().count("|") > 10 and (out / "DONE").is_file()
    n_runs = len((out / "runs.jsonl").read_text().splitlines())
    assert n_runs == 4

    # Adding the full baseline reuses the four finished runs and trains only the new one.
    args = [
        a if a != "evaluate.baselines=[random_real]" else "evaluate.baselines=[random_real, full]"
        for a in args
    ]
    args[args.index("2", args.index("--repeats"))] = "1"
    result = CliRunner().invoke(app, args + ["--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    sets = data["sets"]
    assert data["meta"]["order"] == ["demo", "random_real", "full"]
    assert sets["full"]["images"] == 4000 and sets["full"]["epochs"] == 1
    assert sets["full"]["mean"] > 50.0  # two passes over 4,000 real digits
    dd = sets["demo"]["dd_ranking"]  # one repeat: IOR = demo - random_real, HLR = full - demo (pp)
    assert dd["ior_mean"] == pytest.approx(sets["demo"]["runs"][0] - sets["random_real"]["runs"][0])
    assert dd["hlr_mean"] == pytest.approx(sets["full"]["runs"][0] - sets["demo"]["runs"][0])
    assert "dd_ranking" not in sets["random_real"] and "dd_ranking" not in sets["full"]
    assert len((out / "runs.jsonl").read_text().splitlines()) == 5


def test_random_real_reads_only_its_draw_and_matches_the_draw_from_memory(tmp_path):
    """The random_real baseline draws class by class from the shards (one class's index, only the drawn
    images decoded), byte-identical to the draw from the whole split in memory, which is never loaded."""
    from conftest import digit_shards

    from ddkit.data import load_tensors
    from ddkit.errors import DataError
    from ddkit.evaluate.runs import RealTrain, random_real_subset

    data = digit_shards(tmp_path, classes=4, per_class=15)
    shards = next(s.split("=", 1)[1] for s in data if s.startswith("data.shards="))
    train = RealTrain(shards)
    for seed in (0, 1, 7):
        xs, ys = train.random_subset(3, seed, 4)
        want = random_real_subset(*load_tensors(shards, "train"), 3, seed, 4)
        assert torch.equal(xs, want[0]) and torch.equal(ys, want[1])
    assert train._tensors is None  # the whole split was not read
    with pytest.raises(DataError, match=r"random_real: class 0 has \d+ training images, fewer than IPC 100"):
        train.random_subset(100, 0, 4)
