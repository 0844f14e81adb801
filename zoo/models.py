"""Image classifiers. Every model exposes ``features(x)`` (the head's input) and ``head``
(the final ``nn.Linear``), because FST, LP, FE-tuning and NGF work on the head.

- ``cnn``: a small VGG-style network, the CPU default (about 0.14 M parameters at width 32):
  conv-conv-pool, conv-conv-pool, conv, global average pool. Images larger than 16 x 16 (MNIST,
  CIFAR-10, GTSRB) are pooled once more right after the first convolution, so the network runs
  at most at 16 x 16 past its first layer: 3.6x fewer multiply-adds at 32 x 32, which keeps it the
  fast CPU model there too. The first convolution still sees every pixel (a 3 x 3 patch trigger).
  Where a max-pool follows a block, its ReLU runs after the pool: the same function and
  gradients (ReLU is monotonic) on a quarter of the elements.
- ``preact-resnet18``: PreAct-ResNet18 as in BackdoorBench's ``models/preact_resnet.py``
  (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016): 3x3 stride-1 stem
  with 64 channels, no max-pool, 2-2-2-2 pre-activation blocks of 64/128/256/512 channels,
  1x1 projection shortcuts, adaptive average pool, ``Linear(512, K)``; no final BN/ReLU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from zoo.data import DatasetInfo

__all__ = ["ARCHS", "Classifier", "build_model"]


class Classifier(nn.Module):
    """Base: ``forward(x) = head(features(x))``; ``last_block`` is the backbone's last block
    (the block right before the head's pooling), for defenses that tune it with the head."""

    head: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def last_block(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} names no last block")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _conv_bn(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def _pool_relu() -> nn.Sequential:
    """Max-pool, then ReLU: the values and gradients of ReLU then max-pool (ReLU is monotonic,
    so it commutes with a max), on a quarter of the elements."""
    return nn.Sequential(nn.MaxPool2d(2), nn.ReLU(inplace=True))


class SmallCNN(Classifier):
    # Largest resolution the layers after the first convolution run at.
    MAX_INNER_SIZE = 16

    def __init__(self, channels: int, num_classes: int, width: int = 32, size: int = 16) -> None:
        super().__init__()
        w = width
        # conv-BN-ReLU blocks; where a pool follows, the block's ReLU moves after the pool.
        # Parameter names are those of the plain conv-BN-ReLU-pool layout (body.0.0, body.0.1, ...).
        stem_pool = size > self.MAX_INNER_SIZE
        self.body = nn.Sequential(
            _conv_bn(channels, w, relu=not stem_pool),
            *([_pool_relu()] if stem_pool else []),
            _conv_bn(w, w, relu=False),
            _pool_relu(),
            _conv_bn(w, 2 * w),
            _conv_bn(2 * w, 2 * w, relu=False),
            _pool_relu(),
            _conv_bn(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @property
    def last_block(self) -> nn.Module:
        return self.body[-3]  # the last conv-BN-ReLU, before the global pool and flatten


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Classifier):
    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(512, num_classes)

    @property
    def last_block(self) -> nn.Module:
        return self.layer4[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.avgpool(out), 1)


_BUILDERS = {
    "cnn": lambda info: SmallCNN(info.channels, info.num_classes, size=info.size),
    "preact-resnet18": lambda info: PreActResNet18(info.channels, info.num_classes),
}
ARCHS = tuple(_BUILDERS)


def build_model(arch: str, info: DatasetInfo) -> Classifier:
    """A freshly initialized ``arch`` for ``info``'s channels and classes.

    >>> from zoo.data import dataset_info
    >>> build_model("cnn", dataset_info("digits")).head.out_features
    10
    """
    if arch not in _BUILDERS:
        raise ValueError(f"unknown model {arch!r}: expected one of {', '.join(ARCHS)}")
    return _BUILDERS[arch](info)
