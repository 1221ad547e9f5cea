"""Run directories, atomic writes, manifests.

Every output ddkit writes goes through a temporary file (or directory) in the same folder followed by
``os.replace``, so a crash or a SLURM preemption never leaves half a file behind, and a rerun can trust
whatever exists. Stage completion is marked by a ``DONE`` file written last.

File modes, one policy for every output (:func:`make_readable`): files ``0o666 & ~umask``, directories
``0o777 & ~umask``, as a plain ``open()`` / ``mkdir`` would give, instead of the private 0600 / 0700 of
``mkstemp`` / ``mkdtemp``; the umask is read without changing it (:func:`umask`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ddkit.config import dump_yaml
from ddkit.dist import usable_cpus
from ddkit.errors import DataError

DONE = "DONE"


def umask() -> int:
    """This process's umask, read without changing it.

    Linux (>= 4.7) reports it as ``Umask:`` in ``/proc/self/status``; elsewhere it is read with
    ``os.umask(0)`` / ``os.umask(old)``, which briefly changes a process-wide setting under other threads.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of an output file: ``0o666 & ~umask``, what a plain ``open()`` would create."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode of an output directory: ``0o777 & ~umask``, what a plain ``mkdir`` would create."""
    return 0o777 & ~umask()


def make_readable(path: str | Path) -> Path:
    """Give ``path`` the file-mode policy of every ddkit output, and return it.

    ``mkstemp`` / ``mkdtemp`` create 0600 / 0700, but outputs are shared (SLURM jobs, containers, other
    cluster users, the challenge organisers), so they get the modes the umask allows: files
    ``0o666 & ~umask`` (``0o777 & ~umask`` when already executable, as a compiler or ``cp`` leaves an
    executable), directories ``0o777 & ~umask``. A directory is treated with everything below it; symbolic
    links are left alone.
    """
    path = Path(path)
    mask = umask()

    def fix(p: Path) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, 0o777 & ~mask)
        else:
            os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)

    fix(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                fix(Path(root) / name)
    return path


def _write_via_temp(path: Path, data: bytes, place: Callable[[str], Any]) -> None:
    """``data`` into a new temporary file beside ``path`` (readable as the umask allows, fsynced), then
    ``place(tmp)`` puts it where it belongs (rename or link); the temporary name never outlives the call."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        make_readable(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        place(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename)."""
    path = Path(path)
    _write_via_temp(path, data, lambda tmp: os.replace(tmp, path))
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomic UTF-8 text write."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Atomic JSON write, indented and key-sorted for stable diffs."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def publish_bytes_once(path: str | Path, data: bytes) -> bytes:
    """Write ``data`` to ``path`` unless the file already exists; return what the file holds afterwards.

    First writer wins, atomically: the complete bytes go to a temporary file that is then hard-linked onto
    ``path`` (``os.link`` fails if ``path`` exists), so concurrent writers (ranks of one job, a requeued job
    racing its predecessor) all return the same, complete record. Raises ``OSError`` from the filesystem.
    """
    path = Path(path)

    def link_unless_there(tmp: str) -> None:
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)

    _write_via_temp(path, data, link_unless_there)
    return path.read_bytes()


def publish_json_once(path: str | Path, obj: Any) -> Any:
    """:func:`publish_bytes_once` of ``obj`` as JSON; returns the record the file holds afterwards."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return json.loads(publish_bytes_once(path, text.encode("utf-8")))


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    For writers that want a filename (``torch.save``, ``zipfile``, matplotlib's ``savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    make_readable(tmp)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through :func:`atomic_file` (checkpoints, tensors)."""
    import torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; rename it onto ``path`` when the block succeeds.

    Before the rename the directory and everything in it get the umask's modes (:func:`make_readable`),
    not ``mkdtemp``'s 0700. On error the temporary directory is removed and ``path`` is left as it was.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        make_readable(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush (logs; a torn last line is skipped by :func:`read_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file, skipping a torn final line."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_json(path: str | Path) -> Any:
    """Read a JSON file; raises :class:`ddkit.errors.DataError` naming the file when missing or corrupt."""

    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{p}: not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_digest(module) -> str:
    """sha256 hex over a torch module's state dict (names, dtypes, shapes and raw bytes, in sorted order): the
    identity of weights as loaded, whatever file format they came from."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_run_config(run_dir: str | Path, cfg: Any, name: str = "config.yaml") -> Path:
    """Write the resolved config (a dataclass from :mod:`ddkit.config`) into ``run_dir/name``."""

    return atomic_write_text(Path(run_dir) / name, dump_yaml(cfg))


def mark_done(
    stage_dir: str | Path,
    info: dict[str, Any] | None = None,
    *,
    fingerprint: str | None = None,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Mark a stage directory complete (written last, so its presence means every output exists).

    Args:
        info: what the stage wants to remember (steps, image counts).
        fingerprint, inputs: the stage's fingerprint and the inputs it hashes (:mod:`ddkit.fingerprint`);
            ``ddkit run`` skips the stage on a later run only when they are unchanged.
    """
    rec = dict(info or {})
    if fingerprint is not None:
        rec["fingerprint"] = fingerprint
        rec["inputs"] = inputs or {}
    atomic_write_json(Path(stage_dir) / DONE, rec)


_WARNED: set[str] = set()  # DONE files read_done has warned about in this process


def read_done(stage_dir: str | Path) -> dict[str, Any] | None:
    """The ``DONE`` record of ``stage_dir``, or None when the stage is not complete.

    A ``DONE`` that is not a readable JSON object (impossible with :func:`mark_done`'s atomic write, but a
    torn copy, a full disk under an old ddkit or a hand edit) also reads as None, and one warning line
    naming the file goes to stderr (once per process): the stage counts as not done, so a rerun resumes it
    from what it holds (a training stage from its checkpoint, a generation from its finished shards) rather
    than trusting outputs whose completion nothing records. Nothing is deleted; the next :func:`mark_done`
    replaces the file.
    """
    path = Path(stage_dir) / DONE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        why = f"a JSON {type(rec).__name__}, not an object"
    except (OSError, ValueError) as e:
        rec, why = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if isinstance(rec, dict):
        return rec
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        print(f"warning: {path}: unreadable DONE record ({why}); the stage counts as not done and resumes",
              file=sys.stderr, flush=True)
    return None


def read_record(path: str | Path) -> dict[str, Any] | None:
    """A small JSON record (``fingerprint.json``), or None when the file is missing. An unreadable one
    (impossible with :func:`atomic_write_json`, but an old ddkit or a hand edit) reads as ``{}``: present,
    contents unknown. (``DONE`` records: :func:`read_done`.)"""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def is_done(stage_dir: str | Path, fingerprint: str | None = None) -> bool:
    """True when :func:`mark_done` has run for ``stage_dir`` (a readable ``DONE``, :func:`read_done`) and,
    given ``fingerprint``, recorded that one."""
    rec = read_done(stage_dir)
    return rec is not None and (fingerprint is None or rec.get("fingerprint") == fingerprint)


def set_aside(path: str | Path, keep_dir: str | Path) -> Path | None:
    """Move ``path`` (a stale stage directory) to ``keep_dir/<name>``, replacing what an earlier call put
    there, so nothing resumes from it and the last stale copy can still be inspected. Two renames on one
    filesystem: a crash leaves either the old or no copy at ``path``, never a half-moved one.

    Returns:
        The new location, or None when ``path`` did not exist.
    """
    path, keep = Path(path), Path(keep_dir) / Path(path).name
    if not path.exists():
        return None
    keep.parent.mkdir(parents=True, exist_ok=True)
    if keep.exists():
        trash = keep.with_name(f".{keep.name}.del")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(keep, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, keep)
    return keep


def hardware_info() -> dict[str, Any]:
    """What ran this: host, usable CPUs, torch threads and version, accelerator name (for manifests)."""

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": usable_cpus(),  # this process's affinity / SLURM_CPUS_PER_TASK, not the machine's count
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
        else:
            info["device"] = "cpu"
            info["gpus"] = 0
    except Exception:  # pragma: no cover - torch is a hard dependency
        pass
    return info


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
