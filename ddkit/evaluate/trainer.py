"""Train one student on one training set under one protocol, then test it on the real test split.

Images travel as float32 ``[N, C, H, W]`` in [0, 1] units plus the dataset's per-channel mean/std; each
protocol normalises where its source does (the challenge scorer before DSA, IDC/RDED after their
transforms). All randomness is the global torch RNG, seeded by ``seed`` at the start of a run, so a run is
reproducible and every training set sees the same seed for repeat r ("same seeds" across sets).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddkit import hardware as hw
from ddkit.evaluate import augment
from ddkit.evaluate.networks import build
from ddkit.evaluate.protocols import ECCV2024Protocol, IDCProtocol, Protocol, RDEDProtocol
from ddkit.hardware import autocast


@dataclass
class RunResult:
    """Outcome of one training run. Accuracies in percent on the real test split."""

    final: float  # accuracy after the last epoch (the scorer's number)
    best: float  # best over the protocol's test points (IDC/RDED report this)
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, accuracy) test points
    seconds: float = 0.0  # wall time of training + testing
    train_images: int = 0  # images forwarded+backpropagated (throughput = train_images / seconds)
    epochs: int = 0  # epochs actually run

    def to_dict(self) -> dict:
        return {
            "final": self.final,
            "best": self.best,
            "history": [list(h) for h in self.history],
            "seconds": self.seconds,
            "train_images": self.train_images,
            "epochs": self.epochs,
        }


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and Python's ``random`` for one run."""

    random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device, precision: str):
    return autocast(device.type, precision)


def _stepper(device: torch.device, precision: str) -> Callable[[torch.optim.Optimizer, torch.Tensor], None]:
    """``step(opt, loss)``: zero grads, backward, optimizer step; fp16 with loss scaling (torch.amp.GradScaler,
    Micikevicius et al. 2018), which is a plain backward/step for fp32 and bf16."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def student_precision(requested: str, network: str, shape: tuple[int, int, int], num_classes: int,
                      batch_size: int, device: torch.device | str, previous: dict | None = None):
    """``evaluate.precision`` resolved for this student (:func:`ddkit.hardware.choose_precision`; auto times a
    training step of a fresh ``network`` on a random batch ``[min(batch_size, 256), *shape]``, shape
    ``(C, H, W)``; ``previous``: a recorded choice to keep).

    Returns:
        A :class:`ddkit.hardware.PrecisionChoice`.
    """

    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build(network, shape[0], num_classes, shape[-1]).to(device).train()
        x = torch.randn(min(batch_size, 256), *shape, device=device)
    step = hw.model_step(net, (x,), backward=True)
    return hw.choose_precision(requested, device, role="evaluate", step=step, previous=previous)


def _batches(n: int, batch_size: int):
    perm = torch.randperm(n)
    for i in range(0, n, batch_size):
        yield perm[i : i + batch_size]


def as01(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 [0, 1]; float tensors are taken as [0, 1] units already."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def test_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Top-1 accuracy in percent of ``model`` on ``x`` ``[N,C,H,W]``, ``y`` int64 ``[N]``.

    ``transform`` (e.g. uint8 -> normalised float) is applied per batch so a large test split stays compact.
    """
    was_training = model.training
    model.eval()
    correct = 0
    dev = next(model.parameters()).device
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(dev)
        xb = transform(xb) if transform is not None else xb
        with _autocast(dev, precision):
            out = model(xb)
        correct += int((out.argmax(1) == y[i : i + batch_size].to(dev)).sum().item())
    model.train(was_training)
    return 100.0 * correct / max(1, x.shape[0])


def _normaliser(mean, std, channels: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    m = torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, channels, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32, device=device).view(1, channels, 1, 1)
    return lambda x: (x - m) / s


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on conv/linear weights (RDED ``validation/utils.py`` ``get_parameters``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if ("weight" in name and p.ndim > 1) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_student(
    protocol: Protocol,
    network: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    *,
    mean,
    std,
    num_classes: int,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    teacher: nn.Module | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> RunResult:
    """Train a fresh ``network`` on ``(train_x, train_y)`` with ``protocol`` and test it.

    Args:
        protocol: a preset from :mod:`ddkit.evaluate.protocols` (``epochs``/batch come from the args).
        network: name for :func:`ddkit.evaluate.networks.build`.
        train_x: ``[N, C, H, W]``, uint8 0..255 or float32 in [0, 1] units (un-normalised; converted per
            batch, so a large real split stays uint8 in memory); train_y: int64 ``[N]``.
        test_x: ``[M, C, H, W]``, uint8 or float32 in [0, 1] units; test_y: int64 ``[M]``.
        mean, std: per-channel normalisation (length C).
        num_classes: logits of the student.
        epochs: the protocol's epoch count (the eccv2024 scorer runs ``epochs + 1``).
        batch_size: training batch.
        seed: seeds network init, shuffling and augmentation.
        device: where to train.
        precision: ``"fp32"`` (the references), ``"bf16"`` or ``"fp16"`` (with loss scaling) autocast, as
            resolved by :func:`ddkit.hardware.resolve_precision` (not ``"auto"``).
        teacher: the real-data teacher; required by the soft-label ``rded`` protocol.
        on_epoch: called with the number of finished epochs after each epoch (progress bars).

    Returns:
        :class:`RunResult` (accuracies in percent).

    Raises:
        ValueError: ``rded`` without a teacher.
    """
    device = torch.device(device)
    seed_everything(seed)
    t0 = time.perf_counter()
    c, res = train_x.shape[1], train_x.shape[-1]
    norm = _normaliser(mean, std, c, device)
    train_x = train_x.to(device)
    train_y = train_y.to(device)
    test_y = test_y.to(device)
    model = build(network, c, num_classes, res).to(device)
    model.train()

    def test() -> float:
        return test_accuracy(
            model,
            test_x,
            test_y,
            batch_size=protocol.test_batch_size,
            precision=precision,
            transform=lambda t: norm(as01(t)),
        )

    run = _Student(model, train_x, train_y, test, norm, _stepper(device, precision), device, precision,
                   batch_size, res, t0, on_epoch)  # fmt: skip
    if isinstance(protocol, ECCV2024Protocol):
        return _fit_eccv2024(protocol, run, epochs)
    if isinstance(protocol, IDCProtocol):
        return _fit_idc(protocol, run, epochs)
    if isinstance(protocol, RDEDProtocol):
        return _fit_rded(protocol, run, epochs, teacher)
    raise TypeError(f"unknown protocol object {type(protocol).__name__}")


@dataclass
class _Student:
    """One student run in progress: the model, its training data on ``device`` and the per-run machinery
    the protocols' loops share (the epoch pass, the optimizer step, the test, the progress callback)."""

    model: nn.Module
    train_x: torch.Tensor  # [N, C, H, W] uint8 or float32 in [0, 1] units, on device
    train_y: torch.Tensor  # int64 [N], on device
    test: Callable[[], float]  # accuracy in percent on the real test split
    norm: Callable[[torch.Tensor], torch.Tensor]  # [0, 1] units -> normalised
    step: Callable[[torch.optim.Optimizer, torch.Tensor], None]  # see _stepper
    device: torch.device
    precision: str
    batch_size: int
    res: int  # image side in pixels
    t0: float  # time.perf_counter() at the run's start
    on_epoch: Callable[[int], None] | None = None
    seen: int = 0  # images forwarded + backpropagated

    def epoch(self, opt: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One pass over the training set in a fresh random order (the global torch RNG): per batch of
        indices ``idx`` (int64, on device), ``batch_loss(idx)`` and one optimizer step."""
        for idx in _batches(self.train_x.shape[0], self.batch_size):
            loss = batch_loss(idx.to(self.device))
            self.step(opt, loss)
            self.seen += len(idx)

    def finished(self, epochs_done: int) -> None:
        if self.on_epoch:
            self.on_epoch(epochs_done)

    def result(self, final: float, best: float, history: list[tuple[int, float]], epochs: int) -> RunResult:
        return RunResult(final, best, history, time.perf_counter() - self.t0, self.seen, epochs)


def _fit_eccv2024(protocol: ECCV2024Protocol, run: _Student, epochs: int) -> RunResult:
    """The challenge scorer's loop: DSA on normalised images, SGD rebuilt at the decay epoch, one test at
    the end (``epochs + 1`` epochs with ``extra_epoch``)."""
    # The scorer receives normalised data and augments it there (evaluate.py + DiffAugment).
    lr = protocol.lr

    def sgd(lr_: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            run.model.parameters(), lr=lr_, momentum=protocol.momentum, weight_decay=protocol.weight_decay
        )

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = augment.dsa(run.norm(as01(run.train_x[idx])), protocol.dsa_strategy, protocol.dsa)
        with _autocast(run.device, run.precision):
            return F.cross_entropy(run.model(xb), run.train_y[idx])

    opt = sgd(lr)
    total = epochs + 1 if protocol.extra_epoch else epochs
    decay_at = protocol.decay_epoch(epochs)
    for ep in range(total):
        run.epoch(opt, batch_loss)
        if ep == decay_at:
            lr *= protocol.lr_decay
            opt = sgd(lr)  # the scorer builds a new optimizer: momentum buffers are dropped
        run.finished(ep + 1)
    acc = run.test()
    return run.result(acc, acc, [(total, acc)], total)


def _fit_idc(protocol: IDCProtocol, run: _Student, epochs: int) -> RunResult:
    """IDC's loop: its train transform, CutMix with probability ``mix_p``, SGD with multi-step decay."""
    opt = torch.optim.SGD(
        run.model.parameters(), lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=protocol.milestone_epochs(epochs), gamma=protocol.gamma
    )

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = augment.idc_train_transform(
            as01(run.train_x[idx]), run.res, protocol.rrc_scale, protocol.jitter, protocol.lighting
        )
        xb, yb = run.norm(xb), run.train_y[idx]
        with _autocast(run.device, run.precision):
            if float(torch.rand(1).item()) < protocol.mix_p:
                mixed, perm, ratio = augment.cutmix(xb, protocol.cutmix_beta)
                out = run.model(mixed)
                return F.cross_entropy(out, yb) * ratio + F.cross_entropy(out, yb[perm]) * (1.0 - ratio)
            return F.cross_entropy(run.model(xb), yb)

    every = protocol.eval_every(epochs)
    return _fit_scheduled(run, opt, sched, batch_loss, epochs, lambda e: e % every == 0 or e == epochs)


def _fit_rded(protocol: RDEDProtocol, run: _Student, epochs: int, teacher: nn.Module | None) -> RunResult:
    """RDED's loop: RRC + flip, CutMix, KL to the teacher's temperature-softened labels, AdamW + cosine."""
    if teacher is None:
        raise ValueError("the rded protocol needs a teacher trained on the real training set")
    teacher = teacher.to(run.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        _param_groups(run.model, protocol.weight_decay), lr=protocol.lr, betas=protocol.betas
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: protocol.lr_factor(e, epochs))
    t = protocol.temperature
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in run.model.modules())

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = augment.random_flip(
            augment.random_resized_crop(as01(run.train_x[idx]), run.res, protocol.rrc_scale)
        )
        xb = run.norm(xb)
        if has_bn:
            # The references run the student on the un-mixed batch under no_grad (for a train-accuracy
            # meter); in train mode that still moves BatchNorm running statistics, so we keep it.
            with torch.no_grad(), _autocast(run.device, run.precision):
                run.model(xb)
        mixed, _, _ = augment.cutmix(xb, protocol.cutmix_beta)
        with torch.no_grad(), _autocast(run.device, run.precision):
            soft = F.softmax(teacher(mixed).float() / t, dim=1)
        with _autocast(run.device, run.precision):
            logp = F.log_softmax(run.model(mixed).float() / t, dim=1)
        return F.kl_div(logp, soft, reduction="batchmean")

    return _fit_scheduled(run, opt, sched, batch_loss, epochs, lambda e: e > epochs - protocol.eval_last)


def _fit_scheduled(run: _Student, opt: torch.optim.Optimizer, sched, batch_loss, epochs: int,
                   test_at: Callable[[int], bool]) -> RunResult:  # fmt: skip
    """Epochs ``1..epochs``: a pass, a test after each epoch ``e`` where ``test_at(e)``, then the scheduler's
    epoch step (IDC, RDED). ``best`` is the maximum over the tests, ``final`` the last test's accuracy."""
    history: list[tuple[int, float]] = []
    best = 0.0
    acc = 0.0
    for epoch in range(1, epochs + 1):
        run.epoch(opt, batch_loss)
        if test_at(epoch):
            acc = run.test()
            history.append((epoch, acc))
            best = max(best, acc)
        sched.step()
        run.finished(epoch)
    return run.result(acc, best, history, epochs)


def train_teacher(
    protocol: RDEDProtocol,
    network: str,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    *,
    mean,
    std,
    num_classes: int,
    epochs: int,
    seed: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    on_epoch: Callable[[int], None] | None = None,
) -> nn.Module:
    """Train the soft-label teacher on the full real train set (our recipe; see :class:`RDEDProtocol`).

    ``real_x``: ``[N, C, H, W]`` uint8 or float32 in [0, 1] units; ``real_y``: int64 ``[N]``. SGD(lr
    ``protocol.teacher_lr``, momentum 0.9, weight decay 5e-4), cosine annealing to 0 over ``epochs`` epochs,
    batch ``protocol.teacher_batch_size``, the student's train transform (RRC + flip), cross-entropy.

    Returns:
        The teacher in eval mode on ``device``.
    """
    device = torch.device(device)
    seed_everything(seed)
    c, res = real_x.shape[1], real_x.shape[-1]
    norm = _normaliser(mean, std, c, device)
    real_x, real_y = real_x.to(device), real_y.to(device)
    model = build(network, c, num_classes, res).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=protocol.teacher_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    step = _stepper(device, precision)
    for ep in range(epochs):
        for idx in _batches(real_x.shape[0], protocol.teacher_batch_size):
            idx = idx.to(device)
            xb = augment.random_flip(augment.random_resized_crop(as01(real_x[idx]), res, protocol.rrc_scale))
            with _autocast(device, precision):
                loss = F.cross_entropy(model(norm(xb)), real_y[idx])
            step(opt, loss)
        sched.step()
        if on_epoch:
            on_epoch(ep + 1)
    return model.eval()
