"""`ddkit package`: the ECCV 2024 challenge archive, folder/WebDataset layouts, the generator bundle, --check.

Runs are built here from real CIFAR-100 test images (the 20 PNGs foolbox ships), replicated with shifts and
flips to 10 images for each of the 100 (or 200) classes, in the generation contract's layout.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from ddkit.errors import PackageError
from ddkit.package import (
    CIFAR100_CLASSES,
    ECCV2024,
    check_submission,
    package_run,
    resize_uint8,
)

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)


def real_cifar100() -> torch.Tensor:
    """uint8 [20, 3, 32, 32]: foolbox's real CIFAR-100 test images (found without importing foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(data.glob("cifar100_*.png"))
    assert len(files) == 20
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])


def make_images(num_classes: int, ipc: int, size: int = 32) -> torch.Tensor:
    """uint8 [num_classes * ipc, 3, size, size], class-major, every image a shifted/flipped real photo."""
    base = real_cifar100()
    if size != 32:
        base = resize_uint8(base, size)
    out = []
    for k in range(num_classes):
        for i in range(ipc):
            img = torch.roll(base[(k * ipc + i) % len(base)], shifts=(k % 7, i % 5), dims=(1, 2))
            out.append(img.flip(-1) if k % 2 else img)
    return torch.stack(out)


def make_run(root: Path, dataset: str, classes: list[str], images: torch.Tensor, labels: torch.Tensor,
             ipc: int, method: str = "minimax") -> Path:
    """A run dir as `ddkit generate` leaves it: RUN/gen-<method>/{dataset.pt, manifest.json, config.yaml}."""
    gen = root / f"gen-{method}"
    gen.mkdir(parents=True)
    torch.save({"images": images, "labels": labels, "classes": classes, "ipc": ipc}, gen / "dataset.pt")
    (gen / "manifest.json").write_text(json.dumps({
        "steps": 25, "ipc": ipc, "method": method, "budget_share_used": 0.87, "wall_time": {"sample": 412.0},
        "hardware": {"device": "NVIDIA H100", "gpus": 1}, "checkpoint": str(root / "minimax" / "ckpt" / "last.pt"),
    }))
    (gen / "config.yaml").write_text(yaml.safe_dump({"name": dataset, "run_dir": str(root),
                                                     "data": {"dataset": dataset, "channels": 3}}))
    return root


def class_major_labels(num_classes: int, ipc: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(ipc)


def cifar100_pickles(raw: Path, train_ipc: int, test_ipc: int) -> Path:
    """``raw/{train,test,meta}`` in the CIFAR-100 python-pickle layout, from :func:`make_images`."""
    import pickle

    raw.mkdir()
    for split, ipc in (("train", train_ipc), ("test", test_ipc)):
        imgs = make_images(100, ipc)
        with open(raw / split, "wb") as f:
            pickle.dump({b"data": imgs.reshape(len(imgs), -1).numpy(), b"fine_labels": class_major_labels(100, ipc)
                         .tolist(), b"filenames": [b"x.png"] * len(imgs)}, f)
    with open(raw / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES]}, f)
    return raw


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar") / "run"
    return make_run(root, "cifar100", list(CIFAR100_CLASSES), make_images(100, 10), class_major_labels(100, 10), 10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "run"
    wnids = [f"n{1440764 + 17 * k:08d}" for k in range(200)]
    return make_run(root, "tinyimagenet", wnids, make_images(200, 10, 64), class_major_labels(200, 10), 10)


def normalized(images: torch.Tensor, mean, std) -> torch.Tensor:
    """The scorer's README transform written out independently of ddkit."""
    x = images.double() / 255.0
    for c in range(3):
        x[:, c] = (x[:, c] - mean[c]) / std[c]
    return x.float()


# ----------------------------------------------------------------------------------------------------------
# Round trip
# ----------------------------------------------------------------------------------------------------------
def test_eccv2024_round_trip_loads_with_bare_torch_load(cifar_run, tiny_run, tmp_path):
    out = package_run([cifar_run, tiny_run], fmt="eccv2024", out=tmp_path / "submission.zip")
    submit_dir = tmp_path / "unpacked"
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == ["cifar100.pt", "manifest.json", "tinyimagenet.pt"]  # flat root
        z.extractall(submit_dir)
    # (package_run has already checked the zip itself before renaming it into place)
    report = check_submission(submit_dir)  # the unpacked directory, as the scorer sees it
    assert report.ok, report.lines()
    assert [v.name for v in report.verdicts] == ["cifar100.pt", "tinyimagenet.pt"]

    src = torch.load(cifar_run / "gen-minimax" / "dataset.pt")
    data = torch.load(submit_dir / "cifar100.pt")  # exactly the scorer's call
    assert torch.is_tensor(data) and data.dtype == torch.float32 and tuple(data.shape) == (1000, 3, 32, 32)
    assert torch.allclose(data, normalized(src["images"], CIFAR_MEAN, CIFAR_STD), atol=1e-6)
    tiny = torch.load(submit_dir / "tinyimagenet.pt")
    assert tuple(tiny.shape) == (2000, 3, 64, 64)
    tsrc = torch.load(tiny_run / "gen-minimax" / "dataset.pt")["images"][::97]  # a spread-out subset
    tiny_norm = normalized(tsrc, ECCV2024["tinyimagenet"].mean, ECCV2024["tinyimagenet"].std)
    assert torch.allclose(tiny[::97], tiny_norm, atol=1e-6)
    # The saved file holds only this tensor (a view would drag its parent storage along).
    assert (submit_dir / "cifar100.pt").stat().st_size < 1000 * 3 * 32 * 32 * 4 + 4096

    man = json.loads((submit_dir / "manifest.json").read_text())
    assert man["ddkit_version"] and man["format"] == "eccv2024"
    entry = man["datasets"]["cifar100.pt"]
    assert entry["ipc"] == 10 and entry["steps"] == 25 and entry["class_order"] == list(CIFAR100_CLASSES)
    assert entry["normalization"]["mean"] == list(CIFAR_MEAN) and entry["budget"]["budget_share_used"] == 0.87
    assert entry["generation_hardware"]["device"] == "NVIDIA H100" and entry["config"]["data"]["dataset"] == "cifar100"
    assert "packaging_hardware" in man
    for name in ("cifar100.pt", "tinyimagenet.pt"):
        import hashlib

        assert man["files"][name] == hashlib.sha256((submit_dir / name).read_bytes()).hexdigest()


def test_cli_package_then_check(cifar_run, tmp_path):
    from ddkit.cli import app

    out = tmp_path / "submission.zip"
    r = CliRunner().invoke(app, ["package", str(cifar_run), "--format", "eccv2024", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "wrote" in r.output
    assert out.stat().st_mode & 0o044, oct(out.stat().st_mode)  # not mkstemp's 0600
    # One dataset only: the scorer also loads tinyimagenet.pt, so a plain check fails and says why.
    r = CliRunner().invoke(app, ["package", "--check", str(out)])
    assert r.exit_code == 1 and "tinyimagenet.pt: missing" in r.output, r.output
    r = CliRunner().invoke(app, ["package", "--check", str(out), "--partial"])
    assert r.exit_code == 0, r.output
    assert "OK   cifar100.pt: float32 [1000, 3, 32, 32]" in r.output
    with zipfile.ZipFile(out) as z:
        z.extract("cifar100.pt", tmp_path)
    r = CliRunner().invoke(app, ["package", "--check", str(tmp_path / "cifar100.pt")])  # a single file
    assert r.exit_code == 0 and "OK   cifar100.pt" in r.output, r.output
    (tmp_path / "cifar100.pt").rename(tmp_path / "cifar10.pt")
    r = CliRunner().invoke(app, ["package", "--check", str(tmp_path / "cifar10.pt")])
    assert r.exit_code == 1 and "loads only cifar100.pt and tinyimagenet.pt" in r.output


def test_classes_are_put_in_the_scorers_order_and_extra_ipc_is_cut(tmp_path):
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    classes = [CIFAR100_CLASSES[i] for i in perm.tolist()]
    images = make_images(100, 12)
    # labels shuffled as well: packaging must sort to class-major itself
    labels = class_major_labels(100, 12)
    shuffle = torch.randperm(1200, generator=torch.Generator().manual_seed(1))
    run = make_run(tmp_path / "run", "cifar100", classes, images[shuffle], labels[shuffle], 12)
    out = package_run(run, out=tmp_path / "s.zip")
    with zipfile.ZipFile(out) as z:
        data = torch.load(io.BytesIO(z.read("cifar100.pt")))
    assert data.shape[0] == 1000
    # scorer class j must hold the images the run labelled with the class named CIFAR100_CLASSES[j]
    for j in (0, 57, 99):
        k = classes.index(CIFAR100_CLASSES[j])
        own = images[labels == k]
        got = data[j * 10:(j + 1) * 10]
        want = normalized(own, CIFAR_MEAN, CIFAR_STD)
        # every packaged image of this block is one of the run's images of that class
        d = (got[:, None] - want[None]).abs().flatten(2).amax(-1)
        assert bool((d.amin(1) < 1e-5).all())


def test_generation_at_256px_is_resized_to_32(tmp_path):
    images = resize_uint8(make_images(100, 10), 64)  # a run generated at a larger resolution
    run = make_run(tmp_path / "run", "cifar100", list(CIFAR100_CLASSES), images, class_major_labels(100, 10), 10)
    out = package_run(run, out=tmp_path / "s.zip")
    with zipfile.ZipFile(out) as z:
        data = torch.load(io.BytesIO(z.read("cifar100.pt")))
        man = json.loads(z.read("manifest.json"))
    assert tuple(data.shape) == (1000, 3, 32, 32)
    assert man["datasets"]["cifar100.pt"]["resized_from"] == [64, 64]
    pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(im.permute(1, 2, 0).numpy()).resize(
        (32, 32), Image.BILINEAR))).permute(2, 0, 1) for im in images[:50]])
    den = data[:50] * torch.tensor(CIFAR_STD).view(1, 3, 1, 1) + torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    assert float((den * 255 - pil.float()).abs().mean()) < 2.0  # within ~2 grey levels of PIL's resize


# ----------------------------------------------------------------------------------------------------------
# Refusals when packaging
# ----------------------------------------------------------------------------------------------------------
def test_refuses_unequal_ipc_low_ipc_wrong_classes_and_non_challenge_data(tmp_path):
    images, labels = make_images(100, 10), class_major_labels(100, 10)
    bad_labels = labels.clone()
    bad_labels[5] = 1  # class 0 loses one image to class 1
    r = make_run(tmp_path / "a", "cifar100", list(CIFAR100_CLASSES), images, bad_labels, 10)
    with pytest.raises(PackageError, match="unequal IPC: class 0 .* has 9 images, most classes have 10"):
        package_run(r, out=tmp_path / "a.zip")

    r = make_run(tmp_path / "b", "cifar100", list(CIFAR100_CLASSES), images[::2], class_major_labels(100, 5), 5)
    with pytest.raises(PackageError, match="IPC 5; the scorer .* asserts exactly 10"):
        package_run(r, out=tmp_path / "b.zip")

    names = list(CIFAR100_CLASSES)
    names[3] = "platypus"
    r = make_run(tmp_path / "c", "cifar100", names, images, labels, 10)
    with pytest.raises(PackageError, match="'platypus' is not a CIFAR-100 fine label"):
        package_run(r, out=tmp_path / "c.zip")

    mnist = images[:100, :1]
    r = make_run(tmp_path / "d", "mnist5k", [str(i) for i in range(10)], mnist, class_major_labels(10, 10), 10)
    with pytest.raises(PackageError, match="'mnist5k' is not a challenge dataset .*--format folder"):
        package_run(r, out=tmp_path / "d.zip")
    assert not (tmp_path / "d.zip").exists() and not list(tmp_path.glob(".d.zip*"))


# ----------------------------------------------------------------------------------------------------------
# --check on malformed submissions
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _cifar_images() -> torch.Tensor:
    return make_images(100, 10)


@functools.lru_cache(maxsize=1)
def _good_all() -> torch.Tensor:
    return normalized(_cifar_images(), CIFAR_MEAN, CIFAR_STD)


def _good(num: int = 1000) -> torch.Tensor:
    return _good_all()[:num]


def _write_zip(path: Path, members: dict[str, object], nested: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, obj in members.items():
            buf = io.BytesIO()
            torch.save(obj, buf)
            z.writestr(nested + name, buf.getvalue())
    return path


def _nan() -> torch.Tensor:
    x = _good().clone()
    x[3, 1, 4, 4] = float("nan")
    return x


MALFORMED = {
    "wrong shape": (lambda: torch.nn.functional.interpolate(_good(), size=28), "shape [1000, 3, 28, 28], expected"),
    "wrong channels": (lambda: _good()[:, :1].repeat(1, 4, 1, 1), "shape [1000, 4, 32, 32]"),
    "unequal IPC": (lambda: _good()[:999], "unequal IPC: 999 images are not a multiple of 100 classes"),
    "IPC 5": (lambda: _good()[:500], "IPC 5: the scorer asserts exactly 10"),
    "dict instead of tensor": (lambda: {"images": _good(), "labels": torch.zeros(1000)}, "needs a bare tensor"),
    "NaN": (_nan, "1 NaN/Inf values"),
    "float64": (lambda: _good().double(), "dtype float64, expected float32"),
    "0..255 pixels": (lambda: _cifar_images().float(), "outside [0, 1]"),
    "un-normalised 0..1": (lambda: _cifar_images().float() / 255, "looks un-normalised"),
    "pixels in -1..1": (lambda: _cifar_images().float() / 127.5 - 1, "span only"),
    "ImageNet constants": (lambda: normalized(_cifar_images(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                           "outside [0, 1]"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_check_refuses_malformed_cifar100(case, tmp_path):
    from ddkit.cli import app

    make, reason = MALFORMED[case]
    z = _write_zip(tmp_path / "s.zip", {"cifar100.pt": make()})
    report = check_submission(z, allow_partial=True)
    assert not report.ok
    bad = [v for v in report.verdicts if not v.ok]
    assert bad[0].name == "cifar100.pt" and reason in bad[0].message, bad[0].message
    r = CliRunner().invoke(app, ["package", "--check", str(z), "--partial"])
    assert r.exit_code == 1 and reason in " ".join(r.output.split()), r.output


def test_check_refuses_nested_archive_bad_zip_and_manifest_mismatch(cifar_run, tmp_path):
    z = _write_zip(tmp_path / "n.zip", {"cifar100.pt": _good()}, nested="submission/")
    rep = check_submission(z, allow_partial=True)
    assert not rep.ok and "inside a folder" in rep.first_failure()

    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert "not a zip archive" in check_submission(tmp_path / "junk.zip").first_failure()

    good = package_run(cifar_run, out=tmp_path / "good.zip")
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "tampered.zip", "w") as zout:
        zout.writestr("manifest.json", zin.read("manifest.json"))
        x = torch.load(io.BytesIO(zin.read("cifar100.pt")))
        x[0, 0, 0, 0] += 0.01
        buf = io.BytesIO()
        torch.save(x, buf)
        zout.writestr("cifar100.pt", buf.getvalue())
    assert "sha256 differs" in check_submission(tmp_path / "tampered.zip", allow_partial=True).first_failure()

    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(tmp_path / "counts.zip", "w") as zout:
        man = json.loads(zin.read("manifest.json"))
        man["datasets"]["cifar100.pt"]["class_counts"][7] = 9
        zout.writestr("manifest.json", json.dumps(man))
        zout.writestr("cifar100.pt", zin.read("cifar100.pt"))
    assert "unequal IPC in the manifest" in check_submission(tmp_path / "counts.zip", allow_partial=True).first_failure()


# ----------------------------------------------------------------------------------------------------------
# folder / webdataset
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def small_run(tmp_path) -> Path:
    names = ["zero", "one", "two/three", "four"]  # a '/' in a name must not make a nested directory
    return make_run(tmp_path / "run", "imagewoof", names, make_images(4, 3), class_major_labels(4, 3), 3)


def test_folder_round_trip_and_unequal_ipc(small_run, tmp_path):
    out = package_run(small_run, fmt="folder", out=tmp_path / "distilled")
    rep = check_submission(out)
    assert rep.ok, rep.lines()
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == ["000_zero", "001_one", "002_two_three", "003_four"]
    src = torch.load(small_run / "gen-minimax" / "dataset.pt")["images"]
    back = torch.from_numpy(np.array(Image.open(out / "002_two_three" / "0001.png"))).permute(2, 0, 1)
    assert torch.equal(back, src[2 * 3 + 1])  # PNG is lossless
    (out / "001_one" / "0002.png").unlink()
    rep = check_submission(out)
    assert not rep.ok and "unequal IPC: '001_one' has 2" in rep.first_failure()


def test_webdataset_round_trip(small_run, tmp_path):
    import webdataset as wds

    out = package_run(small_run, fmt="webdataset", out=tmp_path / "wds")
    assert check_submission(out).ok
    samples = list(wds.WebDataset(str(out / "distilled-000000.tar"), shardshuffle=False).decode("torchrgb"))
    assert len(samples) == 12
    assert [int(s["cls"]) for s in samples] == class_major_labels(4, 3).tolist()
    src = torch.load(small_run / "gen-minimax" / "dataset.pt")["images"]
    assert torch.allclose(samples[5]["png"], src[5].float() / 255, atol=1e-6)
    assert json.loads((out / "classes.json").read_text())[2] == "two/three"


# ----------------------------------------------------------------------------------------------------------
# Generative track: bundle and entry point
# ----------------------------------------------------------------------------------------------------------
def test_generator_bundle(cifar_run, tmp_path):
    ckpt = cifar_run / "minimax" / "ckpt" / "last.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(3)}, "ema": {"w": torch.ones(3)}, "optimizer": {"m": torch.ones(99)},
                "model_config": {}, "step": 7}, ckpt)
    with pytest.raises(PackageError, match="shard index .* not found"):
        package_run(cifar_run, fmt="eccv2024-generator", out=tmp_path / "gen")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "dataset.json").write_text(json.dumps({"dataset": "cifar100", "classes": list(CIFAR100_CLASSES)}))
    (shards / "classes.json").write_text(json.dumps(list(CIFAR100_CLASSES)))
    cfg_file = cifar_run / "gen-minimax" / "config.yaml"
    original = cfg_file.read_text()
    cfg_file.write_text(yaml.safe_dump({**yaml.safe_load(original), "data": {"dataset": "cifar100",
                                                                             "shards": str(shards)}}))
    try:
        out = package_run(cifar_run, fmt="eccv2024-generator", out=tmp_path / "gen")
    finally:
        cfg_file.write_text(original)  # the module-scoped run is shared with other tests
    packed = torch.load(out / "weights" / "cifar100" / "last.pt")
    # only what sampling reads: the EMA weights (as load_backbone's "model") and the model config
    assert packed["step"] == 7 and packed["weights"] == "ema" and torch.equal(packed["model"]["w"], torch.ones(3))
    assert "optimizer" not in packed and "ema" not in packed
    assert (out / "weights" / "cifar100" / "scheduler" / "scheduler_config.json").is_file()
    report = check_submission(out)  # `ddkit package --check BUNDLE`
    assert report.kind == "eccv2024-generator" and report.first_failure().startswith("ddkit.sif: missing"), report.lines()
    assert [v.name for v in report.verdicts if v.ok] == ["sha256", "generate", "configs/cifar100.yaml"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    bcfg = yaml.safe_load((broken / "configs" / "cifar100.yaml").read_text())
    bcfg["model"]["vae_decoder"] = "stabilityai/sd-vae-ft-mse"  # an HF id left in: not self-contained
    (broken / "configs" / "cifar100.yaml").write_text(yaml.safe_dump(bcfg))
    (broken / "generate").chmod(0o644)
    verdicts = {v.name: v for v in check_submission(broken).verdicts}
    assert not verdicts["sha256"].ok and "configs/cifar100.yaml differs" in verdicts["sha256"].message
    assert not verdicts["generate"].ok and "not executable" in verdicts["generate"].message
    msg = verdicts["configs/cifar100.yaml"].message
    assert not verdicts["configs/cifar100.yaml"].ok and "model.vae_decoder=stabilityai/sd-vae-ft-mse" in msg
    assert "Hugging Face id" in msg
    cfg = yaml.safe_load((out / "configs" / "cifar100.yaml").read_text())
    assert cfg["generate"]["checkpoint"] == "weights/cifar100/last.pt" and cfg["data"]["shards"] == "data/cifar100"
    assert json.loads((out / "data" / "cifar100" / "dataset.json").read_text())["classes"][0] == "apple"
    man = json.loads((out / "manifest.json").read_text())
    assert "weights/cifar100/last.pt" in man["files"] and man["image"] is None
    script = out / "generate"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    env = {"PATH": "/usr/bin:/bin"}  # no apptainer here: the entry point says so and exits 127
    r = subprocess.run([str(script), "--dataset", "cifar100", "--out", str(tmp_path / "o")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 127 and "apptainer not found" in r.stderr
    r = subprocess.run([str(script), "--dataset", "cifar100"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "--out DIR is required" in r.stderr


def test_challenge_entry_point_writes_a_scorer_file(cifar_run, tmp_path, monkeypatch):
    """`python -m ddkit.challenge` with ddkit.generate.generate replaced by one writing real images."""
    import ddkit.challenge as challenge

    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "weights").mkdir()
    (bundle / "weights" / "last.pt").write_bytes(b"ckpt")
    (bundle / "data" / "cifar100").mkdir(parents=True)
    (bundle / "configs" / "cifar100.yaml").write_text(yaml.safe_dump({
        "name": "cifar100", "data": {"dataset": "cifar100", "channels": 3, "shards": "data/cifar100"},
        "generate": {"checkpoint": "weights/last.pt", "ipc_max": 50}}))
    seen = {}

    def fake_generate(cfg, *, method=None, time_limit=None, out_dir=None, progress=True, t0=None):
        seen.update(cfg=cfg, time_limit=time_limit, t0=t0)
        gen = Path(cfg.run_dir) / "gen-minimax"
        gen.mkdir(parents=True)
        shutil.copy(cifar_run / "gen-minimax" / "dataset.pt", gen / "dataset.pt")
        (gen / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": "cifar100"}}))
        return gen

    monkeypatch.setattr(challenge, "generate", fake_generate)
    rc = challenge.main(["--dataset", "cifar100", "--out", str(tmp_path / "out"), "--time-limit", "600",
                         "--bundle", str(bundle)])
    assert rc == 0
    cfg = seen["cfg"]
    assert cfg.generate.checkpoint == str((bundle / "weights" / "last.pt").resolve())
    assert cfg.data.shards == str((bundle / "data" / "cifar100").resolve())
    assert cfg.generate.ipc_min == cfg.generate.ipc_max == 10  # the scorer's IPC, nothing wasted on more
    assert 590 < seen["time_limit"] < 600  # minus the measured write time
    # called in-process with argv, the budget starts at the call (as its own process: at the process start)
    assert challenge._T0 <= seen["t0"] <= time.monotonic()
    data = torch.load(tmp_path / "out" / "cifar100.pt")
    assert tuple(data.shape) == (1000, 3, 32, 32)
    assert check_submission(tmp_path / "out", allow_partial=True).ok
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cifar100.pt"]
    assert (tmp_path / "out" / "cifar100.pt").stat().st_mode & 0o044  # readable by the organisers


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_generative_track_end_to_end(tmp_path):
    """Real CIFAR-100 pickles (foolbox images) -> shards -> tiny DiT -> generation at IPC 10 -> eccv2024 zip;
    then the generator bundle -> `python -m ddkit.challenge` -> a checked cifar100.pt. About 2 min on CPU."""
    import ddkit.challenge as challenge
    from ddkit.cli import app

    raw = cifar100_pickles(tmp_path / "raw", 6, 2)
    run = tmp_path / "run"
    sets = []
    for kv in (f"run_dir={run}", "data.dataset=cifar100", f"data.root={raw}", "data.channels=3",
               f"data.shards={tmp_path / 'shards'}", "model.in_channels=3", "model.num_classes=100",
               "pretrain.steps=3", "pretrain.batch_size=32", "generate.steps_min=2", "generate.steps_max=2",
               "generate.ipc_min=10", "generate.ipc_max=10"):
        sets += ["--set", kv]
    for args in (["data", "shard", "cifar100"], ["train", "--stage", "pretrain", "--no-progress"],
                 ["generate", "--method", "dit", "--no-progress", "--time-limit", "300"]):
        r = CliRunner().invoke(app, args + sets)
        assert r.exit_code == 0, (args, r.output)
    r = CliRunner().invoke(app, ["package", str(run), "--method", "dit", "--out", str(tmp_path / "s.zip")] + sets)
    assert r.exit_code == 0, r.output
    assert check_submission(tmp_path / "s.zip", allow_partial=True).ok
    r = CliRunner().invoke(app, ["package", str(run), "--method", "dit", "--format", "eccv2024-generator",
                                 "--out", str(tmp_path / "bundle")] + sets)
    assert r.exit_code == 0, r.output
    rc = challenge.main(["--bundle", str(tmp_path / "bundle"), "--dataset", "cifar100", "--out",
                         str(tmp_path / "out"), "--time-limit", "300"])
    assert rc == 0
    data = torch.load(tmp_path / "out" / "cifar100.pt")
    assert tuple(data.shape) == (1000, 3, 32, 32) and data.dtype == torch.float32
