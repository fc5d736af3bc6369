"""AlexNet with BatchNorm ("AlexNet-BN", the variant quantization papers train).

ImageNet (`alexnet`, 224x224): the one-tower topology of torchvision's
`alexnet` - convs 64@11x11/4 (pad 2), 192@5x5 (pad 2), 384, 256, 256 @3x3
(pad 1), 3x3/2 max-pools after conv 1, 2 and 5, adaptive average pool to 6x6,
fully connected 9216 -> 4096 -> 4096 -> classes. Reference: with
`batch_norm=False` (biases on every layer, no BN) this is exactly torchvision's
AlexNet, **61,100,840** params at 1000 classes. AlexNet-BN (the default,
`batch_norm=True`) puts BN after every conv and hidden fc (conv -> BN -> ReLU
-> pool; fc -> BN -> ReLU) and drops the then-redundant biases of those
layers: 61,100,840 - 9,344 biases + 2 x 9,344 BN scale/offset =
**61,110,184** params at 1000 classes.

CIFAR (`alexnet_cifar`, 32x32): the AlexNet of bearpaw/pytorch-classification
(the common "AlexNet on CIFAR", listed there at 2.47M params): convs
64@11x11/4 (pad 5), 192@5x5 (pad 2), 384, 256, 256 @3x3 (pad 1), 2x2/2 max-pools
after conv 1, 2 and 5 (32 -> 8 -> 4 -> 2 -> 1), then one fc 256 -> classes.
Reference: `batch_norm=False` gives **2,472,266** params at 10 classes (2,495,396
at 100); the BN variant 2,472,266 - 1,152 + 2 x 1,152 = **2,473,418** at 10.

Dropout before each hidden fc (torchvision's place): `dropout_rate`, default 0
(BN regularises; set 0.5 for the torchvision recipe and pass
`rngs={'dropout': key}` when training).

Quantization: every quantized layer quantizes its input; all inputs but the
image are post-ReLU (max-pooled or flattened), so unsigned; the first conv
is signed when `quantize_first_last=True`. BatchNorm: `batch_stats`,
momentum 0.9, eps 1e-5, no `axis_name` (`jax.jit` over a sharded `Mesh` batch
already gives global batch statistics).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq_jax.layers import QuantConv, QuantDense
from dq_jax.models import common
from dq_jax.models.common import ModuleDef
from dq_jax.quant.config import QuantConfig

VARIANTS = ("imagenet", "cifar")
# (features, kernel, stride, padding, max-pool after) per conv.
_CONVS = {
    "imagenet": ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
                 (256, 3, 1, 1, False), (256, 3, 1, 1, True)),
    "cifar": ((64, 11, 4, 5, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False),
              (256, 3, 1, 1, False), (256, 3, 1, 1, True)),
}
_POOL = {"imagenet": (3, 2), "cifar": (2, 2)}          # (window, stride)
_HIDDEN = {"imagenet": (4096, 4096), "cifar": ()}
_POOL_TO = {"imagenet": (6, 6), "cifar": None}


class AlexNet(nn.Module):
    """AlexNet(-BN) for 224x224 (`variant='imagenet'`) or 32x32 (`'cifar'`).

    Attributes:
      num_classes: logits size.
      quant: config of the inner layers (first conv / classifier too when
        `quantize_first_last`).
      quantize_first_last: quantize the first conv and the classifier.
      variant: 'imagenet' or 'cifar' (see module docstring).
      batch_norm: AlexNet-BN (True) or the plain reference topology (False).
      dropout_rate: dropout before each hidden fc (needs a 'dropout' rng in training).
      dtype: compute dtype.
      conv, dense: layer classes (QuantConv / QuantDense by default).
    """

    num_classes: int
    quant: QuantConfig = QuantConfig.float()
    quantize_first_last: bool = False
    variant: str = "imagenet"
    batch_norm: bool = True
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: ModuleDef = QuantConv
    dense: ModuleDef = QuantDense

    def __post_init__(self):
        common.check_common(self)
        common.check_choice(self, "variant", VARIANTS)
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"AlexNet.dropout_rate={self.dropout_rate!r} must be in [0, 1).")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        bn = self.batch_norm
        first_conv, conv, head, norm, _ = common.layer_factories(self, train, conv_bias=not bn)
        fc = common.bind_layer(self.dense, self.quant, train, use_bias=not bn, dtype=self.dtype)
        window, stride = _POOL[self.variant]

        x = jnp.asarray(x, self.dtype)
        for i, (features, k, s, p, pool) in enumerate(_CONVS[self.variant]):
            layer = first_conv if i == 0 else conv
            x = layer(features, (k, k), (s, s), padding=((p, p), (p, p)), name=f"conv{i + 1}")(x)
            if bn:
                x = norm(name=f"bn{i + 1}")(x)
            x = nn.relu(x)
            if pool:
                x = nn.max_pool(x, (window, window), strides=(stride, stride), padding="VALID")
        if _POOL_TO[self.variant] is not None:
            x = common.adaptive_avg_pool(x, _POOL_TO[self.variant])
        x = x.reshape(x.shape[0], -1)
        for i, features in enumerate(_HIDDEN[self.variant]):
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = fc(features, name=f"fc{i + 1}")(x)
            if bn:
                x = norm(name=f"fc_bn{i + 1}")(x)
            x = nn.relu(x)
        x = head(self.num_classes, name="head")(x)
        return common.logits_out(x)
