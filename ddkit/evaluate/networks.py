"""Student networks used to judge a distilled set: ConvNet-D, ResNetAP-10 and ResNet-18.

* **ConvNet-D** (depth D = 3, 4 or 6; width 128): ``D × [Conv3×3 -> instance norm -> ReLU -> AvgPool2×2]``
  then one linear layer on the flattened features. Instance norm is ``GroupNorm(C, C)`` with affine
  parameters, exactly as the ECCV 2024 challenge scorer builds it
  (DataDistillation/ECCV2024-Dataset-Distillation-Challenge, ``utils/network.py``, ``net_norm='instancenorm'``).
* **ResNetAP-10**: IDC's ResNet with average-pool downsampling instead of strided convolutions, in its
  ImageNet-subset form (widths 64/128/256/512, one BasicBlock per stage, instance norm, He-normal conv init)
  (snu-mllab/Efficient-Dataset-Condensation, ``models/resnet_ap.py``); the Minimax paper evaluates with it.
* **ResNet-18** from timm; below 64 px the stem is the CIFAR-style 3×3/stride-1 conv without max-pool,
  like RDED's ``resnet18_modified`` (LINs-lab/RDED, ``synthesize/utils.py``). ``ResNet-18-IN`` swaps every
  BatchNorm for ``GroupNorm(C, C)`` instance norm.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddkit.errors import ConfigError

NETWORKS = ("ConvNet-3", "ConvNet-4", "ConvNet-6", "ResNetAP-10", "ResNet-18", "ResNet-18-IN")


def instance_norm(channels: int) -> nn.GroupNorm:
    """Instance norm as the field writes it: ``GroupNorm(C, C)`` with affine weight/bias (no running stats)."""
    return nn.GroupNorm(channels, channels, affine=True)


class ConvNet(nn.Module):
    """ConvNet-D (Gidaris & Komodakis 2018; the dataset-distillation default since DC, Zhao et al. 2021).

    Args:
        channels: input channels (1 for MNIST, 3 otherwise).
        num_classes: output logits.
        resolution: input height = width in pixels.
        depth: number of conv blocks (3 for 32 px, 4 for 64 px, 6 for 128+ px by convention).
        width: conv channels (128).

    Shapes: ``forward(x: float32 [B, channels, resolution, resolution]) -> float32 [B, num_classes]``.

    Source: DataDistillation/ECCV2024-Dataset-Distillation-Challenge ``utils/network.py`` (ConvNet with
    net_width=128, net_act='relu', net_norm='instancenorm', net_pooling='avgpooling'). The reference pads
    the first conv by 3 for 1-channel 28-px MNIST so the maps are 32 px; we do the same for 28 px inputs and
    use padding 1 otherwise (our MNIST shards are already 32 px, where padding 3 would break the classifier
    size the reference computes).
    """

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 3, width: int = 128):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        size = resolution
        for d in range(depth):
            pad = 3 if (channels == 1 and resolution == 28 and d == 0) else 1
            layers += [
                nn.Conv2d(c_in, width, kernel_size=3, padding=pad),
                instance_norm(width),
                nn.ReLU(inplace=True),
            ]
            size = size + 2 * pad - 2
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2))
            size //= 2
            c_in = width
        if size < 1:
            raise ConfigError(
                f"network: ConvNet-{depth} cannot take {resolution} px inputs (features vanish)"
            )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features ``float32 [B, width*h*w]``."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class _APBasicBlock(nn.Module):
    """IDC BasicBlock: conv-norm-ReLU, avg-pool when strided, conv-norm, (+ shortcut), ReLU."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, 1, 1, bias=False)
        self.bn1 = instance_norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = instance_norm(planes)
        self.stride = stride
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            # The "AP" in ResNetAP: downsample by average pooling after the first conv, not by stride.
            out = F.avg_pool2d(out, kernel_size=self.stride, stride=self.stride)
        out = self.bn2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + residual)


class ResNetAP(nn.Module):
    """ResNetAP-10 with instance norm (IDC, Kim et al., ICML 2022).

    ``forward(x: float32 [B, channels, R, R]) -> float32 [B, num_classes]``. The intro block depends on R
    as in the reference: R <= 64 'small' (3×3 conv, no pool), 64 < R <= 128 'mid' (3×3 conv + 2×2 avg-pool),
    else 'large' (7×7 conv + 4×4 avg-pool). Global average pooling before the classifier.

    Source: snu-mllab/Efficient-Dataset-Condensation ``models/resnet_ap.py`` (ImageNet branch, depth 10,
    width 1.0, norm_type='instance'), including its He-normal conv initialisation.
    """

    def __init__(self, channels: int, num_classes: int, resolution: int, depth: int = 10, width: int = 64):
        super().__init__()
        layers_per_stage = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2]}
        if depth not in layers_per_stage:
            raise ConfigError(f"network: ResNetAP-{depth} is not supported (10 or 18)")
        if resolution <= 64:
            k, pool = 3, 1
        elif resolution <= 128:
            k, pool = 3, 2
        else:
            k, pool = 7, 4
        intro: list[nn.Module] = [
            nn.Conv2d(channels, width, k, 1, k // 2, bias=False),
            instance_norm(width),
            nn.ReLU(inplace=True),
        ]
        if pool > 1:
            intro.append(nn.AvgPool2d(pool, pool))
        self.layer0 = nn.Sequential(*intro)
        self._c = width
        stages = []
        for i, n in enumerate(layers_per_stage[depth]):
            stages.append(self._make_stage(width * 2**i, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n_fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n_fan))
            elif isinstance(m, nn.GroupNorm):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._c != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._c, planes, 1, 1, 0, bias=False),
                nn.AvgPool2d(kernel_size=stride, stride=stride),
                instance_norm(planes),
            )
        out = [_APBasicBlock(self._c, planes, stride, downsample)]
        self._c = planes
        out += [_APBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))
        x = F.avg_pool2d(x, x.shape[-1]).flatten(1)
        return self.fc(x)


def _timm_resnet18(channels: int, num_classes: int, resolution: int, instance: bool) -> nn.Module:
    import timm

    kwargs = {}
    if instance:
        kwargs["norm_layer"] = lambda c, **_: instance_norm(c)
    model = timm.create_model(
        "resnet18", pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs
    )
    if resolution <= 64:
        # Small inputs: the 7×7/2 stem + max-pool would leave 1-2 px maps; use the CIFAR stem (RDED's
        # "resnet18_modified": conv1 3×3 stride 1, no max-pool).
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def build(name: str, channels: int, num_classes: int, resolution: int) -> nn.Module:
    """Build a freshly initialised student network (uses the global torch RNG: seed before calling).

    Args:
        name: ``ConvNet-D`` (any depth D >= 1; 3/4/6 are the conventional ones), ``ResNetAP-10``,
            ``ResNet-18`` (timm, batch norm) or ``ResNet-18-IN`` (timm, instance norm).
        channels: image channels (1 or 3).
        num_classes: logits.
        resolution: input side in pixels.

    Returns:
        ``nn.Module`` mapping float32 ``[B, channels, resolution, resolution]`` to float32 ``[B, num_classes]``.

    Raises:
        ConfigError: unknown name, or a depth the resolution cannot support.
    """
    m = re.fullmatch(r"ConvNet-(\d+)", name)
    if m:
        return ConvNet(channels, num_classes, resolution, depth=int(m.group(1)))
    m = re.fullmatch(r"ResNetAP-(\d+)", name)
    if m:
        return ResNetAP(channels, num_classes, resolution, depth=int(m.group(1)))
    if name in ("ResNet-18", "ResNet-18-IN"):
        return _timm_resnet18(channels, num_classes, resolution, instance=name.endswith("-IN"))
    raise ConfigError(f"evaluate.network: unknown network {name!r} (known: {', '.join(NETWORKS)})")
