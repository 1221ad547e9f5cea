"""ddkit.fingerprint (pure): inputs, fingerprints and the rerun decision; the pipeline's plan over a run
directory whose DONE records are written by hand (no training)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ddkit.config import load_config
from ddkit.errors import ConfigError
from ddkit.fingerprint import changes, decide, fingerprint, flatten, grown_only, path_identity, select
from ddkit.io import is_done, mark_done, read_done, set_aside

BASE = {"seed": 0, "model": {"arch": "DiT-T/4", "pretrained": None}, "minimax": {"steps": 150, "lr": 0.001}}


def _inputs(**changes_: object) -> dict:
    cfg = json.loads(json.dumps(BASE))
    for key, value in changes_.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return {**select(cfg, ("seed", "model", "minimax")), "ddkit": "0.1.0"}


def _done(inputs: dict, **info: object) -> dict:
    return {**info, "fingerprint": fingerprint(inputs), "inputs": inputs}


def test_select_reads_sections_and_keys_minus_ignores():
    cfg = {
        "data": {"dataset": "m", "num_workers": 2},
        "generate": {"cfg_scale": 2.0, "d3hr": {"timestep": 600}},
    }
    assert flatten(cfg)["generate.d3hr.timestep"] == 600
    got = select(cfg, ("generate", "data.num_workers"), ("generate.d3hr",))
    assert got == {"generate.cfg_scale": 2.0, "data.num_workers": 2}
    assert select(cfg, ("gen",)) == {}  # a prefix of a name is not its section


def test_fingerprint_is_order_free_and_value_sensitive():
    a = {"x": 1, "y": [1, 2]}
    assert fingerprint(a) == fingerprint({"y": [1, 2], "x": 1})
    assert fingerprint(a) != fingerprint({"x": 1, "y": [2, 1]})
    assert fingerprint({"x": 1.0}) != fingerprint({"x": 1.5})


def test_unchanged_stage_skips_and_says_so():
    new = _inputs()
    d = decide(new, _done(new), None)
    assert d.action == "skip" and fingerprint(new)[:12] in d.reason


def test_changed_key_reruns_and_names_the_key():
    old, new = _inputs(), _inputs(minimax__lr=0.002)
    d = decide(new, _done(old), None, growable="minimax.steps")
    assert d.action == "run" and d.reason == "changed: minimax.lr 0.001 -> 0.002"


def test_more_steps_only_continues_fewer_or_more_plus_other_reruns():
    old = _inputs()
    grown = decide(_inputs(minimax__steps=300), _done(old), None, growable="minimax.steps")
    assert grown.action == "continue" and "minimax.steps 150 -> 300" in grown.reason
    shrunk = decide(_inputs(minimax__steps=100), _done(old), None, growable="minimax.steps")
    assert shrunk.action == "run"
    both = decide(_inputs(minimax__steps=300, minimax__lr=0.01), _done(old), None, growable="minimax.steps")
    assert both.action == "run" and "minimax.lr" in both.reason and "minimax.steps" in both.reason
    not_growable = decide(_inputs(minimax__steps=300), _done(old), None)
    assert not_growable.action == "run"
    assert grown_only(old, _inputs(minimax__steps=300), "minimax.steps")
    assert not grown_only(None, old, "minimax.steps")


def test_done_without_fingerprint_counts_as_changed():
    d = decide(_inputs(), {"step": 150, "checkpoint": "x"}, None)
    assert d.action == "run" and "no fingerprint" in d.reason


def test_done_with_missing_output_reruns():
    new = _inputs()
    assert decide(new, _done(new), None, has_output=False).action == "run"


def test_force_and_upstream_rerun_even_when_unchanged():
    new = _inputs()
    assert decide(new, _done(new), None, forced=True).reason == "--force"
    d = decide(new, _done(new), None, upstream_runs=("pretrain",))
    assert d.action == "run" and d.reason == "upstream pretrain reruns"


def test_interrupted_stage_resumes_only_with_the_same_inputs():
    new = _inputs()
    start = {"fingerprint": fingerprint(new), "inputs": new}
    assert decide(new, None, start, has_partial=True).action == "resume"
    other = decide(_inputs(model__arch="DiT-S/2"), None, start, has_partial=True)
    assert other.action == "run" and other.reason.startswith("interrupted run, changed: model.arch")
    more = decide(_inputs(minimax__steps=200), None, start, has_partial=True, growable="minimax.steps")
    assert more.action == "continue"
    assert "no fingerprint record" in decide(new, None, None, has_partial=True).reason
    assert decide(new, None, None).reason == "not done yet"


def test_changes_lists_added_and_removed_keys_and_cuts_long_values():
    got = changes({"a": 1, "b": "x" * 64}, {"a": 1, "c": 2, "b": "y" * 64})
    assert got[0].startswith("b xxxxxxxxxx…") and got[1] == "c <unset> -> 2"


def test_path_identity_changes_when_the_weights_file_does(tmp_path):
    assert path_identity("facebook/DiT-XL-2-256") == "facebook/DiT-XL-2-256"
    assert path_identity(None) is None
    w = tmp_path / "w" / "model.safetensors"
    w.parent.mkdir()
    w.write_bytes(b"a" * 10)
    first = path_identity(str(w.parent))
    assert first[0][:2] == ["model.safetensors", 10]
    w.write_bytes(b"b" * 11)
    assert path_identity(str(w.parent)) != first


def test_a_shipped_asset_is_identified_by_its_files_bytes(tmp_path, monkeypatch):
    """``ddkit:NAME`` hashed the string: a new shipped checkpoint never reran a stage."""
    import hashlib

    import ddkit.fingerprint as F
    from ddkit.assets import asset_path

    folder = Path(asset_path("ddkit:mnist-dit-t4"))
    ident = path_identity("ddkit:mnist-dit-t4")
    files = sorted(f for f in folder.iterdir() if f.is_file())
    assert [e[0] for e in ident] == [f.name for f in files]
    for (_, size, digest), f in zip(ident, files, strict=True):
        assert size == f.stat().st_size and digest == hashlib.sha256(f.read_bytes()).hexdigest()
    table = folder / "quality.yaml"
    assert path_identity("ddkit:mnist-dit-t4/quality.yaml") == [
        ["quality.yaml", table.stat().st_size, hashlib.sha256(table.read_bytes()).hexdigest()]
    ]
    assert path_identity("ddkit:no-such-model") == "ddkit:no-such-model"  # load_backbone names the error
    # The same name with other bytes (same size, same mtime: a reinstall) is another identity.
    fake = tmp_path / "shipped"
    fake.mkdir()
    (fake / "config.json").write_text("{}")
    w = fake / "w.safetensors"
    w.write_bytes(b"a" * 8)
    monkeypatch.setattr(F, "asset_path", lambda ref: str(fake) if ref.startswith("ddkit:") else ref)
    first = path_identity("ddkit:fake")
    stamp = w.stat().st_mtime_ns
    w.write_bytes(b"b" * 8)
    os.utime(w, ns=(stamp, stamp))
    F._content_digest.cache_clear()  # a later process: the cache is per process, keyed by (path, size, mtime)
    assert path_identity("ddkit:fake") != first
    assert path_identity(str(fake))[1][:2] == ["w.safetensors", 8]  # a local folder: size and mtime


def test_path_identity_refuses_more_files_than_it_covers(tmp_path):
    """The cap cut the list silently: files past the 2,000th could change without a rerun."""
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x")
    assert len(path_identity(str(tmp_path), max_files=5)) == 5
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: 5 files, more than the 4 "):
        path_identity(str(tmp_path), max_files=4)


def test_code_identity_follows_sources_and_shipped_files(tmp_path):
    """The version alone (fixed at 0.1.0) never reran a stage after a code change."""
    import ddkit
    from ddkit.fingerprint import code_identity, tree_digest

    pkg = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", "sub/mod.py": "x = 1", "assets/m/w.bin": "w", "notes.txt": "n",
                      "sub/__pycache__/mod.cpython-311.pyc": "c"}.items():  # fmt: skip
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    base = tree_digest(pkg)
    (pkg / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_text("recompiled")
    (pkg / "notes.txt").write_text("not package code")
    assert tree_digest(pkg) == base
    (pkg / "sub" / "mod.py").write_text("x = 2")
    edited = tree_digest(pkg)
    assert edited != base
    (pkg / "assets" / "m" / "w.bin").write_text("new weights")
    assert tree_digest(pkg) not in (base, edited)
    (pkg / "sub" / "new.py").write_text("")
    assert tree_digest(pkg) != edited
    ident = code_identity()
    assert ident.startswith(f"{ddkit.__version__}+src.") and code_identity() is ident  # once per process
    assert ident == f"{ddkit.__version__}+src.{tree_digest(Path(ddkit.__file__).parent)[:12]}"


def test_done_records_carry_the_fingerprint(tmp_path):
    mark_done(tmp_path, {"step": 3}, fingerprint="abc", inputs={"k": 1})
    assert read_done(tmp_path) == {"step": 3, "fingerprint": "abc", "inputs": {"k": 1}}
    assert is_done(tmp_path) and is_done(tmp_path, "abc") and not is_done(tmp_path, "abd")
    assert read_done(tmp_path / "none") is None


def test_an_unreadable_done_is_not_done_and_says_so_once(tmp_path, capsys):
    """A torn DONE must not count as complete (it did, for is_done without a fingerprint, and for training)."""
    mark_done(tmp_path, {"step": 3}, fingerprint="abc", inputs={"k": 1})
    (tmp_path / "DONE").write_text("{torn")
    assert read_done(tmp_path) is None and not is_done(tmp_path) and not is_done(tmp_path, "abc")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "DONE") in err[0] and "counts as not done" in err[0]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "DONE").write_text("[1, 2]")  # JSON, but not a record
    assert read_done(tmp_path / "x") is None and "not an object" in capsys.readouterr().err


def test_set_aside_keeps_only_the_last_stale_copy(tmp_path):
    run = tmp_path / "run"
    for n in (1, 2):
        (run / "minimax").mkdir(parents=True)
        (run / "minimax" / "n").write_text(str(n))
        assert set_aside(run / "minimax", run / ".stale") == run / ".stale" / "minimax"
        assert not (run / "minimax").exists()
    assert (run / ".stale" / "minimax" / "n").read_text() == "2"
    assert set_aside(run / "minimax", run / ".stale") is None


# ----------------------------------------------------------------------------------------------------------
# The pipeline's plan over a hand-made run directory (no stage runs).
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def finished_run(tmp_path, mnist_shards):
    """A run dir whose every stage has a DONE record with the fingerprint of ``cfg``'s inputs, as a finished
    ``ddkit run`` leaves it (outputs are empty placeholder files)."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.shards={mnist_shards}"])
    _stamp(cfg)
    return cfg


def _stamp(cfg) -> None:
    from ddkit import pipeline as P

    for step in P.plan(cfg):
        node = step.node
        if node.name in ("shard", "report") or node.off:
            continue
        d = P.stage_dir(cfg, node)
        out = P._output(cfg, node)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
        info = {"step": getattr(cfg, node.name).steps} if node.growable else {}
        mark_done(d, info, fingerprint=fingerprint(step.inputs), inputs=step.inputs)


def _actions(cfg, **kw) -> dict[str, str]:
    from ddkit import pipeline as P

    return {s.node.name: s.decision.action for s in P.plan(cfg, **kw)}


def test_plan_of_a_finished_run_skips_everything_but_the_report(finished_run):
    acts = _actions(finished_run)
    assert acts == {
        "shard": "skip", "pretrain": "skip", "minimax": "skip", "gen-minimax": "skip", "gen-dit": "skip",
        "gen-d3hr": "skip", "evaluate": "skip", "package": "skip", "report": "run",
    }  # fmt: skip


def test_plan_inputs_carry_the_code_identity_and_the_assets_bytes(finished_run):
    from ddkit import pipeline as P
    from ddkit.config import replace
    from ddkit.fingerprint import code_identity

    cfg = replace(finished_run, model=replace(finished_run.model, pretrained="ddkit:mnist-dit-t4"))
    steps = {s.node.name: s for s in P.plan(cfg)}
    assert {s.inputs["ddkit"] for s in steps.values() if s.inputs} == {code_identity()}
    shipped = steps["minimax"].inputs["path.model.pretrained"]
    assert [e[0] for e in shipped][-1] == "quality.yaml" and all(len(e[2]) == 64 for e in shipped)
    _stamp(cfg)
    stale = {**steps["gen-dit"].inputs, "ddkit": "0.1.0"}  # a DONE written by other code
    mark_done(P.stage_dir(cfg, steps["gen-dit"].node), {}, fingerprint=fingerprint(stale), inputs=stale)
    d = {s.node.name: s.decision for s in P.plan(cfg)}
    assert d["gen-dit"].action == "run" and d["gen-dit"].reason == f"changed: ddkit 0.1.0 -> {code_identity()}"
    assert d["minimax"].action == "skip"


def test_plan_of_the_readme_example_reruns_minimax_generation_evaluation(finished_run):
    from ddkit.config import replace

    cfg = finished_run
    cfg = replace(cfg, generate=replace(cfg.generate, cfg_scale=3.0), minimax=replace(cfg.minimax, steps=300))
    acts = _actions(cfg)
    assert acts["shard"] == acts["pretrain"] == "skip"
    assert acts["minimax"] == "continue"
    assert {acts[k] for k in ("gen-minimax", "gen-dit", "gen-d3hr", "evaluate", "package")} == {"run"}


def test_plan_d3hr_key_reruns_only_d3hr_and_what_reads_it(finished_run):
    from ddkit.config import replace

    cfg = finished_run
    cfg = replace(cfg, generate=replace(cfg.generate, d3hr=replace(cfg.generate.d3hr, num_groups=77)))
    acts = _actions(cfg)
    assert [k for k, a in acts.items() if a != "skip"] == ["gen-d3hr", "evaluate", "report"]


def test_plan_force_and_stage_selection(finished_run):
    acts = _actions(finished_run, force=("pretrain",))
    assert [k for k, a in acts.items() if a == "skip"] == ["shard"]
    acts = _actions(finished_run, force=("generate",))
    assert [k for k, a in acts.items() if a == "skip"] == ["shard", "pretrain", "minimax"]
    acts = _actions(finished_run, force=("gen-dit",), stages=("generate",))
    assert [k for k, a in acts.items() if a != "skip"] == ["gen-dit"]
    with pytest.raises(ConfigError, match="--force shard: shard sets are shared"):
        _actions(finished_run, force=("shard",))


def test_plan_with_model_pretrained_skips_pretraining(finished_run, tmp_path):
    from ddkit import pipeline as P
    from ddkit.config import replace

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "last.pt").write_bytes(b"x")
    cfg = replace(finished_run, model=replace(finished_run.model, pretrained=str(weights)))
    steps = {s.node.name: s for s in P.plan(cfg)}
    assert steps["pretrain"].decision.action == "skip"
    assert steps["pretrain"].decision.reason == "model.pretrained given"
    assert "upstream.pretrain" not in steps["minimax"].inputs
    assert steps["minimax"].inputs["path.model.pretrained"][0][:2] == ["last.pt", 1]
    assert steps["minimax"].decision.action == "run"  # its inputs changed: the weights it starts from


def test_mgd3_on_the_minimax_checkpoint_reads_the_minimax_stage(finished_run):
    """``generate.modes.weights: minimax`` (MGD^3 on Gu et al.'s checkpoint): gen-mgd3 samples RUN/minimax, so it
    reruns with minimax; on the pretrained DiT it does not read minimax at all."""
    from ddkit import pipeline as P
    from ddkit.config import replace
    from ddkit.generate import checkpoint_for

    base = replace(finished_run, methods=("minimax", "mgd3"))
    _stamp(base)
    on_mm = replace(base, generate=replace(base.generate, modes=replace(base.generate.modes, weights="minimax")))
    steps = {s.node.name: s for s in P.plan(base)}
    assert "upstream.minimax" not in steps["gen-mgd3"].inputs
    assert checkpoint_for(base, "mgd3") == checkpoint_for(base, "dit") != checkpoint_for(base, "minimax")
    assert checkpoint_for(on_mm, "mgd3") == checkpoint_for(on_mm, "minimax")
    steps = {s.node.name: s for s in P.plan(on_mm)}
    assert "upstream.minimax" in steps["gen-mgd3"].inputs and steps["gen-mgd3"].decision.action == "run"
    assert steps["gen-minimax"].decision.action == "skip"
    _stamp(on_mm)
    grown = replace(on_mm, minimax=replace(on_mm.minimax, steps=on_mm.minimax.steps + 50))
    acts = _actions(grown)
    assert acts["minimax"] == "continue" and acts["gen-mgd3"] == acts["gen-minimax"] == "run"


def test_plan_old_done_without_fingerprint_reruns_with_the_reason(finished_run):
    from ddkit import pipeline as P

    d = Path(finished_run.run_dir) / "eval"
    (d / "DONE").write_text(json.dumps({"sets": ["minimax"]}))
    steps = {s.node.name: s.decision for s in P.plan(finished_run)}
    assert steps["evaluate"].action == "run" and "no fingerprint" in steps["evaluate"].reason
    assert steps["package"].action == "skip"  # package reads the generated set, not the evaluation


def test_plan_checks_shards_against_the_config(finished_run):
    from ddkit import pipeline as P
    from ddkit.config import replace
    from ddkit.errors import DataError

    cfg = replace(finished_run, data=replace(finished_run.data, resolution=28))
    with pytest.raises(DataError, match="resolution is 32 but data.resolution=28"):
        P.plan(cfg)


def test_dry_run_writes_nothing(finished_run):
    from ddkit import pipeline as P
    from ddkit.config import replace

    run = Path(finished_run.run_dir)
    before = sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*"))
    lines: list[str] = []
    res = P.run_pipeline(replace(finished_run, seed=1), dry_run=True, log=lines.append)
    assert sorted((p, p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    assert res.ran() == [
        "pretrain",
        "minimax",
        "gen-minimax",
        "gen-dit",
        "gen-d3hr",
        "evaluate",
        "package",
        "report",
    ]
    plan = [line for line in lines if line.startswith("[")]  # after the run's "threads: N" line
    assert plan[1] == "[pretrain] would run: changed: seed 0 -> 1"
    assert plan[2] == "[minimax] would run: upstream pretrain reruns"


def test_plan_an_edited_quality_table_reruns_the_generations(tmp_path, mnist_shards):
    """``generate.quality`` names a file: its bytes are an input, not only its name."""
    table = tmp_path / "quality.yaml"
    table.write_text("- {steps: 10, ipc: 10, accuracy: 70}\n")
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.shards={mnist_shards}",
                             f"generate.quality={table}"])
    _stamp(cfg)
    assert {a for k, a in _actions(cfg).items() if k != "report"} == {"skip"}
    table.write_text("- {steps: 10, ipc: 10, accuracy: 71}\n")
    acts = _actions(cfg)
    assert [k for k, a in acts.items() if a != "skip"] == ["gen-minimax", "gen-dit", "gen-d3hr", "evaluate",
                                                          "package", "report"]
