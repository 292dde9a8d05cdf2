"""Model zoo: a registry of small-image CNNs built by name, timm style.

Every model takes ``num_classes`` and ``in_channels``; most also take ``width_multiplier``.
``create_model`` records how a model was built so a checkpoint can rebuild it.

Example:
    >>> from nni_elastic.models import create_model, list_models
    >>> model = create_model("resnet20", num_classes=10)
    >>> model.nni_elastic_arch
    {'name': 'resnet20', 'kwargs': {'num_classes': 10, 'in_channels': 3}}
    >>> rebuilt = create_model(model.nni_elastic_arch["name"], **model.nni_elastic_arch["kwargs"])
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from torch import nn

from nni_elastic._registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
register_model = MODELS.register


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _plain(key: str, value: Any) -> Any:
    """Tuples become lists; anything JSON cannot hold is rejected so checkpoints stay portable."""
    if isinstance(value, (tuple, list)):
        return [_plain(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(key, v) for k, v in value.items()}
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError(
            f"model kwarg {key!r} must be JSON-serialisable (int, float, str, bool, None, "
            f"list, dict), got {value!r}"
        ) from None
    return value


def _check_keywords(name: str, factory: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """Unknown keywords: one line listing the model's own (from its signature), not a TypeError."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [p for p, v in params.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no keyword {', '.join(repr(k) for k in unknown)}; its keywords: "
                         f"{', '.join(allowed)} (set them with model.kwargs in a recipe)")


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model and record its recipe in ``model.nni_elastic_arch``.

    Args:
        name: registered model name (see ``list_models()``).
        num_classes: size of the classifier output, >= 1.
        in_channels: channels of the input images, >= 1.
        **kwargs: model-specific options, e.g. ``width_multiplier=0.5``; must be JSON-serialisable.

    Example:
        >>> model = create_model("vgg16_bn", num_classes=100, width_multiplier=0.25)
    """
    factory = MODELS.get(name)
    _check_keywords(name, factory, kwargs)
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    arch_kwargs.update({key: _plain(key, value) for key, value in kwargs.items()})
    model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
    model.nni_elastic_arch = {"name": name, "kwargs": arch_kwargs}
    return model


def list_models() -> list[str]:
    """Names of all registered models, sorted.

    Example:
        >>> "resnet20" in list_models()
        True
    """
    return MODELS.names()


# Imported last so each model file can use ``register_model`` defined above.
from nni_elastic.models import alexnet, densenet, growable, mobilenet, resnet, secnn, vgg  # noqa: E402,F401
from nni_elastic.models.alexnet import AlexNet  # noqa: E402
from nni_elastic.models.densenet import DenseNetTiny  # noqa: E402
from nni_elastic.models.growable import GrowableCNN  # noqa: E402
from nni_elastic.models.mobilenet import MobileNetV2Tiny  # noqa: E402
from nni_elastic.models.resnet import ResNetCifar, resnet_cifar  # noqa: E402
from nni_elastic.models.vgg import VGG  # noqa: E402

__all__ = [
    "MODELS",
    "register_model",
    "create_model",
    "list_models",
    "resnet_cifar",
    "AlexNet",
    "DenseNetTiny",
    "GrowableCNN",
    "MobileNetV2Tiny",
    "ResNetCifar",
    "VGG",
]
