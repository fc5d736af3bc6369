"""Model zoo: ResNet, AlexNet-BN, MobileNetV2 (ImageNet and CIFAR sizes) and a digits CNN.

    model = dq_jax.models.create("resnet20", num_classes=10, quant=QuantConfig())
    variables = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)
    logits, updates = model.apply(variables, x, train=True,
                                  mutable=["batch_stats", "quant_stats"])

Every model takes `num_classes`, `quant` (config of the inner conv/dense
layers), `quantize_first_last` (default False: first conv and last dense stay
`QuantConfig.float()`) and `dtype`; see each module's docstring for the
architecture, the reference parameter count it matches and where its
activation quantizers are signed.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn

from dq_jax.models.alexnet import AlexNet
from dq_jax.models.digits import DigitsCNN
from dq_jax.models.mobilenet_v2 import CIFAR_SETTING, IMAGENET_SETTING, MobileNetV2
from dq_jax.models.resnet import ResNet
from dq_jax.quant.config import QuantConfig

_COMMON = ("quantize_first_last", "dtype", "conv", "dense")
_RESNET_KW = _COMMON + ("zero_init_residual", "shortcut")
_MOBILENET_KW = _COMMON + ("width_multiplier", "dropout_rate")
_ALEXNET_KW = _COMMON + ("batch_norm", "dropout_rate")
_DIGITS_KW = _COMMON + ("widths",)

# name -> (class, fixed constructor arguments, accepted keyword arguments, input HWC)
_SPECS: dict[str, tuple[type, dict[str, Any], tuple[str, ...], tuple[int, int, int]]] = {
    "resnet18": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic"), _RESNET_KW,
                 (224, 224, 3)),
    "resnet34": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="basic"), _RESNET_KW,
                 (224, 224, 3)),
    "resnet50": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"), _RESNET_KW,
                 (224, 224, 3)),
    "resnet18_cifar": (ResNet, dict(stage_sizes=(2, 2, 2, 2), block="basic", stem="cifar"),
                       _RESNET_KW, (32, 32, 3)),
    "resnet34_cifar": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="basic", stem="cifar"),
                       _RESNET_KW, (32, 32, 3)),
    "resnet50_cifar": (ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck",
                                    stem="cifar"), _RESNET_KW, (32, 32, 3)),
    "resnet20": (ResNet, dict(stage_sizes=(3, 3, 3), block="basic", stem="cifar",
                              widths=(16, 32, 64), shortcut="pad"), _RESNET_KW, (32, 32, 3)),
    "resnet56": (ResNet, dict(stage_sizes=(9, 9, 9), block="basic", stem="cifar",
                              widths=(16, 32, 64), shortcut="pad"), _RESNET_KW, (32, 32, 3)),
    "alexnet": (AlexNet, dict(variant="imagenet"), _ALEXNET_KW, (224, 224, 3)),
    "alexnet_cifar": (AlexNet, dict(variant="cifar"), _ALEXNET_KW, (32, 32, 3)),
    "mobilenetv2": (MobileNetV2, dict(setting=IMAGENET_SETTING, stem_strides=2),
                    _MOBILENET_KW, (224, 224, 3)),
    "mobilenetv2_cifar": (MobileNetV2, dict(setting=CIFAR_SETTING, stem_strides=1),
                          _MOBILENET_KW, (32, 32, 3)),
    "digits_cnn": (DigitsCNN, {}, _DIGITS_KW, (8, 8, 1)),
}

MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)
"""Names `create` accepts."""

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {k: v[3] for k, v in _SPECS.items()}
"""The (H, W, C) input each model is designed for (ImageNet 224, CIFAR 32, digits 8x8x1)."""


def accepted_kwargs(name: str) -> tuple[str, ...]:
    """Keyword arguments `create(name, ...)` accepts besides num_classes and quant."""
    return _spec(name)[2]


def _spec(name: str):
    if not isinstance(name, str) or name not in _SPECS:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")
    return _SPECS[name]


def create(name: str, num_classes: int,
           quant: Optional[QuantConfig | Mapping[str, Any]] = QuantConfig.float(),
           **kwargs: Any) -> nn.Module:
    """Builds model `name` (one of MODEL_NAMES).

    Args:
      name: e.g. 'resnet18', 'resnet20', 'mobilenetv2_cifar', 'digits_cnn'.
      num_classes: logits size (positive int).
      quant: QuantConfig (or a mapping of its fields; None = float) for the
        inner layers.
      **kwargs: model options; common: quantize_first_last (bool, default
        False), dtype, conv / dense (layer classes); ResNets: zero_init_residual,
        shortcut ('projection' | 'pad'); MobileNetV2: width_multiplier,
        dropout_rate; AlexNet: batch_norm, dropout_rate; digits_cnn: widths.

    Raises:
      ValueError: unknown name (lists the known ones), unknown keyword
        argument (lists the accepted ones), or an invalid value.
    """
    cls, fixed, allowed, _ = _spec(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"create({name!r}) got unexpected keyword argument(s) {unknown}; "
            f"accepted: {sorted(allowed)} (plus num_classes and quant).")
    if quant is None:
        quant = QuantConfig.float()
    elif isinstance(quant, Mapping):
        quant = QuantConfig.from_mapping(quant)
    elif not isinstance(quant, QuantConfig):
        raise TypeError(
            f"create({name!r}): quant must be a QuantConfig or a mapping of its fields, "
            f"got {type(quant).__name__}.")
    return cls(num_classes=num_classes, quant=quant, **{**fixed, **kwargs})


__all__ = ["AlexNet", "DigitsCNN", "INPUT_SHAPES", "MODEL_NAMES", "MobileNetV2", "ResNet",
           "accepted_kwargs", "create"]
