"""MobileNetV2 (Sandler et al. 2018) with quantized convs, for 224x224 and 32x32 inputs.

Architecture as torchvision's `mobilenet_v2` (3,504,872 params at width 1.0 and
1000 classes): 3x3/2 stem conv (32 ch), 17 inverted-residual blocks
(t, c, n, s) = (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1)
(6,160,3,2) (6,320,1,1), a 1x1 conv to 1280 channels, global average pool and
the classifier. A block is [1x1 expand conv, BN, ReLU6] (omitted when t = 1),
3x3 depthwise conv (`feature_group_count` = channels), BN, ReLU6, then the
linear bottleneck: 1x1 projection conv and BN *without* activation; identity
residual when stride is 1 and channels are unchanged (no projection
shortcuts). Width multiplier: every channel count is `make_divisible(c * w, 8)`
and the last conv has `make_divisible(1280 * max(1, w), 8)` channels
(torchvision's rule). Dropout before the classifier: `dropout_rate` (default 0;
torchvision uses 0.2 - set it and pass `rngs={'dropout': key}` when training).

CIFAR variant (`mobilenetv2_cifar`, 32x32): stem stride 1 and the second
stage (c = 24) stride 1 instead of 2, as in the common CIFAR adaptation
(kuangliu/pytorch-cifar); the network then downsamples 32 -> 16 -> 8 -> 4
before the average pool, the same 8x total reduction a 224 input gets from
its first three strides, instead of collapsing to 1x1. All else (blocks,
widths, parameter count) is unchanged: it has exactly the parameters of
`mobilenetv2` for the same width and classes.

Quantization: every quantized conv quantizes its own input. Expand convs read
the previous block's linear-bottleneck output (plus residual), which can be
negative -> `act_signed=True`; the final 1x1 conv reads the last projection
output -> signed too. Depthwise and projection convs read ReLU6 outputs
(unsigned), as does the classifier (pooled ReLU6 features). The first conv
(image input) is signed when `quantize_first_last=True`. Depthwise kernels are
HWIO `[3, 3, 1, C]`, so per-channel granularity gives each channel its own
level set over its 9 weights (needs `2**weight_bits <= 9`: up to 3 bits;
4-bit per-channel depthwise is rejected by the layer with that reason).

BatchNorm: `batch_stats`, momentum 0.9, eps 1e-5, no `axis_name` (global batch
statistics come from `jax.jit` over a sharded `Mesh` batch).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq_jax.layers import QuantConv, QuantDense
from dq_jax.models import common
from dq_jax.models.common import ModuleDef
from dq_jax.quant.config import QuantConfig

# (expand ratio t, output channels c, repeats n, stride of the first s)
IMAGENET_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
CIFAR_SETTING = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Rounds a channel count to a multiple of `divisor`, never down by more than 10%."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear projection (1x1), optional residual."""

    out_channels: int
    strides: int
    expand_ratio: int
    conv: ModuleDef          # unsigned-input convs (post-ReLU6 inputs)
    signed_conv: ModuleDef   # convs whose input may be negative
    norm: ModuleDef
    input_signed: bool = True  # False only for a block reading the (ReLU6) stem

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_channels = x.shape[-1]
        hidden = int(round(in_channels * self.expand_ratio))
        y = x
        if self.expand_ratio != 1:
            y = self.signed_conv(hidden, (1, 1), padding="VALID", name="expand_conv")(y)
            y = jax.nn.relu6(self.norm(name="expand_bn")(y))
        # Without expansion the depthwise conv reads the block input itself: the
        # ReLU6 stem output for the first block, a linear bottleneck otherwise.
        dw_conv = self.signed_conv if self.expand_ratio == 1 and self.input_signed else self.conv
        s = self.strides
        y = dw_conv(hidden, (3, 3), (s, s), padding=common.torch_padding(3),
                      feature_group_count=hidden, name="dw_conv")(y)
        y = jax.nn.relu6(self.norm(name="dw_bn")(y))
        y = self.conv(self.out_channels, (1, 1), padding="VALID", name="project_conv")(y)
        y = self.norm(name="project_bn")(y)
        if s == 1 and in_channels == self.out_channels:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 (see module docstring).

    Attributes:
      num_classes: logits size.
      quant: config of every inner conv (first conv / classifier when
        `quantize_first_last`); signed inputs get `act_signed=True`.
      quantize_first_last: quantize the stem conv and the classifier too.
      width_multiplier: channel multiplier (torchvision rounding to 8).
      setting: inverted-residual table (t, c, n, s) - IMAGENET_SETTING or
        CIFAR_SETTING.
      stem_strides: 2 (ImageNet) or 1 (CIFAR).
      last_channels: channels of the final 1x1 conv at width 1.0.
      dropout_rate: dropout before the classifier (needs a 'dropout' rng in training).
      dtype: compute dtype.
      conv, dense: layer classes (QuantConv / QuantDense by default).
    """

    num_classes: int
    quant: QuantConfig = QuantConfig.float()
    quantize_first_last: bool = False
    width_multiplier: float = 1.0
    setting: Sequence[Sequence[int]] = IMAGENET_SETTING
    stem_strides: int = 2
    last_channels: int = 1280
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: ModuleDef = QuantConv
    dense: ModuleDef = QuantDense

    def __post_init__(self):
        common.check_common(self)
        w = self.width_multiplier
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ValueError(
                f"MobileNetV2.width_multiplier={w!r} must be a positive number (e.g. 0.35-1.4).")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"MobileNetV2.dropout_rate={self.dropout_rate!r} must be in [0, 1).")
        common.check_choice(self, "stem_strides", (1, 2))
        if not self.setting or any(len(row) != 4 for row in self.setting):
            raise ValueError(
                f"MobileNetV2.setting={self.setting!r} must be rows of (t, c, n, s).")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        first_conv, conv, head, norm, args = common.layer_factories(
            self, train, kernel_init=nn.initializers.normal(0.01))
        signed_conv = common.bind_layer(
            self.conv, common.signed(self.quant, "MobileNetV2's expand / last 1x1 convs"),
            train, **args)
        w = float(self.width_multiplier)

        x = jnp.asarray(x, self.dtype)
        s = self.stem_strides
        x = first_conv(make_divisible(32 * w), (3, 3), (s, s), padding=common.torch_padding(3),
                       name="stem_conv")(x)
        x = jax.nn.relu6(norm(name="stem_bn")(x))
        index = 0
        for t, c, n, first_stride in self.setting:
            out = make_divisible(c * w)
            for k in range(n):
                x = InvertedResidual(out, first_stride if k == 0 else 1, t, conv=conv,
                                     signed_conv=signed_conv, norm=norm,
                                     input_signed=index > 0, name=f"block{index}")(x)
                index += 1
        last = make_divisible(self.last_channels * max(1.0, w))
        x = signed_conv(last, (1, 1), padding="VALID", name="last_conv")(x)
        x = jax.nn.relu6(norm(name="last_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        if self.dropout_rate > 0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = head(self.num_classes, name="head")(x)
        return common.logits_out(x)
