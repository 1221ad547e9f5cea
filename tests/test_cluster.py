"""ddkit.cluster without a cluster: time/sinfo parsing, request checks, golden sbatch scripts and container
command lines, the checkpointable jobs through submitit's in-process ("debug") executor, job folders and
the jobs index. The real-cluster behaviour is in tests/test_slurm_integration.py."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddkit import cluster
from ddkit.cli import app
from ddkit.config import SlurmConfig, load_config
from ddkit.errors import ClusterError

SINFO = """\
gpu*|1-00:00:00|gpu:2|1|2|19284|up
cpu|infinite|(null)|3|64|256000|up
big|2:00:00|gpu:a100:4(S:0-1),gpu:v100:2|2|32|512000|up
big|2:00:00|gpu:a100:8(S:0-1)|1|128|1024000|up
down|30:00|gpu:1|1|8|1000|down
"""


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    # Keep the user's jobs index untouched, and stop submitit's debug executor from opening pdb on a failure.
    import pdb

    monkeypatch.setenv("DDKIT_JOBS_INDEX", str(tmp_path / "jobs-index.jsonl"))
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: None)


# ----------------------------------------------------------------------------------------------------------
# Parsing and request checks
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,minutes",
    [
        ("30", 30),
        ("1:30", 2),
        ("4:00:00", 240),
        ("1-0", 1440),
        ("2-03:04", 2 * 1440 + 184),
        ("0-00:00:30", 1),
    ],
)
def test_parse_time_follows_sbatch_formats(text, minutes):
    assert cluster.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "0", "-5", "1h"])
def test_parse_time_rejects_with_one_line(text):
    with pytest.raises(ClusterError) as e:
        cluster.parse_time(text)
    assert "--time" in str(e.value) and "\n" not in str(e.value)


def test_format_minutes_round_trips():
    for m in (1, 59, 240, 1440, 1590, 4321):
        assert cluster.parse_time(cluster.format_minutes(m)) == m
    assert cluster.format_minutes(None) == "infinite"


def test_parse_sinfo_merges_node_groups_and_counts_gpus():
    parts = cluster.parse_sinfo(SINFO)
    assert sorted(parts) == ["big", "cpu", "down", "gpu"]
    gpu = parts["gpu"]
    assert gpu.default and gpu.gpus_per_node == 2 and gpu.max_time_min == 1440 and gpu.cpus_per_node == 2
    assert parts["cpu"].max_time_min is None and parts["cpu"].gpus_per_node == 0 and parts["cpu"].nodes == 3
    big = parts["big"]
    # two node groups: 2 nodes with 4 a100 + 2 v100 = 6 GPUs, 1 node with 8: largest node wins, nodes add up
    assert big.gpus_per_node == 8 and big.nodes == 3 and big.cpus_per_node == 128 and not big.default
    assert not parts["down"].available


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"partition": "nope"}, "--partition 'nope': no such partition (sinfo lists: big, cpu, down, gpu)"),
        ({"nodes": 2}, "--nodes 2: partition 'gpu' has 1 node(s)"),
        ({"gpus_per_node": 4, "tasks_per_node": 4, "cpus_per_task": 1}, "--gpus-per-node 4"),
        ({"cpus_per_task": 2, "tasks_per_node": 2, "gpus_per_node": 2}, "--cpus-per-task 2 x 2 task(s)"),
        ({"time_min": 1441}, "--time 1-00:01:00: partition 'gpu' allows at most 1-00:00:00"),
        ({"mem_gb": 100}, "--mem-gb 100"),
    ],
)
def test_check_request_names_the_option_and_the_limit(kwargs, needle):
    req = dict(partition="gpu", nodes=1, gpus_per_node=1, tasks_per_node=1, cpus_per_task=1, time_min=60)
    req.update(kwargs)
    with pytest.raises(ClusterError) as e:
        cluster.check_request(cluster.parse_sinfo(SINFO), **req)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_check_request_accepts_what_fits():
    parts = cluster.parse_sinfo(SINFO)
    p = cluster.check_request(
        parts, partition="cpu", nodes=3, gpus_per_node=0, tasks_per_node=1, cpus_per_task=64, time_min=10**6
    )
    assert p.name == "cpu"
    cluster.check_request(
        parts, partition="gpu", nodes=1, gpus_per_node=2, tasks_per_node=2, cpus_per_task=1, time_min=1440
    )


def _empty_path(tmp_path, monkeypatch) -> None:
    empty = tmp_path / "emptybin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_preflight_without_sbatch_fails_with_one_line(tmp_path, monkeypatch):
    _empty_path(tmp_path, monkeypatch)
    with pytest.raises(ClusterError) as e:
        cluster.preflight(SlurmConfig())
    assert str(e.value).startswith("sbatch: not found on PATH") and "\n" not in str(e.value)


def test_cli_submit_without_sbatch_prints_one_red_line(tmp_path, monkeypatch):
    _empty_path(tmp_path, monkeypatch)
    res = CliRunner().invoke(app, ["submit", "train", "--set", f"run_dir={tmp_path / 'run'}"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "sbatch: not found" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing was written before the check


# ----------------------------------------------------------------------------------------------------------
# Golden command lines
# ----------------------------------------------------------------------------------------------------------
GOLDEN_TRAIN = """\
#!/bin/bash

# Parameters
#SBATCH --account=proj
#SBATCH --constraint=a100
#SBATCH --cpus-per-task=6
#SBATCH --error=/runs/x/slurm/%j_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=ddkit-train-minimax-x
#SBATCH --mem=64GB
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/runs/x/slurm/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --reservation=dd
#SBATCH --signal=USR2@90
#SBATCH --time=1590
#SBATCH --wckey=submitit

# setup
module load cuda

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /runs/x/slurm/%j_%t_log.out --error /runs/x/slurm/%j_%t_log.err \
apptainer exec --nv --bind /data:/data,/runs/x:/runs/x /img/ddkit.sif python -u -m submitit.core._submit /runs/x/slurm
"""


def _multi_node_slurm() -> SlurmConfig:
    return SlurmConfig(
        partition="gpu",
        nodes=2,
        gpus_per_node=4,
        cpus_per_task=6,
        mem_gb=64,
        time="1-02:30:00",
        account="proj",
        qos="high",
        constraint="a100",
        setup=("module load cuda",),
        additional={"reservation": "dd"},
    )


def test_golden_sbatch_script_for_multi_node_training_in_a_container():
    s = _multi_node_slurm()
    params = cluster.slurm_parameters(
        s,
        name="ddkit-train-minimax-x",
        time_min=cluster.parse_time(s.time),
        tasks_per_node=4,
        gpus_per_node=4,
    )
    # one task per GPU (srun starts 4 per node), everything submitit names under slurm_, the rest additional
    assert params["slurm_ntasks_per_node"] == params["slurm_gpus_per_node"] == 4
    assert params["slurm_additional_parameters"] == {"reservation": "dd"}
    py = cluster.container_python("/img/ddkit.sif", ["/data:/data", "/runs/x:/runs/x"])
    assert py == "apptainer exec --nv --bind /data:/data,/runs/x:/runs/x /img/ddkit.sif python"
    assert cluster.sbatch_script("/runs/x/slurm", params, py) == GOLDEN_TRAIN.replace("\\\n", " ")


def test_sbatch_script_is_what_submitit_writes(tmp_path, monkeypatch):
    # submitit's SlurmExecutor only needs `srun` on PATH to be built; it is never run here.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    s = _multi_node_slurm()
    params = cluster.slurm_parameters(
        s, name="ddkit-x", time_min=90, tasks_per_node=4, gpus_per_node=4, dependency="afterok:7"
    )
    py = cluster.container_python("/img/a b.sif", ["/d:/d"])
    ex = cluster.make_executor(tmp_path / "jobs", s, params, python=py)
    assert ex.cluster == "slurm"
    written = ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "uid")
    assert written == cluster.sbatch_script(tmp_path / "jobs", params, py)
    assert "#SBATCH --dependency=afterok:7" in written
    assert "apptainer exec --nv --bind /d:/d '/img/a b.sif' python -u -m submitit.core._submit" in written
    assert ex._executor.max_num_timeout == s.max_timeouts


def test_container_binds_cover_data_weights_run_and_skip_nested_or_missing(tmp_path, monkeypatch):
    run, data, weights, hf = tmp_path / "run", tmp_path / "data" / "shards", tmp_path / "w", tmp_path / "hf"
    for d in (run, data, weights, hf):
        d.mkdir(parents=True)
    (weights / "dit.pt").write_bytes(b"x")
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = load_config(
        None,
        [
            f"run_dir={run}",
            f"data.shards={data}",
            f"generate.checkpoint={weights / 'dit.pt'}",
            "model.vae=stabilityai/sd-vae-ft-ema",  # an HF id, not a path: covered by the HF cache bind
            f"model.pretrained={tmp_path / 'missing'}",
        ],
    )
    binds = cluster.container_binds(cfg, run / "slurm", extra=["/scratch:/scratch"])
    assert binds == [
        f"{p}:{p}" for p in sorted([run, weights, hf, data], key=lambda p: (len(p.parts), str(p)))
    ] + ["/scratch:/scratch"]
    cmd = shlex.split(cluster.container_python("/img/x.sif", binds))
    assert cmd[:4] == ["apptainer", "exec", "--nv", "--bind"] and cmd[-2:] == ["/img/x.sif", "python"]
    assert cmd[4].split(",") == binds


def test_cli_dry_run_prints_the_container_script(tmp_path, monkeypatch):
    # --dry-run checks against sinfo; a tiny sinfo stand-in on PATH plays the cluster here.
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, body in (("sbatch", "exit 1"), ("srun", "exit 1"), ("sinfo", f"cat <<'EOF'\n{SINFO}EOF")):
        (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-cache"))  # not there: no cache bind
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    run = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "submit",
            "train",
            "--dry-run",
            "-p",
            "gpu",
            "-G",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
            "--container",
            "/img/x.sif",
            "--bind",
            "/scratch:/scratch",
            "--set",
            f"run_dir={run}",
            "--set",
            f"data.shards={tmp_path / 'no-shards'}",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "#SBATCH --ntasks-per-node=2" in res.output and "#SBATCH --gpus-per-node=2" in res.output
    assert (
        f"apptainer exec --nv --bind {run}:{run},/scratch:/scratch /img/x.sif python -u -m submitit"
        in res.output
    )
    bad = CliRunner().invoke(
        app, ["submit", "train", "--dry-run", "-p", "gpu", "-G", "3", "--set", f"run_dir={run}"]
    )
    assert (
        bad.exit_code == 2 and "--gpus-per-node 3: partition 'gpu' nodes have at most 2 GPU(s)" in bad.output
    )


# ----------------------------------------------------------------------------------------------------------
# Jobs through submitit's in-process executor
# ----------------------------------------------------------------------------------------------------------
def _tiny(tmp_path: Path, shards: Path, *sets: str):
    return load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.shards={shards}",
            "pretrain.steps=4",
            "pretrain.batch_size=8",
            "pretrain.log_every=2",
            "pretrain.ckpt_every=2",
            *sets,
        ],
    )


def test_train_job_runs_through_submitit_and_records_its_start(tmp_path, mnist_shards):
    cfg = _tiny(tmp_path, mnist_shards)
    job = cluster.submit_train(cfg, "pretrain", cluster="debug")
    ckpt = Path(job.result())
    assert ckpt == Path(cfg.run_dir) / "pretrain" / "ckpt" / "last.pt" and ckpt.is_file()
    assert (Path(cfg.run_dir) / "pretrain" / "DONE").is_file()
    events = cluster.read_events(Path(cfg.run_dir) / "pretrain")
    assert [e["event"] for e in events] == ["start"] and events[0]["resume_step"] is None
    # a second submission resumes (here: finds the stage done) and records the checkpoint's step
    cluster.submit_train(cfg, "pretrain", cluster="debug").result()
    assert cluster.read_events(Path(cfg.run_dir) / "pretrain")[-1]["resume_step"] == 4


def test_train_checkpoint_saves_through_the_running_trainer_and_resubmits_itself(tmp_path, monkeypatch):
    import ddkit.train

    saved = []

    class Running:
        step = 17

        def save_checkpoint(self):
            saved.append(self.step)

    monkeypatch.setattr(ddkit.train.stop, "_CURRENT", Running())
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    job = cluster.TrainJob(cfg, "minimax", max_steps=30)
    delayed = job.checkpoint()
    assert saved == [17]
    again = delayed.function
    assert isinstance(again, cluster.TrainJob) and again is not job
    assert (again.cfg, again.stage, again.max_steps) == (cfg, "minimax", 30)
    (ev,) = cluster.read_events(tmp_path / "minimax")
    assert ev["event"] == "requeue" and ev["step"] == 17


def test_finished_job_on_slurm_ignores_late_stop_signals(monkeypatch):
    """Once a job's work is done, SLURM's stop signals (USR2: the time-limit warning; SIGTERM) must neither
    reach submitit's handler (which requeues the finished job) nor Python's shutdown (which kills the process
    on them: SLURM then reads FAILED, ExitCode 12:0): ignored on SLURM. A stop (an exception) and in-process
    executors get the previous handlers back."""
    import signal

    from ddkit.cluster import jobs

    sigs = (signal.SIGTERM, signal.SIGUSR2)
    saved = {s: signal.getsignal(s) for s in sigs}

    def submitit_handler(signum, frame):  # stands for submitit's checkpoint-and-requeue handler
        pass

    try:
        for s in sigs:
            signal.signal(s, submitit_handler)
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        with jobs._stop_on_signals() as requeue:
            assert requeue is submitit_handler and signal.getsignal(signal.SIGUSR2) is not submitit_handler
        assert all(signal.getsignal(s) is submitit_handler for s in sigs)
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        with pytest.raises(RuntimeError), jobs._stop_on_signals():
            raise RuntimeError("stopped on a signal")
        assert all(signal.getsignal(s) is submitit_handler for s in sigs)
        with jobs._stop_on_signals():
            pass  # the training finished
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in sigs)
    finally:
        for s, h in saved.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


def test_generate_checkpoint_records_the_budget_restart(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    job = cluster.GenerateJob(cfg, "dit", 60.0, shard=1, num_shards=3)
    again = job.checkpoint().function
    assert (again.method, again.time_limit, again.shard, again.num_shards) == ("dit", 60.0, 1, 3)
    (ev,) = cluster.read_events(tmp_path / "gen-dit")
    assert ev["event"] == "requeue" and ev["shard"] == 1 and "restarts" in ev["budget"]


def test_array_generation_and_merge_through_submitit(tmp_path, mnist_shards):
    cfg = _tiny(tmp_path, mnist_shards)
    Path(cluster.submit_train(cfg, "pretrain", cluster="debug").result())
    gcfg = load_config(
        None,
        [
            f"run_dir={cfg.run_dir}",
            f"data.shards={mnist_shards}",
            "generate.steps_min=2",
            "generate.steps_max=2",
            "generate.ipc_min=1",
            "generate.ipc_max=1",
            "generate.batch_size=10",
        ],
    )
    jobs = cluster.submit_generate(gcfg, method="dit", time_limit=60, gpus=2, array=True, cluster="debug")
    assert len(jobs) == 3  # two shards, then the merge
    for j in jobs[:2]:
        assert Path(j.result()) == Path(cfg.run_dir) / "gen-dit"
    gen = Path(cfg.run_dir) / "gen-dit"
    assert not (gen / "DONE").exists()  # array tasks never merge: the merge job does
    data = torch.load(jobs[2].result(), weights_only=False)
    assert data["images"].shape == (10, 1, 32, 32) and data["labels"].tolist() == list(range(10))
    import json

    manifest = json.loads((gen / "manifest.json").read_text())
    assert manifest["slurm"]["requeues"] == 0
    assert sorted(e["shard"] for e in manifest["slurm"]["events"]) == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# Folders, index, listing
# ----------------------------------------------------------------------------------------------------------
def test_cleanup_removes_only_old_pickles_of_finished_jobs(tmp_path):
    names = [
        "11_submitted.pkl",
        "11_0_result.pkl",
        "11_0_log.out",
        "11_submission.sh",
        "12_submitted.pkl",
        "13_0_result.pkl",
        "14_2_submitted.pkl",
    ]
    for n in names:
        (tmp_path / n).write_text("x")
    old = time.time() - 10 * 86400
    for n in names[:-2]:
        os.utime(tmp_path / n, (old, old))
    os.utime(tmp_path / "14_2_submitted.pkl", (old, old))
    removed = cluster.cleanup_folder(tmp_path, max_age_s=86400, active={"12", "14"})
    assert removed == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["11_0_log.out", "11_submission.sh", "12_submitted.pkl", "13_0_result.pkl", "14_2_submitted.pkl"]
    )


def test_jobs_index_finds_logs_and_the_listing_keeps_ddkit_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("DDKIT_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))
    folder = tmp_path / "run" / "slurm"
    cluster.register_job("41", "ddkit-train-pretrain-x", folder, str(tmp_path / "run"), "train")
    cluster.register_job("42", "ddkit-gen-dit-x", folder, str(tmp_path / "run"), "generate-array")
    assert cluster.log_paths("41") == (folder / "41_0_log.out", folder / "41_0_log.err")
    assert cluster.log_paths("42_3")[0] == folder / "42_3_0_log.out"
    folder.mkdir(parents=True)
    (folder / "41_0_log.out").write_text("a\nb\nc\n")
    res = CliRunner().invoke(app, ["jobs", "logs", "41", "-n", "2"])
    assert res.exit_code == 0 and res.output.splitlines() == ["b", "c"]
    # the listing reads sacct; a stand-in prints what sacct -P would
    fake = tmp_path / "bin"
    fake.mkdir()
    sacct = "41|ddkit-train-pretrain-x|COMPLETED|gpu|00:01:02|vm\n42_0|ddkit-gen-dit-x|CANCELLED by 0|gpu|00:00:01|vm\n7|other|RUNNING|cpu|00:00:09|vm\n"
    for tool, body in (
        ("sbatch", "exit 1"),
        ("srun", "exit 1"),
        ("sinfo", "exit 1"),
        ("sacct", f"cat <<'EOF'\n{sacct}EOF"),
    ):
        (fake / tool).write_text(f"#!/bin/sh\n{body}\n")
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    rows = cluster.list_jobs()
    assert [(r.job_id, r.state, r.folder) for r in rows] == [
        ("41", "COMPLETED", str(folder)),
        ("42_0", "CANCELLED", str(folder)),
    ]
    res = CliRunner().invoke(app, ["jobs"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "ddkit-gen-dit-x" in res.output and "other" not in res.output


def test_unknown_job_logs_fail_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DDKIT_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))
    _empty_path(tmp_path, monkeypatch)
    res = CliRunner().invoke(app, ["jobs", "logs", "999"])
    assert res.exit_code == 2 and "job 999" in res.output and len(res.output.strip().splitlines()) == 1


def test_submit_module_imports_no_torch():
    # `ddkit submit --help` must stay fast: the CLI module imports nothing heavy at import time.
    code = "import sys, ddkit.cli.submit, ddkit.cli.jobs; print('torch' in sys.modules)"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_wait_result_turns_a_failed_job_into_one_line(tmp_path):
    # submitit's "local" executor runs the job in a subprocess and reports failures like SLURM jobs do.
    ex = cluster.make_executor(
        tmp_path, SlurmConfig(), {"slurm_job_name": "ddkit-x", "slurm_time": 1}, cluster="local"
    )
    job = ex.submit(cluster.parse_time, "soon")
    with pytest.raises(ClusterError) as e:
        cluster.wait_result(job, poll_s=0.1, timeout_s=120)
    msg = str(e.value)
    assert "\n" not in msg and f"job {job.job_id} failed" in msg
    assert "--time 'soon': not a SLURM time" in msg and f"ddkit jobs logs {job.job_id} --err" in msg
