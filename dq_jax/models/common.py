"""Pieces shared by the model zoo: layer binding, BatchNorm, quantizer choice.

Where activation quantizers go (DESIGN §1.2): every quantized conv/dense
quantizes its own *input*. Inputs that come straight from a ReLU/ReLU6 (or a
max/avg pool of one) are non-negative and use the unsigned grid
(`act_signed=False`, set by `bind_layer` where the config leaves it to the data);
inputs that can be negative (the normalised image, MobileNetV2's
linear-bottleneck outputs) use `signed(quant)`, i.e. `act_signed=True`. The zoo
fixes every layer's grid by architecture, so its models never use the data-decided
grid (`act_signed=None`, for models written without the library).

First conv and last dense stay full precision (`QuantConfig.float()`) unless
`quantize_first_last=True` (`edge_quant`).

BatchNorm: `use_running_average=not train, momentum=0.9, epsilon=1e-5`, state
in the `batch_stats` collection, like the Flax ImageNet example. No
`axis_name`: we train with `jax.jit` over a `Mesh` with globally sharded
batches, where `jnp.mean` over the batch axis is already the global
(cross-device) mean, so BN statistics are synchronised without `pmap` axes.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dq_jax.quant.config import QuantConfig

ModuleDef = Any

# He (fan-out) normal init for conv kernels, as torchvision's ResNet/MobileNetV2
# (kaiming_normal_, mode="fan_out"; JAX's "normal" is untruncated).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _unwrap(cls: Any) -> Any:
    while isinstance(cls, functools.partial):
        cls = cls.func
    return cls


def is_quant_layer(cls: Any) -> bool:
    """True if `cls` (class or partial) takes `quant` and `train` fields (QuantConv/QuantDense)."""
    fields = getattr(_unwrap(cls), "__dataclass_fields__", {})
    return "quant" in fields and "train" in fields


def bind_layer(cls: ModuleDef, quant: QuantConfig, train: bool, **defaults: Any) -> ModuleDef:
    """A constructor for conv/dense layers of class `cls` configured with `quant`.

    Inputs are post-ReLU unless `quant` says otherwise: `act_signed=None` becomes False
    (signed inputs are bound with `signed(quant)` first).
    `cls` is normally `QuantConv` / `QuantDense`; a plain `nn.Conv` / `nn.Dense`
    is accepted where the layer is not quantized (`quant.is_float`), which is
    how the float-equivalence tests build a plain-Flax network.
    """
    if is_quant_layer(cls):
        quant = unsigned(quant)  # post-ReLU input: the grid is known, not data-decided
        return functools.partial(cls, quant=quant, train=train, **defaults)
    if not quant.is_float:
        raise ValueError(
            f"Layer class {_unwrap(cls).__name__} cannot quantize (it has no 'quant' "
            f"field) but this layer's config is {quant}. Use dq_jax.layers.QuantConv / "
            "QuantDense (the default) or QuantConfig.float().")
    return functools.partial(cls, **defaults)


def signed(quant: QuantConfig, where: str = "") -> QuantConfig:
    """`quant` for a layer whose input can be negative (signed activation grid)."""
    if quant.acts == "float" or quant.act_signed:
        return quant
    try:
        return quant.replace(act_signed=True)
    except ValueError as e:
        raise ValueError(
            f"{where or 'A layer'} has an input that can be negative and needs a "
            f"signed activation quantizer (act_signed=True): {e}") from e


def unsigned(quant: QuantConfig) -> QuantConfig:
    """`quant` for a layer whose input is non-negative (post-ReLU): `act_signed=None`
    (data-decided) becomes False; an explicit choice is kept."""
    return quant.replace(act_signed=False) if quant.act_signed is None else quant


def edge_quant(quant: QuantConfig, quantize_first_last: bool) -> QuantConfig:
    """Config of the first conv / last dense: float unless `quantize_first_last`."""
    return quant if quantize_first_last else QuantConfig.float()


class LayerFactories(NamedTuple):
    """What every model builds from: first conv, inner conv, classifier head, BatchNorm."""
    first_conv: ModuleDef
    conv: ModuleDef
    head: ModuleDef
    norm: ModuleDef
    conv_args: dict


def layer_factories(model: Any, train: bool, *, conv_bias: bool = False,
                    **head_args: Any) -> LayerFactories:
    """Binds a model's `conv`/`dense` classes to its quantization: the first conv and
    the head use `edge_quant` (the first conv reads signed image input); inner convs
    use `model.quant`."""
    edge = edge_quant(model.quant, model.quantize_first_last)
    conv_args = dict(use_bias=conv_bias, dtype=model.dtype, kernel_init=conv_kernel_init)
    return LayerFactories(
        first_conv=bind_layer(model.conv, signed(edge, "The first conv (image input)"), train,
                              **conv_args),
        conv=bind_layer(model.conv, model.quant, train, **conv_args),
        head=bind_layer(model.dense, edge, train, dtype=model.dtype, **head_args),
        norm=batch_norm(train, model.dtype),
        conv_args=conv_args)


def batch_norm(train: bool, dtype: Any) -> ModuleDef:
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=dtype)


def torch_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric `k // 2` padding (PyTorch's convention, so ported weights align)."""
    p = kernel_size // 2
    return ((p, p), (p, p))


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch's `AdaptiveAvgPool2d` on NHWC (bins `[floor(iH/o), ceil((i+1)H/o))`)."""
    h, w = x.shape[1:3]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:
        return nn.avg_pool(x, (h // oh, w // ow), strides=(h // oh, w // ow))
    rows = []
    for i in range(oh):
        h0, h1 = (i * h) // oh, -(-((i + 1) * h) // oh)
        cols = []
        for j in range(ow):
            w0, w1 = (j * w) // ow, -(-((j + 1) * w) // ow)
            cols.append(jnp.mean(x[:, h0:h1, w0:w1, :], axis=(1, 2)))
        rows.append(jnp.stack(cols, axis=1))
    return jnp.stack(rows, axis=1)


def check_common(module: nn.Module) -> None:
    """Validates fields every model has (called from each model's `__post_init__`)."""
    name = type(module).__name__
    nc = module.num_classes
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ValueError(f"{name}.num_classes={nc!r} must be a positive integer.")
    if not isinstance(module.quant, QuantConfig):
        raise TypeError(
            f"{name}.quant must be a dq_jax.QuantConfig (got {type(module.quant).__name__}); "
            "build one with QuantConfig(...) or QuantConfig.from_mapping(dict).")


def check_choice(module: nn.Module, field: str, allowed: Sequence[Any]) -> None:
    value = getattr(module, field)
    if value not in allowed:
        raise ValueError(
            f"{type(module).__name__}.{field}={value!r} is not supported; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}.")


def check_positive_ints(module: nn.Module, field: str) -> None:
    value = getattr(module, field)
    ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ValueError(
            f"{type(module).__name__}.{field}={value!r} must be a non-empty tuple of "
            "positive integers.")


def logits_out(x: jax.Array) -> jax.Array:
    """Logits are returned as float32 whatever the compute dtype (stable losses)."""
    return jnp.asarray(x, jnp.float32)

