"""Image classifiers with BackdoorBench's ``state_dict`` key names, so its checkpoints load as-is.

Every model is a :class:`Classifier`: ``features(x)`` is the head's input, ``head`` the final
``nn.Linear`` (FST, LP, FE-tuning and NGF re-initialize, freeze and read it in place) and
``last_block`` the backbone's last block before the head. ``head`` is the model's own last layer
under BackdoorBench's name (``linear``, ``fc``, ``classifier.6``, ``1.heads.head``, ...), not a
second copy: ``forward(x) == head(features(x))`` and the keys stay BackdoorBench's.

Sources. "BackdoorBench" is SCLBD/BackdoorBench's ``generate_cls_model`` in
``utils/aggregate_block/model_trainer_generate.py``; the torchvision models are torchvision's
classes with the arguments of the builder it calls there (``num_classes`` to the constructor).

- ``cnn``: ours, below.
- ``preactresnet18`` (BackdoorBench's name) = ``preact-resnet18`` (ours so far): He, Zhang, Ren,
  Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016; BackdoorBench
  ``models/preact_resnet.py``, ``PreActResNet18(num_classes)``.
- ``resnet18``: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016;
  ``torchvision.models.resnet18(num_classes)``.
- ``vgg19_bn``: Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
  Recognition", ICLR 2015, with batch norm; ``torchvision.models.vgg19_bn(num_classes)``.
- ``mobilenet_v3_large``: Howard et al., "Searching for MobileNetV3", ICCV 2019;
  ``torchvision.models.mobilenet_v3_large(num_classes)``.
- ``efficientnet_b3``: Tan, Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
  Networks", ICML 2019; ``torchvision.models.efficientnet_b3(num_classes)``.
- ``convnext_tiny``: Liu et al., "A ConvNet for the 2020s", CVPR 2022;
  ``torchvision.models.convnext_tiny(num_classes)``, ImageNet weights partially loaded.
- ``vit_b_16``: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
  Recognition at Scale", ICLR 2021; ``Sequential(Resize((224, 224)), vit_b_16(pretrained))``
  with ``heads.head`` replaced by a fresh ``Linear(768, K)``: hence the ``1.`` key prefix.

The models:

- ``cnn``: a small VGG-style network, the CPU default (about 0.14 M parameters at width 32):
  conv-conv-pool, conv-conv-pool, conv, global average pool. Images larger than 16 x 16 (MNIST,
  CIFAR-10, GTSRB) are pooled once more right after the first convolution, so the network runs
  at most at 16 x 16 past its first layer: 3.6x fewer multiply-adds at 32 x 32, which keeps it the
  fast CPU model there too. The first convolution still sees every pixel (a 3 x 3 patch trigger).
  Where a max-pool follows a block, its ReLU runs after the pool: the same function and
  gradients (ReLU is monotonic) on a quarter of the elements.
- PreAct-ResNet18: 3x3 stride-1 stem with 64 channels, no max-pool, 2-2-2-2 pre-activation
  blocks of 64/128/256/512 channels, 1x1 projection shortcuts, adaptive average pool,
  ``linear = Linear(512, K)``; no final BN/ReLU. Its stem takes ``info.channels`` (BackdoorBench
  hard-codes 3: the same keys and shapes on RGB data).
- The torchvision models (built in :mod:`zoo._tv_models`, which alone imports torchvision, and
  only when one of them is asked for): the input is resized only for ViT, as BackdoorBench does.
  Differences from BackdoorBench: (1) every weight starts random, where BackdoorBench starts
  ``vit_b_16`` and ``convnext_tiny`` from ImageNet weights (loading one of its checkpoints
  replaces them anyway); (2) RGB only: BackdoorBench builds them with a 3-channel stem and has no
  1-channel variant, so a 1-channel dataset (digits, mnist) is refused with a one-line error
  rather than given a stem no BackdoorBench checkpoint has; (3) ``vgg19_bn`` and
  ``convnext_tiny`` need images of at least 32 x 32 (five stride-2 stages; torchvision's own
  ``min_size``), which :func:`check_arch` also enforces.

``last_block``: the last convolutional, residual or transformer block before the global pooling
(``cnn``: its last conv block; ResNets: ``layer4[-1]``; EfficientNet: its final 1x1 conv block
``features[-1]``; ConvNeXt: the last CNBlock, before the final LayerNorm2d; ViT: the last
encoder block, before ``encoder.ln``) or, where hidden fully connected layers sit between the
pooling and the head, the last of them (VGG: fc7, ``classifier[3:6]``; MobileNetV3:
``classifier[0:3]``), the block that feeds the head.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from torch.nn import functional as F

from zoo.classifier import Classifier
from zoo.data import DataError, DatasetInfo

__all__ = ["ARCHS", "Classifier", "build_model", "canonical_arch", "check_arch"]


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
    """BackdoorBench's ``PreActBlock``: the same submodule names, hence the same keys."""

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
    """BackdoorBench's ``PreActResNet18``: keys ``conv1``, ``layer1``..``layer4``, ``linear``."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    @property  # the head under BackdoorBench's key name ``linear``
    def head(self) -> nn.Linear:  # type: ignore[override]
        return self.linear

    @property
    def last_block(self) -> nn.Module:
        return self.layer4[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(self.avgpool(out), 1)


# =============================================================================================
# Registry
# =============================================================================================

_OWN = {
    "cnn": lambda info: SmallCNN(info.channels, info.num_classes, size=info.size),
    "preact-resnet18": lambda info: PreActResNet18(info.channels, info.num_classes),
}
# Other names of the same model (same class, same keys): BackdoorBench's spelling.
ALIASES = {"preactresnet18": "preact-resnet18"}
# Built from torchvision in zoo._tv_models: the smallest image side each accepts.
TORCHVISION_MIN_SIZE = {
    "resnet18": 1,
    "vgg19_bn": 32,  # five 2x2 max-pools
    "mobilenet_v3_large": 1,
    "efficientnet_b3": 1,
    "convnext_tiny": 32,  # a stride-4 stem and three stride-2 downsamplings
    "vit_b_16": 1,  # any size: resized to 224 x 224 first
}
ARCHS = (*_OWN, *ALIASES, *TORCHVISION_MIN_SIZE)


def canonical_arch(arch: str) -> str:
    """``arch`` with aliases resolved: ``preactresnet18`` -> ``preact-resnet18``."""
    return ALIASES.get(arch, arch)


def check_arch(arch: str, info: DatasetInfo) -> None:
    """Raise :class:`DataError` (a ``ValueError``; one line) unless ``arch`` is known and takes
    ``info``'s images (a user error: the CLI prints it as one line)."""
    if arch not in ARCHS:
        raise DataError(f"unknown model {arch!r}: expected one of {', '.join(ARCHS)}")
    min_size = TORCHVISION_MIN_SIZE.get(arch)
    if min_size is None:
        return
    if info.channels != 3:
        raise DataError(
            f"arch {arch!r} takes RGB images (BackdoorBench builds it with a 3-channel stem): "
            f"dataset {info.name!r} has {info.channels} channel(s); expected an RGB dataset, "
            f"or --arch {', '.join((*_OWN, *ALIASES))}"
        )
    if info.size < min_size:
        raise DataError(
            f"arch {arch!r} needs images of at least {min_size} x {min_size}: dataset "
            f"{info.name!r} has {info.size} x {info.size}; expected larger images or another arch"
        )


def build_model(arch: str, info: DatasetInfo) -> Classifier:
    """A freshly initialized ``arch`` for ``info``'s channels and classes.

    >>> from zoo.data import dataset_info
    >>> build_model("cnn", dataset_info("digits")).head.out_features
    10
    >>> sorted(build_model("preactresnet18", dataset_info("cifar10")).state_dict())[-2:]
    ['linear.bias', 'linear.weight']
    """
    check_arch(arch, info)
    arch = canonical_arch(arch)
    if arch in _OWN:
        return _OWN[arch](info)
    if importlib.util.find_spec("torchvision") is None:
        raise DataError(f"arch {arch!r} needs torchvision (not installed): expected "
                         f"`pip install torchvision`, or --arch {', '.join((*_OWN, *ALIASES))}")
    # Deferred: torchvision (seconds to import) loads only when one of its models is asked for,
    # so ``import zoo`` and every Ray worker stay free of it (docs/CONTRACTS.md).
    from zoo import _tv_models

    return _tv_models.build(arch, info.num_classes)
