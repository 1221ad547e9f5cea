"""The generator bundle runs on its own: packaged from a run whose weights are Hugging Face ids, copied to a
fresh directory with the run, the shards and the HF cache deleted, then run as the challenge runs it, in a
clean environment, for dit, minimax and D^3HR, and compared with what the run itself generated.

The challenge runs ``BUNDLE/generate``, which runs ``apptainer exec --cleanenv ... --bind BUNDLE:/bundle:ro
--bind OUT:OUT IMAGE python -m ddkit.challenge``. Apptainer cannot be installed here, so when bubblewrap is
there an ``apptainer`` stand-in on PATH runs that same command line under ``bwrap`` with the same binds:
the host's top-level folders read-only play the image (its Python and ddkit), ``/tmp`` and ``$HOME`` are
empty (no run, no HF cache), no network. Without bwrap, ``python -m ddkit.challenge`` runs under ``env -i``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
HF_ID = "ddkit-test/tiny-dit"
METHODS = ("dit", "minimax", "d3hr", "mgd3")

SETS = [
    "data.dataset=cifar100", "data.channels=3", "model.class_map=identity", f"model.pretrained={HF_ID}",
    f"model.vae={HF_ID}", "model.arch=custom(depth=2,hidden=32,heads=2,patch=2)", "model.in_channels=4",
    "model.input_size=4", "model.num_classes=1000", "model.learn_sigma=true",
    "minimax.steps=2", "minimax.batch_size=8", "minimax.trainable=difffit", "minimax.memory_size=8",
    "minimax.ckpt_every=2", "generate.sampler=ddpm", "generate.steps_min=2", "generate.steps_max=2",
    "generate.ipc_min=10", "generate.ipc_max=10", "generate.batch_size=500", "generate.precision=fp32",
    "generate.cfg_scale=1.0", "generate.d3hr.inversion_steps=5", "generate.d3hr.store_from=400",
    "generate.d3hr.store_to=800", "generate.d3hr.timestep=600", "generate.d3hr.num_groups=20",
    "generate.d3hr.max_images_per_class=2",
]  # fmt: skip

APPTAINER_STANDIN = '''#!{python}
"""Stand-in for `apptainer exec` (tests/test_bundle.py): the same command line, run under bubblewrap."""
import os, pwd, sys

args = sys.argv[1:]
if not args or args[0] != "exec":
    sys.exit("apptainer stand-in: only `apptainer exec` is provided")
i, env, binds, clean = 1, {{}}, [], False
while args[i].startswith("--"):
    if args[i] in ("--nv", "--cleanenv"):
        clean |= args[i] == "--cleanenv"
        i += 1
    elif args[i] in ("--env", "--bind"):
        (binds.append(args[i + 1]) if args[i] == "--bind" else env.update([args[i + 1].split("=", 1)]))
        i += 2
    else:
        sys.exit(f"apptainer stand-in: unknown option {{args[i]}}")
image, cmd = args[i], args[i + 1:]
if not os.path.isfile(image):
    sys.exit(f"apptainer stand-in: image {{image}} not found")
home = os.environ.get("HOME", "/root")
# The image's filesystem: the host's top-level folders read-only on an empty root (so bind targets such as
# /bundle can be created, as Apptainer does), with an empty /tmp and $HOME and no user HF cache.
bw = ["bwrap", "--tmpfs", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
for name in sorted(os.listdir("/")):
    p = "/" + name
    if name in ("dev", "proc", "tmp", "sys"):
        continue
    bw += ["--symlink", os.readlink(p), p] if os.path.islink(p) else ["--ro-bind", p, p] if os.path.isdir(p) else []
# The image's own Python and ddkit, wherever this checkout lives (also below /tmp, which is empty above).
for d in {image_dirs!r}:
    bw += ["--ro-bind", d, d]
hub = os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".cache", "huggingface")
bw += (["--tmpfs", hub] if os.path.isdir(hub) else []) + ["--dir", home]
bw += ["--unshare-pid", "--unshare-net", "--die-with-parent", "--clearenv"]
for b in binds:
    src, dst, *opts = b.split(":")
    bw += ["--ro-bind" if opts == ["ro"] else "--bind", src, dst]
# The image's own environment: its Python (with ddkit) first on PATH, HF_HUB_OFFLINE (containers/ddkit.def).
# The kernel-ISA caps stand for the CPU itself (CI's stand-in for one without native bf16), which
# --cleanenv does not change: they reach the image as the hardware would.
image_env = {{"PATH": {path!r}, "PYTHONPATH": {pythonpath!r}, "HF_HUB_OFFLINE": "1", "HOME": home,
             "OMP_NUM_THREADS": {threads!r}, **{hardware!r}}}
for k, v in {{**({{}} if clean else os.environ), **image_env, **env}}.items():
    bw += ["--setenv", k, v]
os.execvp("bwrap", bw + ["--chdir", "/", *cmd])
'''


def hf_cache_with_tiny_pipeline(root: Path) -> Path:
    """An HF hub cache holding the tiny DiT pipeline (sample size 4: 32 px images) as repo ``HF_ID``."""
    from ddkit.models.tiny import build_tiny_pipeline

    repo = root / ("models--" + HF_ID.replace("/", "--"))
    rev = "0" * 40
    build_tiny_pipeline(repo / "snapshots" / rev, sample_size=4)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return root


def _cli(*args: str) -> str:
    from typer.testing import CliRunner

    from ddkit.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 0, (args, r.output[-3000:], r.exception)
    return r.output


def bwrap_works() -> bool:
    """bubblewrap installed and allowed to make its namespaces here (not in every container)."""
    if shutil.which("bwrap") is None:
        return False
    return subprocess.run(["bwrap", "--ro-bind", "/", "/", "--unshare-pid", "true"], capture_output=True).returncode == 0


def cpu_caps() -> dict[str, str]:
    """The kernel-ISA caps set for this process (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): CI sets them to
    stand in for a CPU without native bf16, so the bundle must run under them too to make the same floats."""
    return {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}


def run_bundle(bundle: Path, out: Path, home: Path, bindir: Path) -> subprocess.CompletedProcess:
    """Run ``bundle`` as the challenge does, in a clean environment (see the module docstring)."""
    home.mkdir(exist_ok=True)
    clean = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(home), "HF_HUB_OFFLINE": "1", **cpu_caps()}
    if shutil.which("apptainer") is None and bwrap_works():
        cmd = [str(bundle / "generate"), "--dataset", "cifar100", "--out", str(out), "--time-limit", "300"]
    else:  # no stand-in possible: the command the image would run, without the image
        clean["PYTHONPATH"] = str(ROOT)
        cmd = [sys.executable, "-m", "ddkit.challenge", "--bundle", str(bundle), "--dataset", "cifar100",
               "--out", str(out), "--time-limit", "300"]
    return subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in clean.items()), *cmd], cwd=bundle.parent,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(600)
def test_bundles_run_alone_for_dit_minimax_d3hr_and_mgd3(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from test_package import cifar100_pickles

    from ddkit.errors import PackageError
    from ddkit.package import ECCV2024, check_submission, load_distilled, package_run, scorer_tensor

    hub = hf_cache_with_tiny_pipeline(tmp_path / "hf" / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))  # read at each call
    raw = cifar100_pickles(tmp_path / "raw", 2, 1)
    run, shards = tmp_path / "run", tmp_path / "shards"
    sets = [a for kv in [f"run_dir={run}", f"data.root={raw}", f"data.shards={shards}", *SETS] for a in ("--set", kv)]
    _cli("data", "shard", "cifar100", *sets)
    _cli("train", "--stage", "minimax", "--no-progress", *sets)
    image = tmp_path / "ddkit.sif"
    image.write_bytes(b"stand-in image: the apptainer stand-in runs the host's Python")
    expected, bundles = {}, {}
    for m in METHODS:
        _cli("generate", "--method", m, "--time-limit", "300", "--no-progress", *sets)
        expected[m] = scorer_tensor(load_distilled(run / f"gen-{m}"), ECCV2024["cifar100"])[0]
        bundles[m] = tmp_path / f"bundle-{m}"
        _cli("package", str(run), "--method", m, "--format", "eccv2024-generator", "--out", str(bundles[m]),
             "--image", str(image), *sets)
        assert "OK   sha256" in _cli("package", "--check", str(bundles[m]))

    # What each bundle holds: the weights the run sampled, resolved from the HF ids, and nothing else.
    cfgs = {m: yaml.safe_load((bundles[m] / "configs" / "cifar100.yaml").read_text()) for m in METHODS}
    w = bundles["minimax"] / "weights" / "cifar100"
    assert cfgs["minimax"]["generate"]["checkpoint"] == "weights/cifar100/last.pt"
    packed = torch.load(w / "last.pt", weights_only=False)
    assert packed["weights"] == "ema" and {"optimizer", "ema", "rng", "memories"}.isdisjoint(packed)
    assert packed["source"] == str(run / "minimax" / "ckpt" / "last.pt")
    for m in ("dit", "d3hr", "mgd3"):  # they sampled model.pretrained (the HF id), not RUN/minimax
        assert cfgs[m]["generate"]["checkpoint"] == "weights/cifar100/transformer"
        names = sorted(p.name for p in (bundles[m] / "weights" / "cifar100" / "transformer").iterdir())
        assert names == ["config.json", "diffusion_pytorch_model.safetensors"]
    for m in METHODS:
        model = cfgs[m]["model"]
        assert model["pretrained"] is None and model["vae"] is None
        assert model["vae_decoder"] == "weights/cifar100/vae"
        assert (bundles[m] / "weights" / "cifar100" / "scheduler" / "scheduler_config.json").is_file()
        assert HF_ID not in (bundles[m] / "configs" / "cifar100.yaml").read_text()
    assert cfgs["d3hr"]["generate"]["d3hr"]["statistics"] == "weights/cifar100/d3hr-stats.pt"
    assert not (bundles["dit"] / "weights" / "cifar100" / "d3hr-stats.pt").exists()
    assert cfgs["mgd3"]["generate"]["modes"]["file"] == "weights/cifar100/modes.pt"  # fitted on the run's shards

    # Packaging is offline: an id missing from the local HF cache is one line naming the key and the id.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(PackageError) as e:
        package_run(run, fmt="eccv2024-generator", method="dit", out=tmp_path / "never")
    assert "\n" not in str(e.value) and "model.pretrained" in str(e.value) and repr(HF_ID) in str(e.value)

    # Nothing else on disk: fresh copies; the run, shards, images, HF cache and originals are gone.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for m in METHODS:
        shutil.copytree(bundles[m], fresh / f"bundle-{m}", symlinks=True)
    for p in (run, shards, raw, tmp_path / "hf", image, *bundles.values()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apptainer").write_text(APPTAINER_STANDIN.format(
        python=sys.executable, path=f"{Path(sys.executable).parent}:/usr/bin:/bin", pythonpath=str(ROOT),
        threads=os.environ.get("OMP_NUM_THREADS", "2"), image_dirs=[sys.prefix, str(ROOT)], hardware=cpu_caps()))
    (bindir / "apptainer").chmod(0o755)
    for m in METHODS:
        out = tmp_path / f"out-{m}"
        r = run_bundle(fresh / f"bundle-{m}", out, tmp_path / "home", bindir)
        assert r.returncode == 0, (m, r.stdout[-2000:], r.stderr[-3000:])
        assert sorted(p.name for p in out.iterdir()) == ["cifar100.pt"]
        assert check_submission(out, allow_partial=True).ok
        got = torch.load(out / "cifar100.pt")
        # The same weights, statistics and seeds: the bundle makes the run's images.
        assert torch.equal(got, expected[m]), (m, float((got - expected[m]).abs().max()))


def test_precomputed_statistics_must_match_the_settings(tmp_path):
    """generate.d3hr.statistics: a file for other timesteps or classes is refused with one line."""
    from ddkit.config import load_config
    from ddkit.errors import ConfigError, DataError
    from ddkit.methods.d3hr import class_statistics

    def load_statistics(model, cfg):
        return class_statistics(model, cfg, device="cpu", cache_dir=tmp_path / "never")

    shards = tmp_path / "shards"
    shards.mkdir()
    index = {"dataset": "x", "classes": ["a", "b"], "class_ids": ["a", "b"], "imagenet_index": None,
             "resolution": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "counts": {}, "shards": {},
             "sha256": {}, "latents": False}
    (shards / "dataset.json").write_text(json.dumps(index))
    stats = tmp_path / "stats.pt"
    blob = {"key": "k", "timesteps": [400, 600, 800], "classes": ["a", "b"], "mean": torch.zeros(3, 2, 4, 4, 4),
            "var": torch.ones(3, 2, 4, 4, 4), "counts": torch.tensor([2, 2]), "inputs": {}}
    torch.save(blob, stats)
    base = [f"data.shards={shards}", f"generate.d3hr.statistics={stats}", "generate.d3hr.inversion_steps=5",
            "generate.d3hr.store_from=400", "generate.d3hr.store_to=800", "generate.d3hr.timestep=600"]
    model = torch.nn.Linear(1, 1)  # stands in for the Backbone: only its attributes are read
    model.in_channels, model.input_size, model.num_classes, model.learn_sigma = 4, 4, 2, True
    got = load_statistics(model, load_config(None, base))
    assert got.timestep == 600 and got.timesteps == [400, 600, 800] and not got.computed and got.path == stats
    assert not (tmp_path / "never").exists()  # nothing inverted, nothing cached
    with pytest.raises(ConfigError, match=r"stores timesteps \[400, 600, 800\], the settings ask for \[400, 600\]"):
        load_statistics(model, load_config(None, [*base, "generate.d3hr.store_to=600"]))
    torch.save({**blob, "classes": ["a", "c"]}, stats)
    with pytest.raises(DataError, match="differ at index 1"):
        load_statistics(model, load_config(None, base))
    with pytest.raises(ConfigError, match="not found"):
        load_statistics(model, load_config(None, [*base, f"generate.d3hr.statistics={tmp_path / 'nope.pt'}"]))
