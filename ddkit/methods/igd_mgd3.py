"""IGD on top of MGD^3 (``igd+mgd3``): one DDPM chain changed by both methods' step guides.

The two compose because each only adds an offset to the scheduler's x_{t-1} = μ_θ(x_t) + σ_t z, and both
offsets are functions of x_t, not of each other's result:

    x_{t-1} = μ_θ(x_t) + σ_t z + λ σ_t (m − x̂_0)  − σ_t² ∇_{x_t}[k·G_I + γ·G_D]
              (scheduler)       (MGD^3, first steps)  (IGD, its timestep window)

MGD^3's pull (:func:`ddkit.methods.modes.guide`) acts on the first ``(1 − stop)`` of the chain; IGD's influence
step (:class:`ddkit.methods.igd.guide.InfluenceGuide`) on respaced steps ``low..high`` of ``reference_steps``.
Applying the pull first and the influence step to its result gives the sum above, so the order does not
change a sample. Image i of a class is pulled towards mode ``i mod k`` (MGD^3) and deviates from the
unguided samples j < i (IGD's memory), as each method alone.

Neither paper composes them: Chen et al. (ICLR 2025) put IGD on DiT and Minimax; Chan-Santiago et al. (ICML
2025) guide towards modes alone. The weights sampled are IGD's (``generate.igd.weights``); both sections,
``generate.igd`` and ``generate.modes``, are read and fingerprinted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ddkit.methods.base import GenerationMethod, Sampling
from ddkit.methods.igd.method import IGD
from ddkit.methods.mgd3 import MGD3


def composed(first, second):
    """The ``step_guide`` of :func:`ddkit.sampling.sample` that applies ``first`` and then ``second`` to its
    result: ``second`` sees the :class:`ddkit.sampling.GuideStep` with ``x_prev`` replaced by what ``first``
    returned (float [B, C, H, W])."""

    def step(s):
        return second(dataclasses.replace(s, x_prev=first(s)))

    return step


class IGDOnModes(GenerationMethod):
    """MGD^3's mode pull and IGD's influence step in one chain (module docstring)."""

    name = "igd+mgd3"
    label = "IGD on MGD^3 mode guidance (ours)"
    fixed_layout = True  # IGD's: one deviation memory of the planned IPC per class
    plan_work_hint = f"{IGD.plan_work_hint}, and {MGD3.plan_work_hint}"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.modes, self.igd = MGD3(cfg), IGD(cfg)

    @property
    def weights(self) -> str:
        return self.igd.weights

    def sampling(self, gcfg, num_train_timesteps: int) -> Sampling:
        self.modes.sampling(gcfg, num_train_timesteps)  # both refuse a sampler but DDPM
        return self.igd.sampling(gcfg, num_train_timesteps)

    def precompute(self, progress: bool) -> None:
        self.igd.precompute(progress)

    def prepare(self, sampler, job, *, progress, phases, clock) -> None:
        self.igd.prepare(sampler, job, progress=progress, phases=phases, clock=clock)
        self.prepared.update(self.igd.prepared)

    def plan_work(self, sampler, ipc: int, kept: int, *, gen_dir: Path) -> tuple[float, float]:
        a = self.modes.plan_work(sampler, ipc, kept, gen_dir=gen_dir)
        b = self.igd.plan_work(sampler, ipc, kept, gen_dir=gen_dir)
        return a[0] + b[0], a[1] + b[1]

    def on_plan(self, sampler, batches, ipc, kept, *, gen_dir, progress, phases, clock) -> None:
        for m in (self.modes, self.igd):
            m.on_plan(sampler, batches, ipc, kept, gen_dir=gen_dir, progress=progress, phases=phases, clock=clock)
            self.prepared.update(m.prepared)

    def guidance(self, sampler, items) -> dict[str, Any]:
        pull = self.modes.guidance(sampler, items)["step_guide"]
        return {"step_guide": composed(pull, self.igd.guidance(sampler, items)["step_guide"])}

    def calibration(self, sampler, batch_size: int) -> dict[str, Any]:
        pull = self.modes.calibration(sampler, batch_size)["step_guide"]
        return {"step_guide": composed(pull, self.igd.calibration(sampler, batch_size)["step_guide"])}

    def bundle_files(self, d, weights: Path) -> dict[str, tuple[Path, str]]:
        return {**self.modes.bundle_files(d, weights), **self.igd.bundle_files(d, weights)}

    def bundle_problem(self, cfg, values) -> str | None:
        return self.modes.bundle_problem(cfg, values) or self.igd.bundle_problem(cfg, values)
