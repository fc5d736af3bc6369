"""Integer inference path for DQ layers (integer convs/matmuls + a small float epilogue).

Where it applies: a `QuantConv` / `QuantDense` with `weights='dq'` (integer
codes + levels; every exported model is rebuilt that way, see
`dq_jax.export`) and a *uniform* activation grid (`acts='dq'`,
`act_levels='uniform'`), in eval mode. Its input is quantized to
`x_q = alpha * a` with integer indices `a` (`0..L-1`, or `-L/2..L/2-1` when
signed), computed exactly as the float path computes them
(`activations.uniform_codes`). Then, per output channel o (group g(o)):

* thermometer form (always exact in integer arithmetic, any levels):
      W_q = l_0 + sum_{k=1}^{L-1} (l_k - l_{k-1}) [codes >= k]
  so  x_q * W_q = alpha * ( l_0 * conv(a, 1) + sum_k d_k * conv(a, T_k) ),
  with `T_k = [codes >= k]` int8 0/1 kernels. All L-1 of them are stacked
  on the output axis and run as ONE integer conv (`preferred_element_type=
  int32`), plus one small all-ones conv per feature group for `conv(a, 1)`;
  the float part is a [L]-term combination per output channel.
* affine form (levels exactly `s_g * (c + z)` for an integer zero point z,
  which is what an exported LSQ layer is and what `affine_grid` detects):
      x_q * W_q = alpha * s_g * conv(a, codes + z)
  one integer conv with int8 (int16 when the ranges need it) operands.

The integer accumulations are exact (int32; overflow needs
`K * max|a| * max|w| >= 2**31`, K = kh*kw*cin/groups - far beyond any model
here). The float epilogue rounds differently from the float path's float32
conv, so the two agree to float32 rounding (~1e-6 relative), not bit for bit.
Everything else (BatchNorm, float layers, learned activation levels,
training) runs the ordinary float path unchanged.

Use:
    plan = intpath.plan_layers(variables)          # numpy, outside jit
    with intpath.integer_inference(plan):
        logits = model.apply(variables, x, train=False)
or `intpath.apply_integer(model, variables, x, train=False)`.

Cost: the thermometer form does (L-1)x the MACs of the layer (as integer
ops); it is meant for the low bit widths (1-3 bits) it is exact for; the
affine form costs one integer conv.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax import lax

from dq_jax.layers import CODES, QUANT_STATS, QuantConv, QuantDense
from dq_jax.quant import activations as aq
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig



# --------------------------------------------------------------------------- plans

@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one layer runs on the integer path: 'thermometer' or 'affine' (zero point z), and
    the activation grid's sign when the data decided it (`act_signed=None`: the `signed`
    statistic, concrete here, so the grid bounds stay static)."""
    kind: str
    zero: int = 0
    signed: bool | None = None


def affine_grid(levels: np.ndarray) -> int | None:
    """The integer zero point z if `levels[g, c] == float32(s_g * (c + z))` exactly, else None.

    `s_g = levels[g, 1 - z]` (the level of integer weight 1) must be > 0. This
    is exactly the form `dq_jax.export` gives LSQ layers (z = -2**(b-1));
    learned DQ levels are essentially never exactly affine and then use the
    thermometer form (a nearest affine fit would NOT be exact).
    """
    levels = np.asarray(levels, np.float32)
    g, n = levels.shape
    if n < 2:
        return None
    step = levels[0, 1] - levels[0, 0]
    if not np.isfinite(step) or step <= 0:
        return None
    z0 = int(np.round(levels[0, 0] / step))
    for z in (z0, z0 - 1, z0 + 1):
        c1 = 1 - z
        if not 0 <= c1 < n:
            continue
        s = levels[:, c1]
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            continue
        grid = np.arange(n, dtype=np.float32) + np.float32(z)
        if np.array_equal(levels, (s[:, None] * grid[None, :]).astype(np.float32)):
            return z
    return None


def plan_layers(variables: Mapping) -> dict[tuple[str, ...], LayerPlan]:
    """A plan per DQ layer (module path -> LayerPlan) from concrete variables."""
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get("params", {})))
    codes = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(CODES, {}) or {}))
    stats = flax.traverse_util.flatten_dict(
        flax.core.unfreeze(variables.get(QUANT_STATS, {}) or {}))
    plan = {}
    for path, levels in params.items():
        module = path[:-1]
        if path[-1] != wq.LEVELS or module + ("kernel",) not in codes:
            continue
        z = affine_grid(np.asarray(levels))
        signed = stats.get(module + ("act_quant", "signed"))
        signed = None if signed is None else bool(np.asarray(signed))
        plan[module] = (LayerPlan("thermometer", signed=signed) if z is None
                        else LayerPlan("affine", z, signed=signed))
    return plan


# --------------------------------------------------------------------------- kernels

def int_dtype(lo: int, hi: int):
    """Smallest of int8/int16/int32 holding [lo, hi]."""
    for dt in (jnp.int8, jnp.int16):
        info = jnp.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return jnp.int32


def act_indices(x: jax.Array, alpha: jax.Array, num_levels: int,
                signed: bool) -> tuple[jax.Array, tuple[int, int]]:
    """Integer indices `a` with `x_q = alpha * a` (rounded as the float path does) + their range."""
    lo, hi = aq.grid_bounds(num_levels, signed)
    return aq.uniform_codes(x, alpha, num_levels, signed).astype(jnp.int32), (lo, hi)


def thermometer_kernels(codes: jax.Array, num_levels: int) -> jax.Array:
    """int8 `[..., out, L-1]`: entry k-1 is `[codes >= k]`, k = 1..L-1."""
    ks = jnp.arange(1, num_levels, dtype=jnp.int32)
    return (codes.astype(jnp.int32)[..., None] >= ks).astype(jnp.int8)


def _per_out(levels: jax.Array, out: int) -> jax.Array:
    """[G, L] level table -> [out, L] (G = 1 broadcast, or G = out)."""
    return jnp.broadcast_to(levels, (out, levels.shape[-1])) if levels.shape[0] == 1 else levels


def _coefficients(levels: jax.Array, out: int) -> tuple[jax.Array, jax.Array]:
    """Thermometer coefficients per output channel: l_0 [out], d [out, L-1]."""
    lv = _per_out(levels.astype(jnp.float32), out)
    return lv[:, 0], lv[:, 1:] - lv[:, :-1]


def _conv_dims(ndim: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    lhs = (0, ndim - 1) + spatial
    rhs = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
    return lax.ConvDimensionNumbers(lhs, rhs, lhs)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The arguments of `lax.conv_general_dilated` that a flax Conv uses (NHWC/HWIO)."""
    strides: tuple[int, ...]
    padding: Any
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]
    feature_group_count: int = 1


def conv_int(a: jax.Array, w: jax.Array, geom: ConvGeometry,
             feature_group_count: int | None = None) -> jax.Array:
    """Integer conv (channels last), int32 accumulation."""
    dt = jnp.promote_types(a.dtype, w.dtype)
    return lax.conv_general_dilated(
        a.astype(dt), w.astype(dt), geom.strides, geom.padding,
        lhs_dilation=geom.input_dilation, rhs_dilation=geom.kernel_dilation,
        dimension_numbers=_conv_dims(a.ndim),
        feature_group_count=feature_group_count or geom.feature_group_count,
        preferred_element_type=jnp.int32)


def _operand_dtype(a_range: tuple[int, int], w_range: tuple[int, int]):
    return int_dtype(min(a_range[0], w_range[0]), max(a_range[1], w_range[1]))


def thermometer_conv(a: jax.Array, a_range: tuple[int, int], codes: jax.Array,
                     levels: jax.Array, alpha: jax.Array, geom: ConvGeometry) -> jax.Array:
    """`conv(alpha * a, levels[codes])` via one integer conv of thermometer kernels."""
    num_levels = levels.shape[-1]
    out, groups = codes.shape[-1], geom.feature_group_count
    dt = _operand_dtype(a_range, (0, 1))
    a = a.astype(dt)
    l0, d = _coefficients(levels, out)
    ones = jnp.ones(codes.shape[:-1] + (groups,), dt)
    base = conv_int(a, ones, geom)  # [..., groups]: sum of a over each group's window
    base = jnp.repeat(base, out // groups, axis=-1).astype(jnp.float32)
    y = base * l0
    if num_levels > 1:
        t = thermometer_kernels(codes, num_levels)
        t = t.reshape(codes.shape[:-1] + (out * (num_levels - 1),))
        acc = conv_int(a, t.astype(dt), geom)
        acc = acc.reshape(acc.shape[:-1] + (out, num_levels - 1)).astype(jnp.float32)
        y = y + jnp.einsum("...ok,ok->...o", acc, d, precision=lax.Precision.HIGHEST)
    return alpha.astype(jnp.float32) * y


def affine_conv(a: jax.Array, a_range: tuple[int, int], codes: jax.Array, levels: jax.Array,
                zero: int, alpha: jax.Array, geom: ConvGeometry) -> jax.Array:
    """`conv(alpha * a, s * (codes + zero))`: one integer conv, then a per-channel scale."""
    num_levels = levels.shape[-1]
    dt = _operand_dtype(a_range, (zero, num_levels - 1 + zero))
    w = (codes.astype(jnp.int32) + zero).astype(dt)
    acc = conv_int(a.astype(dt), w, geom).astype(jnp.float32)
    s = _per_out(levels.astype(jnp.float32), codes.shape[-1])[:, 1 - zero]
    return alpha.astype(jnp.float32) * (acc * s)


def _dot_int(a: jax.Array, w: jax.Array) -> jax.Array:
    dt = jnp.promote_types(a.dtype, w.dtype)
    return lax.dot_general(a.astype(dt), w.astype(dt), (((a.ndim - 1,), (0,)), ((), ())),
                           preferred_element_type=jnp.int32)


def thermometer_dense(a: jax.Array, a_range: tuple[int, int], codes: jax.Array,
                      levels: jax.Array, alpha: jax.Array) -> jax.Array:
    """`(alpha * a) @ levels[codes]` via one integer matmul of thermometer kernels."""
    num_levels = levels.shape[-1]
    out = codes.shape[-1]
    dt = _operand_dtype(a_range, (0, 1))
    a = a.astype(dt)
    l0, d = _coefficients(levels, out)
    y = jnp.sum(a, axis=-1, dtype=jnp.int32)[..., None].astype(jnp.float32) * l0
    if num_levels > 1:
        t = thermometer_kernels(codes, num_levels).reshape(codes.shape[0], -1)
        acc = _dot_int(a, t.astype(dt))
        acc = acc.reshape(acc.shape[:-1] + (out, num_levels - 1)).astype(jnp.float32)
        y = y + jnp.einsum("...ok,ok->...o", acc, d, precision=lax.Precision.HIGHEST)
    return alpha.astype(jnp.float32) * y


def affine_dense(a: jax.Array, a_range: tuple[int, int], codes: jax.Array, levels: jax.Array,
                 zero: int, alpha: jax.Array) -> jax.Array:
    num_levels = levels.shape[-1]
    dt = _operand_dtype(a_range, (zero, num_levels - 1 + zero))
    w = (codes.astype(jnp.int32) + zero).astype(dt)
    acc = _dot_int(a.astype(dt), w).astype(jnp.float32)
    s = _per_out(levels.astype(jnp.float32), codes.shape[-1])[:, 1 - zero]
    return alpha.astype(jnp.float32) * (acc * s)


# --------------------------------------------------------------------------- layers

def _broadcast(x, n: int) -> tuple[int, ...]:
    if x is None:
        x = 1
    return (x,) * n if isinstance(x, int) else tuple(x)


def _prepare_conv_input(m: nn.Conv, a: jax.Array) -> tuple[jax.Array, ConvGeometry, Any]:
    """Mirrors flax `_Conv.__call__` geometry on the index array (zero index = zero value)."""
    ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
    n = len(ks)
    batch_shape = None
    if a.ndim - (n + 1) != 1:
        batch_shape = a.shape[:a.ndim - (n + 1)]
        a = a.reshape((-1,) + a.shape[a.ndim - (n + 1):])
    kd = _broadcast(m.kernel_dilation, n)
    pad = canonicalize_padding(m.padding, n)
    if pad in ("CIRCULAR", "REFLECT"):
        dil = [(k - 1) * d + 1 for k, d in zip(ks, kd)]
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dil] + [(0, 0)]
        a = jnp.pad(a, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[pad])
        pad = "VALID"
    elif pad == "CAUSAL":
        a = jnp.pad(a, [(0, 0), (kd[0] * (ks[0] - 1), 0), (0, 0)])
        pad = "VALID"
    geom = ConvGeometry(_broadcast(m.strides, n), pad, _broadcast(m.input_dilation, n), kd,
                        m.feature_group_count)
    return a, geom, batch_shape


def _layer_state(m: nn.Module):
    """(levels, codes, alpha) of a bound DQ layer, or None if not all present."""
    if not (m.has_variable("params", wq.LEVELS) and m.has_variable(CODES, "kernel")):
        return None
    stats = m.variables.get(QUANT_STATS, {}).get("act_quant", {})
    if "alpha" not in stats:
        return None
    return m.get_variable("params", wq.LEVELS), m.get_variable(CODES, "kernel"), stats["alpha"]


def supports(m: nn.Module) -> bool:
    """True if `m` is a layer type/config the integer path handles."""
    if not isinstance(m, (QuantConv, QuantDense)):
        return False
    cfg: QuantConfig = m.quant
    if cfg.weights != "dq" or cfg.acts != "dq" or cfg.act_levels != "uniform":
        return False
    if isinstance(m, QuantConv) and (m.mask is not None or not m.shared_weights):
        return False
    return True


def integer_layer_call(m: nn.Module, x: jax.Array, plan: LayerPlan) -> jax.Array | None:
    """The integer-path output of bound layer `m` on input `x`, or None to fall back."""
    state = _layer_state(m)
    if state is None:
        return None
    levels, codes, alpha = state
    cfg: QuantConfig = m.quant
    signed = cfg.act_signed if cfg.act_signed is not None else plan.signed
    if signed is None:  # a data-decided grid whose `signed` statistic is not in the plan
        return None
    a, a_range = act_indices(x, alpha, cfg.num_act_levels, signed)
    if isinstance(m, QuantConv):
        a, geom, batch_shape = _prepare_conv_input(m, a)
        if plan.kind == "affine":
            y = affine_conv(a, a_range, codes, levels, plan.zero, alpha, geom)
        else:
            y = thermometer_conv(a, a_range, codes, levels, alpha, geom)
        if batch_shape is not None:
            y = y.reshape(batch_shape + y.shape[1:])
    else:
        if plan.kind == "affine":
            y = affine_dense(a, a_range, codes, levels, plan.zero, alpha)
        else:
            y = thermometer_dense(a, a_range, codes, levels, alpha)
    if m.use_bias:
        y = y + m.get_variable("params", "bias").astype(jnp.float32)
    return y.astype(m.dtype or jnp.float32)


@contextlib.contextmanager
def integer_inference(plan: Mapping[tuple[str, ...], LayerPlan] | None = None):
    """Within this context, eval-mode calls of supported DQ layers use the integer path.

    `plan` (from `plan_layers`) picks affine vs thermometer per module path;
    layers not in it use the thermometer form (always exact). Calls with
    train=True, unsupported layers and layers missing variables fall back to
    the float path.
    """
    plan = dict(plan or {})
    default = LayerPlan("thermometer")

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not supports(m) or not args:
            return next_fun(*args, **kwargs)
        call_train = kwargs.get("train", args[1] if len(args) > 1 else None)
        if m.train is None and call_train is None:
            return next_fun(*args, **kwargs)  # e.g. nn.Conv's own __call__ inside a fallback
        train = m.train if m.train is not None else call_train
        if train:
            return next_fun(*args, **kwargs)
        y = integer_layer_call(m, args[0], plan.get(tuple(m.path), default))
        return next_fun(*args, **kwargs) if y is None else y

    with nn.intercept_methods(interceptor):
        yield


def apply_integer(model: nn.Module, variables: Mapping, *args: Any,
                  plan: Mapping[tuple[str, ...], LayerPlan] | None = None, **kwargs: Any):
    """`model.apply(variables, *args, **kwargs)` with the integer path (plan from variables)."""
    if plan is None:
        concrete = not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(variables))
        plan = plan_layers(variables) if concrete else {}
    with integer_inference(plan):
        return model.apply(variables, *args, **kwargs)
