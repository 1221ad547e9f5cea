"""Precision and thread counts chosen by what this process can use and what its device does fast.

``precision: auto`` (every config section that has a precision) is resolved by one pure rule,
:func:`resolve_precision`, from the device type, a :class:`Capabilities` record and an injected timer that
times a few steps of the stage's actual model in a given precision:

- **CUDA**: bf16 where the GPU has it natively (``torch.cuda.is_bf16_supported(including_emulation=False)``:
  Ampere and newer). Otherwise (V100, T4) training uses fp16 autocast with a ``torch.amp.GradScaler``
  (Micikevicius et al., "Mixed Precision Training", ICLR 2018: loss scaling keeps small fp16 gradients from
  flushing to zero); generation uses fp16 too (inference only: no gradients to underflow; the diffusers DiT
  pipelines sample in fp16); evaluation uses fp32 (the students are small and the protocols' reference
  accuracies are fp32 numbers).
- **CPU**: bf16 only where the CPU has native bf16 (AVX-512-BF16 or AMX, see :func:`cpu_bf16_features`)
  *and* the timed check finds the bf16 step at least :data:`MIN_SPEEDUP` times faster than the fp32 one;
  otherwise fp32 (without native bf16, autocast is emulated: 12x slower on a Zen 3 for the demo's DiT).
- An explicit ``fp32``/``bf16``/``fp16`` is honoured; an explicit bf16 on a CPU without native bf16 is timed
  and gives one warning line with the measured slowdown.

The resolved :class:`PrecisionChoice` (precision, reason, measured fp32/bf16 ratio) goes into each stage's
record: the training ``DONE`` record and checkpoint, the generation ``manifest.json``, the evaluation
``results.json``, and ``report.md``. Nothing is cached across runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ddkit.dist import thread_request, usable_cpus

Role = Literal["train", "generate", "evaluate"]
Timer = Callable[[str], float]  # precision ("fp32" | "bf16" | "fp16") -> seconds per step

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: bf16 must be this many times faster than fp32 to be chosen on a CPU: within the timing noise of a shared
#: machine (the same DiT-T/4 step measured 0.95x and 1.05x in one run under load), fp32 (the more exact one)
#: wins. On this project's AMX Xeon the demo's training step is 0.97x as fast in bf16 (2 idle threads).
MIN_SPEEDUP = 1.10
#: Seconds the timed check may spend per precision (one warm-up step plus 1..TIMED_STEPS timed steps).
CHECK_BUDGET_S = 2.0
TIMED_STEPS = 3
#: Largest batch the timed check runs (keeps it to a few seconds; the ratio barely depends on it beyond).
CHECK_BATCH = 64
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Capabilities:
    """What the device offers, as queried from torch (and ``/proc/cpuinfo``)."""

    device_name: str = ""  # GPU name or CPU model
    cpu_capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    cpu_bf16: tuple[str, ...] = ()  # native bf16 features found: "avx512_bf16", "amx_bf16"
    cuda_bf16: bool = False  # torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision of one stage and why."""

    precision: Literal["fp32", "bf16", "fp16"]
    reason: str  # one sentence for logs and report.md
    ratio: float | None = None  # fp32 step s / bf16 step s (> 1: bf16 faster); None when not measured
    requested: str = "auto"
    grad_scaler: bool = False  # fp16 training: scale the loss (torch.amp.GradScaler)
    warning: str | None = None  # one line printed once (explicit bf16 on a CPU without native bf16)
    device: str = ""  # the device it was resolved for (Capabilities.device_name); set by choose_precision

    @property
    def dtype(self) -> Any:
        """The autocast dtype (``torch.bfloat16`` / ``torch.float16``), or None for fp32."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """``bf16 (auto: ...)`` for logs and reports."""
        ratio = f"; fp32/bf16 step time {self.ratio:.2f}" if self.ratio is not None else ""
        return f"{self.precision} ({self.requested}: {self.reason}{ratio})"


# ----------------------------------------------------------------------------------------------------------
# The rule (pure)
# ----------------------------------------------------------------------------------------------------------
def resolve_precision(
    requested: str, device_type: str, caps: Capabilities, timer: Timer | None, *, role: Role = "train"
) -> PrecisionChoice:
    """Resolve a configured precision to the one a stage runs (the rules of the module docstring).

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device_type: ``torch.device.type``: ``cuda``, ``cpu`` (anything else runs fp32 under ``auto``).
        caps: what the device offers (:func:`detect_capabilities`).
        timer: ``timer(precision) -> seconds per step`` of the stage's actual model; called only for a CPU
            with native bf16 under ``auto`` and for an explicit bf16 on a CPU without it. None: not timed.
        role: ``train`` (fp16 gets a gradient scaler), ``generate`` or ``evaluate``.

    Returns:
        A :class:`PrecisionChoice`.

    Raises:
        ValueError: ``requested`` is not one of :data:`PRECISIONS`.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision: must be one of {list(PRECISIONS)}, got {requested!r}")
    scaler = role != "generate"  # fp16 with gradients needs loss scaling
    if requested == "fp16":
        return PrecisionChoice("fp16", "set explicitly", None, requested, grad_scaler=scaler)
    if requested == "fp32":
        return PrecisionChoice("fp32", "set explicitly", None, requested)
    if requested == "bf16":
        if device_type == "cpu" and not caps.cpu_bf16:
            ratio = _ratio(timer)
            slower = f"{1 / ratio:.1f}x slower than fp32 (measured)" if ratio else "emulated (not timed)"
            warning = (
                f"precision bf16 on a CPU without native bf16 ({caps.device_name or 'this CPU'}, "
                f"{caps.cpu_capability}, no avx512_bf16/amx_bf16): {slower}; set precision: auto or fp32"
            )
            return PrecisionChoice("bf16", "set explicitly; CPU has no native bf16", ratio, requested, warning=warning)
        if device_type == "cuda" and not caps.cuda_bf16:
            warning = f"precision bf16 on {caps.device_name or 'a GPU'} without native bf16: emulated; set precision: auto"
            return PrecisionChoice("bf16", "set explicitly; GPU has no native bf16", None, requested, warning=warning)
        return PrecisionChoice("bf16", "set explicitly", None, requested)
    # auto
    if device_type == "cuda":
        if caps.cuda_bf16:
            return PrecisionChoice("bf16", f"{caps.device_name or 'GPU'} has native bf16")
        if role == "evaluate":
            return PrecisionChoice(
                "fp32", f"{caps.device_name or 'GPU'} has no native bf16; evaluation keeps the protocols' fp32"
            )
        how = "fp16 autocast with a gradient scaler" if scaler else "fp16 autocast (inference: no gradients)"
        return PrecisionChoice(
            "fp16", f"{caps.device_name or 'GPU'} has no native bf16: {how}", None, grad_scaler=scaler
        )
    if device_type != "cpu":
        return PrecisionChoice("fp32", f"no precision rule for device type {device_type!r}")
    if not caps.cpu_bf16:
        return PrecisionChoice(
            "fp32", f"CPU has no native bf16 ({caps.cpu_capability}, no avx512_bf16/amx_bf16): bf16 would be emulated"
        )
    native = "+".join(caps.cpu_bf16)
    ratio = _ratio(timer)
    if ratio is None:
        return PrecisionChoice("fp32", f"CPU has native bf16 ({native}) but no timed check was possible")
    if ratio >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"CPU has native bf16 ({native}) and a bf16 step is {ratio:.2f}x faster", ratio)
    return PrecisionChoice(
        "fp32", f"CPU has native bf16 ({native}) but a bf16 step is only {ratio:.2f}x as fast (< {MIN_SPEEDUP})", ratio
    )


def _ratio(timer: Timer | None) -> float | None:
    """fp32 seconds / bf16 seconds from ``timer``; None without a timer or when a timing is not positive."""
    if timer is None:
        return None
    t32, t16 = float(timer("fp32")), float(timer("bf16"))
    if not (t32 > 0 and t16 > 0):
        return None
    return t32 / t16


# ----------------------------------------------------------------------------------------------------------
# Capabilities and timing (impure)
# ----------------------------------------------------------------------------------------------------------
def cpuinfo(path: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def cpu_flags(path: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags (x86 ``flags``, Arm ``Features``) from :func:`cpuinfo`."""
    info = cpuinfo(path)
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def cpu_bf16_features(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """Native bf16 features of this CPU: ``avx512_bf16`` and/or ``amx_bf16`` (empty: bf16 is emulated).

    torch's own cpuinfo query (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``) where
    it exists, else the ``/proc/cpuinfo`` flags (:func:`cpu_flags`).
    """
    if flags is None:
        import torch

        query = {n: getattr(torch.cpu, f"_is_{q}_supported", None) for n, q in
                 (("avx512_bf16", "avx512_bf16"), ("amx_bf16", "amx_tile"))}
        if all(q is not None for q in query.values()):
            return tuple(n for n, q in query.items() if q())
        flags = cpu_flags()
    return tuple(f for f in _BF16_FLAGS if f in flags)


def detect_capabilities(device: Any) -> Capabilities:
    """Query torch about ``device`` (a ``torch.device`` or string)."""

    import torch

    device = torch.device(device)
    cap = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.4 has no such argument: native bf16 tensor cores start at sm_80
            native = torch.cuda.get_device_capability(device) >= (8, 0)
        return Capabilities(device_name=torch.cuda.get_device_name(device), cpu_capability=cap, cuda_bf16=bool(native))
    name = cpuinfo().get("model name") or platform.processor() or platform.machine()
    return Capabilities(device_name=name, cpu_capability=cap, cpu_bf16=cpu_bf16_features())


def autocast(device_type: str, precision: str):
    """``torch.autocast`` for ``bf16``/``fp16``; a null context for ``fp32``."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def step_timer(
    step: Callable[[], Any],
    device_type: str,
    *,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    budget_s: float = CHECK_BUDGET_S,
    timed_steps: int = TIMED_STEPS,
    clock: Callable[[], float] = time.perf_counter,
) -> Timer:
    """A :data:`Timer` around ``step`` (one step of the actual model; see :func:`model_step`).

    The first call measures every one of ``precisions``, interleaved so that a change in machine load hits
    them alike: one warm-up step each (kernel selection, weight packing), then rounds of one step each while
    ``budget_s`` per precision lasts (``timed_steps`` rounds at most, one at least); each precision's time is
    its fastest timed step (seconds). When a warm-up step alone overran the budget (emulated bf16 on a CPU
    without it), the warm-up times are the answer: a step that slow decides the question anyway. Later calls
    return the stored times. Global RNG states are restored afterwards, so a resumed run stays exact.
    """
    import torch

    times: dict[str, float] = {}

    def one(precision: str) -> float:
        with autocast(device_type, precision):
            t = clock()
            step()
            if device_type == "cuda":
                torch.cuda.synchronize()
            return clock() - t

    def measure() -> None:
        with torch.random.fork_rng(devices=[]):
            warm = {p: one(p) for p in precisions}
            if max(warm.values()) > budget_s:
                times.update(warm)
                return
            best = {p: float("inf") for p in precisions}
            spent = sum(warm.values())
            for _ in range(timed_steps):
                for p in precisions:
                    dt = one(p)
                    best[p], spent = min(best[p], dt), spent + dt
                if spent > budget_s * len(precisions):
                    break
            times.update(best)

    def timer(precision: str) -> float:
        if not times:
            measure()
        return times[precision]

    return timer


def model_step(model: Any, inputs: tuple, *, backward: bool) -> Callable[[], None]:
    """One step of ``model(*inputs)``: the forward, and with ``backward`` a backward of the output's mean
    (gradients are dropped afterwards; parameters, buffers and optimizer state are not touched)."""
    import torch

    def step() -> None:
        if backward:
            model(*inputs).float().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(*inputs)

    return step


def backbone_inputs(model: Any, batch: int, device: Any) -> tuple:
    """Random ``(x float [b,C,S,S], t int64 [b], y int64 [b])`` for a :class:`ddkit.models.Backbone`,
    ``b = min(batch, CHECK_BATCH)``, drawn from a private generator."""
    import torch

    b = max(1, min(batch, CHECK_BATCH))
    g = torch.Generator().manual_seed(0)
    c, s = model.in_channels, model.input_size
    x = torch.randn(b, c, s, s, generator=g).to(device)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    y = torch.randint(0, model.num_classes, (b,), generator=g).to(device)
    return x, t, y


def choose_precision(
    requested: str,
    device: Any,
    *,
    role: Role,
    step: Callable[[], Any] | None = None,
    warn: Callable[[str], None] | None = None,
    agree: bool = True,
    previous: dict[str, Any] | None = None,
) -> PrecisionChoice:
    """Resolve ``requested`` for this process's ``device`` with a timed check of ``step`` where needed.

    With ``agree`` under a ``torch.distributed`` process group (a collective: every rank must call it),
    rank 0 decides (and times) and every rank adopts its choice, so all ranks train in one precision.
    Without, each rank decides for itself. The warning line, if any, is printed once per decider (stderr).
    ``previous`` (a :meth:`PrecisionChoice.to_dict` from a checkpoint) is kept, untimed, when it was resolved
    from the same request on the same device: a resumed run continues in the precision it started with.
    """
    import torch
    import torch.distributed as tdist

    device = torch.device(device)
    group = agree and tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    rank = tdist.get_rank() if group else 0
    choice = None
    if rank == 0:
        caps = detect_capabilities(device)
        if previous and previous.get("requested") == requested and previous.get("device") == caps.device_name:
            known = {f.name for f in dataclasses.fields(PrecisionChoice)}
            choice = PrecisionChoice(**{k: v for k, v in previous.items() if k in known and k != "warning"})
        else:
            timer = step_timer(step, device.type) if step is not None else None
            choice = resolve_precision(requested, device.type, caps, timer, role=role)
            choice = dataclasses.replace(choice, device=caps.device_name)
    if group:
        box = [choice]
        tdist.broadcast_object_list(box, src=0)
        choice = box[0]
    if choice.warning and rank == 0:
        (warn or _stderr_line)(choice.warning)
    return choice


def _stderr_line(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------------
def configure_threads() -> int:
    """Set torch's intra-op threads for a stage command and return the count.

    ``OMP_NUM_THREADS`` when the user set it, else :func:`ddkit.dist.usable_cpus` (affinity mask,
    ``SLURM_CPUS_PER_TASK``, shared among torchrun's local processes). Called by the CLI and the pipeline
    at the start of each stage command; the count is recorded with :func:`ddkit.io.hardware_info`.
    """
    import torch

    n = thread_request() or usable_cpus()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


__all__ = [
    "Capabilities",
    "PrecisionChoice",
    "autocast",
    "backbone_inputs",
    "choose_precision",
    "configure_threads",
    "cpu_bf16_features",
    "cpu_flags",
    "cpuinfo",
    "detect_capabilities",
    "model_step",
    "resolve_precision",
    "step_timer",
]
