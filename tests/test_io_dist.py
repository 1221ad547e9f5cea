"""Atomic writes leave nothing half-written; the launcher environment maps to rank / world / master."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ddkit.dist import dist_env, first_host
from ddkit.io import atomic_dir, atomic_file, atomic_write_json, is_done, mark_done, read_json, read_jsonl


def test_atomic_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("preempted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_atomic_outputs_honour_the_umask(tmp_path):
    p = atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert read_json(p) == {"a": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_umask_is_read_as_set():
    from ddkit.io import dir_mode, file_mode, umask

    old = os.umask(0o027)
    try:
        assert (umask(), file_mode(), dir_mode()) == (0o027, 0o640, 0o750)
    finally:
        os.umask(old)


def test_atomic_dir_output_is_readable_as_the_umask_allows(tmp_path):
    """mkdtemp / mkstemp make 0700 / 0600; a finished atomic_dir and what it holds follow the umask."""
    import tempfile

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        with atomic_dir(out) as tmp:
            fd, private = tempfile.mkstemp(dir=tmp)  # 0600, as a library writing through a temp file leaves it
            os.close(fd)
            sub = Path(tempfile.mkdtemp(dir=tmp))  # 0700
            (sub / "f.txt").write_text("x")
            (tmp / "run.sh").write_text("#!/bin/sh\n")
            (tmp / "run.sh").chmod(0o700)
        assert out.stat().st_mode & 0o777 == 0o755
        assert (out / Path(private).name).stat().st_mode & 0o777 == 0o644
        assert (out / sub.name).stat().st_mode & 0o777 == 0o755
        assert (out / sub.name / "f.txt").stat().st_mode & 0o777 == 0o644
        assert (out / "run.sh").stat().st_mode & 0o777 == 0o755  # execute bits kept, as the umask allows
    finally:
        os.umask(old)


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "shards"
    with atomic_dir(out) as tmp:
        (tmp / "a.tar").write_text("x")
    assert (out / "a.tar").exists()
    with pytest.raises(ValueError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "b.tar").write_text("y")
            raise ValueError("corrupt input")
    assert sorted(p.name for p in out.iterdir()) == ["a.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]
    with pytest.raises(FileExistsError):
        with atomic_dir(out):
            pass


def test_done_marker_and_torn_jsonl(tmp_path):
    assert not is_done(tmp_path)
    mark_done(tmp_path, {"steps": 3})
    assert is_done(tmp_path)
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"ste')
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]


def test_dist_env_from_launchers():
    assert dist_env({}).world_size == 1
    tr = dist_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port, tr.launcher) == (
        1, 4, 1, "n1", 1234, "torchrun"
    )
    sl = dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                   "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[003-004]"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.master_addr, sl.launcher) == (3, 8, 1, "gpu003", "slurm")
    assert sl.master_port == 20000 + 4242
    # a single-task batch step is one process, not a world of one rank per task
    assert dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "none"


@pytest.mark.parametrize(
    "nodelist, first",
    [("node1", "node1"), ("gpu[003-005,7]", "gpu003"), ("a[1,2],b3", "a1"), ("c[10]", "c10"),
     ("gpu[003-005]-ib", "gpu003-ib"), ("a[1-2]b[3-4],c9", "a1b3"), (" n[07-08] ", "n07"), ("gpu[003", "gpu")],
)  # fmt: skip
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first
