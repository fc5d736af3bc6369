"""DQ-A, the channel-aware activation quantizer (DESIGN §1.2).

Hand-computed closed-form fits, the monotone-error property of the fit step,
the channel-normalised vs global error on synthetic data, the clipped STE, and
when the `quant_stats` collection may change.
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax.quant import activations as qa
from dq_jax.quant.activations import ActQuantizer
from dq_jax.quant.config import QuantConfig


def key(seed):
    """unsafe_rbg keys: threefry draws of rank-4 kernels take ~9 s each to compile on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


_fit = jax.jit(qa.fit_uniform_step, static_argnums=(3, 4))
_err = jax.jit(qa.uniform_error, static_argnums=(3, 4))
_weights = jax.jit(qa.channel_weights, static_argnums=(1,))
_fit_learned = jax.jit(qa.fit_learned_levels, static_argnums=(3,))


def relu_data(rng, shape, big_channel=None, big_scale=10.0):
    x = np.maximum(rng.normal(size=shape), 0.0)
    if big_channel is not None:
        x[..., big_channel] *= big_scale
    return x.astype(np.float32)


def np_spec_error(x, q, eps_rel=0.0):
    """E = sum_c mean_nhw (x - Q(x))^2 / (mean_nhw x^2 + eps), straight from DESIGN §1.2."""
    c = x.shape[-1]
    x, q = x.reshape(-1, c).astype(np.float64), q.reshape(-1, c).astype(np.float64)
    energy = (x ** 2).mean(0)
    return float((((x - q) ** 2).mean(0) / (energy + eps_rel * energy.mean())).sum())


# ---------------------------------------------------------------- closed-form fit

def test_channel_weights_are_inverse_channel_energy(np_rng):
    x = relu_data(np_rng, (2, 3, 3, 4)) * np.array([0.1, 1.0, 3.0, 30.0], np.float32)
    w = np.asarray(_weights(jnp.asarray(x), "channel"))
    energy = (x.reshape(-1, 4).astype(np.float64) ** 2).mean(0)
    # w_c = 1 / (energy + eps) with a small eps: at most 1e-6 of the mean channel energy
    assert np.all(w <= (1.0 / energy) * (1 + 1e-5))
    assert np.all(w >= 1.0 / (energy + 1e-6 * energy.mean()) * (1 - 1e-5))
    np.testing.assert_allclose(w[2:], 1.0 / energy[2:], rtol=1e-4)  # eps negligible here
    np.testing.assert_array_equal(_weights(jnp.asarray(x), "global"), np.ones(4))
    # a dead channel gets a large but finite weight
    x[..., 0] = 0.0
    w = np.asarray(_weights(jnp.asarray(x), "channel"))
    assert np.all(np.isfinite(w)) and w[0] > w[1:].max()


def test_uniform_error_is_the_spec_error_up_to_1_over_n(np_rng):
    x = relu_data(np_rng, (2, 4, 4, 5)) * np.array([0.1, 1.0, 2.0, 5.0, 50.0], np.float32)
    alpha, num_levels = 0.4, 4
    q = alpha * np.clip(np.round(x / alpha), 0, num_levels - 1)
    w_c = _weights(jnp.asarray(x), "channel")
    n = x.size // x.shape[-1]
    got = float(_err(jnp.asarray(x), jnp.float32(alpha), w_c, num_levels, False)) / n
    # eps: a floor of 1e-6 x the mean channel energy (matters only for nearly dead channels)
    np.testing.assert_allclose(got, np_spec_error(x, q, eps_rel=1e-6), rtol=1e-4)
    np.testing.assert_allclose(got, np_spec_error(x, q), rtol=1e-2)


def test_fit_uniform_step_hand_computed():
    # x[n, c] with 2 channels, L = 4 levels {0, a, 2a, 3a}, start a = 1:
    # codes: 0.4 -> 0, 1.2 -> 1 (channel 0); 2.0 -> 2, 0.0 -> 0 (channel 1)
    x = jnp.array([[0.4, 2.0], [1.2, 0.0]])
    # channel energies 0.8 and 2.0: w = (1/0.8, 1/2)
    # alpha = (1.25*1.2 + 0.5*4.0) / (1.25*1 + 0.5*4) = 3.5 / 3.25 = 14/13
    a = _fit(x, jnp.float32(1.0), _weights(x, "channel"), 4, False)
    np.testing.assert_allclose(a, 14.0 / 13.0, rtol=1e-5)
    # global: (1.2 + 4.0) / (1 + 4) = 1.04
    a = _fit(x, jnp.float32(1.0), _weights(x, "global"), 4, False)
    np.testing.assert_allclose(a, 1.04, rtol=1e-6)


def test_fit_uniform_step_signed_hand_computed():
    # signed 2-bit grid {-2a, -a, 0, a}; a = 1: -1.6 -> -2, 0.7 -> 1, -0.4 -> 0, 3.0 -> 1 (clip)
    x = jnp.array([[-1.6], [0.7], [-0.4], [3.0]])
    # alpha = (3.2 + 0.7 + 3.0) / (4 + 1 + 1) = 6.9 / 6 = 1.15
    a = _fit(x, jnp.float32(1.0), _weights(x, "channel"), 4, True)
    np.testing.assert_allclose(a, 1.15, rtol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("num_levels", [2, 4, 16])
def test_fit_uniform_step_never_increases_weighted_error(np_rng, num_levels, signed):
    shape = (4, 5, 5, 8)
    scales = (10.0 ** np_rng.uniform(-1, 1, 8)).astype(np.float32)
    raw = np_rng.normal(size=shape) if signed else np.abs(np_rng.normal(size=shape))
    x = jnp.asarray((raw * scales).astype(np.float32))
    top = float(jnp.max(jnp.abs(x)))
    alphas = jnp.asarray(top * np.array([0.003, 0.02, 0.1, 0.3, 1.0, 3.0]), jnp.float32)
    for act_error in ("channel", "global"):
        w_c = _weights(x, act_error)
        for a0 in alphas:
            a, errs = a0, [float(_err(x, a0, w_c, num_levels, signed))]
            for _ in range(6):
                a = _fit(x, a, w_c, num_levels, signed)
                errs.append(float(_err(x, a, w_c, num_levels, signed)))
                assert float(a) > 0
            assert all(b <= e * (1 + 1e-5) + 1e-12 for e, b in zip(errs, errs[1:])), \
                (act_error, float(a0), errs)


def test_calibration_is_near_the_brute_force_optimum(np_rng):
    x = jnp.asarray(relu_data(np_rng, (8, 6, 6, 16), big_channel=3))
    top = float(jnp.max(x))
    grid = jnp.asarray(np.geomspace(1e-3, 1.0, 400) * top, jnp.float32)

    @jax.jit
    def run(w_c):
        a = qa.calibrate_uniform(x, w_c, 4, False, 10)
        brute = jnp.min(jax.vmap(lambda g: qa.uniform_error(x, g, w_c, 4, False))(grid))
        naive = qa.uniform_error(x, jnp.float32(top / 3), w_c, 4, False)  # max calibration
        return qa.uniform_error(x, a, w_c, 4, False), brute, naive

    for act_error in ("channel", "global"):
        got, brute, naive = map(float, run(_weights(x, act_error)))
        assert got <= brute * 1.02, (act_error, got, brute)
        assert got < naive


# ---------------------------------------------------------------- learned levels

def test_fit_learned_levels_hand_computed_and_monotone(np_rng):
    # one channel, levels {0, 1, 2}: cells {0.1, 0.2} -> 0.15, {0.9, 1.3} -> 1.1, {2.6} -> 2.6
    x = jnp.array([[0.1], [0.2], [0.9], [1.3], [2.6]])
    new = _fit_learned(x, jnp.array([0.0, 1.0, 2.0]), jnp.ones((1,)), False)
    np.testing.assert_allclose(new, [0.15, 1.1, 2.6], rtol=1e-6)
    # unsigned (post-ReLU): the lowest level stays exactly 0, the others are cell means
    new = _fit_learned(x, jnp.array([0.0, 1.0, 2.0]), jnp.ones((1,)), True)
    assert float(new[0]) == 0.0
    np.testing.assert_allclose(new, [0.0, 1.1, 2.6], rtol=1e-6)
    # weighted error never increases under repeated steps (Lloyd)
    x = jnp.asarray(relu_data(np_rng, (4, 5, 5, 6), big_channel=2))
    w_c = _weights(x, "channel")

    @jax.jit
    def werr(lv):  # brute-force nearest level, weighted squared error
        q = lv[jnp.argmin(jnp.abs(x[..., None] - lv), axis=-1)]
        return jnp.sum(w_c * jnp.sum(((x - q) ** 2).reshape(-1, 6), 0))
    lv = jnp.linspace(0.0, float(x.max()), 4)
    errs = [float(werr(lv))]
    for _ in range(5):
        lv = _fit_learned(x, lv, w_c, True)
        errs.append(float(werr(lv)))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0]


def _one_hot_fit(x, levels, w_c, nonnegative):
    """The dense one-hot formulation (before the masked reductions); no zero pinning."""
    num_levels = levels.shape[0]
    idx = qa.nearest_level_index(x, levels)
    weighted = jax.nn.one_hot(idx, num_levels, dtype=jnp.float32) * w_c[:, None]
    sums = jnp.sum((weighted * x[..., None]).reshape(-1, num_levels), axis=0)
    mass = jnp.sum(weighted.reshape(-1, num_levels), axis=0)
    new = jnp.where(mass > 0, sums / jnp.where(mass > 0, mass, 1.0), levels)
    return jnp.sort(jnp.maximum(new, 0.0) if nonnegative else new)


_one_hot_fit_jit = jax.jit(_one_hot_fit, static_argnums=(3,))


@pytest.mark.parametrize("num_levels", [4, 16, 32])
def test_fit_learned_levels_bitwise_equal_to_one_hot_on_integer_data(np_rng, num_levels):
    """Integer inputs and integer channel weights: every partial sum is exact in float32 in
    any order, so the masked reductions (or, above 16 levels, the segment sum) and the
    one-hot sums agree bit for bit; so does the division."""
    x = jnp.asarray(np_rng.integers(-3, 12, (4, 6, 6, 5)).astype(np.float32))
    w_c = jnp.asarray(np_rng.integers(1, 4, (5,)).astype(np.float32))
    levels = jnp.asarray(np.linspace(-2.0, 11.0, num_levels).astype(np.float32))
    got = _fit_learned(x, levels, w_c, False)
    np.testing.assert_array_equal(got, _one_hot_fit_jit(x, levels, w_c, False))
    assert len(np.unique(np.asarray(got))) > 2  # not vacuous


@pytest.mark.parametrize("num_levels", [4, 16])
def test_fit_learned_levels_matches_one_hot_within_summation_bound(np_rng, num_levels):
    """Float post-ReLU data (every term >= 0): each sum over n terms is within gamma_n of
    exact in any order (relative, as no term cancels), so the cell mean sums/mass is within
    ~2 gamma_n + u, and two orders within twice that (gamma_n = n u / (1 - n u), u = 2**-24).
    Compared without pinning (signed form), so every level is a cell mean in both."""
    x = jnp.asarray(relu_data(np_rng, (8, 6, 6, 16), big_channel=3))
    w_c = _weights(x, "channel")
    levels = jnp.asarray(np.linspace(0.05, float(x.max()), num_levels).astype(np.float32))
    got = np.asarray(_fit_learned(x, levels, w_c, False), np.float64)
    ref = np.asarray(_one_hot_fit_jit(x, levels, w_c, False), np.float64)
    n, u = x.size, 2.0 ** -24
    gamma = n * u / (1 - n * u)
    np.testing.assert_array_less(np.abs(got - ref), 2 * (2 * gamma + u) * np.abs(ref) + 1e-30)


def test_learned_unsigned_levels_keep_an_exact_zero_on_post_relu_data(np_rng):
    """Post-ReLU batches are mostly exact zeros: the fitted unsigned level set keeps a level
    at exactly 0.0 through calibration and EMA steps, so those zeros quantize to exactly 0.
    (The plain Lloyd mean of the lowest cell, zeros plus small positives, sits above 0.)"""
    cfg = QuantConfig(acts="dq", act_bits=2, act_levels="learned", act_momentum=0.9)
    batches = [relu_data(np_rng, (8, 6, 6, 8)) - np.float32(0.3) for _ in range(4)]
    batches = [np.maximum(b, 0.0) for b in batches]   # ~60% exact zeros
    assert all((b == 0).mean() > 0.5 for b in batches)
    q, v = _fit_module(cfg, batches)
    lv = np.asarray(v["quant_stats"]["levels"])
    assert lv[0] == 0.0 and np.all(np.diff(lv) > 0), lv
    y = np.asarray(q.apply(v, jnp.asarray(batches[-1]), train=False))
    assert np.all(y[batches[-1] == 0] == 0.0)
    # the unpinned Lloyd step would move it: the pin is what keeps the zero
    x = jnp.asarray(batches[-1])
    free = np.asarray(_fit_learned(x, jnp.asarray(lv), _weights(x, "channel"), False))
    assert free[0] > 0.0, free


def test_learned_levels_stay_sorted_and_nonnegative(np_rng):
    cfg = QuantConfig(acts="dq", act_bits=2, act_levels="learned", act_momentum=0.5,
                      act_signed=False)  # unsigned by choice (the default decides from data)
    q = ActQuantizer(cfg)
    # not post-ReLU on purpose: negative inputs must not pull unsigned levels below 0
    batches = [np_rng.normal(size=(4, 4, 4, 6)).astype(np.float32) * np.float32(s)
               for s in (1.0, 3.0, 0.2, 5.0, 1.0, 0.5)]
    v = jax.jit(partial(q.init, train=False))(key(0), jnp.asarray(batches[0]))
    step = jax.jit(partial(q.apply, train=True, mutable=["quant_stats"]))
    for xb in batches:
        y, upd = step(v, jnp.asarray(xb))
        v = {**v, **upd}
        lv = np.asarray(v["quant_stats"]["levels"])
        assert lv.shape == (4,)
        assert np.all(np.diff(lv) >= 0), lv
        assert np.all(lv >= 0), lv
        assert np.all(np.isin(np.asarray(y), lv))  # outputs are levels
    assert bool(v["quant_stats"]["initialized"])


# ---------------------------------------------------------------- forward and STE

def test_quantize_uniform_forward_and_clipped_ste():
    # alpha = 0.5, L = 4: levels {0, 0.5, 1.0, 1.5}; pass-through range [0, 1.5]
    x = jnp.array([-0.3, 0.0, 0.2, 0.3, 1.2, 1.5, 1.6, 3.0])
    y, vjp = jax.vjp(lambda v: qa.quantize_uniform(v, jnp.float32(0.5), 4, False), x)
    np.testing.assert_array_equal(y, [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 1.5, 1.5])
    (g,) = vjp(jnp.ones_like(x))
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 1, 0, 0],
                                  err_msg="clipped STE: 1 on the closed range [0, max level]")


def test_quantize_signed_forward_and_clipped_ste():
    # signed alpha = 0.5, L = 4: levels {-1, -0.5, 0, 0.5}; pass-through range [-1, 0.5]
    x = jnp.array([-2.0, -1.0, -0.7, -0.2, 0.0, 0.4, 0.5, 0.9])
    y, vjp = jax.vjp(lambda v: qa.quantize_uniform(v, jnp.float32(0.5), 4, True), x)
    np.testing.assert_array_equal(y, [-1.0, -1.0, -0.5, 0.0, 0.0, 0.5, 0.5, 0.5])
    (g,) = vjp(jnp.ones_like(x))
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 1, 1, 0])


def test_quantize_learned_forward_and_clipped_ste():
    levels = jnp.array([0.0, 0.3, 1.0, 2.5])
    x = jnp.array([-1.0, 0.0, 0.1, 0.2, 0.7, 2.0, 2.5, 4.0])
    y, vjp = jax.vjp(lambda v: qa.quantize_learned(v, levels), x)
    np.testing.assert_array_equal(y, np.float32([0.0, 0.0, 0.0, 0.3, 1.0, 2.5, 2.5, 2.5]))
    (g,) = vjp(jnp.ones_like(x))
    np.testing.assert_array_equal(g, [0, 1, 1, 1, 1, 1, 1, 0])


# ---------------------------------------------------------------- the module

def _per_channel_rel_error(x, y):
    c = x.shape[-1]
    x, y = x.reshape(-1, c).astype(np.float64), np.asarray(y).reshape(-1, c)
    return ((x - y) ** 2).mean(0) / (x ** 2).mean(0)


def _fit_module(cfg, batches):
    q = ActQuantizer(cfg)
    v = jax.jit(partial(q.init, train=False))(key(0), jnp.asarray(batches[0]))
    step = jax.jit(partial(q.apply, train=True, mutable=["quant_stats"]))
    for xb in batches:  # first batch calibrates, the rest are EMA steps
        _, upd = step(v, jnp.asarray(xb))
        v = {**v, **upd}
    return q, v


@pytest.mark.parametrize("act_levels", ["uniform", "learned"])
def test_channel_normalised_fit_beats_global_on_a_dominant_channel(np_rng, act_levels):
    """16 ReLU'd Gaussian channels, one with 10x the std (100x the variance)."""
    big = 5
    batches = [relu_data(np_rng, (8, 6, 6, 16), big_channel=big) for _ in range(5)]
    held_out = relu_data(np_rng, (8, 6, 6, 16), big_channel=big)
    rel = {}
    for act_error in ("channel", "global"):
        cfg = QuantConfig(acts="dq", act_bits=2, act_levels=act_levels, act_error=act_error)
        q, v = _fit_module(cfg, batches[:4])
        y = jax.jit(partial(q.apply, train=False))(v, jnp.asarray(held_out))
        rel[act_error] = _per_channel_rel_error(held_out, y)
    med_channel, med_global = np.median(rel["channel"]), np.median(rel["global"])
    assert med_channel < med_global, (med_channel, med_global)
    assert med_channel < 0.8 * med_global  # a clear margin, not a tie
    # the trade-off: the global error serves the dominant channel better
    assert rel["global"][big] < rel["channel"][big]


def test_stats_change_only_in_mutable_training(np_rng):
    cfg = QuantConfig(acts="dq", act_bits=2)
    q = ActQuantizer(cfg)
    x = jnp.asarray(relu_data(np_rng, (4, 4, 4, 3)) * 7.0)
    # init with train=True must not calibrate on the dummy batch
    v = q.init(key(0), x, train=True)
    assert not bool(v["quant_stats"]["initialized"])
    np.testing.assert_array_equal(v["quant_stats"]["alpha"], 1.0)
    # eval, even with a mutable collection: unchanged
    _, upd = q.apply(v, x, train=False, mutable=["quant_stats"])
    np.testing.assert_array_equal(upd["quant_stats"]["alpha"], v["quant_stats"]["alpha"])
    assert not bool(upd["quant_stats"]["initialized"])
    # train=True without a mutable collection: no error, no update possible, output uses alpha
    y = q.apply(v, x, train=True)
    np.testing.assert_array_equal(y, jnp.clip(jnp.round(x), 0, 3))
    # train=True and mutable: calibrates, initialized
    _, upd = q.apply(v, x, train=True, mutable=["quant_stats"])
    assert bool(upd["quant_stats"]["initialized"])
    a1 = float(upd["quant_stats"]["alpha"])
    assert a1 != 1.0 and a1 > 0


_fit_one_pass = jax.jit(qa.fit_uniform_step_one_pass, static_argnums=(2, 3, 4))


@pytest.mark.parametrize("act_error", ["channel", "global"])
@pytest.mark.parametrize("signed", [False, True])
def test_one_pass_uniform_step_equals_the_three_pass_step(np_rng, act_error, signed):
    """The EMA's step from one variadic reduction (issue 27) is `fit_uniform_step` with
    `channel_weights`: bit for bit where every sum is exact (quarter-integer data, step 0.5:
    all terms are multiples of 1/16 far below 2**24/16), and on float data within the bound
    of two summation orders (every term x*x, x*k, k*k is >= 0, so each sum of n terms is
    within gamma_n relative of exact; the ratio num/den within ~4 gamma_n + u of either)."""
    levels = 4
    exact = np_rng.integers(-8 if signed else 0, 9, (4, 6, 6, 5)).astype(np.float32) / 4
    alpha = jnp.float32(0.5)
    for x in (exact, exact.reshape(2, 12, 6, 5)):
        ref = _fit(jnp.asarray(x), alpha, _weights(jnp.asarray(x), act_error), levels, signed)
        got = _fit_one_pass(jnp.asarray(x), alpha, levels, signed, act_error)
        assert np.asarray(got).tobytes() == np.asarray(ref).tobytes(), (float(got), float(ref))
        assert float(got) != float(alpha)  # the step moved: not vacuous
    x = relu_data(np_rng, (8, 6, 6, 16), big_channel=3)
    if signed:
        x = x - np.float32(0.4)
    alpha = jnp.float32(0.3)
    ref = float(_fit(jnp.asarray(x), alpha, _weights(jnp.asarray(x), act_error), levels, signed))
    got = float(_fit_one_pass(jnp.asarray(x), alpha, levels, signed, act_error))
    n, u = x.size // x.shape[-1], 2.0 ** -24
    gamma = n * u / (1 - n * u)
    assert abs(got - ref) <= (8 * gamma + u) * abs(ref), (got, ref)
    zeros = jnp.zeros((2, 3, 3, 4))  # an all-zero batch keeps the step
    assert float(_fit_one_pass(zeros, alpha, levels, signed, act_error)) == float(alpha)


def test_ema_step_reads_the_activation_in_one_reduction():
    """Issue 27: a calibrated quantizer's train-mode step reduces over the activation once
    (channel energies and both sums of the closed-form step in one variadic reduction), not
    three times (energies, then x*k, then k*k). (A fixed grid: with `act_signed=None` each
    of the two grids' branches has its one reduction.)"""
    q = ActQuantizer(QuantConfig(acts="dq", act_bits=2, act_signed=False))
    x = jnp.ones((4, 6, 6, 8))
    v = q.init(jax.random.PRNGKey(0), x, train=False)
    v = {"quant_stats": {**v["quant_stats"], "initialized": jnp.ones((), jnp.bool_)}}

    def step(v, x):
        with qa.assume_calibrated():
            return q.apply(v, x, train=True, mutable=["quant_stats"])

    text = jax.jit(step).lower(v, x).as_text()
    reductions = [line for line in text.splitlines() if "stablehlo.reduce" in line]
    over_x = [line for line in reductions if "tensor<144x8xf32>" in line]
    assert len(over_x) == 1, over_x
    assert over_x[0].count("tensor<144x8xf32>") == 3  # x*x, x*k, k*k in the one reduction


def test_ema_step_matches_numpy_weighted_least_squares(np_rng):
    """Second batch: alpha <- m*alpha + (1-m)*LS-fit(batch 2 | nearest codes at alpha)."""
    m = 0.9
    cfg = QuantConfig(acts="dq", act_bits=2, act_momentum=m)
    x1 = relu_data(np_rng, (4, 4, 4, 5), big_channel=1)
    x2 = relu_data(np_rng, (4, 4, 4, 5), big_channel=1) * np.float32(1.7)
    q, v = _fit_module(cfg, [x1, x2])  # calibrate on x1, then one EMA step on x2
    a1 = float(_fit_module(cfg, [x1])[1]["quant_stats"]["alpha"])
    upd = v
    xs = x2.reshape(-1, 5).astype(np.float64)
    k = np.clip(np.round(xs / a1), 0, 3)
    w = 1.0 / (xs ** 2).mean(0)
    a_ls = (w * (xs * k).sum(0)).sum() / (w * (k * k).sum(0)).sum()
    np.testing.assert_allclose(float(upd["quant_stats"]["alpha"]), m * a1 + (1 - m) * a_ls,
                               rtol=1e-4)


def test_eval_output_takes_at_most_L_values_and_signed_keeps_negatives(np_rng):
    x = jnp.asarray(np_rng.normal(size=(4, 4, 4, 3)).astype(np.float32))
    outs, alphas = {}, {}
    for signed in (False, True):
        cfg = QuantConfig(acts="dq", act_bits=2, act_signed=signed)
        q, v = _fit_module(cfg, [np.asarray(x)])
        y = np.asarray(jax.jit(partial(q.apply, train=False))(v, x))
        a = alphas[signed] = float(v["quant_stats"]["alpha"])
        grid = a * (np.arange(-2, 2) if signed else np.arange(0, 4))
        assert len(np.unique(y)) <= 4
        dist = np.abs(np.unique(y)[:, None] - grid[None, :]).min(1)
        assert np.all(dist <= 1e-6 * a), (np.unique(y), grid)
        outs[signed] = y
    neg = np.asarray(x) < -0.5 * alphas[True]  # rounds to a negative level
    assert neg.any()
    assert np.all(outs[True][neg] < 0), "signed variant must quantize negative inputs"
    assert np.all(outs[False] >= 0) and np.all(outs[False][neg] == 0)


def test_signed_learned_levels_cover_negative_inputs(np_rng):
    cfg = QuantConfig(acts="dq", act_bits=2, act_signed=True, act_levels="learned")
    x = np_rng.normal(size=(4, 4, 4, 3)).astype(np.float32)
    q, v = _fit_module(cfg, [x, x])
    lv = np.asarray(v["quant_stats"]["levels"])
    assert np.all(np.diff(lv) >= 0) and lv[0] < 0 < lv[-1]
    y = np.asarray(jax.jit(partial(q.apply, train=False))(v, jnp.asarray(x)))
    assert np.all(y[x < lv[0]] == lv[0])
