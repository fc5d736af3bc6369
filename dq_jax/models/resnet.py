"""ResNets with quantized convs: ImageNet 18/34/50, their CIFAR-stem twins, CIFAR ResNet-20/56.

One `ResNet` module covers all of them:

* ImageNet stem (`stem='imagenet'`): 7x7/2 conv, BN, ReLU, 3x3/2 max-pool;
  stages of widths (64, 128, 256, 512), stride 2 at the first block of every
  stage but the first. `block='basic'` (ResNet-18/34) or `'bottleneck'`
  (ResNet-50, "v1.5": the stride sits on the 3x3 conv, as in torchvision and
  the Flax ImageNet example). Shortcuts: identity, or a 1x1 conv + BN
  projection where the shape changes (He et al.'s option B), which is what
  the reference parameter counts (11,689,512 / 21,797,672 / 25,557,032 at
  1000 classes, torchvision) assume.
* CIFAR stem (`stem='cifar'`): one 3x3/1 conv, BN, ReLU, no max-pool, for
  32x32 inputs (`resnet18_cifar`: 11,173,962 params at 10 classes, the count
  of the widely used kuangliu/pytorch-cifar ResNet18).
* CIFAR ResNet-20/56 (He et al. 2016, sec. 4.2, 6n+2 layers, widths 16/32/64):
  default `shortcut='pad'` - He et al.'s option A, parameter-free: the
  input is subsampled (stride 2) and zero-padded in channels. We default to
  it because it is the architecture of the paper (0.27M / 0.85M params;
  269,722 and 853,018 at 10 classes) and the one the CIFAR quantization
  baselines report, and because it adds no layer that would have to be
  either quantized or left in float. `shortcut='projection'` gives option B
  (1x1 conv + BN, quantized like every other inner conv).

Quantization (DESIGN §1.2): each quantized conv quantizes its input. Inside
the blocks every conv input - the block input and the outputs of the inner
ReLUs - is post-ReLU, hence non-negative: unsigned grids. The projection
shortcut also reads the (post-ReLU) block input. The first conv reads the
normalised image, so when `quantize_first_last=True` it gets a signed grid;
the head reads the global average of post-ReLU features (unsigned).

BatchNorm: Flax-ImageNet-example style, `batch_stats` collection, momentum
0.9, eps 1e-5, no `axis_name` (under `jax.jit` with batches sharded over a
`Mesh` the batch mean is already global).
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

BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "cifar")
SHORTCUTS = ("projection", "pad")


def _shortcut(x: jax.Array, out_channels: int, strides: int, kind: str,
              conv: ModuleDef, norm: ModuleDef) -> jax.Array:
    if kind == "projection":
        x = conv(out_channels, (1, 1), (strides, strides), padding="VALID",
                 name="proj_conv")(x)
        return norm(name="proj_bn")(x)
    # Option A: subsample, then zero-pad the new channels (no parameters).
    if strides > 1:
        x = x[:, ::strides, ::strides, :]
    extra = out_channels - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"shortcut='pad' cannot reduce channels ({x.shape[-1]} -> {out_channels}); "
            "use shortcut='projection'.")
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34, CIFAR ResNets); `conv`/`norm` come pre-bound."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    shortcut: str = "projection"
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.strides
        y = self.conv(self.filters, (3, 3), (s, s), padding=common.torch_padding(3),
                      name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=common.torch_padding(3), name="conv2")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn2")(y)
        residual = x
        if x.shape != y.shape:
            residual = _shortcut(x, self.filters, s, self.shortcut, self.conv, self.norm)
        return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided, "v1.5") -> 1x1 (x4 channels) (ResNet-50)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    shortcut: str = "projection"
    zero_init_residual: bool = False
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.strides
        y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), (s, s), padding=common.torch_padding(3),
                      name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        out = self.filters * self.expansion
        y = self.conv(out, (1, 1), padding="VALID", name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn3")(y)
        residual = x
        if x.shape != y.shape:
            residual = _shortcut(x, out, s, self.shortcut, self.conv, self.norm)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet family with quantized inner convs (see module docstring).

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: 'basic' or 'bottleneck'.
      num_classes: logits size.
      quant: config of every inner conv (and of the first conv / head when
        `quantize_first_last`).
      quantize_first_last: quantize the stem conv and the head too.
      stem: 'imagenet' (7x7/2 + max-pool) or 'cifar' (3x3/1, no pool).
      widths: channels of each stage (bottleneck output is 4x).
      shortcut: 'projection' (1x1 conv + BN, option B) or 'pad' (option A).
      zero_init_residual: zero-init the last BN scale of each block (Goyal et al.).
      dtype: compute dtype of convs, BN and head (params stay float32).
      conv, dense: layer classes (default QuantConv/QuantDense; plain nn.Conv /
        nn.Dense only with QuantConfig.float()).

    Call: `model.apply(variables, x, train=..., mutable=[...])`, `x` NHWC.
    """

    stage_sizes: Sequence[int]
    block: str
    num_classes: int
    quant: QuantConfig = QuantConfig.float()
    quantize_first_last: bool = False
    stem: str = "imagenet"
    widths: Sequence[int] = (64, 128, 256, 512)
    shortcut: str = "projection"
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    conv: ModuleDef = QuantConv
    dense: ModuleDef = QuantDense

    def __post_init__(self):
        common.check_common(self)
        common.check_choice(self, "block", BLOCKS)
        common.check_choice(self, "stem", STEMS)
        common.check_choice(self, "shortcut", SHORTCUTS)
        common.check_positive_ints(self, "stage_sizes")
        common.check_positive_ints(self, "widths")
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(
                f"ResNet.widths={tuple(self.widths)} needs one width per stage "
                f"(stage_sizes={tuple(self.stage_sizes)}).")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        first_conv, conv, head, norm, _ = common.layer_factories(self, train)

        x = jnp.asarray(x, self.dtype)
        if self.stem == "imagenet":
            x = first_conv(self.widths[0], (7, 7), (2, 2), padding=common.torch_padding(7),
                           name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = first_conv(self.widths[0], (3, 3), padding=common.torch_padding(3),
                           name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))

        block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(width, conv=conv, norm=norm, strides=strides,
                              shortcut=self.shortcut,
                              zero_init_residual=self.zero_init_residual,
                              name=f"stage{i + 1}_block{j + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = head(self.num_classes, name="head")(x)
        return common.logits_out(x)
