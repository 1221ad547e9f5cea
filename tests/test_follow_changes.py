"""Standalone commands answer a config change as ``ddkit run`` does (:func:`ddkit.stages.enter`): an unchanged
fingerprint skips with its reason, a changed one sets the old output aside under ``RUN/.stale/`` and reruns,
and nothing old is ever returned for new inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddkit.cli import app
from ddkit.io import read_done

ROOT = Path(__file__).resolve().parents[1]
GEN = ("generate.precision=fp32", "generate.steps_min=2", "generate.steps_max=2", "generate.ipc_min=1",
       "generate.ipc_max=1", "generate.batch_size=10", "generate.quality=dsr")  # fmt: skip


def _generate(run: Path, shards: Path, out: Path, *sets: str, flags: tuple[str, ...] = ()):
    args = ["generate", str(run), "-c", str(ROOT / "configs" / "mnist.yaml"), "-m", "dit", "--out", str(out),
            "--no-progress", "--time-limit", "120", *flags]  # fmt: skip
    for kv in (f"data.shards={shards}", *GEN, *sets):
        args += ["--set", kv]
    return CliRunner().invoke(app, args)


def test_ddkit_generate_reruns_a_changed_config_and_skips_an_unchanged_one(mnist_shards, tmp_path):
    """The issue's case: ``--set generate.cfg_scale=1.0`` then ``4.0`` into one ``--out``. The second call
    must not leave the first set with a config that says 4.0."""
    run, out = tmp_path / "run", tmp_path / "X"
    first = _generate(run, mnist_shards, out, "generate.cfg_scale=1.0")
    assert first.exit_code == 0, first.output
    images_1 = torch.load(out / "dataset.pt")["images"]
    fp_1 = read_done(out)["fingerprint"]

    again = _generate(run, mnist_shards, out, "generate.cfg_scale=1.0")
    assert again.exit_code == 0, again.output
    assert "skip: unchanged" in again.output and read_done(out)["fingerprint"] == fp_1

    changed = _generate(run, mnist_shards, out, "generate.cfg_scale=4.0")
    assert changed.exit_code == 0, changed.output
    assert "run: changed: generate.cfg_scale 1.0 -> 4.0" in changed.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["cfg_scale"] == 4.0 and man["record"]["cfg_scale"] == 4.0
    assert read_done(out)["fingerprint"] != fp_1
    assert not torch.equal(torch.load(out / "dataset.pt")["images"], images_1)
    stale = run / ".stale" / "X"
    assert torch.equal(torch.load(stale / "dataset.pt")["images"], images_1)  # set aside, not lost

    forced = _generate(run, mnist_shards, out, "generate.cfg_scale=4.0", flags=("--force",))
    assert forced.exit_code == 0 and "run: --force" in forced.output, forced.output


def test_a_merge_refuses_shards_sampled_under_different_records(mnist_shards, tmp_path):
    """Shards of one generation made under two plans are never merged into one set."""
    from ddkit.config import load_config
    from ddkit.errors import DataError
    from ddkit.generate import generate, merge
    from ddkit.io import mark_done

    run, out = tmp_path / "run", tmp_path / "gen"
    cfg = load_config(ROOT / "configs" / "mnist.yaml", [f"run_dir={run}", f"data.shards={mnist_shards}", *GEN])
    generate(cfg, method="dit", out_dir=out, rank=0, world_size=2, progress=False, time_limit=120)
    generate(cfg, method="dit", out_dir=out, rank=1, world_size=2, progress=False, time_limit=120,
             merge_when_done=False)  # fmt: skip
    done = read_done(out / "shard-1")
    done["record"]["steps"] = 3  # as if shard 1 had planned on its own
    mark_done(out / "shard-1", done)
    with pytest.raises(DataError, match=r"shard-1: sampled under another record than shard-0 \(steps: 2 != 3\)"):
        merge(out)
