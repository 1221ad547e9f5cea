"""ddkit on a real SLURM cluster: slurm/start-local-cluster.sh started once per session (munge, MariaDB,
slurmdbd, slurmctld, slurmd on localhost), real ddkit training and generation on the MNIST shards.

Skipped, with the reason, only when the cluster cannot start here (not root, no apt); with CI=true that is
a failure instead. Jobs use one thread each (OMP_NUM_THREADS=1) so an interrupted and an uninterrupted run
compute bit-identical steps.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ddkit import cluster
from ddkit.config import SlurmConfig, load_config

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "slurm" / "start-local-cluster.sh"
STOP = ROOT / "slurm" / "stop-local-cluster.sh"
STEPS = 40  # reference / preemption runs: about 7 s of training at one thread


@dataclass
class Cluster:
    state: Path
    start_s: float


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The local cluster for this session (``DDKIT_SLURM_STATE`` reuses a running one and leaves it up)."""

    def unavailable(reason: str):
        if _in_ci():
            pytest.fail(f"local SLURM cluster must start in CI but did not: {reason}", pytrace=False)
        pytest.skip(f"local SLURM cluster unavailable: {reason}")

    reuse = os.environ.get("DDKIT_SLURM_STATE")
    if not sys.platform.startswith("linux"):
        unavailable("needs Linux")
    if os.geteuid() != 0:
        unavailable("slurm/start-local-cluster.sh needs root")
    # A short state path: slurmstepd's and munge's unix sockets live below it (108-byte limit).
    state = Path(reuse) if reuse else Path(f"/tmp/ddks{os.getpid()}")
    # Oversubscribe 2 cores, so tiny jobs overlap their waits; 4 fake GPUs, so two 2-rank jobs run at once.
    env = dict(os.environ, DDKIT_SLURM_CPUS="4", DDKIT_SLURM_GPUS="4")
    t = time.monotonic()
    try:
        res = subprocess.run(
            ["bash", str(START), str(state)], capture_output=True, text=True, env=env, timeout=900
        )
    except subprocess.TimeoutExpired:
        unavailable("start-local-cluster.sh did not finish in 900 s")
    start_s = time.monotonic() - t
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        if not reuse:
            subprocess.run(["bash", str(STOP), str(state)], capture_output=True, timeout=120)
        unavailable(lines[-1] if lines else f"start-local-cluster.sh exit {res.returncode}")
    print(f"\nlocal SLURM cluster ready in {start_s:.1f}s ({(res.stderr.strip().splitlines() or [''])[-1]})")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(state / "slurm.conf"))
    mp.setenv("OMP_NUM_THREADS", "1")  # exported to every job by sbatch
    mp.setenv("DDKIT_JOBS_INDEX", str(tmp_path_factory.mktemp("index") / "jobs.jsonl"))
    try:
        yield Cluster(state, start_s)
    finally:
        mp.undo()
        if not reuse:
            subprocess.run(["bash", str(STOP), str(state)], capture_output=True, timeout=180)
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, mnist_shards) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(
        f"""\
name: tiny
data: {{shards: {mnist_shards}}}
model: {{arch: DiT-T/4}}
pretrain: {{steps: {STEPS}, batch_size: 16, log_every: 5, ckpt_every: 5, precision: fp32}}
generate: {{steps_min: 2, steps_max: 2, ipc_min: 1, ipc_max: 1, batch_size: 10}}
"""
    )
    return path


def ddkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    code = "import sys; from ddkit.cli import main; sys.argv[0] = 'ddkit'; main()"
    env = dict(os.environ, COLUMNS="200")  # rich tables unfolded
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _log_steps(stage_dir: Path) -> list[dict]:
    from ddkit.io import read_jsonl

    return read_jsonl(stage_dir / "train_log.jsonl")


def _wait_for(pred, timeout_s: float, what: str, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def _warn_until_gone(job, timeout_s: float = 120) -> int:
    """Send USR2, the warning SLURM sends before a time limit, every 50 ms until the job runs no more
    (``scancel`` refuses then): the warning lands after the last step, while the result is pickled and in
    Python's shutdown. Returns the number sent."""
    deadline = time.monotonic() + timeout_s
    sent = 0
    while subprocess.run(["scancel", "--signal", "USR2", job.job_id], capture_output=True).returncode == 0:
        sent += 1
        assert time.monotonic() < deadline, f"job {job.job_id} still running after {timeout_s:.0f}s"
        time.sleep(0.05)
    return sent


def _assert_completed(job_id: str) -> None:
    """A finished job reads COMPLETED (exit 0:0) in sacct (its latest record, as submitit and ``ddkit jobs``
    read it), in ``scontrol show job`` while slurmctld still holds it, and in ``ddkit jobs``."""

    def sacct() -> str | None:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
                             capture_output=True, text=True).stdout.strip()  # fmt: skip
        running = ("RUNNING", "COMPLETING", "PENDING", "REQUEUED")
        return out if out and out.split("|")[0] not in running else None

    assert _wait_for(sacct, 60, f"job {job_id} to leave the accounting's running states") == "COMPLETED|0:0"
    info = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True).stdout
    if info:  # slurmctld forgets a job MinJobAge (600 s here) after its end; sacct keeps it
        assert re.search(r"\bJobState=COMPLETED\b", info) and re.search(r"\bExitCode=0:0\b", info), info
    listing = ddkit("jobs")
    assert listing.returncode == 0, listing.stderr
    rows = [[c.strip() for c in ln.split("│")] for ln in listing.stdout.splitlines()]
    assert [r[3] for r in rows if len(r) > 3 and r[1] == job_id] == ["COMPLETED"], listing.stdout


def _params(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {"model": state["model"], "ema": state["ema"], "step": state["step"]}


def _assert_same_params(a: Path, b: Path, steps: int = STEPS) -> None:
    pa, pb = _params(a), _params(b)
    assert pa["step"] == pb["step"] == steps
    for key in ("model", "ema"):
        assert pa[key].keys() == pb[key].keys()
        for name in pa[key]:
            assert torch.equal(pa[key][name], pb[key][name]), f"{key}.{name} differs"


# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(slurm_cluster, config_file, tmp_path_factory):
    """An uninterrupted run submitted through the CLI and waited for: (process, checkpoint, seconds)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    t = time.monotonic()
    res = ddkit(
        "submit",
        "train",
        str(config_file),
        "--stage",
        "pretrain",
        "-p",
        "cpu",
        "-G",
        "0",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--wait",
        "--set",
        f"run_dir={run}",
    )
    return res, run / "pretrain" / "ckpt" / "last.pt", time.monotonic() - t


def test_trivial_job_round_trip(slurm_cluster, tmp_path):
    import operator

    import submitit

    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(slurm_partition="cpu", slurm_time=1, slurm_cpus_per_task=1)
    t = time.monotonic()
    job = ex.submit(operator.add, 2, 3)
    assert cluster.wait_result(job, poll_s=0.05, timeout_s=60) == 5
    print(
        f"\ncluster start {slurm_cluster.start_s:.1f}s; trivial job submit-to-result {time.monotonic() - t:.2f}s"
    )


def test_multi_gpu_job_starts_one_task_per_gpu_with_ranks_from_slurm(slurm_cluster, tmp_path):
    s = SlurmConfig(partition="gpu", gpus_per_node=2, cpus_per_task=1, time="1")
    params = cluster.slurm_parameters(s, name="ddkit-probe", time_min=1, tasks_per_node=2, gpus_per_node=2)
    job = cluster.make_executor(tmp_path, s, params).submit(cluster.task_info)
    _wait_for(lambda: job.done(force_check=True), 60, "the 2-task job", poll_s=0.2)
    tasks = sorted(job.results(), key=lambda t: t["rank"])
    assert [t["rank"] for t in tasks] == [0, 1] and {t["world_size"] for t in tasks} == {2}
    assert {t["launcher"] for t in tasks} == {"slurm"} and [t["local_rank"] for t in tasks] == [0, 1]
    # one rendezvous for the job: the first node of the step, a port derived from the job id
    assert {t["master_addr"] for t in tasks} == {tasks[0]["host"]}
    assert {t["master_port"] for t in tasks} == {20000 + int(job.job_id) % 20000}
    assert {t["cuda_visible_devices"] for t in tasks} == {"0,1"}  # the fake GRES GPUs of the node


def test_jobs_cancel_ends_a_running_job(slurm_cluster, tmp_path):
    s = SlurmConfig(partition="cpu", gpus_per_node=0, cpus_per_task=1, time="2")
    params = cluster.slurm_parameters(s, name="ddkit-sleep", time_min=2, tasks_per_node=1, gpus_per_node=0)
    job = cluster.make_executor(tmp_path, s, params).submit(time.sleep, 300)
    res = ddkit("jobs", "cancel", job.job_id)
    assert res.returncode == 0 and f"cancelled {job.job_id}" in res.stdout
    _wait_for(
        lambda: job.watcher.get_state(job.job_id, mode="force").startswith("CANCELLED"), 60, "CANCELLED", 0.2
    )
    bad = ddkit("jobs", "cancel", "999999")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "scancel" in bad.stderr


def test_wrong_partition_fails_before_submission(slurm_cluster, config_file, tmp_path):
    run = tmp_path / "run"
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    res = ddkit("submit", "train", str(config_file), "--partition", "nope", "--set", f"run_dir={run}")
    assert res.returncode == 2
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert lines == ["error: --partition 'nope': no such partition (sinfo lists: cpu, gpu)"]
    assert not run.exists()  # nothing pickled, no job folder
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    res = ddkit(
        "submit", "train", str(config_file), "-p", "gpu", "--gpus-per-node", "9", "--set", f"run_dir={run}"
    )
    # the fixture's cluster has 4 fake GPUs per node (a reused one may have 2)
    assert res.returncode == 2 and re.search(r"partition 'gpu' nodes have at most [24] GPU\(s\)", res.stderr)


def test_submit_train_cli_returns_result(reference, config_file):
    res, ckpt, seconds = reference
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.split("submitted ")[1].split()[0]
    assert f"result: {ckpt}" in res.stdout
    assert ckpt.is_file() and (ckpt.parent.parent / "DONE").is_file()
    assert _log_steps(ckpt.parent.parent)[-1]["step"] == STEPS
    print(f"\nddkit submit train --wait ({STEPS} steps): {seconds:.1f}s")
    # the job is listed and its log is reachable by id
    listing = ddkit("jobs")
    assert listing.returncode == 0 and job_id in listing.stdout and "ddkit-train-pretr" in listing.stdout
    logs = ddkit("jobs", "logs", job_id)
    assert logs.returncode == 0 and "Job completed successfully" in logs.stdout
    # The job left the records `ddkit run` leaves: a later run with the same config does not train again.
    plan = ddkit("run", str(config_file), "--set", f"run_dir={ckpt.parent.parent.parent}", "--stage", "pretrain",
                 "--dry-run", "--no-progress")  # fmt: skip
    assert plan.returncode == 0 and "[pretrain] would skip: unchanged" in plan.stdout, plan.stdout + plan.stderr


@pytest.fixture(scope="module")
def timeout_job(reference, config_file, tmp_path_factory):
    """A training job that outlives its 1-minute limit, submitted early so it runs beside the next tests.

    SLURM warns (USR2) ``signal_delay_s`` before the limit, checked by slurmctld every 30 s: with --time=1
    and USR2@20 the warning is due 10 s in and sent within 40 s of each attempt's start. The job gets ~40 s
    of steps (from the reference run's speed) after a start-up of several seconds, so the first attempt is
    still training when warned.

    A thread gives the job 10 minutes as soon as its first time-limit requeue is recorded: the requeued attempt
    then finishes, instead of spending minute after minute on start-up while the other tests load the machine
    (each attempt is warned within 40 s; 10 requeues at most, ``max_timeouts``).
    """
    _, ref_ckpt, _ = reference
    if not ref_ckpt.is_file():
        pytest.fail("the reference run failed", pytrace=False)
    speed = _log_steps(ref_ckpt.parent.parent)[-1]["steps_per_s"]
    steps = int(min(1000, max(150, math.ceil(40 * speed))))
    run = tmp_path_factory.mktemp("timeout") / "run"
    cfg = load_config(config_file, [f"run_dir={run}", f"pretrain.steps={steps}"])
    s = SlurmConfig(
        partition="cpu", gpus_per_node=0, cpus_per_task=1, time="1", signal_delay_s=20, max_timeouts=10
    )
    job = cluster.submit_train(cfg, "pretrain", slurm=s)
    extend = threading.Thread(target=_extend_after_first_requeue, args=(job.job_id, run / "pretrain"))
    extend.daemon = True
    extend.start()
    return job, run / "pretrain", steps


def _extend_after_first_requeue(job_id: str, stage: Path, minutes: int = 10, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(e["event"] == "requeue" for e in cluster.read_events(stage)):
            upd = ["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"]
            subprocess.run(upd, capture_output=True)  # fails only once the job finished: nothing to extend
            return
        time.sleep(0.1)


def test_preempted_job_resumes_from_checkpoint_exactly(reference, timeout_job, config_file, tmp_path):
    _, ref_ckpt, _ = reference
    assert ref_ckpt.is_file(), "the reference run failed"
    cfg = load_config(config_file, [f"run_dir={tmp_path / 'run'}"])
    stage = tmp_path / "run" / "pretrain"
    job = cluster.submit_train(
        cfg, "pretrain", slurm=SlurmConfig(partition="cpu", gpus_per_node=0, cpus_per_task=1, time="5")
    )
    _wait_for(lambda: any(r["step"] >= 10 for r in _log_steps(stage)), 120, "10 training steps")
    job._interrupt()  # submitit's preemption path: SIGTERM, then USR2 -> stop, checkpoint, scontrol requeue
    # Issue 23: the requeued attempt finishes, and a time-limit warning still comes after its last step. It
    # must neither requeue the finished job nor kill it at shutdown (which read FAILED, ExitCode 12:0).
    _wait_for(lambda: (stage / "DONE").is_file(), 180, "the requeued attempt to finish")
    sent = _warn_until_gone(job)
    ckpt = Path(cluster.wait_result(job, poll_s=0.2, timeout_s=180))
    _assert_completed(job.job_id)
    print(f"\nrequeued job finished with {sent} USR2 warning(s) after its last step: COMPLETED")
    events = cluster.read_events(stage)
    assert [e["event"] for e in events] == ["start", "stop", "requeue", "start"], events
    assert events[0]["resume_step"] is None and events[3]["restart"] == "1"
    assert events[1]["requeue_by"] == "submitit" and "SIGTERM" in events[1]["signals"]
    # resumed from the checkpoint written at the stop: no step lost
    assert 10 <= events[3]["resume_step"] == events[1]["step"] == events[2]["step"] < STEPS
    steps = [r["step"] for r in _log_steps(stage)]
    assert steps == list(range(5, STEPS + 1, 5))  # lines after the checkpoint were dropped, none repeat
    _assert_same_params(ckpt, ref_ckpt)


# ----------------------------------------------------------------------------------------------------------
# Two ranks under srun: preempted twice at arbitrary moments, bit-identical to an uninterrupted run
# ----------------------------------------------------------------------------------------------------------
DDP_STEPS = 48
DDP_SETS = [f"pretrain.steps={DDP_STEPS}", "pretrain.log_every=1", "pretrain.ckpt_every=1000"]


def _last_step(stage: Path) -> int:
    return max((r["step"] for r in _log_steps(stage)), default=0)


@pytest.fixture(scope="module")
def ddp_reference(slurm_cluster, config_file, tmp_path_factory):
    """An uninterrupted 2-rank run: ``ddkit submit train --gpus-per-node 2 --wait`` in a subprocess.

    Started at once when the node has 4 GPUs (it trains beside the interrupted run); on a reused 2-GPU
    cluster only when asked for, so it never holds the GPUs a requeued job waits for (that wait would
    count as requeue -> resume time). Yields a function returning the reference checkpoint.
    """
    run = tmp_path_factory.mktemp("ddpref") / "run"
    code = "import sys; from ddkit.cli import main; sys.argv[0] = 'ddkit'; main()"
    args = ["submit", "train", str(config_file), "--stage", "pretrain", "-p", "gpu", "--gpus-per-node", "2",
            "--cpus-per-task", "1", "--time", "10", "--wait", "--set", f"run_dir={run}"]  # fmt: skip
    for kv in DDP_SETS:
        args += ["--set", kv]
    procs: list[subprocess.Popen] = []

    def start() -> None:
        cmd = [sys.executable, "-c", code, *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    def result() -> Path:
        if not procs:
            start()
        out, err = procs[0].communicate(timeout=300)
        assert procs[0].returncode == 0, err
        return run / "pretrain" / "ckpt" / "last.pt"

    if cluster.partitions()["gpu"].gpus_per_node >= 4:
        start()
    yield result
    for p in procs:
        if p.poll() is None:
            p.kill()


def test_two_ranks_requeued_twice_resume_bit_identically(ddp_reference, config_file, tmp_path):
    """``scontrol requeue`` (what SLURM preemption does: SIGTERM, KillWait, SIGKILL, requeue) at two
    arbitrary steps of a 2-rank srun job: both ranks stop after one agreed step, one checkpoint is written,
    the job resumes from it; the final weights equal an uninterrupted 2-rank run's, bit for bit."""
    import random

    cfg = load_config(config_file, [f"run_dir={tmp_path / 'run'}", *DDP_SETS])
    stage = tmp_path / "run" / "pretrain"
    s = SlurmConfig(partition="gpu", gpus_per_node=2, cpus_per_task=1, time="10")
    job = cluster.submit_train(cfg, "pretrain", slurm=s)
    rng = random.Random()
    lost, resume_s, restart_s, resumed_at = [], [], [], 0
    for attempt in (1, 2):
        target = resumed_at + rng.randint(2, 10)  # an arbitrary step of this attempt (never a checkpoint's)
        _wait_for(lambda t=target: _last_step(stage) >= t, 180, f"step {target}", poll_s=0.05)
        seen = _last_step(stage)
        t, t_epoch = time.monotonic(), time.time()
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True)

        def resumed(n=attempt):
            starts = [e for e in cluster.read_events(stage) if e["event"] == "start"]
            return len(starts) > n and _last_step(stage) > (starts[n]["resume_step"] or 0) and starts[n]

        start = _wait_for(resumed, 180, f"training to resume after requeue {attempt}", poll_s=0.05)
        resume_s.append(time.monotonic() - t)
        restart_s.append(start["time"] - t_epoch)  # until the requeued job runs ddkit code again
        stops = [e for e in cluster.read_events(stage) if e["event"] == "stop"]
        assert len(stops) == attempt and stops[-1]["signals"] == ["SIGTERM"], stops
        assert stops[-1]["requeue_by"] == "slurm"
        resumed_at = start["resume_step"]
        assert resumed_at == stops[-1]["step"] >= seen  # the checkpoint holds every step made
        lost.append(max(seen, stops[-1]["step"]) - resumed_at)
    ckpt = Path(cluster.wait_result(job, poll_s=0.2, timeout_s=300))
    events = cluster.read_events(stage)
    assert [e["event"] for e in events] == ["start", "stop", "start", "stop", "start"], events
    assert [r["step"] for r in _log_steps(stage)] == list(range(1, DDP_STEPS + 1))  # each step logged once
    _assert_same_params(ckpt, ddp_reference(), DDP_STEPS)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["world_size"] == 2
    print(
        f"\n2-rank requeues at steps {[e['step'] for e in events if e['event'] == 'stop']}: steps lost {lost}; "
        f"requeue -> training resumed {', '.join(f'{x:.1f}s' for x in resume_s)} (of which SLURM requeue + "
        f"job start {', '.join(f'{x:.1f}s' for x in restart_s)}; the rest is imports, model, DDP, checkpoint load)"
    )
    assert lost == [0, 0]


def test_generation_array_completes_and_merges(reference, config_file, tmp_path):
    _, ref_ckpt, _ = reference
    assert ref_ckpt.is_file(), "the reference run failed"
    run = tmp_path / "run"
    res = ddkit(
        "submit",
        "generate",
        str(run),
        "-c",
        str(config_file),
        "--method",
        "dit",
        "--time-limit",
        "60",
        "--gpus",
        "2",
        "--array",
        "-p",
        "gpu",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--wait",
        "--set",
        f"generate.checkpoint={ref_ckpt}",
    )
    assert res.returncode == 0, res.stderr
    gen = run / "gen-dit"
    assert f"result: {gen / 'dataset.pt'}" in res.stdout
    data = torch.load(gen / "dataset.pt", weights_only=False)
    assert data["ipc"] == 1 and data["labels"].tolist() == list(range(10))
    assert data["images"].dtype == torch.uint8 and data["images"].shape == (10, 1, 32, 32)
    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["slurm"]["requeues"] == 0
    starts = [e for e in manifest["slurm"]["events"] if e["event"] == "start"]
    assert sorted((e["shard"], e["array_task"]) for e in starts) == [(0, "0"), (1, "1")]
    assert len({e["array_job_id"] for e in starts}) == 1


def test_generation_one_job_one_rank_per_gpu(reference, config_file, tmp_path):
    _, ref_ckpt, _ = reference
    assert ref_ckpt.is_file(), "the reference run failed"
    run = tmp_path / "run"
    res = ddkit(
        "submit", "generate", str(run), "-c", str(config_file), "--method", "dit", "--time-limit", "60",
        "--gpus", "2", "-p", "gpu", "--cpus-per-task", "1", "--time", "5", "--wait",
        "--set", f"generate.checkpoint={ref_ckpt}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    gen = run / "gen-dit"
    manifest = json.loads((gen / "manifest.json").read_text())
    # two srun tasks in one process group shared the shards; the merge job added the SLURM history
    assert manifest["world_size"] == 2 and manifest["ipc"] == 1 and (gen / "DONE").is_file()
    assert [e["event"] for e in manifest["slurm"]["events"]] == ["start"]


# ----------------------------------------------------------------------------------------------------------
# Generation ranks (one srun job, or an array) requeued at an arbitrary moment, D^3HR included
# ----------------------------------------------------------------------------------------------------------
D3HR_SETS = ["generate.ipc_min=2", "generate.ipc_max=2", "generate.d3hr.inversion_steps=10",
             "generate.d3hr.store_from=500", "generate.d3hr.store_to=700", "generate.d3hr.timestep=600",
             "generate.d3hr.max_images_per_class=2",
             # Two separate runs are compared: each would time auto on its own, so pin the precision.
             "generate.precision=fp32"]  # fmt: skip


def _submit_d3hr(config_file: Path, run: Path, ckpt: Path, array: bool, wait: bool):
    args = ["submit", "generate", str(run), "-c", str(config_file), "--method", "d3hr", "--time-limit", "120",
            "--gpus", "2", "-p", "gpu", "--cpus-per-task", "1", "--time", "5", "--set",
            f"generate.checkpoint={ckpt}"] + (["--array"] if array else []) + (["--wait"] if wait else [])  # fmt: skip
    for kv in D3HR_SETS:
        args += ["--set", kv]
    code = "import sys; from ddkit.cli import main; sys.argv[0] = 'ddkit'; main()"
    env = dict(os.environ, COLUMNS="200")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def d3hr_reference(reference, config_file, tmp_path_factory):
    """An uninterrupted 2-rank D^3HR generation (one srun job), started in the background."""
    _, ref_ckpt, _ = reference
    run = tmp_path_factory.mktemp("d3hrref") / "run"
    proc = _submit_d3hr(config_file, run, ref_ckpt, array=False, wait=True)

    def result() -> Path:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err
        return run / "gen-d3hr" / "dataset.pt"

    yield result
    if proc.poll() is None:
        proc.kill()


@pytest.mark.parametrize(
    ("array", "moment"),
    [(False, "statistics"), (True, "shard"), (True, "start")],
    ids=["srun-statistics", "array-shard", "array-start"],
)
def test_generation_requeued_at_any_moment_matches_uninterrupted(reference, d3hr_reference, config_file,
                                                                 tmp_path, array, moment):  # fmt: skip
    """``scontrol requeue`` at each kind of moment (job start, during the D^3HR statistics, once a shard is
    done), under srun and as an array: no hang, no duplicate and no missing image, the same merged set as an
    uninterrupted run (including its precision: a restart re-times nothing, it adopts ``precision.json``)."""
    _, ref_ckpt, _ = reference
    run = tmp_path / "run"
    gen = run / "gen-d3hr"
    proc = _submit_d3hr(config_file, run, ref_ckpt, array=array, wait=True)
    milestones = {
        "start": lambda: any(e["event"] == "start" for e in cluster.read_events(gen)),
        "statistics": lambda: any((run / "d3hr-cache").glob("*")),
        "shard": lambda: any((gen / f"shard-{r}" / "DONE").is_file() for r in (0, 1)),
    }
    _wait_for(milestones[moment], 240, f"generation to reach '{moment}'", poll_s=0.05)
    starts = [e for e in cluster.read_events(gen) if e["event"] == "start"]
    requeued = not (gen / "DONE").exists() and bool(starts)
    if requeued:
        job = starts[0]["array_job_id"] + "_" + starts[0]["array_task"] if array else starts[0]["job_id"]
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
    out, err = proc.communicate(timeout=400)  # a hang fails here, at the deadline
    assert proc.returncode == 0, err
    man = json.loads((gen / "manifest.json").read_text())
    pairs = [tuple(p) for p in man["seeds"]["per_image"]]
    assert pairs == [(c, i) for c in range(10) for i in range(2)]  # none duplicated, none missing
    assert man["ipc"] == 2 and man["images_dropped_for_balance"] == 0
    restarts = [
        e for e in cluster.read_events(gen) if e["event"] == "start" and e.get("restart") not in (None, "0")
    ]
    print(f"\nD^3HR generation ({'array' if array else 'srun'}) requeued at '{moment}': "
          f"{'yes' if requeued else 'no (already done)'}, restarted tasks {len(restarts)}; "
          f"images {man['images']} = 10 classes x IPC {man['ipc']}, duplicated 0, missing 0")  # fmt: skip
    ref = torch.load(d3hr_reference(), weights_only=False)
    got = torch.load(gen / "dataset.pt", weights_only=False)
    assert torch.equal(got["labels"], ref["labels"]) and torch.equal(got["images"], ref["images"])


def test_time_limit_requeues_and_finishes(timeout_job):
    job, stage, steps = timeout_job
    _wait_for(
        lambda: any(e["event"] == "requeue" for e in cluster.read_events(stage)),
        150,
        "the time-limit requeue",
    )
    # Every attempt of a 1-minute job is warned within 40 s; give the requeued one room to finish (the
    # fixture's thread did so already, if it could). A requeued attempt that already finished (a fast
    # machine) makes the update fail: nothing to extend.
    upd = subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "TimeLimit=10"], capture_output=True, text=True)
    if upd.returncode != 0:
        # the state SLURM holds now (submitit's `job.state` may be a cached earlier one)
        state = job.watcher.get_state(job.job_id, mode="force")
        assert state in ("COMPLETED", "COMPLETING"), (state, upd.stderr)
    ckpt = Path(cluster.wait_result(job, poll_s=0.2, timeout_s=300))
    # An attempt that finishes within its first minute may get the warning after its last step (issue 23).
    _assert_completed(job.job_id)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["step"] == steps
    assert (stage / "DONE").is_file()
    events = cluster.read_events(stage)
    assert (
        events[0]["event"] == "start" and events[-1]["event"] == "start" and int(events[-1]["restart"]) >= 1
    )
    assert sum(e["event"] == "requeue" for e in events) >= 1
    log = (stage.parent / "slurm" / f"{job.job_id}_0_log.out").read_text()
    assert "this job is timed-out" in log and "Job completed successfully" in log
