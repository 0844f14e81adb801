"""The torchvision-built classifiers of :mod:`zoo.models` (sources, choices and ``last_block``
per arch are in its docstring). The only module of the core that imports torchvision;
``zoo.models.build_model`` imports it when one of these archs is asked for.

Each class subclasses torchvision's own and calls its constructor with the arguments of the
builder BackdoorBench calls (``torchvision.models.<arch>(num_classes=K)``), so every
``state_dict`` key is torchvision's, i.e. BackdoorBench's; ``tests/test_models.py`` checks each
against the builder (structure, keys both ways, outputs). ``head`` is a property over the
existing final Linear, so no key moves.

torchvision names the convolutional trunk of VGG, MobileNetV3, EfficientNet and ConvNeXt
``features``, the name of the :class:`~zoo.classifier.Classifier` method: the method wins attribute
lookup, the trunk stays registered under ``features`` (its keys unchanged) and is reached as
``trunk``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from torchvision import models as tvm  # type: ignore[import-untyped]
from torchvision.transforms import Resize  # type: ignore[import-untyped]

from zoo.classifier import Classifier

__all__ = ["CLASSES", "build"]


def _linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise TypeError(f"head {type(module).__name__}: expected nn.Linear")
    return module


class _TrunkClassifier(Classifier):
    """For torchvision classes whose ``features`` submodule the Classifier method shadows."""

    avgpool: nn.Module
    classifier: nn.Sequential

    @property
    def trunk(self) -> nn.Sequential:
        """torchvision's ``features`` Sequential (keys ``features.*``)."""
        return cast(nn.Sequential, self._modules["features"])


class ResNet18(Classifier, tvm.ResNet):
    """``resnet18(num_classes)``: ``ResNet(BasicBlock, [2, 2, 2, 2])``; head ``fc``."""

    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    relu: nn.ReLU
    maxpool: nn.MaxPool2d
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential
    avgpool: nn.AdaptiveAvgPool2d
    fc: nn.Linear

    def __init__(self, num_classes: int) -> None:
        super().__init__(tvm.resnet.BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return _linear(self.fc)

    @property
    def last_block(self) -> nn.Module:
        return self.layer4[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class VGG19BN(_TrunkClassifier, tvm.VGG):
    """``vgg19_bn(num_classes)``: configuration "E" with batch norm, 7x7 adaptive pool, then
    fc6 (25088 -> 4096) and fc7 (4096 -> 4096) with ReLU and dropout 0.5; head
    ``classifier.6``."""

    def __init__(self, num_classes: int) -> None:
        trunk = tvm.vgg.make_layers(tvm.vgg.cfgs["E"], batch_norm=True)
        super().__init__(trunk, num_classes=num_classes)

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return _linear(self.classifier[6])

    @property
    def last_block(self) -> nn.Module:
        return self.classifier[3:6]  # fc7, its ReLU and dropout

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.trunk(x)), 1)
        return self.classifier[:6](x)


class MobileNetV3Large(_TrunkClassifier, tvm.MobileNetV3):
    """``mobilenet_v3_large(num_classes)``: torchvision's large configuration, last channel
    1280, dropout 0.2; head ``classifier.3``."""

    def __init__(self, num_classes: int) -> None:
        setting, last_channel = tvm.mobilenetv3._mobilenet_v3_conf("mobilenet_v3_large")
        super().__init__(setting, last_channel, num_classes=num_classes)

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return _linear(self.classifier[3])

    @property
    def last_block(self) -> nn.Module:
        return self.classifier[:3]  # Linear(960, 1280), Hardswish, dropout

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.trunk(x)), 1)
        return self.classifier[:3](x)


class EfficientNetB3(_TrunkClassifier, tvm.EfficientNet):
    """``efficientnet_b3(num_classes)``: width 1.2, depth 1.4, dropout 0.3, stochastic depth
    0.2; head ``classifier.1``."""

    def __init__(self, num_classes: int) -> None:
        setting, last_channel = tvm.efficientnet._efficientnet_conf(
            "efficientnet_b3", width_mult=1.2, depth_mult=1.4)
        super().__init__(setting, 0.3, last_channel=last_channel, num_classes=num_classes)

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return _linear(self.classifier[1])

    @property
    def last_block(self) -> nn.Module:
        return self.trunk[-1]  # the 1x1 conv-BN-SiLU to 1536 channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.trunk(x)), 1)
        return self.classifier[0](x)  # dropout


class ConvNeXtTiny(_TrunkClassifier, tvm.ConvNeXt):
    """``convnext_tiny(num_classes)``: stages of 3, 3, 9, 3 blocks at 96-768 channels,
    stochastic depth 0.1; head ``classifier.2`` after LayerNorm2d and flatten."""

    def __init__(self, num_classes: int) -> None:
        stage = tvm.convnext.CNBlockConfig
        stages = [stage(96, 192, 3), stage(192, 384, 3), stage(384, 768, 9), stage(768, None, 3)]
        super().__init__(stages, stochastic_depth_prob=0.1, num_classes=num_classes)

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return _linear(self.classifier[2])

    @property
    def last_block(self) -> nn.Module:
        return cast(nn.Sequential, self.trunk[-1])[-1]  # the last CNBlock

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier[:2](self.avgpool(self.trunk(x)))  # LayerNorm2d, flatten


class ViTB16(Classifier):
    """BackdoorBench's ``Sequential(Resize((224, 224)), vit_b_16())`` with ``heads.head``
    replaced: children ``0`` (the resize) and ``1`` (the ViT), hence keys ``1.*``; head
    ``1.heads.head``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        vit = tvm.VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=12,
                                    hidden_dim=768, mlp_dim=3072)
        # BackdoorBench puts a fresh Linear (PyTorch's default init) in place of the ImageNet
        # head; torchvision's own init would zero it.
        vit.heads.head = nn.Linear(vit.hidden_dim, num_classes)
        self.add_module("0", Resize((224, 224)))
        self.add_module("1", vit)

    @property
    def resize(self) -> nn.Module:
        return cast(nn.Module, self._modules["0"])

    @property
    def vit(self) -> tvm.VisionTransformer:
        return cast(tvm.VisionTransformer, self._modules["1"])

    @property
    def head(self) -> nn.Linear:  # type: ignore[override]
        return _linear(self.vit.heads.head)

    @property
    def last_block(self) -> nn.Module:
        return self.vit.encoder.layers[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``VisionTransformer.forward`` up to the head: patches, class token,
        encoder, the class token's output."""
        vit = self.vit
        x = vit._process_input(self.resize(x))
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return vit.encoder(x)[:, 0]


CLASSES: dict[str, Callable[[int], Classifier]] = {
    "resnet18": ResNet18,
    "vgg19_bn": VGG19BN,
    "mobilenet_v3_large": MobileNetV3Large,
    "efficientnet_b3": EfficientNetB3,
    "convnext_tiny": ConvNeXtTiny,
    "vit_b_16": ViTB16,
}


def build(arch: str, num_classes: int) -> Classifier:
    """A freshly initialized torchvision ``arch`` with ``num_classes`` outputs."""
    if arch not in CLASSES:
        raise ValueError(f"unknown torchvision model {arch!r}: expected one of {', '.join(CLASSES)}")
    return CLASSES[arch](num_classes)
