"""Named evaluation protocols: how the field trains a student on a distilled set and scores it.

Each preset is a frozen dataclass whose defaults are the source's values; ``ddkit evaluate --protocol NAME``
picks one, ``--epochs`` shortens it, nothing else changes it.

* ``eccv2024`` — the ECCV 2024 Dataset Distillation Challenge scorer
  (DataDistillation/ECCV2024-Dataset-Distillation-Challenge, ``evaluate.py``).
* ``idc`` — IDC's ImageNet-subset hard-label protocol, used by Minimax Diffusion (Gu et al., CVPR 2024)
  (snu-mllab/Efficient-Dataset-Condensation, ``train.py``, ``data.py``, ``argument.py``).
* ``rded`` — the soft-label (teacher KD) protocol of RDED (Sun et al., CVPR 2024) as used for ImageNet-1K and
  by D^3HR (LINs-lab/RDED ``validation/main.py``; lin-zhao-resoLve/D3HR ``validation/validate.py``,
  ``validation/argument.py``, ``validation/utils/data_utils.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from ddkit.errors import ConfigError
from ddkit.evaluate.augment import DSA_STRATEGY, DSAParams


@dataclass(frozen=True)
class ECCV2024Protocol:
    """The challenge scorer.

    ConvNet-3 (instance norm); SGD(lr 0.01, momentum 0.9, weight decay 5e-4); batch 256 (shuffled, last
    partial batch kept); ``for ep in range(epochs + 1)`` — the scorer runs one epoch more than it names —
    and after epoch ``epochs // 2 + 1`` the lr is multiplied by 0.1 and a FRESH SGD optimizer (momentum
    reset) is built; DSA ``color_crop_cutout_flip_scale_rotate`` with one random op per batch; hard labels;
    the data arrives normalised and DSA acts on normalised tensors; tested once at the end; 3 runs averaged.
    """

    name: Literal["eccv2024"] = "eccv2024"
    network: str = "ConvNet-3"
    optimizer: Literal["sgd"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    epochs: int = 1000  # the generative track of the challenge used 100
    extra_epoch: bool = True  # range(Epoch + 1)
    lr_decay: float = 0.1
    fresh_optimizer_at_decay: bool = True
    dsa_strategy: str = DSA_STRATEGY
    dsa: DSAParams = field(default_factory=DSAParams)
    labels: Literal["hard"] = "hard"
    normalised_input: bool = True
    repeats: int = 3
    test_batch_size: int = 256

    def epochs_for(self, ipc: int) -> int:
        """Epochs for a set of ``ipc`` images per class (the scorer's are fixed)."""
        return self.epochs

    def batch_size_for(self, ipc: int, num_classes: int) -> int:
        return self.batch_size

    def decay_epoch(self, epochs: int) -> int:
        """0-based epoch after which the lr drops: the scorer's ``lr_schedule = [Epoch // 2 + 1]``."""
        return epochs // 2 + 1


@dataclass(frozen=True)
class IDCProtocol:
    """IDC / Minimax hard-label protocol (ImageNet subsets).

    ResNetAP-10 (instance norm); train transform RandomResizedCrop(scale 0.5–1) -> flip -> ColorJitter(0.4)
    -> Lighting(0.1) -> Normalize; CutMix with β = 1 on every batch (``mix_p = 1`` for ImageNet);
    SGD(lr 0.01, momentum 0.9, weight decay 5e-4), batch 64; MultiStepLR at ``2E//3`` and ``5E//6``, γ = 0.2;
    epochs by IPC (<= 10: 2000, <= 50: 1500, else 1000); tested every ``E // 100`` epochs; best and last
    accuracy reported (``mean`` is the best, as IDC's log line "Best, last acc").
    """

    name: Literal["idc"] = "idc"
    network: str = "ResNetAP-10"
    optimizer: Literal["sgd"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    milestones: tuple[float, float] = (2 / 3, 5 / 6)
    gamma: float = 0.2
    epochs_by_ipc: tuple[tuple[int, int], ...] = ((10, 2000), (50, 1500))
    epochs_default: int = 1000
    rrc_scale: tuple[float, float] = (0.5, 1.0)
    jitter: float = 0.4
    lighting: float = 0.1
    cutmix_beta: float = 1.0
    mix_p: float = 1.0
    num_evals: int = 100  # test every max(1, E // 100) epochs
    labels: Literal["hard"] = "hard"
    normalised_input: bool = False
    repeats: int = 3
    test_batch_size: int = 256

    def epochs_for(self, ipc: int) -> int:
        for bound, e in self.epochs_by_ipc:
            if ipc <= bound:
                return e
        return self.epochs_default

    def batch_size_for(self, ipc: int, num_classes: int) -> int:
        return self.batch_size

    def milestone_epochs(self, epochs: int) -> list[int]:
        """MultiStepLR milestones in epochs: ``[2 * E // 3, 5 * E // 6]`` (IDC ``train.py``)."""
        return [2 * epochs // 3, 5 * epochs // 6]

    def eval_every(self, epochs: int) -> int:
        return max(1, epochs // self.num_evals)


@dataclass(frozen=True)
class RDEDProtocol:
    """Soft-label protocol (RDED; D^3HR's evaluation).

    A teacher trained on the real training set labels every CutMix'ed batch; the student minimises
    ``KL(softmax(t/T) || softmax(s/T))`` (``nn.KLDivLoss(reduction='batchmean')`` on log-softmax, no T²
    factor) at T = 20; train transform RandomResizedCrop(scale 0.08–1) -> flip (D^3HR's
    ``transform_imagenet``); AdamW(lr 1e-3, betas (0.9, 0.999), weight decay 0.01 on conv/linear weights
    only — RDED's ``get_parameters``); per-epoch LambdaLR ``0.5 (1 + cos(π e / (2E)))``, i.e. cosine from
    1× down to 0.5×; 300 epochs; batch by IPC (>= 50: 100, >= 10: 50, else 15; × 2 for 100 classes;
    capped at the set size); tested in the last 9 epochs (D^3HR: ``epoch > 290`` of 300); best reported.

    The teacher recipe is ours (the references ship pretrained teachers): the student network, trained on
    the full real train set with SGD(0.01, momentum 0.9, wd 5e-4), cosine to 0, batch 256, RRC + flip,
    ``teacher_epochs`` epochs.
    """

    name: Literal["rded"] = "rded"
    network: str = "ResNet-18"
    optimizer: Literal["adamw"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    epochs: int = 300
    temperature: float = 20.0
    cutmix_beta: float = 1.0
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    cosine_floor: float = 0.5  # the lr ends at 0.5x (cos of pi/2 * e/E)
    eval_last: int = 9
    labels: Literal["soft"] = "soft"
    normalised_input: bool = False
    repeats: int = 3
    test_batch_size: int = 256
    teacher_network: str | None = None  # None: the student network
    teacher_epochs: int = 30
    teacher_lr: float = 0.01
    teacher_batch_size: int = 256

    def epochs_for(self, ipc: int) -> int:
        return self.epochs

    def batch_size_for(self, ipc: int, num_classes: int) -> int:
        """D^3HR ``validation/argument.py``: by IPC, doubled for 100 classes, capped at ``ipc * num_classes``."""
        if ipc >= 50:
            bs = 100
        elif ipc >= 10:
            bs = 50
        else:
            bs = 15
        if num_classes == 100:
            bs *= 2
        return max(1, min(bs, ipc * num_classes))

    def lr_factor(self, epoch: int, epochs: int) -> float:
        """LambdaLR factor at 0-based ``epoch``: ``0.5 (1 + cos(π epoch / (2 E)))`` (RDED ``--cos``)."""

        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs / 2)) if epoch <= epochs else 0.0


Protocol = Union[ECCV2024Protocol, IDCProtocol, RDEDProtocol]

PROTOCOLS: dict[str, Protocol] = {
    "eccv2024": ECCV2024Protocol(),
    "idc": IDCProtocol(),
    "rded": RDEDProtocol(),
}


def get_protocol(name: str) -> Protocol:
    """The preset called ``name``.

    Raises:
        ConfigError: unknown name (the message lists the known ones).
    """
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(
            f"evaluate.protocol: unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})"
        ) from None
