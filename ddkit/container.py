"""The Apptainer image: definition parsing and lint, command lines, and a shadow build without Apptainer.

Command lines are built by pure functions (:func:`build_command`, :func:`run_command`,
:func:`apptainer_exec_prefix`) so they are tested golden-style; :func:`build` and :func:`run` only add
"print the command, check that apptainer exists, execute it".

Binds keep host paths unchanged inside the container (``--bind /data/cifar:/data/cifar:ro``), so a config's
paths mean the same thing on both sides; Apptainer already binds ``$HOME``, ``/tmp`` and the working
directory by default, so relative paths from the project directory work as well.

Weights: the image's ``HF_HOME`` is ``/opt/hf``. Baked in: put an HF-cache layout into
``containers/weights/`` before ``ddkit container build`` (``%files`` copies it to ``/opt/hf``). Bound:
``ddkit container run --weights ~/.cache/huggingface`` binds that directory read-only and points
``HF_HOME`` at it. ``HF_HUB_OFFLINE=1`` is set either way, so a missing model fails at once.

The shadow build that stands in for ``apptainer build`` on machines without Apptainer (debootstrap +
bubblewrap) is test tooling and lives in ``tools/shadow_build.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from ddkit.errors import ContainerError

# Apptainer's definition-file sections (apptainer.org/docs/user/main/definition_files.html).
SECTIONS = ("help", "setup", "files", "labels", "environment", "pre", "post", "runscript", "test",
            "startscript", "arguments")
SCRIPT_SECTIONS = ("setup", "pre", "post", "environment", "runscript", "test", "startscript")
# Header keywords accepted by Apptainer's bootstrap agents (docker, library, localimage, debootstrap, yum...).
HEADER_KEYS = ("Bootstrap", "From", "Stage", "Registry", "Namespace", "IncludeCmd", "OSVersion", "MirrorURL",
               "UpdateURL", "Include", "Fingerprints", "Library", "SetOpt", "Confurl")
BOOTSTRAP_AGENTS = ("docker", "docker-archive", "docker-daemon", "oci", "oci-archive", "library", "localimage",
                    "shub", "debootstrap", "yum", "dnf", "zypper", "busybox", "arch", "scratch")

ROOT = Path(__file__).resolve().parent.parent
SOURCE_URL = "https://github.com/ddkit/ddkit"


def default_definition() -> Path:
    """``containers/ddkit.def`` of a source checkout, else the copy shipped in the wheel (package data
    ``ddkit/resources/ddkit.def``, found through ``importlib.resources``)."""
    source = ROOT / "containers" / "ddkit.def"
    if source.is_file():
        return source

    return Path(str(files("ddkit") / "resources" / "ddkit.def"))


def build_context(definition: str | Path) -> Path:
    """The build context of ``definition``: the source checkout it lies in (``%files`` copies from there).

    Raises:
        ContainerError: no ``pyproject.toml`` two levels up, e.g. the copy inside a wheel install.
    """
    root = Path(definition).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise ContainerError(
            f"{definition}: the image is built from a ddkit source checkout (%files copies pyproject.toml, ddkit/ "
            f"and configs/ from it) and this install has none: git clone {SOURCE_URL} and run "
            "`ddkit container build` inside it"
        )
    return root


DEFAULT_DEF = default_definition()
DEFAULT_IMAGE = "ddkit.sif"
HF_HOME = "/opt/hf"


# ----------------------------------------------------------------------------------------------------------
# Definition files
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Definition:
    """A parsed definition: header ``{key: value}`` and sections ``{name: body}`` (body text, dedented)."""

    header: dict[str, str] = field(default_factory=dict)
    sections: dict[str, str] = field(default_factory=dict)
    section_args: dict[str, str] = field(default_factory=dict)  # "%files from build" -> {"files": "from build"}
    problems: list[str] = field(default_factory=list)  # parse-level problems (unknown section, bad header line)

    def files(self) -> list[tuple[str, str]]:
        """``%files`` as ``(src, dst)`` pairs (``dst`` defaults to ``src``, as Apptainer does)."""
        out = []
        for line in self.sections.get("files", "").splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = shlex.split(line)
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
        return out

    def labels(self) -> dict[str, str]:
        out = {}
        for line in self.sections.get("labels", "").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition(" ")
                out[key] = value.strip()
        return out


_SECTION_RE = re.compile(r"^%(\w+)\s*(.*)$")


def parse_definition(text: str) -> Definition:
    """Parse definition-file text (header lines ``Key: value`` until the first ``%section``)."""
    d = Definition()
    current: str | None = None
    body: list[str] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        m = _SECTION_RE.match(raw)
        if m and not raw.startswith((" ", "\t")):
            if current is not None:
                d.sections[current] = _dedent("\n".join(body))
            current, body = m.group(1), []
            if current not in SECTIONS:
                d.problems.append(f"line {lineno}: unknown section %{current} (Apptainer knows {', '.join(SECTIONS)})")
            if current in d.sections:
                d.problems.append(f"line {lineno}: section %{current} appears twice")
            if m.group(2).strip():
                d.section_args[current] = m.group(2).strip()
            continue
        if current is None:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition(":")
            if not sep:
                d.problems.append(f"line {lineno}: header line without 'Key: value': {line!r}")
                continue
            key = key.strip()
            if key not in HEADER_KEYS:
                d.problems.append(f"line {lineno}: unknown header key {key!r}")
            d.header[key] = value.strip()
        else:
            body.append(raw)
    if current is not None:
        d.sections[current] = _dedent("\n".join(body))
    return d


def read_definition(path: str | Path = DEFAULT_DEF) -> Definition:
    """Parse a definition file. Raises :class:`ContainerError` when it does not exist."""
    p = Path(path)
    if not p.is_file():
        raise ContainerError(f"{p}: definition file not found")
    return parse_definition(p.read_text())


def lint_definition(path: str | Path = DEFAULT_DEF, *, project_root: str | Path | None = None) -> list[str]:
    """Strict lint of an Apptainer definition; returns the problems (empty list: clean).

    Checks: only Apptainer's section names and header keys; ``Bootstrap`` is the first header key and a
    known agent, with ``From`` where the agent needs it; ``sh -n`` on every script section; ``%files``
    sources exist below ``project_root`` (default: the definition's parent's parent, the repo root);
    ``%labels`` lines are ``KEY VALUE``; ``%help`` and ``%runscript`` present.
    """
    p = Path(path)
    d = read_definition(p)
    root = Path(project_root) if project_root is not None else p.resolve().parent.parent
    problems = list(d.problems)
    keys = list(d.header)
    if not keys or keys[0] != "Bootstrap":
        problems.append("header: Bootstrap must be the first key")
    agent = d.header.get("Bootstrap", "")
    if agent and agent not in BOOTSTRAP_AGENTS:
        problems.append(f"header: unknown Bootstrap agent {agent!r}")
    if agent not in ("scratch", "") and "From" not in d.header and agent not in ("debootstrap", "yum", "dnf",
                                                                                    "zypper", "arch", "busybox"):
        problems.append(f"header: Bootstrap {agent} needs From")
    for name in ("help", "runscript"):
        if not d.sections.get(name, "").strip():
            problems.append(f"%{name}: missing or empty")
    for name in SCRIPT_SECTIONS:
        if name in d.sections:
            err = sh_syntax_error(d.sections[name])
            if err:
                problems.append(f"%{name}: sh -n: {err}")
    if "files" in d.sections and "files" not in d.section_args:  # "%files from stage" copies from a stage
        for src, dst in d.files():
            if not (root / src).exists() and not Path(src).is_absolute():
                problems.append(f"%files: source {src} does not exist below {root}")
            if not dst.startswith("/"):
                problems.append(f"%files: destination {dst} is not absolute")
    for line in d.sections.get("labels", "").splitlines():
        s = line.strip()
        if s and not s.startswith("#") and len(s.split(None, 1)) != 2:
            problems.append(f"%labels: line {s!r} is not 'KEY VALUE'")
    return problems


def sh_syntax_error(script: str) -> str | None:
    """``sh -n`` (POSIX parse, nothing executed) on ``script``; the first error line, or None when clean."""
    sh = shutil.which("dash") or shutil.which("sh") or "/bin/sh"
    r = subprocess.run([sh, "-n"], input=script, capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0]


# ----------------------------------------------------------------------------------------------------------
# Command lines (pure)
# ----------------------------------------------------------------------------------------------------------
def build_command(
    definition: str | Path,
    image: str | Path,
    *,
    fakeroot: bool,
    force: bool = False,
    sandbox: bool = False,
    build_args: Sequence[str] = (),
    apptainer: str = "apptainer",
) -> list[str]:
    """``apptainer build [--fakeroot] [--force] [--sandbox] [--build-arg K=V ...] IMAGE DEF``."""
    cmd = [apptainer, "build"]
    if fakeroot:
        cmd.append("--fakeroot")
    if force:
        cmd.append("--force")
    if sandbox:
        cmd.append("--sandbox")
    for a in build_args:
        cmd += ["--build-arg", a]
    return cmd + [str(image), str(definition)]


def bind_args(binds: Sequence[str]) -> list[str]:
    """``["--bind", b]`` per bind (``src[:dst[:opts]]``; a bare ``src`` binds at the same path)."""
    out: list[str] = []
    for b in binds:
        out += ["--bind", b]
    return out


def run_binds(data: str | None = None, weights: str | None = None, out: str | None = None,
              extra: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The binds and ``--env`` arguments for data (read-only), weights (read-only, as ``HF_HOME``), output.

    Returns:
        ``(binds, env)``: ``binds`` like ``["/d:/d:ro", ...]``; ``env`` like ``["HF_HOME=/w"]``.
    """
    binds, env = [], []
    if data:
        binds.append(f"{data}:{data}:ro")
    if weights:
        binds.append(f"{weights}:{weights}:ro")
        env.append(f"HF_HOME={weights}")
    if out:
        binds.append(f"{out}:{out}")
    binds += list(extra)
    return binds, env


def run_command(
    image: str | Path,
    args: Sequence[str] = (),
    *,
    data: str | None = None,
    weights: str | None = None,
    out: str | None = None,
    binds: Sequence[str] = (),
    nv: bool = True,
    pwd: str | None = None,
    apptainer: str = "apptainer",
) -> list[str]:
    """``apptainer run --nv --bind ... [--env HF_HOME=...] [--pwd DIR] IMAGE ARGS...`` (runs ``ddkit ARGS``)."""
    b, env = run_binds(data, weights, out, binds)
    cmd = [apptainer, "run"]
    if nv:
        cmd.append("--nv")
    cmd += bind_args(b)
    for e in env:
        cmd += ["--env", e]
    if pwd:
        cmd += ["--pwd", pwd]
    return cmd + [str(image), *args]


def apptainer_exec_prefix(image: str | Path, binds: Sequence[str] = (), *, nv: bool = True,
                          env: Sequence[str] = (), apptainer: str = "apptainer") -> list[str]:
    """The prefix that runs a command inside the image: ``apptainer exec --nv --bind ... IMAGE``.

    For job launchers (``srun ... <prefix> python -m ...``); the SLURM module appends its own command.
    """
    cmd = [apptainer, "exec"]
    if nv:
        cmd.append("--nv")
    cmd += bind_args(binds)
    for e in env:
        cmd += ["--env", e]
    return cmd + [str(image)]


def format_command(cmd: Sequence[str]) -> str:
    """The command as a copy-pasteable shell line."""
    return shlex.join([str(c) for c in cmd])


# ----------------------------------------------------------------------------------------------------------
# Running them
# ----------------------------------------------------------------------------------------------------------
def find_apptainer() -> str:
    """Path of the ``apptainer`` executable.

    Raises:
        ContainerError: not on PATH (one line saying how to get it).
    """
    exe = shutil.which("apptainer")
    if exe is None:
        raise ContainerError("apptainer not found on PATH: install Apptainer >= 1.1 or run on a node that has "
                             "it (module load apptainer); the command above is what would run")
    return exe


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def build(definition: str | Path = DEFAULT_DEF, image: str | Path = DEFAULT_IMAGE, *, fakeroot: bool | None = None,
          force: bool = False, echo: Callable[[str], None] = print) -> Path:
    """Lint ``definition``, print the ``apptainer build`` line, and run it.

    ``fakeroot`` None means ``--fakeroot`` exactly when not running as root.

    Raises:
        ContainerError: lint problems, apptainer missing, or the build failing (with its exit code).
    """
    problems = lint_definition(definition)
    if problems:
        raise ContainerError(f"{definition}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    context = build_context(definition)
    cmd = build_command(definition, image, fakeroot=(not is_root()) if fakeroot is None else fakeroot, force=force)
    echo(format_command(cmd))
    cmd[0] = find_apptainer()
    # The build context is the repo root: %files sources are relative to it.
    r = subprocess.run(cmd, cwd=context)
    if r.returncode != 0:
        raise ContainerError(f"apptainer build exited {r.returncode} for {definition}")
    return Path(image)


def run(image: str | Path, args: Sequence[str], *, echo: Callable[[str], None] = print, **kw) -> int:
    """Print the ``apptainer run`` line (see :func:`run_command`) and execute it; return its exit code.

    Raises:
        ContainerError: apptainer missing, or the image file missing.
    """
    cmd = run_command(image, args, **kw)
    echo(format_command(cmd))
    cmd[0] = find_apptainer()
    if not Path(image).exists():
        raise ContainerError(f"{image}: image not found (ddkit container build first)")
    return subprocess.run(cmd).returncode


def _dedent(text: str) -> str:
    return textwrap.dedent(text).strip("\n")
