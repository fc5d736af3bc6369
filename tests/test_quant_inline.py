"""`dq_jax.quant.inline`: jnp's where / clip / round without their jit wrappers, bitwise.

The quantizers and the optimizer use these in every layer (issue 27: a jitted jnp function is
a call per use in the program XLA compiles); each must return exactly what the jnp function
returns: the same dtype, shape and bits, including -0.0 / +0.0, NaN and ties.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax.quant import inline

SPECIAL = np.array([-np.inf, -2.5, -1.5, -0.5, -0.0, 0.0, 0.5, 1.5, 2.5, 3.0, np.inf, np.nan,
                    1e-45, -1e-45, 3.4e38], np.float32)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes(), (a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint32, jnp.uint8])
def test_select_is_jnp_where_bitwise(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 7, (3, 1, 5)).astype(np.float32) - 2).astype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        x = jnp.asarray(SPECIAL[:5]).astype(dtype) * jnp.ones((3, 1, 5), dtype)
    y = jnp.flip(x, -1)
    cond = jnp.asarray(rng.random((3, 4, 5)) < 0.5)
    cases = [(cond, x, y), (cond[..., :1], x, y), (cond, x[0, 0, 0], y), (cond, 1, y),
             (cond, x, 0), (jnp.asarray(True), x, y), (jnp.asarray(False), x, y[0, 0, 0]),
             (cond[0, 0], 2, 3)]
    for c, a, b in cases:
        for fn in (lambda f: f, jax.jit):  # eager and traced
            got = fn(inline.select)(c, a, b)
            _same(got, fn(jnp.where)(c, a, b))


def test_select_of_floats_keeps_signed_zeros_and_nans():
    a, b = jnp.asarray(SPECIAL), jnp.asarray(SPECIAL[::-1].copy())
    cond = jnp.arange(SPECIAL.size) % 3 == 0
    _same(jax.jit(inline.select)(cond, a, b), jnp.where(cond, a, b))
    _same(inline.select(cond, -0.0, b), jnp.where(cond, -0.0, b))  # weak Python scalar


def test_select_needs_a_boolean_condition():
    with pytest.raises(TypeError, match="must be boolean.*compare it first"):
        inline.select(jnp.arange(3), 1.0, 0.0)


def test_select_gradient_is_jnp_where_gradient():
    x = jnp.asarray([-1.0, 0.5, 2.0])
    f = lambda fn: jax.grad(lambda v: jnp.sum(fn(v > 0, v * v, jax.lax.stop_gradient(v))))(x)
    _same(f(inline.select), f(jnp.where))


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-0.0, 0.0), (0.0, -0.0), (-0.5, 0.5)])
def test_clip_is_jnp_clip_bitwise(lo, hi):
    x = jnp.asarray(SPECIAL)
    _same(jax.jit(inline.clip)(x, lo, hi), jax.jit(jnp.clip)(x, lo, hi))
    _same(inline.clip(x, lo, hi), jnp.clip(x, lo, hi))
    k = jnp.arange(-3, 6, dtype=jnp.int32)
    _same(inline.clip(k, 0, 2), jnp.clip(k, 0, 2))


def test_clip_gradient_is_jnp_clip_gradient():
    """Including the tie at a bound (e.g. post-ReLU exact zeros): jnp.clip's is 0.5 there."""
    x = jnp.asarray([-1.0, 0.0, 0.5, 1.0, 2.0])
    g = lambda fn: jax.grad(lambda v: jnp.sum(fn(v, 0.0, 1.0)))(x)
    _same(g(inline.clip), g(jnp.clip))


def test_round_half_even_is_jnp_round_bitwise():
    x = jnp.concatenate([jnp.asarray(SPECIAL), jnp.arange(-8, 8) / 2.0 + 0.0])
    _same(inline.round_half_even(x), jnp.round(x))
    _same(jax.jit(inline.round_half_even)(x), jax.jit(jnp.round)(x))
    _same(inline.round_half_even(jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])),
          jnp.asarray([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0], jnp.float32))
