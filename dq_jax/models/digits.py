"""A tiny CNN for the 8x8x1 scikit-learn digits (seconds per few hundred CPU steps).

float conv 32@3x3 -> BN -> ReLU -> quantized conv 64@3x3/2 -> BN -> ReLU ->
quantized conv 64@3x3 -> BN -> ReLU -> global average pool -> float dense.
8x8 -> 8x8 -> 4x4 -> 4x4; 56,554 params at 10 classes (float).

The quantized convs read post-ReLU inputs (unsigned grids); the first conv
reads the pixels (signed grid when `quantize_first_last=True`, so any input
normalisation works) and the head the pooled post-ReLU features.
BatchNorm: `batch_stats`, momentum 0.9, eps 1e-5, no `axis_name` (`jax.jit`
over a sharded `Mesh` batch gives global statistics).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq_jax.layers import QuantConv, QuantDense
from dq_jax.models import common
from dq_jax.models.common import ModuleDef
from dq_jax.quant.config import QuantConfig


class DigitsCNN(nn.Module):
    """Three convs and a dense head; `widths` are the three conv widths."""

    num_classes: int
    quant: QuantConfig = QuantConfig.float()
    quantize_first_last: bool = False
    widths: Sequence[int] = (32, 64, 64)
    dtype: Any = jnp.float32
    conv: ModuleDef = QuantConv
    dense: ModuleDef = QuantDense

    def __post_init__(self):
        common.check_common(self)
        common.check_positive_ints(self, "widths")
        if len(self.widths) != 3:
            raise ValueError(f"DigitsCNN.widths={self.widths!r} must have 3 entries.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        first_conv, conv, head, norm, _ = common.layer_factories(self, train)
        pad = common.torch_padding(3)

        x = jnp.asarray(x, self.dtype)
        x = first_conv(self.widths[0], (3, 3), padding=pad, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        x = conv(self.widths[1], (3, 3), (2, 2), padding=pad, name="conv2")(x)
        x = nn.relu(norm(name="bn2")(x))
        x = conv(self.widths[2], (3, 3), padding=pad, name="conv3")(x)
        x = nn.relu(norm(name="bn3")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = head(self.num_classes, name="head")(x)
        return common.logits_out(x)
