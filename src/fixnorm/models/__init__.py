"""Model registry: build any supported network by name with `create_model`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from fixnorm.errors import FixNormError
from fixnorm.models.cifar_resnet import CifarResNet, resnet20, resnet32, resnet56, resnet110
from fixnorm.models.efficientnet import EfficientNet, efficientnet_b0, efficientnet_b0_cifar
from fixnorm.models.fast_cnn import FastCNN
from fixnorm.models.mobilenetv2 import MobileNetV2, mobilenetv2, mobilenetv2_cifar
from fixnorm.models.preact_resnet import PreActResNet, preact_resnet18
from fixnorm.models.resnet import ResNet, resnet50
from fixnorm.models.small_cnn import SmallCNN
from fixnorm.models.wide_resnet import wide_resnet, wrn, wrn16_4, wrn28_10

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Decorator that makes a model factory (or class) available to `create_model` under `name`."""

    def decorator(factory: F) -> F:
        if name in _REGISTRY:
            raise FixNormError(f"model name {name!r} is already registered; pick another name")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kw) -> nn.Module:
    """Build a registered model; extra keywords go to its factory (e.g. width, zero_init_residual)."""
    if name not in _REGISTRY:
        raise FixNormError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kw)


for _name, _factory in {
    "small_cnn": SmallCNN,
    "fast_cnn": FastCNN,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet50": resnet50,
    "preact_resnet18": preact_resnet18,
    "wrn": wrn,
    "wrn16_4": wrn16_4,
    "wrn28_10": wrn28_10,
    "mobilenetv2": mobilenetv2,
    "mobilenetv2_cifar": mobilenetv2_cifar,
    "efficientnet_b0": efficientnet_b0,
    "efficientnet_b0_cifar": efficientnet_b0_cifar,
}.items():
    register_model(_name)(_factory)

__all__ = [
    "CifarResNet",
    "EfficientNet",
    "FastCNN",
    "MobileNetV2",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "create_model",
    "efficientnet_b0",
    "efficientnet_b0_cifar",
    "list_models",
    "mobilenetv2",
    "mobilenetv2_cifar",
    "preact_resnet18",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet50",
    "wide_resnet",
    "wrn",
    "wrn16_4",
    "wrn28_10",
]
