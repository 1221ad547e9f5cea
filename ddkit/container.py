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

The shadow build (:func:`shadow_build`) runs a definition's ``%files``, ``%post``, ``%runscript`` and
``%test`` in a debootstrap'd Debian root under bubblewrap; it stands in for ``apptainer build`` on
machines without Apptainer and is what ``tests/test_container.py -m slow`` runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    from importlib.resources import files

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


# ----------------------------------------------------------------------------------------------------------
# Shadow build: debootstrap + bubblewrap instead of apptainer
# ----------------------------------------------------------------------------------------------------------
SHADOW_SUITE = "bookworm"  # Debian 12: Python 3.11, the same minor as the pytorch/pytorch images' conda
SHADOW_CACHE = Path(os.environ.get("DDKIT_SHADOW_CACHE", Path.home() / ".cache" / "ddkit" / "shadow"))
# Host paths holding wheels; bound read-only so %post's pip finds torch etc. without a multi-GB download.
HOST_WHEEL_DIRS = ("/opt/wheels", "/opt/pypi", "/opt/pypi-more", "/etc/xdg/pip")


@dataclass
class ShadowResult:
    """What a shadow build did: per phase seconds and outputs."""

    root: Path
    seconds: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)


_HOST_TORCH_RE = re.compile(r"^(torch|torchgen|functorch|torchvision|triton|nvidia|cuda)([-_.].*)?$")
BINDS_FILE = ".ddkit-shadow-binds"
SHADOW_PYTHON = (3, 11)  # bookworm's python3


def host_torch_binds(site: Path | None = None) -> list[tuple[str, str]]:
    """``(host path, path in the root)`` for the host's torch, torchvision, triton and NVIDIA libraries.

    The shadow base binds these read-only into its ``/opt/conda`` site-packages instead of installing a
    multi-GB CUDA torch into every root: they stand in for the torch that the ``pytorch/pytorch`` base image
    ships. Empty when the host's torch is for another Python minor than the shadow root's.
    """
    import sys

    if sys.version_info[:2] != SHADOW_PYTHON:
        return []
    if site is None:
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return []
        site = Path(next(iter(spec.submodule_search_locations))).parent
    dest = f"/opt/conda/lib/python{SHADOW_PYTHON[0]}.{SHADOW_PYTHON[1]}/site-packages"
    return [(str(p), f"{dest}/{p.name}") for p in sorted(site.iterdir()) if _HOST_TORCH_RE.match(p.name)]


def shadow_base(cache: Path = SHADOW_CACHE, *, echo: Callable[[str], None] = print) -> Path:
    """A Debian root standing in for the definition's ``From:`` image (``pytorch/pytorch``), cached.

    debootstrap (minbase + python3-venv), then a venv at ``/opt/conda`` (the pytorch images' Python
    prefix) that sees the host's torch/torchvision/triton/NVIDIA packages through read-only binds
    (:func:`host_torch_binds`; listed in the root's ``.ddkit-shadow-binds`` and applied by every phase) plus
    torch's small pure-Python dependencies installed with pip, and ``/.singularity.d/env/
    10-docker2singularity.sh`` putting ``/opt/conda/bin`` first on PATH, as Apptainer does with the image's
    Docker ``ENV``. Built once into ``cache/<suite>-torch``; later calls return it.

    Raises:
        ContainerError: debootstrap or bwrap missing, no usable host torch, or a step failing.
    """
    final = cache / f"{SHADOW_SUITE}-torch"
    if (final / ".ddkit-shadow-ok").is_file() and all(
        Path(line.split("\t")[0]).exists() for line in (final / BINDS_FILE).read_text().splitlines()
    ):
        return final
    for tool in ("debootstrap", "bwrap"):
        if shutil.which(tool) is None:
            raise ContainerError(f"{tool} not found: apt-get install debootstrap bubblewrap")
    binds = host_torch_binds()
    if not binds:
        raise ContainerError(f"shadow build: needs a host torch for Python {SHADOW_PYTHON[0]}.{SHADOW_PYTHON[1]}")
    cache.mkdir(parents=True, exist_ok=True)
    base = cache / SHADOW_SUITE
    if not (base / "usr" / "bin" / "python3").exists():
        tmp = cache / f"{SHADOW_SUITE}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
               SHADOW_SUITE, str(tmp), "http://deb.debian.org/debian"]
        echo(format_command(cmd))
        _check(subprocess.run(cmd, capture_output=True, text=True), "debootstrap")
        os.replace(tmp, base)
    work = cache / f"{SHADOW_SUITE}-torch.tmp"
    shutil.rmtree(work, ignore_errors=True)
    _copytree(base, work)
    (work / BINDS_FILE).write_text("".join(f"{h}\t{d}\n" for h, d in binds))
    deps = _requires_dist(Path(binds[0][0]).parent)
    script = ("set -e; python3 -m venv /opt/conda; /opt/conda/bin/pip install --no-cache-dir -q "
              + " ".join(shlex.quote(s) for s in deps) + "; /opt/conda/bin/python -c 'import torch, torchvision'")
    _check(_bwrap(work, ["/bin/sh", "-c", script], env=_pip_env()), "shadow base: torch dependencies")
    envd = work / ".singularity.d" / "env"
    envd.mkdir(parents=True, exist_ok=True)
    (envd / "10-docker2singularity.sh").write_text("export PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:"
                                                   "/usr/sbin:/usr/bin:/sbin:/bin\n")
    (work / ".ddkit-shadow-ok").write_text(" ".join(deps) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    return final


def _requires_dist(site: Path) -> list[str]:
    """torch's and torchvision's pure-Python requirements (not the bound CUDA/triton packages)."""
    out: list[str] = []
    for meta in sorted(site.glob("torch*-*.dist-info/METADATA")):
        for line in meta.read_text().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                req = line.split(":", 1)[1].split(";", 1)[0].strip()
                name = re.split(r"[\s<>=!~\[(]", req, maxsplit=1)[0]
                if not _HOST_TORCH_RE.match(name.replace("-", "_")) and req not in out:
                    out.append(req)
    return out


def shadow_build(definition: str | Path = DEFAULT_DEF, *, project_root: str | Path | None = None,
                 root: str | Path, base: Path | None = None, run_args: Sequence[str] = ("--help",),
                 run_test: bool = True, test_env: dict[str, str] | None = None,
                 echo: Callable[[str], None] = print) -> ShadowResult:
    """Run a definition's ``%files`` and ``%post`` in a copy of :func:`shadow_base`, then its runscript and
    ``%test``, each under bubblewrap with the definition's ``%environment`` sourced. ``test_env`` is passed
    to ``%test`` (as ``apptainer test`` passes the host's environment).

    Differences from ``apptainer build`` (what this does not test): the real base image (CUDA, conda), the
    SIF/squashfs packing, ``--fakeroot`` user namespaces, ``%labels``/``%help`` metadata, ``--nv`` GPU
    binding, and Apptainer's own environment handling (this sources the env files in order as it does).

    Raises:
        ContainerError: a phase exits non-zero (naming the phase and the last output line).
    """
    definition = Path(definition)
    proj = Path(project_root) if project_root is not None else build_context(definition)
    d = read_definition(definition)
    res = ShadowResult(Path(root))
    t = time.monotonic()
    base = base or shadow_base(echo=echo)
    res.seconds["base"] = time.monotonic() - t
    t = time.monotonic()
    shutil.rmtree(root, ignore_errors=True)
    _copytree(base, Path(root))
    res.seconds["copy"] = time.monotonic() - t
    rootp = Path(root)
    if "setup" in d.sections:
        raise ContainerError("%setup runs on the host as root; the shadow build refuses it")
    t = time.monotonic()
    for src, dst in d.files():
        s, target = proj / src, rootp / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
        else:
            shutil.copy2(s, target)
    res.seconds["files"] = time.monotonic() - t
    envd = rootp / ".singularity.d"
    (envd / "env").mkdir(parents=True, exist_ok=True)
    (envd / "env" / "90-environment.sh").write_text(d.sections.get("environment", "") + "\n")
    (envd / "runscript").write_text("#!/bin/sh\n" + d.sections.get("runscript", "") + "\n")
    (envd / "test").write_text("#!/bin/sh\n" + d.sections.get("test", "") + "\n")
    if "post" in d.sections:
        t = time.monotonic()
        (envd / "post.sh").write_text(d.sections["post"] + "\n")
        # Apptainer runs %post with the base image's environment (the Docker ENV), not %environment.
        r = _bwrap(rootp, ["/bin/sh", "-c", ". /.singularity.d/env/10-docker2singularity.sh; "
                                        "exec /bin/sh -e /.singularity.d/post.sh"], env=_pip_env())
        res.seconds["post"] = time.monotonic() - t
        res.outputs["post"] = r.stdout + r.stderr
        _check(r, "%post", rootp.parent / "post.log")
    src_env = "for f in /.singularity.d/env/*.sh; do . \"$f\"; done; "
    t = time.monotonic()
    r = _bwrap(rootp, ["/bin/sh", "-c", src_env + 'exec /bin/sh /.singularity.d/runscript "$@"', "runscript",
                       *run_args], env={}, net=False)
    res.seconds["runscript"] = time.monotonic() - t
    res.outputs["runscript"] = r.stdout + r.stderr
    _check(r, "%runscript", rootp.parent / "runscript.log")
    if run_test and d.sections.get("test", "").strip():
        t = time.monotonic()
        r = _bwrap(rootp, ["/bin/sh", "-c", src_env + "exec /bin/sh -e /.singularity.d/test"], env=test_env or {},
                   net=False)
        res.seconds["test"] = time.monotonic() - t
        res.outputs["test"] = r.stdout + r.stderr
        _check(r, "%test", rootp.parent / "test.log")
    return res


def _bwrap(root: Path, argv: Sequence[str], *, env: dict[str, str], net: bool = True,
           timeout: float = 3600) -> subprocess.CompletedProcess:
    cmd = ["bwrap", "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
           "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--clearenv",
           "--setenv", "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "--setenv", "HOME", "/root", "--setenv", "LANG", "C.UTF-8"]
    if net:
        cmd += ["--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
        # The host's trust store, so pip works the same behind a TLS-inspecting proxy as on the host.
        ca = _host_ca_bundle()
        if ca:
            cmd += ["--ro-bind", ca, "/etc/ssl/certs/ca-certificates.crt"]
        for d in HOST_WHEEL_DIRS:
            if Path(d).is_dir():
                cmd += ["--ro-bind", d, d]
    else:
        # The runtime phases run with no network, as on a compute node (HF_HUB_OFFLINE must hold).
        cmd += ["--unshare-net"]
    binds = root / BINDS_FILE
    if binds.is_file():
        for line in binds.read_text().splitlines():
            host, _, dest = line.partition("\t")
            cmd += ["--ro-bind", host, dest]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    return subprocess.run(cmd + list(argv), capture_output=True, text=True, timeout=timeout)


def _host_ca_bundle() -> str | None:
    for c in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
        if c and Path(c).is_file():
            return c
    return None


def _pip_env() -> dict[str, str]:
    """pip settings for the shadow root: the host's wheel dirs and constraints, nothing else from the host."""
    env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore",
           "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt"}
    if Path("/opt/wheels").is_dir():
        env["PIP_FIND_LINKS"] = "/opt/wheels"
    extra = " ".join(f"file://{d}/simple" for d in ("/opt/pypi", "/opt/pypi-more") if Path(d, "simple").is_dir())
    if extra:
        env["PIP_EXTRA_INDEX_URL"] = extra
    if Path("/etc/xdg/pip/constraints.txt").is_file():
        env["PIP_CONSTRAINT"] = "/etc/xdg/pip/constraints.txt"
    return env


def _copytree(src: Path, dst: Path) -> None:
    # cp -a keeps device nodes, hard links and ownership that shutil.copytree would lose.
    r = subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(dst)], capture_output=True, text=True)
    _check(r, f"copy {src}")


def _check(r: subprocess.CompletedProcess, what: str, log: Path | None = None) -> None:
    if r.returncode != 0:
        text = (r.stdout or "") + (r.stderr or "")
        if log is not None:
            log.write_text(text)
        # rich error boxes end in border lines; report the last line with words in it
        lines = [ln.strip(" │╭╮╰╯─") for ln in text.strip().splitlines()]
        tail = [ln for ln in lines if re.search(r"\w", ln)]
        where = f" (full output: {log})" if log is not None else ""
        raise ContainerError(f"{what} exited {r.returncode}: {tail[-1] if tail else 'no output'}{where}")


def _dedent(text: str) -> str:
    import textwrap

    return textwrap.dedent(text).strip("\n")
