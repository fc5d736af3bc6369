"""DQ-W weight quantizers (DESIGN §1.1): gather + exact level gradient, code
re-assignment (stochastic / nearest), level sorting, Lloyd init, and the
latent-STE and LSQ baselines.

References are hand-computed numbers, numpy brute force, finite differences
and invariants; nothing here is copied from the code's own output.
"""
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from dq_jax.layers import QuantConv, QuantDense, zero_perturbations
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig


def key(seed):
    """unsafe_rbg keys: threefry draws of rank-4 kernels take ~9 s each to compile on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


GRANULARITIES = ("per_layer", "per_channel")

# jitted entry points: one compile per shape instead of op-by-op dispatch
_stochastic = jax.jit(wq.stochastic_codes)
_nearest = jax.jit(wq.nearest_codes)
_lloyd = jax.jit(wq.lloyd_init, static_argnums=(1, 2, 3))


# ---------------------------------------------------------------- references

def np_gather(levels, codes):
    """W_q[..., o] = levels[g(o), codes[..., o]] (last axis = out channel), by indexing."""
    levels, codes = np.asarray(levels), np.asarray(codes).astype(np.int64)
    groups = (np.broadcast_to(np.arange(codes.shape[-1]), codes.shape) if levels.shape[0] > 1
              else np.zeros(codes.shape, np.int64))
    return levels[groups, codes]


def np_gather_loop(levels, codes):
    """The same, entry by entry (the most literal reading of the spec; small shapes)."""
    levels, codes = np.asarray(levels), np.asarray(codes)
    out = np.empty(codes.shape, levels.dtype)
    for idx in np.ndindex(codes.shape):
        g = idx[-1] if levels.shape[0] > 1 else 0
        out[idx] = levels[g, codes[idx]]
    return out


def np_scatter(cot, codes, num_groups, num_levels):
    """Brute-force dL/dlevels[g, k] = sum of cot over entries of group g with code k."""
    cot, codes = np.asarray(cot, np.float64), np.asarray(codes)
    out = np.zeros((num_groups, num_levels))
    for idx in np.ndindex(codes.shape):
        g = idx[-1] if num_groups > 1 else 0
        out[g, codes[idx]] += cot[idx]
    return out


def np_group_rows(w, num_groups):
    w = np.asarray(w)
    return w.reshape(1, -1) if num_groups == 1 else w.reshape(-1, num_groups).T


def np_nearest_error(rows, levels):
    """Squared error of projecting each row onto its (any order) level set."""
    d = (rows[:, :, None] - levels[:, None, :]) ** 2
    return float(d.min(-1).sum())


def sorted_random_levels(rng, num_groups, num_levels, scale=1.0):
    lv = np.sort(rng.normal(size=(num_groups, num_levels)) * scale, axis=-1)
    # keep levels distinct (ties would make "the" nearest/bracketing level ambiguous)
    lv += np.arange(num_levels) * 1e-3
    return lv.astype(np.float32)


# ---------------------------------------------------------------- gather_levels

def test_gather_per_layer_hand_computed():
    levels = jnp.array([[-1.0, 0.0, 0.5, 2.0]])
    codes = jnp.array([[0, 3], [2, 2], [1, 0]], jnp.uint8)
    w_q, vjp = jax.vjp(wq.gather_levels, levels, codes)
    np.testing.assert_array_equal(w_q, [[-1.0, 2.0], [0.5, 0.5], [0.0, -1.0]])
    d_levels, d_codes = vjp(jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    # code 0: entries (0,0),(2,1) -> 1+6; code 1: (2,0) -> 5; code 2: (1,0),(1,1) -> 3+4;
    # code 3: (0,1) -> 2
    np.testing.assert_array_equal(d_levels, [[7.0, 5.0, 7.0, 2.0]])
    assert d_codes.dtype == jax.dtypes.float0
    assert d_codes.shape == codes.shape


def test_gather_per_channel_hand_computed():
    # kernel of shape (3, 2): 2 output channels; column o uses level set o
    levels = jnp.array([[-1.0, 0.0, 1.0, 2.0], [10.0, 20.0, 30.0, 40.0]])
    codes = jnp.array([[0, 3], [2, 2], [1, 0]], jnp.uint8)
    w_q, vjp = jax.vjp(wq.gather_levels, levels, codes)
    np.testing.assert_array_equal(w_q, [[-1.0, 40.0], [1.0, 30.0], [0.0, 10.0]])
    d_levels, d_codes = vjp(jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    # group 0 (column 0): codes 0,2,1 with cotangents 1,3,5
    # group 1 (column 1): codes 3,2,0 with cotangents 2,4,6
    np.testing.assert_array_equal(d_levels, [[1.0, 5.0, 3.0, 0.0], [6.0, 0.0, 4.0, 2.0]])
    assert d_codes.dtype == jax.dtypes.float0


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gather_hwio_matches_brute_force(np_rng, granularity):
    shape, num_levels = (3, 3, 2, 5), 8
    ng = wq.num_groups(shape, granularity)
    levels = sorted_random_levels(np_rng, ng, num_levels)
    codes = np_rng.integers(0, num_levels, shape).astype(np.uint8)
    cot = np_rng.normal(size=shape).astype(np.float32)
    w_q, vjp = jax.vjp(wq.gather_levels, jnp.asarray(levels), jnp.asarray(codes))
    np.testing.assert_array_equal(w_q, np_gather_loop(levels, codes))
    np.testing.assert_array_equal(np_gather(levels, codes), np_gather_loop(levels, codes))
    d_levels, d_codes = vjp(jnp.asarray(cot))
    np.testing.assert_allclose(d_levels, np_scatter(cot, codes, ng, num_levels),
                               rtol=1e-5, atol=1e-5)
    assert d_levels.shape == levels.shape and d_levels.dtype == levels.dtype
    assert d_codes.dtype == jax.dtypes.float0 and d_codes.shape == shape


def _primitives(fn, *args):
    """Names of every primitive in fn's jaxpr, sub-jaxprs (custom_vjp, pjit) included."""
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_levels", [2, 4, 16, 32])
def test_lookup_and_level_gradient_are_selects_up_to_16_levels_gather_scatter_above(
        np_rng, num_levels, granularity):
    """<= 16 levels: no gather, no scatter, no one-hot matmul; > 16: the gather/scatter path."""
    shape = (3, 3, 2, 4)
    levels = jnp.asarray(sorted_random_levels(np_rng, wq.num_groups(shape, granularity),
                                              num_levels))
    codes = jnp.asarray(np_rng.integers(0, num_levels, shape).astype(np.uint8))
    r = jnp.asarray(np_rng.normal(size=shape).astype(np.float32))
    prims = _primitives(jax.value_and_grad(lambda l: jnp.sum(wq.gather_levels(l, codes) * r)),
                        levels)
    assert "dot_general" not in prims, "level gradient should not be a one-hot matmul"
    big = {p for p in prims if "gather" in p or "scatter" in p}
    if num_levels <= wq.SELECT_MAX_LEVELS:
        assert not big, big
        assert {"select_n", "reduce_sum"} <= prims, prims
    else:
        assert {"gather", "scatter-add"} <= big, prims


def _old_gather(levels, codes):
    """The general path (what every level count used before the select path)."""
    ng, nl = levels.shape
    return levels.reshape(-1)[wq._flat_index(codes, ng, nl)]


def _old_level_grad(levels, codes, cot):
    ng, nl = levels.shape
    idx = wq._flat_index(codes, ng, nl)
    return jax.ops.segment_sum(cot.reshape(-1), idx.reshape(-1), ng * nl).reshape(ng, nl)


def _bits(a):
    a = np.asarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_levels", [2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_select_lookup_is_bitwise_the_gather(np_rng, granularity, num_levels, dtype):
    """A select returns the table's float unchanged: -0.0, denormals, inf and NaN included."""
    shape = (3, 3, 5, 6)
    ng = wq.num_groups(shape, granularity)
    levels = np_rng.normal(size=(ng, num_levels)).astype(np.float32)
    specials = np.float32([-0.0, 1e-45, -np.inf, np.nan, 3.0e38, 0.0])
    levels.reshape(-1)[:min(levels.size, specials.size)] = specials[:levels.size]
    levels = jnp.asarray(levels, dtype)
    codes = jnp.asarray(np_rng.integers(0, num_levels, shape).astype(np.uint8))
    new, old = jax.jit(lambda l, c: (wq.gather_levels(l, c), _old_gather(l, c)))(levels, codes)
    assert new.dtype == old.dtype == dtype
    np.testing.assert_array_equal(_bits(new), _bits(old))
    np.testing.assert_array_equal(_bits(new), _bits(np_gather_loop(np.asarray(levels), codes)))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_levels", [4, 16])
def test_level_gradient_bitwise_equal_to_segment_sum_on_integer_cotangents(
        np_rng, granularity, num_levels):
    """Integer cotangents: every partial sum is an integer < 2**24, exact in float32 in any
    order, so the masked sums and the segment sum must agree bit for bit (and with numpy)."""
    shape = (3, 3, 64, 32)
    ng = wq.num_groups(shape, granularity)
    levels = jnp.asarray(sorted_random_levels(np_rng, ng, num_levels))
    codes = jnp.asarray(np_rng.integers(0, num_levels, shape).astype(np.uint8))
    cot = jnp.asarray(np_rng.integers(-8, 9, shape).astype(np.float32))
    new, old = jax.jit(lambda l, c, g: (jax.vjp(wq.gather_levels, l, c)[1](g)[0],
                                        _old_level_grad(l, c, g)))(levels, codes, cot)
    np.testing.assert_array_equal(_bits(new), _bits(old))
    np.testing.assert_array_equal(new, np_scatter(cot, codes, ng, num_levels))


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_levels", [4, 16])
def test_level_gradient_matches_segment_sum_within_float32_summation_bound(
        np_rng, granularity, num_levels):
    """Float cotangents: the masked reductions sum in XLA's reduce order, the segment sum in
    scatter order. Any order of summing n float32 terms is within gamma_(n-1) * sum|g| of the
    exact sum (gamma_m = m u / (1 - m u), u = 2**-24; adding the masked-out zeros is exact),
    so each result is checked against the float64 sum with that bound, and the two against
    each other with twice it. The bound is a worst case; the observed gap is far smaller."""
    shape = (3, 3, 64, 32)
    ng = wq.num_groups(shape, granularity)
    levels = jnp.asarray(sorted_random_levels(np_rng, ng, num_levels))
    codes_np = np_rng.integers(0, num_levels, shape).astype(np.uint8)
    cot_np = np_rng.normal(size=shape).astype(np.float32) * np.float32(1e-3)
    new, old = jax.jit(lambda l, c, g: (jax.vjp(wq.gather_levels, l, c)[1](g)[0],
                                        _old_level_grad(l, c, g)))(
        levels, jnp.asarray(codes_np), jnp.asarray(cot_np))
    exact = np_scatter(cot_np, codes_np, ng, num_levels)             # float64
    abs_sum = np_scatter(np.abs(cot_np), codes_np, ng, num_levels)
    count = np_scatter(np.ones(shape), codes_np, ng, num_levels)
    u = 2.0 ** -24
    gamma = (count - 1) * u / (1 - (count - 1) * u)
    bound = gamma * abs_sum
    for got in (new, old):
        assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= bound)
    assert np.all(np.abs(np.asarray(new, np.float64) - np.asarray(old, np.float64)) <= 2 * bound)
    assert np.all(count > 1) and np.abs(exact).max() > 0  # not vacuous


def test_level_gradient_matches_finite_differences_through_quant_conv(np_rng):
    # per channel (3 groups x 4 levels), with the input quantizer in the path (eval mode)
    cfg = QuantConfig(weights="dq", weight_bits=2, granularity="per_channel", acts="dq")
    layer = QuantConv(3, (3, 3), strides=(2, 1), padding="SAME", quant=cfg)
    x = np.maximum(np_rng.normal(size=(2, 5, 5, 2)), 0.0).astype(np.float32)
    variables = jax.jit(partial(layer.init, train=False))(key(0), jnp.asarray(x))
    r = np_rng.normal(size=(2, 3, 5, 3))

    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"])
        rest = {k: v for k, v in variables.items() if k not in ("params", "perturbations")}
        x64, r64 = jnp.asarray(x, jnp.float64), jnp.asarray(r, jnp.float64)

        @jax.jit
        def loss(levels):
            y = layer.apply({"params": {**params, "kernel_levels": levels}, **rest}, x64,
                            train=False)
            return jnp.sum(jnp.sin(y) * r64)  # non-linear in the levels

        levels0 = params["kernel_levels"]
        grad = jax.grad(loss)(levels0)
        assert grad.dtype == levels0.dtype  # a float64 primal gets a float64 cotangent
        grad = np.asarray(grad)
        h = 1e-5
        fd = np.zeros(levels0.shape)
        for idx in np.ndindex(levels0.shape):
            e = np.zeros(levels0.shape)
            e[idx] = h
            fd[idx] = (float(loss(levels0 + e)) - float(loss(levels0 - e))) / (2 * h)
    # float64 central differences are accurate to ~1e-9 here (the tolerance alone would
    # also accept a float32 cotangent: hence the dtype check above)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)
    assert np.abs(fd).max() > 1e-2  # the check is not vacuous


def test_perturbation_gradient_equals_conv_kernel_gradient(np_rng):
    """Grad w.r.t. the `perturbations` collection is dL/dW_q of an nn.Conv with kernel W_q."""
    kw = dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding="SAME",
              feature_group_count=2)
    cfg = QuantConfig(weights="dq", weight_bits=2, granularity="per_channel", acts="float")
    qlayer = QuantConv(quant=cfg, **kw)
    x = jnp.asarray(np_rng.normal(size=(2, 6, 6, 4)).astype(np.float32))
    v = jax.jit(qlayer.init)(key(1), x)
    r = jnp.asarray(np_rng.normal(size=(2, 3, 3, 4)).astype(np.float32))
    w_q = wq.gather_levels(v["params"]["kernel_levels"], v["codes"]["kernel"])

    def qloss(pert):
        y = qlayer.apply({"params": v["params"], "codes": v["codes"], "perturbations": pert}, x)
        return jnp.sum(jnp.tanh(y) * r)

    def ref_loss(kernel):
        y = nn.Conv(**kw).apply({"params": {"kernel": kernel, "bias": v["params"]["bias"]}}, x)
        return jnp.sum(jnp.tanh(y) * r)

    def lvl_loss(levels):  # (zero perturbations: a DQ layer refuses to be differentiated
        # without them, which would leave its codes frozen in training)
        y = qlayer.apply({"params": {**v["params"], "kernel_levels": levels},
                          "codes": v["codes"],
                          "perturbations": zero_perturbations(v["codes"])}, x)
        return jnp.sum(jnp.tanh(y) * r)

    g_pert, g_ref, g_lv = jax.jit(lambda p, k, lv: (
        jax.grad(qloss)(p)["kernel"], jax.grad(ref_loss)(k), jax.grad(lvl_loss)(lv)))(
            zero_perturbations(v["codes"]), w_q, v["params"]["kernel_levels"])
    assert g_pert.shape == w_q.shape
    np.testing.assert_allclose(g_pert, g_ref, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g_ref).max()) > 0
    # and the level gradient is exactly the per-(group, code) sum of that same dL/dW_q
    np.testing.assert_allclose(g_lv, np_scatter(g_ref, v["codes"]["kernel"], *g_lv.shape),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- stochastic_codes

def _binomial_tol(levels_row, targets, n):
    """5 sigma of the mean of n draws: std of one draw is gap*sqrt(p(1-p))."""
    lv = np.asarray(levels_row, np.float64)
    k = np.clip(np.searchsorted(lv, targets, side="right") - 1, 0, len(lv) - 2)
    gap = lv[k + 1] - lv[k]
    p = np.clip((targets - lv[k]) / gap, 0, 1)
    return 5 * gap * np.sqrt(p * (1 - p) / n) + 1e-5


def test_stochastic_codes_unbiased_per_layer():
    levels = np.array([[-1.0, -0.2, 0.5, 2.0]], np.float32)
    targets = np.array([-0.9, -0.6, -0.2, 0.0, 0.3, 0.49, 1.0, 1.9], np.float32)
    n = 20000
    t = jnp.broadcast_to(jnp.asarray(targets), (n, len(targets)))
    codes = _stochastic(jnp.asarray(levels), t, key(0))
    assert codes.dtype == jnp.uint8
    mean = np_gather(levels, np.asarray(codes)).astype(np.float64).mean(0)
    tol = _binomial_tol(levels[0], targets, n)
    assert np.all(np.abs(mean - targets) <= tol), (mean, targets, tol)
    # a target exactly on a level never moves
    assert np.all(np.asarray(codes)[:, 2] == 1)
    # only the two bracketing levels are ever used: 0.3 lies in [-0.2, 0.5)
    assert set(np.unique(np.asarray(codes)[:, 4])) == {1, 2}


def test_stochastic_codes_unbiased_per_channel():
    levels = np.array([[0.0, 1.0, 2.0, 3.0], [-5.0, -1.0, 0.0, 10.0]], np.float32)
    targets = np.array([[1.3, 4.0], [0.1, -4.0], [2.5, 9.0]], np.float32)  # [T, G]
    n = 20000
    t = jnp.broadcast_to(jnp.asarray(targets), (n,) + targets.shape)
    codes = np.asarray(_stochastic(jnp.asarray(levels), t, key(1)))
    mean = np_gather(levels, codes).astype(np.float64).mean(0)
    for g in range(2):
        tol = _binomial_tol(levels[g], targets[:, g], n)
        assert np.all(np.abs(mean[:, g] - targets[:, g]) <= tol), (g, mean[:, g], tol)


def test_stochastic_codes_probability_threshold_hand_computed():
    # levels 0, 1, 3; target 2.5 lies in [1, 3): P(up) = (2.5 - 1) / 2 = 0.75
    levels = jnp.array([[0.0, 1.0, 3.0]])
    t = jnp.full((4,), 2.5)
    u = jnp.array([0.0, 0.74, 0.76, 0.999])
    codes = _stochastic(levels, t, key(0), u)
    np.testing.assert_array_equal(codes, [2, 2, 1, 1])


def test_quantize_cell_residual_hand_computed():
    """Levels -1, 0, 2 (gaps 1 and 2): z = r / gap-on-its-side, clipped to [-1/2, 1/2],
    rounded to the sub-interval centres (j + 1/2) / 2**b by j = floor(z 2**b - 1/2 + U), or
    past the outermost one to the next cell's first centre (z_q = 3/4 at 1 bit: the code will
    flip), mapped back with the gap on the result's side. Every value dyadic."""
    levels = jnp.float32([[-1.0, 0.0, 2.0]])
    codes = jnp.uint8([1, 1, 1, 1, 1, 1, 0, 2, 2])
    r = jnp.float32([0.5, 1.0, 1.0, 0.0, 0.0, -0.25, -3.0, 0.75, 0.75])
    u = jnp.float32([0.5, 0.25, 0.75, 0.25, 0.75, 0.5, 0.5, 0.125, 0.875])
    # 1 bit, centres z = -1/4 (r = -0.25 below level 0) and +1/4 (r = +0.5 above it):
    # z 2 - 1/2 = 0, 0.5, 0.5, -0.5, -0.5, -1, -1.5 (end level 0: inner gap 1), 0.25 (top: 2)
    got = wq.quantize_cell_residual(levels, codes, r, 1, uniform=u)
    np.testing.assert_array_equal(got, [0.5, 0.5, 1.5, -0.25, 0.5, -0.25, -0.25, 0.5, 1.5])
    # 2 bits, centres z = -3/8, -1/8, 1/8, 3/8: z 4 - 1/2 = 0.5, 1.5, 1.5, -0.5, -0.5, -1.5, -2.5, 1
    got = wq.quantize_cell_residual(levels, codes, r, 2, uniform=u)
    np.testing.assert_array_equal(got, [0.75, 0.75, 1.25, -0.125, 0.25, -0.125, -0.375, 0.75,
                                        0.75])
    # tied levels 0, 0: an offset toward a zero gap counts as z = 0; a zero gap on the
    # result's side keeps no offset
    tied = wq.quantize_cell_residual(jnp.float32([[0.0, 0.0, 1.0]]), jnp.uint8([1, 1, 1, 0]),
                                     jnp.float32([0.25, -0.3, -0.3, 0.3]), 1,
                                     uniform=jnp.float32([0.75, 0.9, 0.1, 0.9]))
    np.testing.assert_array_equal(tied, [0.25, 0.25, 0.0, 0.0])
    with pytest.raises(ValueError, match="bits=0 must be >= 1"):
        wq.quantize_cell_residual(levels, codes, r, 0, uniform=u)


def test_quantize_cell_residual_is_unbiased_and_keeps_grid_points():
    """Equal gaps (levels -1, 0, 1): over evenly spaced draws U = (i + 1/2)/8 the mean of the
    rounded offset is the offset (all values dyadic: exact) over the whole cell, whose edges
    round to the outermost centre or past it to the next cell's first, and an offset on the
    grid of centres is returned unchanged for every U."""
    levels = jnp.float32([[-1.0, 0.0, 1.0]])
    u = (jnp.arange(8, dtype=jnp.float32) + 0.5) / 8
    for bits in (1, 2, 3):
        n = 2 ** bits
        inner = np.float32([-0.5, -0.5 + 0.5 / n, -0.0625, 0.0, 0.1875, 0.5 - 0.5 / n, 0.5])
        centres = ((np.arange(n) + 0.5) / n - 0.5).astype(np.float32)
        beyond = np.float32([-0.5 - 0.5 / n, 0.5 + 0.5 / n])
        for r, check in ((inner, "mean"), (centres, "same")):
            shape = (8, r.size)
            got = np.asarray(wq.quantize_cell_residual(
                levels, jnp.ones(shape, jnp.uint8), jnp.broadcast_to(r, shape), bits,
                uniform=jnp.broadcast_to(u[:, None], shape)))
            assert np.all(np.isin(got, np.concatenate([centres, beyond]))), (bits, got)
            if check == "mean":
                np.testing.assert_array_equal(got.mean(0), r)
            else:
                np.testing.assert_array_equal(got, np.broadcast_to(r, shape))


def test_stochastic_codes_clip_outside_and_stay_in_range(np_rng):
    levels = jnp.asarray(sorted_random_levels(np_rng, 1, 8))
    lo, hi = float(levels[0, 0]), float(levels[0, -1])
    t = jnp.asarray(np.concatenate([np.full(500, lo - 50.0), np.full(500, lo - 1e-3),
                                    np.full(500, lo), np.full(500, hi),
                                    np.full(500, hi + 1e-3), np.full(500, hi + 50.0)]))
    codes = np.asarray(_stochastic(levels, t, key(3))).reshape(6, 500)
    np.testing.assert_array_equal(codes[:3], 0)
    np.testing.assert_array_equal(codes[3:], 7)
    # random targets over a wide range (3 channels, L = 2 and 256): never leaves [0, L)
    for bits in (1, 8):
        num_levels = 2 ** bits
        lv = jnp.asarray(sorted_random_levels(np_rng, 3, num_levels))
        tt = jnp.asarray(np_rng.normal(size=(200, 3)).astype(np.float32) * 10)
        c = np.asarray(_stochastic(lv, tt, key(bits)))
        assert c.dtype == np.uint8 and c.min() >= 0 and c.max() < num_levels
        assert c.min() == 0 and c.max() == num_levels - 1  # both ends are reached (clipped)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_stochastic_codes_bracket_and_unbiased_binary_search_path(np_rng, granularity):
    """L=64 > the compare-all threshold: the searchsorted path."""
    num_levels, ng = 64, (1 if granularity == "per_layer" else 2)
    levels = sorted_random_levels(np_rng, ng, num_levels)
    targets = np.stack([np.linspace(levels[g, 0] + 1e-3, levels[g, -1] - 1e-3, 7)
                        for g in range(ng)], -1).astype(np.float32)  # [7, ng]
    n = 10000
    t = np.broadcast_to(targets, (n,) + targets.shape)
    codes = np.asarray(_stochastic(jnp.asarray(levels), jnp.asarray(t), key(4)))
    vals = np_gather(levels, codes).astype(np.float64)
    for g in range(ng):
        lv = levels[g].astype(np.float64)
        k = np.searchsorted(lv, targets[:, g], side="right") - 1
        c = codes[..., g]
        assert np.all((c == k) | (c == k + 1)), "code outside the bracketing pair"
        tol = _binomial_tol(lv, targets[:, g], n)
        assert np.all(np.abs(vals[..., g].mean(0) - targets[:, g]) <= tol)


def _old_stochastic_codes(levels, target, uniform):
    """stochastic_codes with the general gather lookup (the implementation before selects)."""
    num_levels = levels.shape[-1]
    k = jnp.clip(wq.count_levels_below(levels, target, inclusive=True) - 1, 0, num_levels - 2)
    lo, hi = _old_gather(levels, k), _old_gather(levels, k + 1)
    gap = hi - lo
    p = jnp.clip(jnp.where(gap > 0, (target - lo) / jnp.where(gap > 0, gap, 1.0), 0.0), 0.0, 1.0)
    return (k + (uniform < p).astype(jnp.int32)).astype(wq.CODE_DTYPE)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_levels", [2, 4, 16])
def test_stochastic_codes_equal_the_gather_implementation(np_rng, granularity, num_levels):
    """Same lo/hi floats (selects return them bitwise), so the same codes for the same draws."""
    shape = (3, 3, 16, 8)
    ng = wq.num_groups(shape, granularity)
    levels = jnp.asarray(sorted_random_levels(np_rng, ng, num_levels))
    target = jnp.asarray(np_rng.normal(size=shape).astype(np.float32) * 1.5)
    uniform = jnp.asarray(np_rng.uniform(size=shape).astype(np.float32))
    new, old = jax.jit(lambda l, t, u: (wq.stochastic_codes(l, t, None, u),
                                        _old_stochastic_codes(l, t, u)))(levels, target, uniform)
    np.testing.assert_array_equal(new, old)
    prims = _primitives(lambda l, t, u: wq.stochastic_codes(l, t, None, u), levels, target,
                        uniform)
    assert not {p for p in prims if "gather" in p or "scatter" in p}, prims


def test_reassign_codes_rejects_unknown_rounding():
    with pytest.raises(ValueError, match=r"rounding='floor'.*'stochastic', 'nearest'"):
        wq.reassign_codes(jnp.zeros((1, 2)), jnp.zeros((3,)), key(0), "floor")


# ---------------------------------------------------------------- nearest_codes

# L-1 <= 32 mid-points: compare-all; above: binary search (L = 64, 256)
@pytest.mark.parametrize("bits,granularity", [(1, "per_layer"), (5, "per_layer"),
                                               (6, "per_layer"), (8, "per_layer"),
                                               (2, "per_channel"), (8, "per_channel")])
def test_nearest_codes_match_brute_force(np_rng, granularity, bits):
    num_levels = 2 ** bits
    shape = (300, 3) if granularity == "per_channel" else (10, 6, 5)
    ng = wq.num_groups(shape, granularity)
    levels = sorted_random_levels(np_rng, ng, num_levels)
    w = (np_rng.normal(size=shape) * 1.5).astype(np.float32)  # some outside the range
    codes = np.asarray(_nearest(jnp.asarray(levels), jnp.asarray(w)))
    assert codes.dtype == np.uint8 and codes.shape == shape
    table = levels[np.arange(shape[-1]) if ng > 1 else np.zeros(shape[-1], int)]  # [O, L]
    dist = np.abs(w.astype(np.float64)[..., None] - table.astype(np.float64))
    brute = dist.argmin(-1)
    d_code = np.take_along_axis(dist, codes[..., None].astype(np.int64), -1)[..., 0]
    mismatch = codes != brute
    # a mismatch is only allowed on an exact (float32-rounded) midpoint tie
    assert np.all(d_code[mismatch] - dist.min(-1)[mismatch] <= 1e-6), \
        f"{mismatch.sum()} entries not at their nearest level"
    assert mismatch.mean() < 1e-3


def test_nearest_codes_hand_computed_and_ties_go_down():
    levels = jnp.array([[0.0, 1.0, 3.0, 4.0]])
    w = jnp.array([-7.0, 0.49, 0.5, 0.51, 1.99, 2.0, 2.01, 3.6, 100.0])
    np.testing.assert_array_equal(_nearest(levels, w), [0, 0, 0, 1, 1, 1, 2, 3, 3])


# ---------------------------------------------------------------- sort_levels

@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sort_levels_keeps_gather_unchanged(np_rng, granularity):
    shape, num_levels = (3, 3, 2, 6), 8
    ng = wq.num_groups(shape, granularity)
    levels = np_rng.normal(size=(ng, num_levels)).astype(np.float32)  # unsorted
    assert not np.all(np.diff(levels, axis=-1) > 0)
    codes = np_rng.integers(0, num_levels, shape).astype(np.uint8)
    new_levels, new_codes = jax.jit(wq.sort_levels)(jnp.asarray(levels), jnp.asarray(codes))
    np.testing.assert_array_equal(new_levels, np.sort(levels, axis=-1))
    assert new_codes.dtype == np.uint8 and new_codes.shape == shape
    np.testing.assert_array_equal(np_gather(np.asarray(new_levels), np.asarray(new_codes)),
                                  np_gather(levels, codes))
    only_levels, none = wq.sort_levels(jnp.asarray(levels))
    assert none is None
    np.testing.assert_array_equal(only_levels, np.sort(levels, axis=-1))


def _old_sort_levels(levels, codes):
    """argsort + take_along_axis + gather remap (the implementation before the select path)."""
    ng, nl = levels.shape
    perm = jnp.argsort(levels, axis=-1)
    inverse = jnp.argsort(perm, axis=-1).astype(jnp.int32)
    new_codes = inverse.reshape(-1)[wq._flat_index(codes, ng, nl)]
    return jnp.take_along_axis(levels, perm, axis=-1), new_codes.astype(codes.dtype)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("num_levels", [4, 16, 32])
def test_sort_levels_bitwise_equal_to_argsort_and_gather(np_rng, granularity, num_levels):
    """Same sorted levels (bits) and remapped codes as argsort + gathers, ties included
    (a tie keeps the earlier slot first in both: the same stable sort)."""
    shape = (3, 3, 4, 8)
    ng = wq.num_groups(shape, granularity)
    levels = np_rng.normal(size=(ng, num_levels)).astype(np.float32)
    levels[:, 1] = levels[:, 2]   # ties
    levels[:, 0] = -0.0
    levels[:, 3] = 0.0            # -0.0 and 0.0 compare equal
    codes = jnp.asarray(np_rng.integers(0, num_levels, shape).astype(np.uint8))
    (nl, nc), (ol, oc) = jax.jit(lambda l, c: (wq.sort_levels(l, c), _old_sort_levels(l, c)))(
        jnp.asarray(levels), codes)
    np.testing.assert_array_equal(_bits(nl), _bits(ol))
    assert nc.dtype == oc.dtype == np.uint8
    np.testing.assert_array_equal(nc, oc)
    _, _, perm = wq.sort_levels(jnp.asarray(levels), codes, return_perm=True)
    np.testing.assert_array_equal(perm, jnp.argsort(jnp.asarray(levels), axis=-1))


@pytest.mark.parametrize("num_levels", [4, 16, 32])
def test_permute_levels_and_code_counts_equal_take_along_axis_and_bincount(np_rng, num_levels):
    stats = jnp.asarray(np_rng.normal(size=(5, num_levels)).astype(np.float32))
    perm = jnp.asarray(np.argsort(np_rng.normal(size=(5, num_levels)), axis=-1).astype(np.int32))
    np.testing.assert_array_equal(_bits(jax.jit(wq.permute_levels)(stats, perm)),
                                  _bits(jnp.take_along_axis(stats, perm, axis=-1)))
    codes = np_rng.integers(0, num_levels, (3, 3, 4, 8)).astype(np.uint8)
    got = jax.jit(wq.code_counts, static_argnums=1)(jnp.asarray(codes), num_levels)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, np.bincount(codes.reshape(-1), minlength=num_levels))
    prims = _primitives(lambda s, p, c: (wq.permute_levels(s, p), wq.code_counts(c, num_levels)),
                        stats, perm, jnp.asarray(codes))
    big = {p for p in prims if "gather" in p or "scatter" in p}
    assert (not big) if num_levels <= wq.SELECT_MAX_LEVELS else big, prims


# ---------------------------------------------------------------- lloyd_init

def _quantile_start(rows, num_levels):
    qs = (np.arange(num_levels) + 0.5) / num_levels
    return np.quantile(rows, qs, axis=1).T


@pytest.mark.parametrize("shape, num_groups_", [((3, 3, 16, 16), 1), ((3, 3, 16, 16), 16),
                                                ((5, 5, 7, 11), 11), ((2, 1), 1), ((1, 3), 3)])
def test_quantile_levels_equal_jnp_quantile_bitwise(np_rng, shape, num_groups_):
    """Lloyd's quantile start is `jnp.quantile(..., 'linear')` bitwise (the same float32
    operations, positions computed in NumPy, values read from sorted order keys); a row
    holding a NaN (either sign) gives NaNs, as jnp.quantile's does. Heavy tails, so the
    interpolation weights matter; signed zeros and repeats."""
    w = np_rng.standard_t(3, size=shape).astype(np.float32)
    if w.size > 5:
        w.reshape(-1)[:5] = [0.5, 0.0, 0.0, w.reshape(-1)[5], w.reshape(-1)[5]]  # repeats
    rows = np_group_rows(w, num_groups_).copy()
    if rows.shape[0] > 1:
        rows[0, 0], rows[-1, -1] = np.nan, -np.nan
    for num_levels in (2, 4, 16):
        qs = (jnp.arange(num_levels, dtype=jnp.float32) + 0.5) / num_levels
        want = jax.jit(lambda r: jnp.quantile(r, qs, axis=1).T)(rows)
        got = jax.jit(wq.quantile_levels, static_argnums=1)(rows, num_levels)
        assert got.shape == (rows.shape[0], num_levels) and got.dtype == jnp.float32
        got, want = np.asarray(got), np.asarray(want)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))   # NaN payloads aside
        np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(got)],
                                      want.view(np.uint32)[~np.isnan(want)])
        if rows.shape[0] > 1:
            assert np.all(np.isnan(got[0])) and np.all(np.isnan(got[-1]))
            assert not np.any(np.isnan(got[1:-1]))


@pytest.mark.parametrize("sizes, copies", [([(1, 1)], 1), ([(3, 5)], 2), ([(1, 256)], 2),
                                           ([(2, 257), (1, 1000)], 1),
                                           ([(1, 4097), (3, 64), (2, 1)], 2)])
def test_lloyd_rows_cell_edges_and_sums_equal_numpy(np_rng, sizes, copies):
    """Lloyd's sorted-row structure over one or several kernels' rows ([G, n] each, batched
    as `lloyd_init_many` does): per threshold, the count of values <= it (ties counted: they
    go to the lower level) and the sums between consecutive counts, against NumPy's
    searchsorted and range sums. Integer values, so every sum is exact in any order and the
    comparison is bitwise; rows on both sides of a block edge (B = 256: n = B, B + 1, 4097),
    rows of different lengths (padding), thresholds below all values, above all, and equal
    to values."""
    rows = [np_rng.integers(-50, 50, size=size).astype(np.float32) for size in sizes]
    keys = [jax.lax.sort(wq._order_key(jnp.asarray(r)), dimension=1) for r in rows]
    src = [row for r in rows for row in np.sort(r, axis=1)] * copies
    mids = []
    for r in src:
        picks = r[np_rng.integers(0, len(r), size=3)]                   # exact ties
        mids.append(np.sort(np.concatenate([[-99.0], picks + 0.5 * (picks % 2), [99.0]])))
    mids = np.float32(mids)                                             # [R, K]

    def run(keys, mids):
        data = wq._LloydRows(keys, copies=copies)
        q, counts, head_sum = data.edges(mids)
        return counts, data.cell_sums(q, head_sum)

    counts, sums = jax.jit(run)(keys, jnp.asarray(mids))
    want_counts = np.stack([np.searchsorted(r, m, side="right") for r, m in zip(src, mids)])
    np.testing.assert_array_equal(np.asarray(counts), want_counts)
    want_sums = np.array([[r[a:b].sum() for a, b in zip(e[:-1], e[1:])] for r, e in zip(
        src, [np.concatenate([[0], c, [len(r)]]) for r, c in zip(src, want_counts)])],
        np.float32)
    np.testing.assert_array_equal(np.asarray(sums), want_sums)


def test_lloyd_init_many_equals_lloyd_init_bitwise(np_rng):
    """What a model's deferred init runs (one Lloyd loop per level count for all layers)
    gives each kernel `lloyd_init`'s levels and codes bitwise: kernels of different sizes,
    level counts, granularities and iteration caps, one holding a NaN (its loop runs to the
    cap; the other rows must stay put). Every float sum in the loop is a fixed pairwise
    tree, so batching (longer, zero-padded rows) cannot regroup it."""
    fits = [(np_rng.standard_t(3, size=(3, 3, 16, 32)), 4, "per_layer", 200),
            (np_rng.normal(size=(3, 3, 8, 16)), 4, "per_channel", 200),
            (np_rng.laplace(size=(1, 1, 8, 8)), 4, "per_layer", 3),
            (np_rng.normal(size=(5, 5, 4, 8)), 16, "per_channel", 200),
            (np_rng.standard_t(3, size=(40, 10)), 16, "per_layer", 200),
            (np_rng.normal(size=(3, 3, 4, 4)), 4, "per_layer", 200)]
    fits = [(w.astype(np.float32), *rest) for w, *rest in fits]
    fits[5][0][0, 0, 0, 0] = np.nan
    many = jax.jit(lambda ws: wq.lloyd_init_many(
        [(w, *rest) for w, (_, *rest) in zip(ws, fits)]))([w for w, *_ in fits])
    for (w, *rest), (levels, codes) in zip(fits, many):
        want_levels, want_codes = _lloyd(jnp.asarray(w), *rest)
        np.testing.assert_array_equal(np.asarray(levels), np.asarray(want_levels))
        np.testing.assert_array_equal(np.asarray(codes), np.asarray(want_codes))
    assert np.all(np.isnan(many[5][0])) and not np.any(np.isnan(many[4][0]))


def test_sorted_order_keys_read_back_as_lax_sort_bitwise(np_rng):
    """Lloyd's quantile start sorts uint32 order keys instead of floats (6x faster on
    XLA:CPU); read back, they are `lax.sort`'s values — bitwise but for a zero's sign (the
    sort keeps -0 and +0 in input order, the keys read back +0) and a NaN's payload (both
    sort NaNs last): heavy tails, repeats, signed zeros, +-inf, NaNs of both signs,
    one-element rows. (Denormals are left out: XLA:CPU's float comparator may flush them.)"""
    w = np_rng.standard_t(2, size=(6, 257)).astype(np.float32)
    w[1, :100] = w[1, 0]                                          # a long run of repeats
    w[2, :4] = [0.0, -0.0, np.inf, -np.inf]
    w[3, :3] = [np.nan, -np.nan, 0.0]
    w[4] = np.round(w[4])                                         # few distinct values
    for x in (w, np.float32([[3.5], [-0.0]])):
        want = np.asarray(jax.lax.sort(jnp.asarray(x), dimension=1))
        got = np.asarray(jax.jit(lambda v: wq._from_order_key(
            jax.lax.sort(wq._order_key(v), dimension=1)))(x))
        np.testing.assert_array_equal(got, want)                  # values; NaN == NaN, -0 == 0
        plain = (want != 0) & ~np.isnan(want)
        np.testing.assert_array_equal(got.view(np.uint32)[plain], want.view(np.uint32)[plain])
        assert np.all(got.view(np.uint32)[got == 0] == 0)         # zeros read back as +0


def test_lloyd_init_lowers_without_scatter_and_with_block_sized_gathers():
    """What the init jit compiles (issue 12): Lloyd's start reads its quantiles by static
    slices of one sort (jnp.quantile's gathers and kernel-wide NaN guard cost ~1 s of XLA:CPU
    compile per large kernel), and a step neither scatters over the weights nor gathers
    more than one block (B = 256 values, n = 36864 here) per row, cell edge and start."""
    for granularity, rows in (("per_layer", 1), ("per_channel", 64)):
        text = jax.jit(lambda w: wq.lloyd_init(w, 4, granularity)).lower(
            jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)).as_text()
        assert "scatter" not in text
        block = wq._LLOYD_BLOCK
        gathered = [int(np.prod([int(d) for d in shape.split("x")[:-1]]))
                    for shape in re.findall(r'stablehlo\.gather.*-> tensor<([0-9x]+x?f32)>', text)]
        assert gathered and max(gathered) <= 2 * rows * 3 * block, gathered


def _lloyd_case(np_rng, dist, shape, bits, granularity, iters=5):
    num_levels = 2 ** bits
    w = (np_rng.laplace(size=shape) if dist == "laplace"
         else np_rng.normal(size=shape)).astype(np.float32)
    levels, codes = _lloyd(jnp.asarray(w), num_levels, granularity, iters)
    levels, codes = np.asarray(levels), np.asarray(codes)
    ng = wq.num_groups(shape, granularity)
    rows = np_group_rows(w, ng).astype(np.float64)
    err = float(((w - np_gather(levels, codes)).astype(np.float64) ** 2).sum())
    uniform = np.linspace(rows.min(1), rows.max(1), num_levels, axis=-1)
    return w, levels, codes, rows, err, np_nearest_error(rows, uniform)


@pytest.mark.parametrize("bits,granularity", [(1, "per_layer"), (2, "per_layer"),
                                               (3, "per_layer"), (2, "per_channel"),
                                               (4, "per_channel")])
def test_lloyd_init_sorted_nearest_and_no_worse_than_starts(np_rng, granularity, bits):
    shape = (3, 3, 8, 6)
    w, levels, codes, rows, err, err_uniform = _lloyd_case(np_rng, "laplace", shape, bits,
                                                           granularity)
    ng, num_levels = wq.num_groups(shape, granularity), 2 ** bits
    assert levels.shape == (ng, num_levels) and levels.dtype == np.float32
    assert codes.shape == shape and codes.dtype == np.uint8
    assert np.all(np.diff(levels, axis=-1) >= 0), "levels not sorted"
    np.testing.assert_array_equal(codes, _nearest(jnp.asarray(levels), jnp.asarray(w)))
    # codes are the nearest level: the error equals the brute-force projection error
    np.testing.assert_allclose(err, np_nearest_error(rows, levels.astype(np.float64)),
                               rtol=1e-5)
    err_quantile = np_nearest_error(rows, _quantile_start(rows, num_levels))
    assert err <= err_quantile * (1 + 1e-5), (err, err_quantile)
    # never worse than a uniform min-max grid (it is one of the two refined starts)
    assert err <= err_uniform * (1 + 1e-5), (err, err_uniform)


def test_lloyd_init_no_worse_than_uniform_grid_4bit_per_channel(np_rng):
    *_, err, err_uniform = _lloyd_case(np_rng, "laplace", (3, 3, 8, 6), 4, "per_channel")
    assert err <= err_uniform * (1 + 1e-5), (err, err_uniform)


def test_lloyd_error_non_increasing_in_iterations(np_rng):
    w = jnp.asarray(np_rng.standard_t(3, size=(5, 5, 4, 8)).astype(np.float32))
    errs = []
    for iters in (0, 2):
        levels, codes = _lloyd(w, 4, "per_layer", iters)
        errs.append(float(jnp.sum((w - wq.gather_levels(levels, codes)) ** 2)))
    rows = np_group_rows(np.asarray(w), 1).astype(np.float64)
    # iters=0: the better of the two starts (quantiles, uniform min-max grid), unrefined.
    uniform_start = rows.min() + (rows.max() - rows.min()) * np.arange(4)[None, :] / 3
    np.testing.assert_allclose(errs[0], min(np_nearest_error(rows, _quantile_start(rows, 4)),
                                            np_nearest_error(rows, uniform_start)), rtol=1e-4)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def test_lloyd_per_channel_equals_per_layer_on_each_column(np_rng):
    w = np_rng.normal(size=(4, 4, 3, 5)).astype(np.float32) * np.arange(1, 6)
    levels, _ = _lloyd(jnp.asarray(w), 4, "per_channel", 3)
    for o in range(5):
        col_levels, _ = _lloyd(jnp.asarray(w[..., o]), 4, "per_layer", 3)
        np.testing.assert_allclose(levels[o], col_levels[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_lloyd_init_matches_the_scatter_add_version(np_rng, granularity):
    """The sorted-row Lloyd against the former scatter-add one (tests/reference_lloyd.py,
    frozen): the same starts, cells and stopping rule, the cell sums taken in another order
    (sorted blocks vs memory order), so the levels agree up to float round-off: over these
    cases and 3 seeds, measured within 1.5e-6 of the level span and the projection errors
    within 1.2e-6 relative; asserted with margin (1e-4, 1e-5). Codes stay nearest."""
    from tests import reference_lloyd
    old = jax.jit(reference_lloyd.lloyd_init, static_argnums=(1, 2, 3))
    for shape, dist in (((3, 3, 8, 6), "laplace"), ((5, 5, 4, 8), "t"), ((3, 3, 64, 64), "normal")):
        w = (np_rng.laplace(size=shape) if dist == "laplace" else np_rng.standard_t(3, size=shape)
             if dist == "t" else np_rng.normal(size=shape)).astype(np.float32)
        ng = wq.num_groups(shape, granularity)
        rows = np_group_rows(w, ng).astype(np.float64)
        for bits, iters in ((1, 200), (2, 1), (2, 200), (4, 3), (4, 200)):
            if rows.shape[1] < 2 ** bits:
                continue
            levels, codes = _lloyd(jnp.asarray(w), 2 ** bits, granularity, iters)
            want, _ = old(jnp.asarray(w), 2 ** bits, granularity, iters)
            levels, want = np.asarray(levels, np.float64), np.asarray(want, np.float64)
            span = want[:, -1:] - want[:, :1]
            assert np.all(np.abs(levels - want) <= 1e-4 * span), (shape, bits, iters)
            np.testing.assert_allclose(np_nearest_error(rows, levels),
                                       np_nearest_error(rows, want), rtol=1e-5)
            np.testing.assert_array_equal(codes, _nearest(jnp.asarray(levels, jnp.float32),
                                                          jnp.asarray(w)))


def test_lloyd_init_nan_group_gets_nan_levels_and_leaves_the_others(np_rng):
    """A NaN weight makes its group's levels NaN (as the quantile start's); every other group
    is fitted as if the NaN group were not there: bitwise the levels of the same kernel with
    that column replaced (groups are independent rows of one loop, and a converged row stays
    fixed while the NaN row runs to the cap)."""
    w = np_rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    clean = w.copy()
    w[1, 2, 0, 3] = np.nan
    levels, codes = _lloyd(jnp.asarray(w), 4, "per_channel", 50)
    want, _ = _lloyd(jnp.asarray(clean), 4, "per_channel", 50)
    levels, want = np.asarray(levels), np.asarray(want)
    assert np.all(np.isnan(levels[3])) and not np.any(np.isnan(np.delete(levels, 3, axis=0)))
    np.testing.assert_array_equal(np.delete(levels, 3, axis=0), np.delete(want, 3, axis=0))
    assert codes.dtype == np.uint8 and codes.shape == w.shape


def test_lloyd_two_clusters_hand_computed():
    # 1 bit on {-2, -2, -1, 3, 3, 5}: the optimum is {-5/3, 11/3}
    w = jnp.array([-2.0, -2.0, -1.0, 3.0, 3.0, 5.0])
    levels, codes = _lloyd(w, 2, "per_layer", 5)
    np.testing.assert_allclose(levels, [[-5.0 / 3.0, 11.0 / 3.0]], rtol=1e-6)
    np.testing.assert_array_equal(codes, [0, 0, 0, 1, 1, 1])


# ---------------------------------------------------------------- bad kernel shapes

def test_kernel_shape_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"granularity='per_channel'.*ndim >= 2.*per_layer"):
        wq.check_kernel_shape((16,), "per_channel", 4)
    with pytest.raises(ValueError, match=r"per_channel.*L=4.*at least 4 weights.*has 2"
                                         r".*granularity='per_layer' or fewer bits"):
        wq.check_kernel_shape((1, 1, 2, 8), "per_channel", 4)
    with pytest.raises(ValueError, match=r"granularity='per_row'.*'per_layer', 'per_channel'"):
        wq.check_kernel_shape((3, 3, 2, 8), "per_row", 4)
    with pytest.raises(ValueError, match=r"per_channel"):
        wq.lloyd_init(jnp.ones((16,)), 4, "per_channel")
    # the boundary case is accepted: exactly L weights per channel
    wq.check_kernel_shape((1, 1, 4, 8), "per_channel", 4)
    wq.check_kernel_shape((16,), "per_layer", 4)


# ---------------------------------------------------------------- latent_ste

@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_latent_ste_forward_and_straight_through_gradient(np_rng, granularity):
    shape = (3, 3, 2, 4)
    ng = wq.num_groups(shape, granularity)
    levels = sorted_random_levels(np_rng, ng, 4)
    kernel = np_rng.normal(size=shape).astype(np.float32)
    r = np_rng.normal(size=shape).astype(np.float32)

    table = levels[np.arange(4) if ng > 1 else np.zeros(4, int)]
    brute_codes = np.abs(kernel[..., None] - table).argmin(-1)
    w_q_ref = np_gather(levels, brute_codes)

    def loss(k, lv):
        w_q = wq.latent_ste_kernel(k, lv)
        return jnp.sum(r * w_q ** 2), w_q

    (_, w_q), (g_k, g_lv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(kernel), jnp.asarray(levels))
    np.testing.assert_array_equal(w_q, w_q_ref)
    g_w = 2 * r * w_q_ref  # dL/dW_q
    np.testing.assert_allclose(g_k, g_w, rtol=1e-6, atol=1e-6)  # STE: passes unchanged
    np.testing.assert_allclose(g_lv, np_scatter(g_w, brute_codes, ng, 4), rtol=1e-5,
                               atol=1e-5)


def test_latent_ste_layer_kernel_gradient_is_dl_dwq(np_rng):
    cfg = QuantConfig(weights="latent_ste", weight_bits=2, acts="float")
    layer = QuantDense(3, quant=cfg)
    x = jnp.asarray(np_rng.normal(size=(4, 8)).astype(np.float32))
    v = jax.jit(layer.init)(key(0), x)
    assert set(v["params"]) == {"kernel", "kernel_levels", "bias"}
    p = v["params"]
    lv, kern = np.asarray(p["kernel_levels"][0]), np.asarray(p["kernel"])
    w_q = lv[np.abs(kern[..., None] - lv).argmin(-1)]  # brute-force nearest level
    assert len(np.unique(w_q)) <= 4
    g = jax.jit(jax.grad(lambda p_: jnp.sum(jnp.tanh(layer.apply({"params": p_}, x)))))(p)
    g_ref = jax.jit(jax.grad(lambda k: jnp.sum(jnp.tanh(nn.Dense(3).apply(
        {"params": {"kernel": k, "bias": p["bias"]}}, x)))))(w_q)
    np.testing.assert_allclose(g["kernel"], g_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- LSQ

@pytest.mark.parametrize("bits,granularity", [(2, "per_layer"), (4, "per_layer"),
                                               (2, "per_channel"), (3, "per_channel")])
def test_lsq_forward_and_gradients_match_paper(np_rng, granularity, bits):
    shape = (3, 3, 2, 4)
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    assert wq.lsq_bounds(bits) == (-qn, qp)
    kernel = np_rng.normal(size=shape).astype(np.float32)
    r = np_rng.normal(size=shape).astype(np.float32)
    # steps chosen so that some weights clip at +-Qp*s / -Qn*s at every bit width
    step = ((np.array([1.5]) if granularity == "per_layer"
             else np.array([0.8, 1.2, 1.6, 2.4])) / qp).astype(np.float32)
    s = step[0] if granularity == "per_layer" else step  # broadcast over the last axis

    v = kernel / s
    ref = np.round(np.clip(v, -qn, qp)) * s

    def loss(k, st):
        out = wq.lsq_kernel(k, st, bits)
        return jnp.sum(r * out), out

    (_, out), (g_k, g_s) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        jnp.asarray(kernel), jnp.asarray(step))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert len(np.unique(np.asarray(out))) <= 2 ** bits * len(step)

    inside = (v > -qn) & (v < qp)
    np.testing.assert_allclose(g_k, r * inside, rtol=1e-6, atol=1e-7)
    # d w_hat / d s: round(v) - v inside, -Qn below, Qp above; scaled by 1/sqrt(N*Qp)
    dwds = np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v))
    n_per_group = kernel.size // len(step)
    contrib = (r * dwds).astype(np.float64)
    per_group = contrib.sum() if len(step) == 1 else contrib.reshape(-1, 4).sum(0)
    expected = np.atleast_1d(per_group) / np.sqrt(n_per_group * qp)
    np.testing.assert_allclose(g_s, expected, rtol=1e-4, atol=1e-6)
    assert inside.any() and (~inside).any()  # both branches are exercised


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_lsq_init_step(np_rng, granularity):
    kernel = np_rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    step = wq.lsq_init_step(jnp.asarray(kernel), 3, granularity)
    absw = np.abs(kernel)
    ref = (absw.mean(keepdims=True).ravel() if granularity == "per_layer"
           else absw.reshape(-1, 4).mean(0)) * 2 / np.sqrt(3)
    np.testing.assert_allclose(step, ref, rtol=1e-5)


def test_default_lloyd_iterations_reach_the_converged_error(np_rng):
    """Heavy-tailed (Student-t) 4-bit per-layer kernel: the default iteration count ends
    within 1% of a 500-iteration run (5 iterations, the old default, did not)."""
    from dq_jax.quant.config import QuantConfig
    w = jnp.asarray(np_rng.standard_t(3, size=(3, 3, 64, 64)).astype(np.float32))

    def err(iters):
        levels, codes = _lloyd(w, 16, "per_layer", iters)
        return float(jnp.sum((w - wq.gather_levels(levels, codes)) ** 2))
    converged = err(500)
    assert err(QuantConfig().lloyd_iters) <= converged * 1.01
    assert err(5) > converged * 1.05  # the case is one where iterations matter


def test_stochastic_codes_temperature_sharpens_toward_nearest_hand_computed():
    """Levels 0..3 (gap 1), so p = target - floor(target). Temperature 0.5:
    p' = clip(2 (p - 1/2) + 1/2, 0, 1): p = 0.25 -> 0 (always down), 0.75 -> 1 (always up),
    0.5 -> 0.5, 0.4 -> 0.3. The draws are chosen away from every p and p' (no boundary)."""
    levels = jnp.float32([[0.0, 1.0, 2.0, 3.0]])
    target = jnp.float32([0.25, 0.25, 1.75, 1.75, 2.5, 2.5, 0.4, 0.4, 0.4])
    uniform = jnp.float32([0.1, 0.5, 0.5, 0.9, 0.45, 0.55, 0.2, 0.35, 0.6])
    plain = np.asarray(wq.stochastic_codes(levels, target, None, uniform))
    sharp = np.asarray(wq.stochastic_codes(levels, target, None, uniform, temperature=0.5))
    np.testing.assert_array_equal(plain, [1, 0, 2, 1, 3, 2, 1, 1, 0])
    np.testing.assert_array_equal(sharp, [0, 0, 2, 2, 3, 2, 1, 0, 0])
    zero = np.asarray(wq.stochastic_codes(levels, target, None, uniform, temperature=0.0))
    nearest = np.asarray(wq.nearest_codes(levels, target))
    off_mid = np.asarray(target) != 2.5
    np.testing.assert_array_equal(zero[off_mid], nearest[off_mid])
    np.testing.assert_array_equal(zero[~off_mid], [3, 2])  # half-way: still a coin flip


@pytest.mark.parametrize("num_levels", [2, 4, 8, 16, 32])
def test_sort_levels_equals_lax_sort_bit_for_bit(num_levels):
    """Up to 16 levels the sort is ranks by compares (no `sort` op: issue 27's compile time);
    it gives exactly what a stable `lax.sort_key_val` and its inverse permutation give: sorted
    levels (bits, so -0 vs +0 too), remapped codes and `perm`, including ties, -0/+0, NaN,
    inf and denormals (tied with 0, as XLA:CPU's comparator flushes them). 32 levels keep the
    sort op."""
    def reference(levels, codes):
        iota = jax.lax.broadcasted_iota(jnp.int32, levels.shape, 1)
        out, perm = jax.lax.sort_key_val(levels, iota, dimension=1)
        inverse = jax.lax.sort_key_val(perm, iota, dimension=1)[1]
        return out, jnp.take_along_axis(inverse, codes.astype(jnp.int32).T, axis=1).T, perm

    rng = np.random.default_rng(num_levels)
    specials = [[-0.0, 0.0], [np.nan, 1.0], [np.inf, -np.inf], [1e-40, -1e-41], [0.5, 0.5]]
    for trial in range(40):
        levels = rng.standard_normal((3, num_levels)).astype(np.float32)
        if trial % 2:
            levels = np.round(levels * 2) / 2  # many ties
        for row, pair in enumerate(specials[trial % 5: trial % 5 + 2]):
            levels[row, rng.choice(num_levels, 2, replace=False)] = pair
        codes = rng.integers(0, num_levels, (7, 3)).astype(np.uint8)
        got = jax.jit(lambda l, c: wq.sort_levels(l, c, return_perm=True))(levels, codes)
        want = jax.jit(reference)(levels, codes)
        for name, g, w in zip(("levels", "codes", "perm"), got, want):
            np.testing.assert_array_equal(np.asarray(g).view(np.uint8),
                                          np.asarray(w).astype(np.asarray(g).dtype).view(np.uint8),
                                          err_msg=f"{name}, levels {levels}")
    text = jax.jit(lambda l, c: wq.sort_levels(l, c)).lower(levels, codes).as_text()
    assert ("stablehlo.sort" in text) == (num_levels > wq.SELECT_MAX_LEVELS)
