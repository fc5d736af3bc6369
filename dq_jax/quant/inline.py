"""`jnp.where`, `jnp.clip` and `jnp.round` written inline with `lax` ops: bitwise the same.

The three jnp functions are jitted: every use inside a traced program becomes a call to a
computation of its own (a `func.call` in StableHLO), which XLA's first passes inline again.
A DQ W2A2 ResNet-20 train step used them about 850 times (selects over each layer's level
table, kernel and code map; float's step: about 30), so XLA's HLO passes ran over 2.8x
float's instructions and 400 computations (issue 27: compile time). These emit the same
`select` / `max`-`min` / `round` ops in place, with jnp's dtype promotion and broadcasting.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

ArrayLike = jax.typing.ArrayLike


def select(condition: jax.Array, x: ArrayLike, y: ArrayLike) -> jax.Array:
    """`jnp.where(condition, x, y)` (boolean condition) without its jit wrapper."""
    if condition.dtype != jnp.bool_:
        raise TypeError(f"select: the condition must be boolean, got {condition.dtype}; "
                        "compare it first (e.g. `codes == k`).")
    x, y = jnp.asarray(x), jnp.asarray(y)
    dtype = jnp.result_type(x, y)
    x, y = lax.convert_element_type(x, dtype), lax.convert_element_type(y, dtype)
    # jnp.broadcast_arrays is jnp.where's own broadcast (shapes and, under an Explicit mesh,
    # shardings); a scalar condition stays a scalar, as in jnp.where.
    if condition.ndim == 0:
        return lax.select(condition, *jnp.broadcast_arrays(x, y))
    return lax.select(*jnp.broadcast_arrays(condition, x, y))


def clip(x: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> jax.Array:
    """`jnp.clip(x, lo, hi)`: `minimum(hi, maximum(lo, x))` in jnp's argument order (which
    picks between -0 and +0, and propagates NaNs, as jnp.clip does)."""
    return jnp.minimum(hi, jnp.maximum(lo, x))


def round_half_even(x: jax.Array) -> jax.Array:
    """`jnp.round(x)` of a float array: to the nearest integer, ties to even."""
    return lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN)
