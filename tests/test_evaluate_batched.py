"""Batched students (ddkit.evaluate.batched) are the same experiment as the sequential reference loop.

K = 1 is bit-identical to ``train_student``; for K > 1 the accuracies of ten seeds, batched and sequential,
come from one distribution (Welch's two-sample t-test); an evaluation trains all missing runs under one
progress bar, batched in groups, and reuses cached runs.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ddkit.evaluate import batched, runs
from ddkit.evaluate import trainer as T
from ddkit.evaluate.protocols import get_protocol

MEAN, STD = [0.1307], [0.3081]


@pytest.fixture(scope="module")
def small(mnist_shards):
    """MNIST-5k at 16 px: 3 training digits per class and 100 test digits (a sub-second student)."""
    from ddkit.data import load_tensors
    from ddkit.evaluate import random_real_subset

    def down(x):
        return (F.avg_pool2d(x.float(), 2)).round().to(torch.uint8)  # 32 px -> 16 px, still uint8

    tx, ty = load_tensors(mnist_shards, "train")
    sx, sy = load_tensors(mnist_shards, "test")
    xs, ys = random_real_subset(tx, ty, 3, 0, 10)
    return down(xs), ys, down(sx[:100]), sy[:100]


def _kw(epochs: int) -> dict:
    return dict(mean=MEAN, std=STD, num_classes=10, epochs=epochs, batch_size=32)


@pytest.mark.parametrize("protocol", ["eccv2024", "idc"])
def test_one_batched_student_is_bit_identical_to_the_sequential_run(small, protocol, monkeypatch):
    xs, ys, sx, sy = small
    built = []
    build = T.build
    monkeypatch.setattr(T, "build", lambda *a: built.append(build(*a)) or built[-1])
    seq = T.train_student(get_protocol(protocol), "ConvNet-2", xs, ys, sx, sy, seed=3, **_kw(2))

    final = {}
    test = batched._Group.test

    def spy(self, *a, **kw):
        final.update({n: t[0].detach().clone() for n, t in self.params.items()})
        return test(self, *a, **kw)

    monkeypatch.setattr(batched._Group, "test", spy)
    (bat,) = batched.train_students(
        get_protocol(protocol), "ConvNet-2", [batched.Student(xs, ys, 3)], sx, sy, **_kw(2)
    )
    assert (bat.final, bat.best, bat.history) == (seq.final, seq.best, seq.history)
    assert bat.train_images == seq.train_images and bat.epochs == seq.epochs
    for name, p in built[0].named_parameters():
        assert torch.equal(p.detach(), final[name]), name


def test_batched_and_sequential_accuracies_share_one_distribution(small):
    from scipy.stats import ttest_ind

    xs, ys, sx, sy = small
    protocol, seeds = get_protocol("eccv2024"), list(range(10))
    seq = [T.train_student(protocol, "ConvNet-2", xs, ys, sx, sy, seed=s, **_kw(2)).final for s in seeds]  # fmt: skip
    students = [batched.Student(xs, ys, s) for s in seeds]
    bat = [r.final for r in batched.train_students(protocol, "ConvNet-2", students, sx, sy, **_kw(2))]
    p = float(ttest_ind(bat, seq, equal_var=False).pvalue) if seq != bat else 1.0
    mean_b, mean_s = sum(bat) / len(bat), sum(seq) / len(seq)
    print(f"\nbatched vs sequential, 10 seeds: mean {mean_b:.2f} vs {mean_s:.2f} %, Welch t-test p = {p:.3f}")
    assert p > 0.01, (bat, seq)
    assert len(set(seq)) > 1  # the seeds do differ: the test compares two spreads, not two constants


def test_students_of_other_sizes_epochs_or_batches_train_in_their_own_groups(monkeypatch):
    monkeypatch.setattr(batched, "MAX_IMAGES_PER_STEP", 64)

    class B:
        batched = True

    def run(n, epochs=2, batch=32):
        return runs._Run("s", 0, 0, "k", torch.zeros(n, 1, 8, 8), torch.zeros(n), epochs, batch)

    todo = [run(10), run(10), run(12), run(10, epochs=3), run(10), run(10, batch=16)]
    assert batched.group_size(32, 10) == 6 and batched.group_size(32, 100) == 2  # 64 images per step
    sizes = [[int(r.x.shape[0]) for r in g] for g in runs._groups(B(), todo)]
    assert sizes == [[10, 10, 10], [12], [10], [10]]  # one group per (epochs, batch, shape)
    B.batched = False
    assert [len(g) for g in runs._groups(B(), todo)] == [1] * 6
    B.batched = True
    todo = [run(10) for _ in range(8)]
    assert [len(g) for g in runs._groups(B(), todo)] == [6, 2]


def test_evaluation_trains_missing_runs_batched_under_one_bar(mnist_shards, tmp_path, monkeypatch):
    from ddkit.config import EvaluateConfig
    from ddkit.data import load_tensors
    from ddkit.evaluate import evaluate, random_real_subset

    tx, ty = load_tensors(mnist_shards, "train")
    xs, ys = random_real_subset(tx, ty, 2, 7, 10)
    ds = tmp_path / "set.pt"
    torch.save({"images": xs, "labels": ys, "classes": [str(c) for c in range(10)], "ipc": 2}, ds)
    bars, groups = [], []
    bar, train_students = runs.bar, runs.train_students

    def spy_bar(desc, total, **kw):
        bars.append(total)
        return bar(desc, total, **kw)

    def spy_train(protocol, network, students, *a, **kw):
        groups.append([s.seed for s in students])
        return train_students(protocol, network, students, *a, **kw)

    monkeypatch.setattr(runs, "bar", spy_bar)
    monkeypatch.setattr(runs, "train_students", spy_train)
    cfg = EvaluateConfig(
        epochs=1, repeats=2, baselines=("random_real",), network="ConvNet-2", precision="fp32", batched=True
    )
    out = tmp_path / "eval"
    first = evaluate({"demo": ds}, mnist_shards, cfg, out_dir=out, progress=False)
    # One bar over 2 sets x 2 repeats x (1 + the scorer's extra) epochs; both sets (20 images) in one group.
    assert bars == [8] and groups == [[0, 1, 0, 1]]
    assert json.loads((out / "results.json").read_text())["meta"]["batched"] is True

    bars.clear(), groups.clear()
    again = evaluate({"demo": ds}, mnist_shards, replace(cfg, repeats=3), out_dir=out, progress=False)
    assert bars == [4] and groups == [[2, 2]]  # only the two new repeats train; the four cached are read
    for name in ("demo", "random_real"):
        assert again[name]["runs"][:2] == first[name]["runs"]
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6
