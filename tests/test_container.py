"""The Apptainer image: strict lint of containers/ddkit.def, golden command lines, and (slow) a shadow build.

No Apptainer can be installed on this machine. What these tests do not cover is listed in the README's
container section (the real base image, SIF packing, --fakeroot, --nv, Apptainer's own env handling).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ddkit.container as ct
from ddkit.container import (
    DEFAULT_DEF,
    apptainer_exec_prefix,
    build_command,
    format_command,
    lint_definition,
    parse_definition,
    read_definition,
    run_command,
)
from ddkit.errors import ContainerError

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------------------
# Lint
# ----------------------------------------------------------------------------------------------------------
def test_definition_is_clean_and_has_what_the_issue_asks():
    assert lint_definition(DEFAULT_DEF) == []
    d = read_definition(DEFAULT_DEF)
    assert list(d.header) == ["Bootstrap", "From"] and d.header["Bootstrap"] == "docker"
    assert d.header["From"].startswith("pytorch/pytorch:") and "cuda" in d.header["From"]
    assert set(d.sections) == {"help", "labels", "files", "environment", "post", "runscript", "test"}
    assert "export HF_HUB_OFFLINE=1" in d.sections["environment"].splitlines()
    assert d.sections["runscript"].strip() == 'exec ddkit "$@"'
    dsts = dict((dst, src) for src, dst in d.files())
    assert dsts["/opt/ddkit/ddkit"] == "ddkit" and dsts["/opt/ddkit/pyproject.toml"] == "pyproject.toml"
    assert dsts["/opt/hf"] == "containers/weights"  # weights baked from here (or bound over at run time)
    assert "org.opencontainers.image.title" in d.labels()
    assert "baked in" in d.sections["help"] and "bound" in d.sections["help"]
    assert "ddkit --help" in d.sections["test"]


GOOD = """Bootstrap: docker
From: debian:12

%help
    hi

%post
    set -eu
    echo ok

%runscript
    exec ddkit "$@"
"""


def _lint_text(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "containers").mkdir(exist_ok=True)
    p = tmp_path / "containers" / "x.def"
    p.write_text(text)
    return lint_definition(p)


@pytest.mark.parametrize("mutation, problem", [
    (lambda t: t.replace("%post", "%postinstall"), "unknown section %postinstall"),
    (lambda t: t.replace("%post", "%apprun foo"), "unknown section %apprun"),
    (lambda t: t.replace("From: debian:12", "From: debian:12\nBootsrap: docker"), "unknown header key 'Bootsrap'"),
    (lambda t: "From: debian:12\n" + t.replace("From: debian:12\n", ""), "Bootstrap must be the first key"),
    (lambda t: t.replace("From: debian:12\n", ""), "Bootstrap docker needs From"),
    (lambda t: t.replace("Bootstrap: docker", "Bootstrap: dockr"), "unknown Bootstrap agent 'dockr'"),
    (lambda t: t.replace("echo ok", "if true; then echo ok"), "%post: sh -n:"),
    (lambda t: t.replace('exec ddkit "$@"', 'exec ddkit "$@'), "%runscript: sh -n:"),
    (lambda t: t + "\n%test\n    for x in; do\n", "%test: sh -n:"),
    (lambda t: t + "\n%environment\n    export A=(1 2)\n", "%environment: sh -n:"),  # bash array: not sh
    (lambda t: t + "\n%files\n    nowhere.txt /opt/nowhere.txt\n", "source nowhere.txt does not exist"),
    (lambda t: t + "\n%files\n    containers relative/dst\n", "destination relative/dst is not absolute"),
    (lambda t: t + "\n%labels\n    lonely\n", "%labels: line 'lonely' is not 'KEY VALUE'"),
    (lambda t: t.replace("%help\n    hi\n", ""), "%help: missing or empty"),
    (lambda t: t + "\n%post\n    echo twice\n", "section %post appears twice"),
])
def test_lint_catches(tmp_path, mutation, problem):
    assert _lint_text(tmp_path, GOOD) == []
    problems = _lint_text(tmp_path, mutation(GOOD))
    assert any(problem in p for p in problems), problems


def test_parse_keeps_scripts_verbatim_and_section_args():
    d = parse_definition(GOOD + "\n%files from build\n    /a /b\n")
    assert d.sections["post"] == "set -eu\necho ok"
    assert d.section_args == {"files": "from build"} and d.files() == [("/a", "/b")]


def test_every_script_section_of_the_definition_parses_with_sh_n():
    d = read_definition(DEFAULT_DEF)
    for name in ct.SCRIPT_SECTIONS:
        if name in d.sections:
            assert ct.sh_syntax_error(d.sections[name]) is None, name
    assert ct.sh_syntax_error("if then") is not None


# ----------------------------------------------------------------------------------------------------------
# Golden command lines
# ----------------------------------------------------------------------------------------------------------
def test_build_command_golden():
    assert build_command("containers/ddkit.def", "ddkit.sif", fakeroot=True) == [
        "apptainer", "build", "--fakeroot", "ddkit.sif", "containers/ddkit.def"]
    assert build_command("c.def", "/img/d.sif", fakeroot=False, force=True, build_args=["TAG=1"]) == [
        "apptainer", "build", "--force", "--build-arg", "TAG=1", "/img/d.sif", "c.def"]


def test_run_command_golden():
    cmd = run_command("ddkit.sif", ["generate", "-c", "configs/cifar100.yaml"], data="/data/cifar",
                      weights="/home/u/.cache/huggingface", out="/scratch/runs", binds=["/etc/x:/x:ro"])
    assert cmd == [
        "apptainer", "run", "--nv",
        "--bind", "/data/cifar:/data/cifar:ro",
        "--bind", "/home/u/.cache/huggingface:/home/u/.cache/huggingface:ro",
        "--bind", "/scratch/runs:/scratch/runs",
        "--bind", "/etc/x:/x:ro",
        "--env", "HF_HOME=/home/u/.cache/huggingface",
        "ddkit.sif", "generate", "-c", "configs/cifar100.yaml",
    ]
    assert format_command(run_command("my image.sif", ["--help"], nv=False, pwd="/w")) == (
        "apptainer run --pwd /w 'my image.sif' --help")


def test_exec_prefix_golden_for_srun():
    prefix = apptainer_exec_prefix("/img/ddkit.sif", ["/data:/data:ro", "/runs"], env=["HF_HUB_OFFLINE=1"])
    assert prefix == ["apptainer", "exec", "--nv", "--bind", "/data:/data:ro", "--bind", "/runs",
                      "--env", "HF_HUB_OFFLINE=1", "/img/ddkit.sif"]
    srun = ["srun", "--ntasks-per-node=4", *prefix, "python", "-m", "ddkit.cli", "train", "--stage", "minimax"]
    assert format_command(srun) == (
        "srun --ntasks-per-node=4 apptainer exec --nv --bind /data:/data:ro --bind /runs --env HF_HUB_OFFLINE=1 "
        "/img/ddkit.sif python -m ddkit.cli train --stage minimax")


# ----------------------------------------------------------------------------------------------------------
# CLI without apptainer: print the exact command, then one clear line
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture()
def no_apptainer(monkeypatch):
    real = shutil.which
    monkeypatch.setattr(ct.shutil, "which", lambda name, *a, **k: None if name == "apptainer" else real(name, *a, **k))


def test_cli_build_prints_command_and_fails_cleanly(no_apptainer, monkeypatch, tmp_path):
    from ddkit.cli import app

    monkeypatch.setattr(ct, "is_root", lambda: False)
    r = CliRunner().invoke(app, ["container", "build", "--out", str(tmp_path / "d.sif")])
    assert r.exit_code == 2
    out = " ".join(r.output.split())
    assert f"$ apptainer build --fakeroot {tmp_path / 'd.sif'} {DEFAULT_DEF}" in out, out
    assert "apptainer not found on PATH" in out
    monkeypatch.setattr(ct, "is_root", lambda: True)
    r = CliRunner().invoke(app, ["container", "build", "--out", str(tmp_path / "d.sif")])
    assert f"$ apptainer build {tmp_path / 'd.sif'}" in " ".join(r.output.split())


def test_cli_run_prints_command_and_fails_cleanly(no_apptainer, tmp_path):
    from ddkit.cli import app

    r = CliRunner().invoke(app, ["container", "run", "--image", "x.sif", "--data", str(tmp_path / "d"),
                                 "--out", str(tmp_path / "o"), "--", "generate", "-c", "configs/cifar100.yaml"])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    d, o = tmp_path / "d", tmp_path / "o"
    assert (f"$ apptainer run --nv --bind {d}:{d}:ro --bind {o}:{o} x.sif generate -c configs/cifar100.yaml"
            in out), out
    assert "apptainer not found on PATH" in out


def test_cli_lint(tmp_path):
    from ddkit.cli import app

    assert CliRunner().invoke(app, ["container", "lint"]).exit_code == 0
    bad = tmp_path / "containers" / "bad.def"
    bad.parent.mkdir()
    bad.write_text(GOOD.replace("%post", "%pots"))
    r = CliRunner().invoke(app, ["container", "lint", str(bad)])
    assert r.exit_code == 1 and "unknown section %pots" in r.output


def test_build_refuses_a_definition_that_fails_lint(tmp_path):
    bad = tmp_path / "containers" / "bad.def"
    bad.parent.mkdir()
    bad.write_text(GOOD.replace("echo ok", "if true; then echo ok"))
    with pytest.raises(ContainerError, match="sh -n"):
        ct.build(bad, tmp_path / "x.sif", echo=lambda s: None)


# ----------------------------------------------------------------------------------------------------------
# Shadow build (slow, tools/shadow_build.py): %files + %post in a debootstrap'd Debian root under bubblewrap, then runscript + %test
# ----------------------------------------------------------------------------------------------------------
def _shadow_tool():
    """``tools/shadow_build.py`` (test tooling outside the package), imported by path."""
    import importlib.util
    import sys

    if "shadow_build" not in sys.modules:  # dataclasses look their module up in sys.modules
        spec = importlib.util.spec_from_file_location("shadow_build", ROOT / "tools" / "shadow_build.py")
        sys.modules["shadow_build"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["shadow_build"])
    return sys.modules["shadow_build"]


def test_shadow_build_tool_lives_outside_the_package():
    shadow = _shadow_tool()
    assert callable(shadow.shadow_build) and callable(shadow.shadow_base)
    assert not hasattr(ct, "shadow_build") and "/opt/wheels" not in Path(ct.__file__).read_text()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_shadow_build(tmp_path):
    for tool in ("debootstrap", "bwrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install debootstrap bubblewrap)")
    # The %test's tiny generation needs the data/train/generate stages; run it when they exist.
    import importlib.util

    full = all(importlib.util.find_spec(m) is not None for m in ("ddkit.data", "ddkit.train", "ddkit.generate"))
    res = _shadow_tool().shadow_build(DEFAULT_DEF, root=tmp_path / "root", echo=print,
                          test_env={"DDKIT_TEST_GENERATE": "1" if full else "0"})
    print({k: round(v, 1) for k, v in res.seconds.items()})
    assert "Usage: ddkit" in res.outputs["runscript"]
    assert "cuda False" in res.outputs["test"]  # the %test smoke line ran (no GPU in the shadow root)
    if full:  # the tiny generation ran, was packaged as a folder and passed `ddkit package --check`
        assert "OK   classes: 10 classes x IPC" in res.outputs["test"], res.outputs["test"][-2000:]
    site = next((tmp_path / "root" / "opt" / "conda" / "lib").glob("python3*/site-packages"))
    assert (site / "diffusers").is_dir() and list(site.glob("ddkit-*.dist-info"))
    assert os.access(tmp_path / "root" / "opt" / "conda" / "bin" / "ddkit", os.X_OK)
