"""`DigitsCNN`: the zoo's `digits_cnn` (dq_jax/models/digits.py) written in NNX.

Same layers, initializers, BatchNorm settings and variable names as the Linen
model, so `dq_jax.nnx.linen_variables` of it is a `digits_cnn` variable dict
(`.dqz` export / predict, Linen <-> NNX comparisons). Train/eval follows
`model.train()` / `model.eval()` (BatchNorm and activation statistics).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dq_jax.models import common
from dq_jax.nnx.layers import QuantConv, QuantLinear
from dq_jax.quant.config import QuantConfig


class DigitsCNN(nnx.Module):
    """conv1 (float unless quantize_first_last) -> conv2 /2 -> conv3 -> GAP -> head."""

    def __init__(self, num_classes: int = 10, *, quant: QuantConfig = QuantConfig.float(),
                 quantize_first_last: bool = False, widths: Sequence[int] = (32, 64, 64),
                 in_channels: int = 1, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if len(widths) != 3:
            raise ValueError(f"DigitsCNN widths={widths!r} must have 3 entries.")
        edge = common.edge_quant(quant, quantize_first_last)
        pad = common.torch_padding(3)
        conv = dict(use_bias=False, dtype=dtype, kernel_init=common.conv_kernel_init,
                    padding=pad, rngs=rngs)

        def norm(features):
            return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, dtype=dtype, rngs=rngs)

        self.dtype = dtype
        self.conv1 = QuantConv(in_channels, widths[0], (3, 3),
                               quant=common.signed(edge, "The first conv (image input)"), **conv)
        self.bn1 = norm(widths[0])
        self.conv2 = QuantConv(widths[0], widths[1], (3, 3), (2, 2), quant=common.unsigned(quant),
                               **conv)
        self.bn2 = norm(widths[1])
        self.conv3 = QuantConv(widths[1], widths[2], (3, 3), quant=common.unsigned(quant), **conv)
        self.bn3 = norm(widths[2])
        self.head = QuantLinear(widths[2], num_classes, quant=common.unsigned(edge), dtype=dtype,
                                rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, self.dtype)
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        x = nnx.relu(self.bn3(self.conv3(x)))
        x = jnp.mean(x, axis=(1, 2))
        return common.logits_out(self.head(x))
