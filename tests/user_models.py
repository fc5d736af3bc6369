"""A user's own Flax models, written outside dq_jax (export/predict, rules and conversion tests).

It is what a user would write: a plain Flax CNN whose convolutions come from a `conv` field,
given our `QuantConv` through `functools.partial` by a factory function (the partial is not a
JSON value, so the export records the factory `user_models:make_model` and its kwargs).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from dq_jax.layers import QuantConv
from dq_jax.quant.config import QuantConfig


class TinyNet(nn.Module):
    """`conv` (a QuantConv partial) if given, else a `bits`-bit DQ QuantConv built here."""
    num_classes: int
    conv: Callable[..., Any] | None = None
    bits: int = 2
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = self.conv or functools.partial(QuantConv, quant=QuantConfig(
            weights="dq", weight_bits=self.bits, acts="dq", act_bits=self.bits))
        x = nn.Conv(self.width, (3, 3), name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn0")(x))
        x = conv(self.width * 2, (3, 3), strides=2, name="conv1")(x, train=train)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def make_model(num_classes: int = 10, bits: int = 2) -> TinyNet:
    quant = QuantConfig(weights="dq", weight_bits=bits, acts="dq", act_bits=bits)
    return TinyNet(num_classes, conv=functools.partial(QuantConv, quant=quant))


def flax_example_resnet_tiny(num_classes: int = 10, bits: int = 2):
    """The unmodified Flax-example-style ResNet (tests/flax_example_resnet.py) with our conv:
    a factory, because `conv=partial(QuantConv, ...)` is not a JSON value."""
    import flax_example_resnet as example
    quant = QuantConfig(weights="dq", weight_bits=bits, acts="dq", act_bits=bits)
    return example.ResNetTiny(num_classes=num_classes, conv=functools.partial(QuantConv, quant=quant))


def rules_plain_net(num_classes: int = 10):
    """An unmodified plain-Flax model (hard-coded nn.Conv / nn.Dense) quantized by rules:
    8-bit stem and head, W2A2 inner convs (tests/test_rules.py)."""
    import dq_jax
    from tests.test_rules import RULES, PlainNet
    assert num_classes == 10
    return dq_jax.quantize_model(PlainNet(), RULES)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Conv(8, (3, 3), name="conv")(x)), None


class ScannedConvs(nn.Module):
    """A float stem conv, then 3 convs stacked by `nn.scan` ('blocks/conv', kernels [3, ...]):
    a layer whose variables carry a stack axis, and whose body Flax traces more than once."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        x, _ = nn.scan(_ScanBlock, variable_axes={"params": 0, "codes": 0, "quant_stats": 0,
                                                  "perturbations": 0},
                       split_rngs={"params": True}, length=3)(name="blocks")(x, None)
        return x
