"""Over-generate-and-select (ddkit.methods.select): the pure selectors on hand-made features."""

from __future__ import annotations

import pytest
import torch

from ddkit.methods import select as S


def test_herding_tracks_the_target_mean_better_than_any_other_first_choice():
    f = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [0.0, 5.0]])
    # target (0, 0): first the exact match, then the pair (1,1)/(-1,-1) that keeps the mean at 0
    idx = S.herding(f, 3, target=torch.zeros(2))
    assert idx[0] == 0
    assert set(idx[1:].tolist()) == {2, 3}


def test_herding_defaults_to_the_feature_mean_and_never_repeats():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 8, generator=g)
    idx = S.herding(f, 50)
    assert sorted(idx.tolist()) == list(range(50))
    # the 5-point herded mean is closer to the full mean than the first 5 rows' mean
    err = lambda rows: float((f[rows].mean(0) - f.mean(0)).norm())  # noqa: E731
    assert err(idx[:5]) < err(torch.arange(5))


def test_k_center_covers_the_extremes():
    f = torch.tensor([[0.0], [0.1], [-0.1], [9.0], [-9.0], [0.2]])
    idx = S.k_center(f, 3, target=torch.zeros(1))
    assert idx[0] == 0 and set(idx[1:].tolist()) == {3, 4}


@pytest.mark.parametrize("fn", [S.herding, S.k_center])
def test_selectors_reject_k_out_of_range(fn):
    with pytest.raises(ValueError, match="k=4"):
        fn(torch.zeros(3, 2), 4)


def test_select_class_filters_low_confidence_then_fills_from_the_most_confident():
    f = torch.arange(6, dtype=torch.float32).view(6, 1)
    conf = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.95, 0.3])
    keep = S.select_class(f, conf, 3, criterion="herding", min_confidence=0.5)
    assert set(keep.tolist()) == {0, 2, 4}  # exactly the eligible ones
    keep = S.select_class(f, conf, 4, criterion="kcenter", min_confidence=0.5)
    assert set(keep.tolist()) == {0, 2, 4, 5}  # 0.3 is the most confident below the threshold
    keep = S.select_class(f, conf, 2, criterion="confidence")
    assert keep.tolist() == [4, 0]
    with pytest.raises(ValueError, match="criterion"):
        S.select_class(f, conf, 2, criterion="random")


def test_select_per_class_is_class_major_balanced_and_inside_each_class():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat(8)  # 8 candidates per class, interleaved
    feats = torch.randn(24, 4, generator=g)
    logits = torch.randn(24, 3, generator=g)
    sel = S.select_per_class(feats, logits, labels, 2, real_means=torch.zeros(3, 4))
    assert sel.keep.shape == (6,)
    assert labels[sel.keep].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(sel.keep.tolist())) == 6
    assert torch.allclose(sel.confidence, torch.softmax(logits, 1)[torch.arange(24), labels])
    with pytest.raises(ValueError, match="candidates < ipc"):
        S.select_per_class(feats, logits, labels, 9)


@pytest.mark.parametrize("batch_size", [1, 7, 13, 500])
@pytest.mark.parametrize("criterion", S.CRITERIA)
def test_streamed_selection_equals_the_whole_pool_selection(batch_size, criterion):
    """select_streamed (the pool read one encode batch at a time, a class chosen once complete) keeps exactly
    what select_per_class keeps on the whole pool's features, whether a batch ends inside a class, holds
    several classes, or holds one row; a pool that is not class-major is refused."""
    from ddkit.evaluate.networks import ConvNet

    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    net = ConvNet(1, 4, 8, width=4).eval()
    counts = [5, 9, 3, 6]  # uneven, as a pool cut by the deadline is not (merge balances it), to test the bounds
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
    means = torch.randn(4, net.embed(torch.zeros(1, 1, 8, 8)).shape[1], generator=g)
    feats, logits = S.encode(net, images, batch_size=batch_size)
    kw = dict(criterion=criterion, min_confidence=0.3, real_means=means)
    whole = S.select_per_class(feats, logits, labels, 3, **kw)
    streamed = S.select_streamed(net, images, labels, 3, batch_size=batch_size, **kw)
    assert streamed.keep.tolist() == whole.keep.tolist()
    assert torch.equal(streamed.confidence, whole.confidence)
    with pytest.raises(ValueError, match="candidates < ipc"):
        S.select_streamed(net, images, labels, 4, batch_size=batch_size, **kw)
    with pytest.raises(ValueError, match="class-major"):
        S.select_streamed(net, images, labels.flip(0), 3, batch_size=batch_size, **kw)


def test_selection_reserve_is_the_timed_cost_of_one_class_times_the_candidates(tmp_path):
    """The reserve +select keeps for its selection is measured on the encoder (one class's candidates
    encoded and chosen), scaled by the dataset's classes: a slower machine gets a larger reserve."""
    from conftest import digit_shards

    from ddkit.config import load_config
    from ddkit.methods import registry
    from ddkit.methods.selected import SELECTION_FIXED_SECONDS, encoder_for, selection_seconds_per_candidate

    data = digit_shards(tmp_path, classes=3)
    cfg = load_config(None, [*data, f"run_dir={tmp_path / 'run'}", "generate.ipc_max=10",
                             "generate.select.ratio=4", "generate.select.encoder_epochs=1"])  # fmt: skip
    meth = registry.build("dit+select", cfg)
    meth.before_sampling(progress=False)
    per = meth.prepared_seconds["select_per_candidate_s"]
    assert per > 0 and meth.reserve_seconds() == pytest.approx(SELECTION_FIXED_SECONDS + per * 40 * 3)

    encoder, means, _ = encoder_for(cfg)
    ticks = iter([10.0, 16.0])  # a fake clock: the timed work "takes" 6 s
    per = selection_seconds_per_candidate(encoder, means, (1, 16, 16), 40, 10, cfg.generate.select,
                                          clock=lambda: next(ticks))  # fmt: skip
    assert per == pytest.approx(6.0 / 40)
