"""K students trained as one batched model: the same experiment as K calls of ``train_student``, in one loop.

The K students' parameters are stacked (``torch.func.stack_module_state``) and one network is run over them
with ``torch.func.vmap(functional_call)``; one ``torch.optim`` optimizer over the stacked tensors is K
independent optimizers, because SGD's update is elementwise. Each student keeps everything that makes it
its own run:

* its seed, initialisation, data order and augmentation draws: every student owns a copy of the global torch
  (and Python) RNG state, seeded and used exactly as ``train_student`` does, and swapped in around each of
  its draws, so student k draws the same numbers in the same order as the sequential run with its seed;
* its data: each student indexes its own training set (a group shares the set size and batch size, so the
  students step together; sets of other sizes train in their own group);
* its learning-rate schedule: a group shares the epoch count, hence the protocol's schedule.

At K = 1 the network runs without ``vmap`` on the one student's parameters, so the run is bit-identical to
``train_student`` on the CPU (``tests/test_evaluate_batched.py``). For K > 1 the floating-point order of a
batched convolution differs from K separate ones; the accuracies come from the same distribution (same test).

Supported: the ``eccv2024`` and ``idc`` loops with per-sample normalisation only (ConvNet-D, ResNetAP, whose
instance norm never mixes images, so neither students nor padding interact) in fp32 or bf16 (fp16's loss
scaler skips steps for the whole batch, which would couple the students). See :func:`supports`.
"""

from __future__ import annotations

import contextlib
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ddkit.evaluate import augment
from ddkit.evaluate.networks import build
from ddkit.evaluate.protocols import ECCV2024Protocol, IDCProtocol, Protocol
from ddkit.evaluate.trainer import RunResult, _autocast, _normaliser, _stepper, as01, seed_everything

# Images one batched step may hold (K x batch); more students are split into several groups. ConvNet-3 keeps
# ~2.5 MB of activations per 32 px image for the backward pass, so 2,048 images stay near 5 GB.
MAX_IMAGES_PER_STEP = 2048

_PER_SAMPLE_NETWORKS = re.compile(r"ConvNet-\d+|ResNetAP-\d+")


def supports(protocol: Protocol, network: str, precision: str) -> bool:
    """Whether :func:`train_students` can train this protocol/network/precision batched (see the module)."""
    return (
        isinstance(protocol, (ECCV2024Protocol, IDCProtocol))
        and bool(_PER_SAMPLE_NETWORKS.fullmatch(network))
        and precision != "fp16"
    )


def group_size(batch_size: int, n_images: int) -> int:
    """Students per batched group for a set of ``n_images`` trained at ``batch_size`` (>= 1)."""
    return max(1, MAX_IMAGES_PER_STEP // max(1, min(batch_size, n_images)))


@dataclass
class Student:
    """One run to train: its data (``x`` ``[N, C, H, W]`` uint8 or float32 in [0, 1] units, ``y`` int64 ``[N]``)
    and its seed."""

    x: torch.Tensor
    y: torch.Tensor
    seed: int


class _RNG:
    """One student's global-RNG state (torch CPU generator and Python ``random``), swapped in by ``use``."""

    def __init__(self) -> None:
        self.torch, self.py = torch.get_rng_state(), random.getstate()

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        torch.set_rng_state(self.torch)
        random.setstate(self.py)
        try:
            yield
        finally:
            self.torch, self.py = torch.get_rng_state(), random.getstate()


class _Group:
    """K students in progress: stacked parameters, their RNGs, their data on ``device``."""

    def __init__(self, network: str, students: list[Student], num_classes: int, device: torch.device,
                 batch_size: int, precision: str) -> None:  # fmt: skip
        self.rngs: list[_RNG] = []
        models = []
        for s in students:
            seed_everything(s.seed)  # as train_student: seed, then build (the init draws come first)
            models.append(build(network, s.x.shape[1], num_classes, s.x.shape[-1]).to(device))
            self.rngs.append(_RNG())
        self.base = models[0].train()
        self.params, self.buffers = stack_module_state(models)
        self.xs = [s.x.to(device) for s in students]
        self.ys = [s.y.to(device) for s in students]
        self.k, self.n = len(students), int(students[0].x.shape[0])
        self.device, self.batch_size, self.precision = device, batch_size, precision
        self.res = int(students[0].x.shape[-1])
        self.step = _stepper(device, precision)
        self.seen = 0

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Logits ``[K, B, classes]`` of input ``[K, B, C, H, W]`` (or ``[B, C, H, W]`` for all when ``shared``)."""
        if self.k == 1:  # the one student's own network, as train_student runs it (bit-identical)
            p = {n: t[0] for n, t in self.params.items()}
            b = {n: t[0] for n, t in self.buffers.items()}
            return functional_call(self.base, (p, b), (x if shared else x[0],)).unsqueeze(0)

        def one(p, b, xb):
            return functional_call(self.base, (p, b), (xb,))

        return vmap(one, in_dims=(0, 0, None if shared else 0), randomness="different")(
            self.params, self.buffers, x
        )

    def optimizer(self, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
        """SGD over the stacked parameters: per element the update of each student's own SGD."""
        return torch.optim.SGD(self.params.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)

    def epoch(self, opt: torch.optim.Optimizer, draw: Callable) -> None:
        """One pass over every student's set in its own fresh order. ``draw(k, idx)`` runs under student k's
        RNG and returns ``(input [B, C, H, W], loss_of(logits [B, classes]) -> scalar)``."""
        perms = []
        for rng in self.rngs:
            with rng.use():
                perms.append(torch.randperm(self.n))
        for i in range(0, self.n, self.batch_size):
            inputs, losses = [], []
            for k, rng in enumerate(self.rngs):
                with rng.use():
                    xb, loss_of = draw(k, perms[k][i : i + self.batch_size].to(self.device))
                inputs.append(xb)
                losses.append(loss_of)
            with _autocast(self.device, self.precision):
                # unsqueeze keeps a lone batch's strides: a 1-channel batch's layout picks oneDNN's kernel
                out = self.forward(inputs[0].unsqueeze(0) if self.k == 1 else torch.stack(inputs))
                total = losses[0](out[0])
                for k in range(1, self.k):
                    total = total + losses[k](out[k])  # d total / d loss_k = 1: each student's own gradient
            self.step(opt, total)
            self.seen += inputs[0].shape[0]

    @torch.no_grad()
    def test(self, test_x: torch.Tensor, test_y: torch.Tensor, norm, batch_size: int) -> list[float]:
        """Each student's top-1 accuracy in percent on ``(test_x, test_y)`` (as ``trainer.test_accuracy``)."""
        self.base.eval()
        bs = batch_size if self.k == 1 else max(16, batch_size // self.k)  # K x batch images at once
        correct = torch.zeros(self.k, dtype=torch.long)
        for i in range(0, test_x.shape[0], bs):
            xb = norm(as01(test_x[i : i + bs].to(self.device)))
            with _autocast(self.device, self.precision):
                out = self.forward(xb, shared=True)
            correct += (out.argmax(-1) == test_y[i : i + bs].to(self.device)).sum(1).cpu()
        self.base.train()
        return [100.0 * int(c) / max(1, test_x.shape[0]) for c in correct]


def train_students(
    protocol: Protocol,
    network: str,
    students: list[Student],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    mean,
    std,
    num_classes: int,
    epochs: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    on_epoch: Callable[[int], None] | None = None,
) -> list[RunResult]:
    """Train the K ``students`` as one batched model; the same runs as ``train_student`` on each.

    Args:
        protocol: ``eccv2024`` or ``idc`` (see :func:`supports`).
        network: ``ConvNet-D`` or ``ResNetAP-D``.
        students: K >= 1 runs with sets of one size ``[N, C, H, W]`` (uint8 or float32 in [0, 1] units).
        test_x, test_y: the real test split, ``[M, C, H, W]`` uint8 or float32, int64 ``[M]``.
        mean, std, num_classes, epochs, batch_size, device, precision: as :func:`trainer.train_student`.
        on_epoch: called with the number of student-epochs just finished (K per epoch of the group).

    Returns:
        One :class:`RunResult` per student, in order; ``seconds`` is the group's wall time divided by K.

    Raises:
        ValueError: an unsupported protocol/network/precision, or students whose sets differ in size.
    """
    device = torch.device(device)
    if not supports(protocol, network, precision):
        raise ValueError(f"batched students: {protocol.name} / {network} / {precision} is not supported")
    if len({int(s.x.shape[0]) for s in students}) != 1:
        raise ValueError("batched students: every set of one group must have the same size")
    t0 = time.perf_counter()
    c = int(students[0].x.shape[1])
    norm = _normaliser(mean, std, c, device)
    with torch.random.fork_rng(devices=[]):
        g = _Group(network, students, num_classes, device, batch_size, precision)
        tick = (lambda: on_epoch(g.k)) if on_epoch else (lambda: None)
        if isinstance(protocol, ECCV2024Protocol):
            accs, history, best, total = _fit_eccv2024(protocol, g, epochs, tick, test_x, test_y, norm)
        else:
            accs, history, best, total = _fit_idc(protocol, g, epochs, tick, test_x, test_y, norm)
    secs = (time.perf_counter() - t0) / g.k
    return [RunResult(accs[k], best[k], history[k], secs, g.seen, total) for k in range(g.k)]


def _fit_eccv2024(protocol: ECCV2024Protocol, g: _Group, epochs: int, tick, test_x, test_y, norm):
    """``trainer._fit_eccv2024`` for a group: DSA on normalised images, fresh SGD at the decay epoch."""
    lr = protocol.lr

    def draw(k: int, idx: torch.Tensor):
        xb = augment.dsa(norm(as01(g.xs[k][idx])), protocol.dsa_strategy, protocol.dsa)
        y = g.ys[k][idx]
        return xb, lambda out: F.cross_entropy(out, y)

    def sgd(lr_: float) -> torch.optim.Optimizer:
        return g.optimizer(lr_, protocol.momentum, protocol.weight_decay)

    opt = sgd(lr)
    total = epochs + 1 if protocol.extra_epoch else epochs
    decay_at = protocol.decay_epoch(epochs)
    for ep in range(total):
        g.epoch(opt, draw)
        if ep == decay_at:
            lr *= protocol.lr_decay
            opt = sgd(lr)  # the scorer builds a new optimizer: momentum buffers are dropped
        tick()
    accs = g.test(test_x, test_y, norm, protocol.test_batch_size)
    return accs, [[(total, a)] for a in accs], accs, total


def _fit_idc(protocol: IDCProtocol, g: _Group, epochs: int, tick, test_x, test_y, norm):
    """``trainer._fit_idc`` for a group: IDC's transform, CutMix with probability ``mix_p``, MultiStepLR."""
    opt = g.optimizer(protocol.lr, protocol.momentum, protocol.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=protocol.milestone_epochs(epochs), gamma=protocol.gamma
    )

    def draw(k: int, idx: torch.Tensor):
        xb = augment.idc_train_transform(
            as01(g.xs[k][idx]), g.res, protocol.rrc_scale, protocol.jitter, protocol.lighting
        )
        xb, yb = norm(xb), g.ys[k][idx]
        if float(torch.rand(1).item()) < protocol.mix_p:
            mixed, perm, ratio = augment.cutmix(xb, protocol.cutmix_beta)
            return (
                mixed,
                lambda out: F.cross_entropy(out, yb) * ratio + F.cross_entropy(out, yb[perm]) * (1.0 - ratio),
            )
        return xb, lambda out: F.cross_entropy(out, yb)

    every = protocol.eval_every(epochs)
    history: list[list[tuple[int, float]]] = [[] for _ in range(g.k)]
    best, accs = [0.0] * g.k, [0.0] * g.k
    for epoch in range(1, epochs + 1):
        g.epoch(opt, draw)
        if epoch % every == 0 or epoch == epochs:
            accs = g.test(test_x, test_y, norm, protocol.test_batch_size)
            for k, a in enumerate(accs):
                history[k].append((epoch, a))
                best[k] = max(best[k], a)
        sched.step()
        tick()
    return accs, history, best, epochs
