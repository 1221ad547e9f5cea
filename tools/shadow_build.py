"""Shadow build: a definition's ``%files``, ``%post``, ``%runscript`` and ``%test`` in a debootstrap'd Debian root
under bubblewrap, standing in for ``apptainer build`` on machines without Apptainer.

Test tooling, not library: it knows this machine's wheel directories (``/opt/wheels``, ``/opt/pypi``,
``/etc/xdg/pip``) and caches the base root under ``$DDKIT_SHADOW_CACHE`` (default
``~/.cache/ddkit/shadow``). ``tests/test_container.py -m slow`` runs it; by hand:
``python tools/shadow_build.py --root /tmp/shadow-root``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ddkit.container import DEFAULT_DEF, build_context, format_command, read_definition
from ddkit.errors import ContainerError

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


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("definition", nargs="?", default=str(DEFAULT_DEF))
    ap.add_argument("--root", required=True, help="where the built root goes (replaced)")
    ap.add_argument("--no-test", action="store_true", help="skip %%test")
    a = ap.parse_args(argv)
    try:
        res = shadow_build(a.definition, root=a.root, run_test=not a.no_test)
    except ContainerError as e:
        print(f"shadow build: {e}", file=sys.stderr)
        return 1
    print({k: round(v, 1) for k, v in res.seconds.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
