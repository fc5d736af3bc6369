"""`dq_optimizer`: the direct code update, the levels' Adam, weight decay on W_q,
reproducibility, and an end-to-end 2-bit training run on scikit-learn's digits.

Below those: the bitwise guard against the frozen pre-optax optimizer
(tests/reference_optim.py), composition with optax (chain, apply_if_finite,
inject_hyperparams, MultiSteps) and Flax's TrainState, and stacked (nn.scan) layers.
"""
from functools import partial

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dq_jax.layers import QuantConv, QuantDense
from dq_jax import optim
from dq_jax.optim import code_histogram_entropy, dq_optimizer, effective_kernels
from dq_jax.quant import weights as wq
from dq_jax.quant.config import FEEDBACK_ROUNDINGS, QuantConfig
from dq_jax.trees import flatten


def key(seed):
    """unsafe_rbg keys: threefry draws of rank-4 kernels take ~9 s each to compile on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


W2A2 = QuantConfig(weights="dq", weight_bits=2, acts="dq", act_bits=2)


class Small(nn.Module):
    """float conv -> 2-bit per-layer QuantConv -> pool -> 2-bit per-channel QuantDense."""

    quant: QuantConfig

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(QuantConv(8, (3, 3), strides=2, quant=self.quant)(x, train=train))
        x = x.mean((1, 2))
        return QuantDense(3, quant=self.quant.replace(granularity="per_channel"))(x, train=train)


def np_gather(levels, codes):
    """W_q[..., o] = levels[g(o), codes[..., o]], by numpy indexing."""
    levels, codes = np.asarray(levels), np.asarray(codes).astype(np.int64)
    groups = (np.broadcast_to(np.arange(codes.shape[-1]), codes.shape) if levels.shape[0] > 1
              else np.zeros(codes.shape, np.int64))
    return levels[groups, codes]


def _split(variables):
    v = dict(variables)
    v.pop("perturbations", None)
    params, codes = v.pop("params"), v.pop("codes")
    return params, codes, v  # v: quant_stats (and batch_stats)


class Opt:
    """The transformation with the old call shape, for the tests below:
    `update(grads, w_grads, state, params, codes) -> (params, codes, state, diagnostics)`."""

    def __init__(self, *args, key=0, **kwargs):
        self.tx = dq_optimizer(*args, key=key, **kwargs)

    def init(self, params, codes):
        return self.tx.init({"params": params, "codes": codes})

    def update(self, g, gw, state, params, codes):
        trainable = {"params": params, "codes": codes}
        updates, state = self.tx.update({"params": g, "codes": gw}, state, trainable)
        new = optax.apply_updates(trainable, updates)
        return (new["params"], new["codes"], state,
                optim.code_diagnostics(codes, new["codes"], new["params"]))


def with_key(state, k):
    """The state with another code-update key (stored as key data)."""
    return state._replace(key=jax.random.key_data(k))


def make_step(model, opt, mutable=("quant_stats",)):
    @jax.jit
    def step(params, codes, stats, state, xb, yb):
        pert = jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), codes)

        def loss_fn(p, pt):
            out, upd = model.apply({"params": p, "codes": codes, "perturbations": pt, **stats},
                                   xb, train=True, mutable=list(mutable))
            return optax.softmax_cross_entropy_with_integer_labels(out, yb).mean(), upd

        (loss, upd), (g, gw) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            params, pert)
        params, codes, state, diag = opt.update(g, gw, state, params, codes)
        return params, codes, {**stats, **upd}, state, loss, diag
    return step


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 2)).astype(np.float32)
    y = (x[..., 0].mean((1, 2)) > 0).astype(np.int32) + (x[..., 1].mean((1, 2)) > 0)
    model = Small(W2A2)
    params, codes, stats = _split(jax.jit(partial(model.init, train=False))(key(0), x[:2]))
    return model, params, codes, stats, jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(scope="module")
def small_grads(small):
    """(grads, w_grads) of the small model at its init, with stats calibrated."""
    model, params, codes, stats, x, y = small

    @jax.jit
    def grads(params, pert):
        def loss_fn(p, pt):
            out, _ = model.apply({"params": p, "codes": codes, "perturbations": pt, **stats},
                                 x, train=True, mutable=["quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return jax.grad(loss_fn, argnums=(0, 1))(params, pert)

    pert = jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), codes)
    return grads(params, pert)


def _check_invariants(params, codes, num_levels=4):
    flat_p = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_c = flax.traverse_util.flatten_dict(flax.core.unfreeze(codes))
    assert len(flat_c) == 2
    for path, c in flat_c.items():
        assert c.dtype == jnp.uint8, path
        c = np.asarray(c)
        assert c.min() >= 0 and c.max() < num_levels, path
        levels = np.asarray(flat_p[path[:-1] + ("kernel_levels",)])
        assert np.all(np.diff(levels, axis=-1) >= 0), (path, levels)
    for path, w_q in effective_kernels(params, codes).items():
        w_q = np.asarray(w_q)
        if path[-1].startswith("QuantDense"):  # per channel
            counts = [len(np.unique(w_q[..., o])) for o in range(w_q.shape[-1])]
        else:
            counts = [len(np.unique(w_q))]
        assert max(counts) <= num_levels, (path, counts)


def _expected_flips(levels, codes, move):
    """E[#codes that change] when each W_q moves by `move` with unbiased rounding."""
    levels, codes = np.asarray(levels, np.float64), np.asarray(codes).astype(np.int64)
    total = 0.0
    for g in range(levels.shape[0]):
        sel = (slice(None),) * (codes.ndim - 1) + ((g if levels.shape[0] > 1 else slice(None)),)
        lv, c = levels[g], codes[sel]
        t = np.clip(lv[c] + move[sel], lv[0], lv[-1])
        k = np.clip(np.searchsorted(lv, t, side="right") - 1, 0, len(lv) - 2)
        p_up = (t - lv[k]) / (lv[k + 1] - lv[k])
        total += float(np.where(c == k, p_up, np.where(c == k + 1, 1 - p_up, 1.0)).sum())
    return total


@pytest.fixture(scope="module")
def tiny(small, small_grads):
    """Optimizers with a "tiny" code LR: no weight moves by more than 0.4 of half the
    smallest level gap, so nearest rounding can never cross a mid-point. Momentum 0 (the
    first step is plain SGD either way), levels' Adam at 1e-2. One compiled update each,
    shared by the tests below (the optimizer key lives in the state: `with_key`).
    """
    _, params, codes, _, _, _ = small
    _, gw = small_grads
    names = ("QuantConv_0", "QuantDense_0")
    half_gap = min(float(np.diff(np.asarray(params[n]["kernel_levels"])).min()) / 2
                   for n in names)
    lr = 0.4 * half_gap / max(float(jnp.abs(a).max()) for a in jax.tree.leaves(gw))
    out = {"lr": lr, "half_gap": half_gap}
    for rounding in ("nearest", "stochastic"):
        opt = Opt(lr, 1e-2, momentum=0.0, rounding=rounding, key=key(0))
        out[rounding] = (jax.jit(opt.update), opt.init(params, codes))
    return out


# ---------------------------------------------------------------- invariants

def _updates(update, state, params, codes, g, gw, steps, check=False):
    diags = []
    for _ in range(steps):
        params, codes, state, diag = update(g, gw, state, params, codes)
        diags.append(diag)
        if check:
            _check_invariants(params, codes)
    return params, codes, diags


def test_invariants_hold_after_many_updates_and_are_reproducible(small, small_grads, tiny):
    """30 updates with steps of up to a full level gap: codes flip, levels move and may
    cross (Adam moves each by 1e-2 per step in a fixed direction); after every update a
    layer's W_q takes <= L values per group, levels are sorted, codes uint8 in [0, L)."""
    _, params, codes, _, _, _ = small
    g, gw = small_grads
    gw = jax.tree.map(lambda a: a * 5.0, gw)
    update, state = tiny["stochastic"]
    p1, c1, diags = _updates(update, state, params, codes, g, gw, 30, check=True)
    flips = [float(d["QuantConv_0"]["flip_rate"]) for d in diags]
    assert min(flips) > 0, "codes should change every step here"
    for d in diags:
        for layer in d.values():
            assert 0.0 <= float(layer["flip_rate"]) <= 1.0
            assert 0.0 <= float(layer["code_entropy"]) <= 2.0 + 1e-6
    assert np.abs(np.asarray(p1["QuantConv_0"]["kernel_levels"])
                  - np.asarray(params["QuantConv_0"]["kernel_levels"])).max() > 0.1
    # same key -> bit-identical; another key -> different codes (stochastic rounding)
    p2, c2, _ = _updates(update, state, params, codes, g, gw, 30)
    jax.tree.map(np.testing.assert_array_equal, (p1, c1), (p2, c2))
    _, c3, _ = _updates(update, with_key(state, key(9)), params, codes, g, gw, 30)
    assert not np.array_equal(c1["QuantConv_0"]["kernel"], c3["QuantConv_0"]["kernel"])


def test_tiny_lr_nearest_freezes_codes_stochastic_moves_them(small, small_grads, tiny):
    _, params, codes, _, _, _ = small
    g, gw = small_grads
    lr, half_gap = tiny["lr"], tiny["half_gap"]
    assert half_gap > 1e-2  # the levels' 1e-2 Adam step cannot make two levels cross
    expected_flips = sum(_expected_flips(params[n]["kernel_levels"], codes[n]["kernel"],
                                         -lr * np.asarray(gw[n]["kernel"]))
                         for n in ("QuantConv_0", "QuantDense_0"))
    moved = {}
    for rounding in ("nearest", "stochastic"):
        update, state = tiny[rounding]
        new_params, new_codes, _, diag = update(g, gw, state, params, codes)
        _check_invariants(new_params, new_codes)
        for name in ("QuantConv_0", "QuantDense_0"):
            old_c, new_c = np.asarray(codes[name]["kernel"]), np.asarray(new_codes[name]["kernel"])
            changed = float(np.mean(old_c != new_c))
            # the diagnostic is the measured fraction (levels moved by 1e-2 and did not
            # cross, so no remap)
            np.testing.assert_allclose(float(diag[name]["flip_rate"]), changed, atol=1e-7)
            moved[rounding, name] = changed
            if rounding == "stochastic":  # only to an adjacent level
                assert np.all(np.abs(old_c.astype(int) - new_c.astype(int)) <= 1)
    assert moved["nearest", "QuantConv_0"] == 0 and moved["nearest", "QuantDense_0"] == 0
    assert expected_flips > 3  # P(no flip at all) < e^-3: the check below is meaningful
    assert moved["stochastic", "QuantConv_0"] > 0 or moved["stochastic", "QuantDense_0"] > 0


def test_stochastic_update_is_unbiased_toward_the_sgd_target(small, small_grads, tiny):
    """Mean of the new W_q over many keys equals W_q - lr * dL/dW_q (first step)."""
    _, params, codes, _, _, _ = small
    _, gw = small_grads
    update, state = tiny["stochastic"]
    # zero float gradients: the levels stay put (Adam of 0), only the codes move
    zero_g = jax.tree.map(jnp.zeros_like, params)
    gw = jax.tree.map(lambda a: a * 2.0, gw)  # p up to 0.8: more signal per draw
    lr, n, name = tiny["lr"], 300, "QuantConv_0"
    samples = []
    for s in range(n):
        p, c, _, _ = update(zero_g, gw, with_key(state, key(100 + s)), params, codes)
        samples.append(np_gather(p[name]["kernel_levels"], c[name]["kernel"]))
    samples = np.stack(samples).astype(np.float64)
    levels = np.asarray(params[name]["kernel_levels"][0], np.float64)
    w_q = np_gather(params[name]["kernel_levels"], codes[name]["kernel"]).astype(np.float64)
    target = np.clip(w_q - lr * np.asarray(gw[name]["kernel"]), levels[0], levels[-1])
    k = np.clip(np.searchsorted(levels, target, side="right") - 1, 0, len(levels) - 2)
    gap = levels[k + 1] - levels[k]
    p = np.clip((target - levels[k]) / gap, 0, 1)
    sigma = gap * np.sqrt(p * (1 - p) / n)
    inside = sigma > 1e-6
    z = (samples.mean(0) - target) / np.where(inside, sigma, 1.0)
    assert np.all(np.abs(z[inside]) < 5.5), np.abs(z[inside]).max()
    np.testing.assert_allclose(samples.mean(0)[~inside], target[~inside], atol=1e-5)
    assert inside.mean() > 0.5  # most targets fall strictly between two levels
    # and in aggregate the mean move is -lr * dL/dW_q (sum of the per-entry checks)
    move = (samples.mean(0) - w_q).sum()
    np.testing.assert_allclose(move, (target - w_q).sum(),
                               atol=5 * np.sqrt((sigma ** 2).sum()) + 1e-6)


# ---------------------------------------------------------------- levels: Adam, sort, remap

def test_levels_adam_is_scale_free(small, small_grads, tiny):
    _, params, codes, _, _, _ = small
    g, gw = small_grads
    update, state0 = tiny["stochastic"]
    results = []
    for scale in (1.0, 1000.0):
        # the level updates depend only on the level gradients given (not on the codes)
        gs = jax.tree.map(lambda a: a * scale, g)
        p, c, state = params, codes, state0
        for _ in range(3):
            p, c, state, _ = update(gs, gw, state, p, c)
        results.append(p)
    for name in ("QuantConv_0", "QuantDense_0"):
        d1 = np.asarray(results[0][name]["kernel_levels"] - params[name]["kernel_levels"])
        d2 = np.asarray(results[1][name]["kernel_levels"] - params[name]["kernel_levels"])
        assert np.abs(d1).max() > 1e-3
        np.testing.assert_allclose(d2, d1, rtol=1e-3, atol=1e-6)
    # size-free as well: the first Adam step moves every used level by exactly lr, in both
    # the 288-weight conv and the 32-weight dense layer, although |dL/dlevels| differs
    p1, _, _, _ = update(g, gw, state0, params, codes)
    for name in ("QuantConv_0", "QuantDense_0"):
        step = np.abs(np.asarray(p1[name]["kernel_levels"] - params[name]["kernel_levels"]))
        used = np.abs(np.asarray(g[name]["kernel_levels"])) > 1e-6
        np.testing.assert_allclose(step[used], 1e-2, rtol=1e-3)
    g_conv = np.abs(np.asarray(g["QuantConv_0"]["kernel_levels"])).max()
    g_dense = np.abs(np.asarray(g["QuantDense_0"]["kernel_levels"])).max()
    assert max(g_conv, g_dense) > 2 * min(g_conv, g_dense)  # the gradient scales do differ


def _one_layer(levels, codes_np):
    params = {"layer": {"kernel_levels": jnp.asarray(levels, jnp.float32),
                        "bias": jnp.zeros((codes_np.shape[-1],))}}
    return params, {"layer": {"kernel": jnp.asarray(codes_np, jnp.uint8)}}


def test_level_crossing_is_sorted_and_codes_remapped():
    """Adam's first step is lr*sign(g): chosen to make levels cross."""
    levels = np.array([[-1.0, -0.3, 0.2, 1.0]], np.float32)
    codes_np = np.random.default_rng(0).integers(0, 4, (6, 5)).astype(np.uint8)
    params, codes = _one_layer(levels, codes_np)
    grads = {"layer": {"kernel_levels": jnp.array([[-1.0, 1.0, -1.0, 1.0]]),
                       "bias": jnp.zeros((5,))}}
    w_grads = {"layer": {"kernel": jnp.zeros((6, 5))}}
    opt = Opt(0.0, 0.8, key=key(0))
    new_p, new_c, _, _ = jax.jit(opt.update)(grads, w_grads, opt.init(params, codes),
                                             params, codes)
    unsorted = levels - 0.8 * np.array([[-1.0, 1.0, -1.0, 1.0]])  # [-0.2, -1.1, 1.0, 0.2]
    assert not np.all(np.diff(unsorted) > 0)  # they do cross
    # (Adam's float32 bias correction makes |step| = lr up to ~1e-5 relative)
    np.testing.assert_allclose(new_p["layer"]["kernel_levels"], np.sort(unsorted), rtol=1e-4)
    np.testing.assert_allclose(
        wq.gather_levels(new_p["layer"]["kernel_levels"], new_c["layer"]["kernel"]),
        unsorted[0][codes_np], rtol=1e-4)  # every weight keeps its (moved) level
    assert new_c["layer"]["kernel"].dtype == jnp.uint8


def test_level_crossing_keeps_each_levels_adam_moments():
    """After a crossing, each level's Adam moments follow it to its sorted slot.

    Step 1 makes levels cross (as above); step 2 has zero level gradient, so every level keeps
    moving by its *own* momentum: Adam's step-2 update with g = 0 after g = +-1 is
    lr * (b1 / (1 + b1)) / sqrt(b2 / (1 + b2)) in the direction of its own step 1.
    """
    levels = np.array([[-1.0, -0.3, 0.2, 1.0]], np.float32)
    codes_np = np.random.default_rng(0).integers(0, 4, (6, 5)).astype(np.uint8)
    params, codes = _one_layer(levels, codes_np)
    g = np.array([[-1.0, 1.0, -1.0, 1.0]], np.float32)
    grads = {"layer": {"kernel_levels": jnp.asarray(g), "bias": jnp.zeros((5,))}}
    zero = jax.tree.map(jnp.zeros_like, grads)
    w_grads = {"layer": {"kernel": jnp.zeros((6, 5))}}
    lr, b1, b2 = 0.8, 0.9, 0.999
    opt = Opt(0.0, lr, key=key(0))
    update = jax.jit(opt.update)
    p1, c1, s1, _ = update(grads, w_grads, opt.init(params, codes), params, codes)
    p2, c2, _, _ = update(zero, w_grads, s1, p1, c1)
    step2 = lr * (b1 / (1 + b1)) / np.sqrt(b2 / (1 + b2))
    expected = levels - lr * np.sign(g) - step2 * np.sign(g)  # per original level
    np.testing.assert_allclose(p2["layer"]["kernel_levels"], np.sort(expected), rtol=1e-4)
    np.testing.assert_allclose(
        wq.gather_levels(p2["layer"]["kernel_levels"], c2["layer"]["kernel"]),
        expected[0][codes_np], rtol=1e-4)


def test_level_statistics_identity_permutation_is_bitwise():
    """Without a crossing the permutation is the identity: the state is unchanged bitwise."""
    from dq_jax.optim import permute_level_statistics
    state = {"mu": {"layer": {"kernel_levels": jnp.array([[0.1, -0.2, 0.3, 1e-30]])},
                    "other": {"kernel": jnp.ones((2, 4))}}}
    perm = {("layer", "kernel_levels"): jnp.argsort(jnp.array([[0.0, 1.0, 2.0, 3.0]]), -1)}
    out = permute_level_statistics(state, perm)
    np.testing.assert_array_equal(out["mu"]["layer"]["kernel_levels"],
                                  state["mu"]["layer"]["kernel_levels"])
    perm = {("layer", "kernel_levels"): jnp.array([[3, 2, 1, 0]])}
    out = permute_level_statistics(state, perm)
    np.testing.assert_array_equal(out["mu"]["layer"]["kernel_levels"],
                                  np.float32([[1e-30, 0.3, -0.2, 0.1]]))
    np.testing.assert_array_equal(out["mu"]["other"]["kernel"], np.ones((2, 4)))


# ---------------------------------------------------------------- weight decay

def test_weight_decay_moves_w_q_toward_zero_in_expectation():
    levels = np.array([[-1.5, -0.5, 0.5, 1.5]], np.float32)
    codes_np = np.random.default_rng(0).integers(0, 4, (64, 64)).astype(np.uint8)
    params, codes = _one_layer(levels, codes_np)
    zero_g = jax.tree.map(jnp.zeros_like, params)
    zero_w = {"layer": {"kernel": jnp.zeros((64, 64))}}
    lr, wd = 0.5, 0.1  # target W~ = (1 - lr*wd) W_q = 0.95 W_q
    w_old = levels[0][codes_np].astype(np.float64)
    for rounding in ("stochastic",):  # (nearest + small steps: see the tiny-LR test)
        opt = Opt(lr, 1e-2, weight_decay=wd, rounding=rounding, key=key(5))
        new_p, new_c, _, _ = jax.jit(opt.update)(zero_g, zero_w,
                                                 opt.init(params, codes), params, codes)
        # levels are not decayed (no gradient: Adam leaves them; no wd on levels)
        np.testing.assert_array_equal(new_p["layer"]["kernel_levels"], levels)
        w_new = np.asarray(wq.gather_levels(new_p["layer"]["kernel_levels"],
                                            new_c["layer"]["kernel"]), np.float64)
        target = (1 - lr * wd) * w_old
        # E[w_new] = target entrywise; the mean deviation is within 5 sigma
        lo = np.where(np.abs(w_old) > 1.0, np.sign(w_old) * 0.5, -np.sign(w_old) * 0.5)
        gap = np.abs(w_old - lo)
        p = np.abs(target - lo) / gap  # probability of keeping the old level
        sigma = np.sqrt((gap ** 2 * p * (1 - p)).sum()) / w_old.size
        assert abs((w_new - target).mean()) < 5 * sigma
        # toward zero: the sum of |W_q| shrinks, by about lr*wd of it
        shrink = 1 - (np.abs(w_new).sum() / np.abs(w_old).sum())
        assert 0.02 < shrink < 0.055, shrink  # expected 3.75% (half the codes are +-1.5)
        assert np.all(np.abs(w_new) <= np.abs(w_old))  # no entry moves away from 0


def test_weight_decay_that_skips_float_params_warns_once_naming_them():
    """A nonzero weight decay over float params it does not decay (ndim > 1, not 'kernel':
    a custom `self.param('w', ...)`, an embedding) warns, naming them and the fix; what it does
    decay (kernels, W_q), 1-D params and a zero decay stay silent. Chaining the masked decay
    in front, as the warning says, decays them."""
    import warnings
    levels = np.array([[-1.5, -0.5, 0.5, 1.5]], np.float32)
    params, codes = _one_layer(levels, np.zeros((4, 4), np.uint8))
    params = {**params, "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
              "emb": {"embedding": jnp.ones((5, 3))}, "conv": {"w": jnp.ones((1, 1, 2, 2))}}
    trainable = {"params": params, "codes": codes}
    with pytest.warns(optim.UndecayedParamsWarning) as rec:
        dq_optimizer(0.1, 1e-3, weight_decay=1e-4).init(trainable)
    msg = str(rec[0].message)
    assert len(rec) == 1 and "params/conv/w" in msg and "params/emb/embedding" in msg, msg
    assert "dense" not in msg and "layer" not in msg and "optax.masked" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dq_optimizer(0.1, 1e-3, weight_decay=0.0).init(trainable)
        no_odd = {"params": {k: v for k, v in params.items() if k not in ("emb", "conv")},
                  "codes": codes}
        dq_optimizer(0.1, 1e-3, weight_decay=1e-4).init(no_odd)
    # the fix the warning names: the masked decay in front decays exactly those leaves
    wd, lr = 0.5, 0.1
    mask = {"params": jax.tree_util.tree_map_with_path(
        lambda p, _: p[0].key in ("emb", "conv"), params), "codes": jax.tree.map(
        lambda _: False, codes)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optim.UndecayedParamsWarning)
        tx = optax.chain(optax.masked(optax.add_decayed_weights(wd), mask),
                         dq_optimizer(lr, 1e-3, momentum=0.0, rounding="nearest"))
        state = tx.init(trainable)
    grads = {"params": jax.tree.map(jnp.zeros_like, params),
             "codes": {"layer": {"kernel": jnp.zeros((4, 4))}}}
    updates, _ = tx.update(grads, state, trainable)
    np.testing.assert_allclose(updates["params"]["conv"]["w"], -lr * wd * params["conv"]["w"])
    np.testing.assert_allclose(updates["params"]["emb"]["embedding"], -lr * wd)
    assert not np.any(updates["params"]["dense"]["kernel"])  # weight_decay=0 in dq_optimizer


def test_code_histogram_entropy_hand_computed():
    entropy = jax.jit(code_histogram_entropy, static_argnums=1)
    for codes, bits in (([0, 0, 1, 1], 1.0), ([0, 1, 2, 3], 2.0), ([2, 2, 2, 2], 0.0),
                        ([0, 0, 0, 3], 0.8112781)):  # -(3/4 log2 3/4 + 1/4 log2 1/4)
        np.testing.assert_allclose(entropy(jnp.array(codes, jnp.uint8), 4), bits, rtol=1e-6)


def test_bad_arguments_and_mismatched_gradients(small, small_grads):
    """Every misuse is one ValueError naming the problem and the fix."""
    with pytest.raises(ValueError, match=r"rounding='round'.*'stochastic', 'nearest'"):
        dq_optimizer(0.1, 0.1, rounding="round")
    with pytest.raises(ValueError, match=r"key must be a PRNG key or an int seed"):
        dq_optimizer(0.1, 0.1, key=jnp.zeros(2, jnp.float32))
    _, params, codes, _, _, _ = small
    g, gw = small_grads
    tx = dq_optimizer(0.1, 0.1)
    trainable = {"params": params, "codes": codes}
    state = tx.init(trainable)
    with pytest.raises(ValueError, match="perturbations.*dq_grads"):  # one layer's dL/dW_q
        tx.update({"params": g, "codes": {"QuantConv_0": gw["QuantConv_0"]}}, state, trainable)
    with pytest.raises(ValueError, match=r"needs params .*tx.update\(grads, state, params\)"):
        tx.update({"params": g, "codes": gw}, state)
    with pytest.raises(ValueError, match=r"updates must be the trainable tree.*dq_grads"):
        tx.update({"params": g, "perturbations": gw}, state, trainable)
    with pytest.raises(ValueError, match=r"params must be the trainable tree"):
        tx.init(params)
    with pytest.raises(ValueError, match=r"needs integer codes and a params/QuantConv_0"):
        tx.init({"params": {}, "codes": codes})
    assert optim.dq_grads({"params": g, "perturbations": gw}) == {"params": g, "codes": gw}
    with pytest.raises(ValueError, match=r"dq_grads expects keys 'params' and 'perturbations'"):
        optim.dq_grads({"params": g, "codes_typo": gw})


# ---------------------------------------------------------------- end to end

class DigitsNet(nn.Module):
    """3-conv net: float conv 16, 2-bit QuantConv 32 (stride 2), QuantConv 32, float dense.

    Reaches ~0.97 test accuracy in 300 steps (seeds 0-2: 0.973-0.976); chance is 0.10.
    """

    quant: QuantConfig

    @nn.compact
    def __call__(self, x, train):
        bn = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(bn()(nn.Conv(16, (3, 3))(x)))  # first conv stays float
        x = QuantConv(32, (3, 3), strides=2, use_bias=False, quant=self.quant)(x, train=train)
        x = nn.relu(bn()(x))
        x = QuantConv(32, (3, 3), use_bias=False, quant=self.quant)(x, train=train)
        x = nn.relu(bn()(x))
        return nn.Dense(10)(x.mean((1, 2)))  # last dense stays float


def test_digits_w2a2_learns():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int32), test_size=0.25,
                                          random_state=0, stratify=d.target)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    steps = 300
    model = DigitsNet(W2A2)
    params, codes, rest = _split(jax.jit(partial(model.init, train=False))(key(0), xtr[:2]))
    shape = optax.cosine_decay_schedule(1.0, steps)
    opt = Opt(lambda s: 0.05 * shape(s), lambda s: 1e-3 * shape(s), weight_decay=5e-4,
              key=key(1))
    state = opt.init(params, codes)
    step = make_step(model, opt, mutable=("batch_stats", "quant_stats"))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(xtr), 64)
        params, codes, rest, state, loss, _ = step(params, codes, rest, state, xtr[idx], ytr[idx])
        losses.append(float(loss))
        if len(losses) % 75 == 0:  # a real training loop keeps the invariants too
            _check_invariants(params, codes)
    for path, w_q in effective_kernels(params, codes).items():
        assert len(np.unique(np.asarray(w_q))) <= 4, path
    logits = jax.jit(lambda v, xb: model.apply(v, xb, train=False))(
        {"params": params, "codes": codes, **rest}, xte)
    acc = float((np.asarray(logits).argmax(-1) == yte).mean())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert acc >= 0.90, acc


def test_bfloat16_code_momentum_halves_the_buffer_and_still_moves_codes():
    """The W_q momentum is most of a DQ train state; in bfloat16 it takes half the bytes,
    and the update still re-assigns codes like the float32 one (same direction)."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 16))
    levels, codes = wq.lloyd_init(w, 4, "per_layer", 3)
    params, codes = {"l": {"kernel_levels": levels}}, {"l": {"kernel": codes}}
    g_w = {"l": {"kernel": jnp.sign(w)}}  # pushes every weight toward 0
    states, moved = {}, {}
    for dtype in ("float32", "bfloat16"):
        opt = Opt(0.5, 0.0, rounding="nearest", code_momentum_dtype=dtype,
                  key=jax.random.PRNGKey(1))
        st = opt.init(params, codes)
        grads = {"l": {"kernel_levels": jnp.zeros_like(levels)}}
        _, new_codes, st, _ = opt.update(grads, g_w, st, params, codes)
        states[dtype] = st
        before = effective_kernels(params, codes)[("l",)]
        after = effective_kernels(params, new_codes)[("l",)]
        moved[dtype] = np.asarray(jnp.abs(after) < jnp.abs(before))
    trace = lambda st: jax.tree.leaves(st.codes)[0]
    nbytes = lambda st: sum(x.nbytes for x in jax.tree.leaves(st.codes))
    assert trace(states["bfloat16"]).dtype == jnp.bfloat16
    assert nbytes(states["bfloat16"]) < 0.51 * nbytes(states["float32"]) + 64
    assert moved["float32"].mean() > 0.3
    np.testing.assert_array_equal(moved["bfloat16"], moved["float32"])
    with pytest.raises(ValueError, match="code_momentum_dtype='float16'.*'bfloat16'"):
        dq_optimizer(0.1, 0.0, code_momentum_dtype="float16")



def test_code_momentum_drives_only_the_code_update():
    """`code_momentum` sets the decay of the W_q momentum buffer and nothing else."""
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 8))
    levels, codes = wq.lloyd_init(w, 4, "per_layer", 3)
    params, codes = {"l": {"kernel_levels": levels, "bias": jnp.zeros(8)}}, {"l": {"kernel": codes}}
    grads = {"l": {"kernel_levels": jnp.zeros_like(levels), "bias": jnp.full(8, 0.01)}}
    g_w = {"l": {"kernel": jnp.full(w.shape, 0.01)}}
    traces = {}
    for beta in (None, 0.5, 0.99):
        opt = Opt(0.1, 0.0, momentum=0.9, code_momentum=beta, rounding="nearest", key=key(0),
                  code_momentum_dtype="float32")  # exact traces (bf16: 2^-8 relative)
        st = opt.init(params, codes)
        for _ in range(2):
            _, _, st, _ = opt.update(grads, g_w, st, params, codes)
        traces[beta] = ([x for x in jax.tree.leaves(st.codes) if x.ndim == 4][0], st.params)
    # Two steps of a constant gradient 0.01 leave trace = 0.01 * (1 + beta).
    for beta, want in ((None, 0.019), (0.5, 0.015), (0.99, 0.0199)):
        assert traces[beta][0].shape == w.shape
        np.testing.assert_allclose(np.asarray(traces[beta][0]), want, rtol=1e-6)
    # The float params' momentum stays the model's (0.9) whatever code_momentum is.
    for a, b in zip(jax.tree.leaves(traces[None][1]), jax.tree.leaves(traces[0.5][1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- bitwise guard (frozen reference)

def _names(keypath) -> tuple:
    """Key path -> names; a tuple dict key (the reference's module paths) is spread out."""
    out = []
    for k in keypath:
        k = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        out.extend(k if isinstance(k, tuple) else (k,))
    return tuple(str(x) for x in out)


def _leaves_by_path(tree) -> dict:
    return {_names(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _stat_leaves(tree) -> list:
    """The statistics of an optimizer state (momentum traces, Adam's count/mu/nu), in order,
    without the step counts of schedules: under inject_hyperparams a learning rate is a value,
    not a schedule, so those counts are not in the inner state."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return [x for x in jax.tree.leaves(tree, is_leaf=is_sched) if not is_sched(x)]


def _to_new_state(ref_state, new_state):
    """The reference state in the new layout (same values): codes momentum nested like the
    codes instead of keyed by module-path tuples, the key as key data; `_stat_leaves` align."""
    def convert(ref, new):
        same = len(jax.tree.leaves(ref)) == len(jax.tree.leaves(new))
        out = jax.tree.unflatten(jax.tree.structure(new),
                                 jax.tree.leaves(ref) if same else _stat_leaves(ref))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(new), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
        return out
    return optim.DQState(params=convert(ref_state.params, new_state.params),
                         codes=convert(ref_state.codes, new_state.codes),
                         key=jax.random.key_data(ref_state.key))


@pytest.mark.parametrize("rounding,momentum_dtype,key_impl", [
    ("stochastic", "bfloat16", "unsafe_rbg"), ("stochastic", "float32", "unsafe_rbg"),
    ("nearest", "bfloat16", "unsafe_rbg"), ("nearest", "float32", "unsafe_rbg"),
    ("stochastic", "bfloat16", "threefry2x32")])  # threefry: the program's default impl
@pytest.mark.parametrize("via", ["dq_optimizer", "inject_hyperparams"])
def test_new_transform_matches_frozen_reference_bitwise(small, small_grads, rounding, via,
                                                         momentum_dtype, key_impl):
    """5 updates of the frozen `QuantOptimizer` (tests/reference_optim.py) and of
    `dq_optimizer` (bare, and as train.py builds it: inject_hyperparams over explicit
    schedules) from the same inputs at every step, run eagerly (op by op, so no fusion
    difference can change round-off): params, codes, SGD/Adam statistics, key and diagnostics
    are bitwise equal, with unsafe_rbg keys and with threefry keys (the default impl, what
    the program uses). Per-layer (conv) and per-channel (dense) levels, weight decay,
    Nesterov, a code LR and momentum of their own, levels pushed to cross, codes that flip.

    The one allowed difference: a level slot that a crossing moved gets the update
    `sorted - old`, and `old + (sorted - old)` can differ from `sorted` by the rounding of that
    difference (exact when the two are within a factor 2, Sterbenz): at most 1 ulp of the
    larger magnitude, asserted for exactly those slots. The diagnostics of a layer whose
    levels crossed differ by design: the reference measured the codes before its sort,
    `code_diagnostics` measures the stored (relabelled) ones, so its flip rate counts the
    relabelled codes and a per-channel layer's pooled histogram changes; they are only
    range-checked at such a step, bitwise everywhere else.
    """
    from tests import reference_optim
    key = lambda seed: jax.random.key(seed, impl=key_impl)
    _, params, codes, _, _, _ = small
    g0, gw0 = small_grads
    # Level gradients that push neighbours toward each other (Adam moves each by ~lr a step).
    push = {"QuantConv_0": np.float32([[-1, 1, -1, 1]]),
            "QuantDense_0": np.tile(np.float32([[1, -1, 1, -1]]), (3, 1))}
    gap = min(float(np.diff(np.asarray(params[n]["kernel_levels"])).min()) for n in push)
    shape = lambda step: 1.0 - 0.1 * step  # a schedule shape the two must follow alike
    # The reference draws per layer: the new transform's 'per_layer' stream (kept for old
    # workdirs) is the one to match bitwise; the default 'hash' stream is tested statistically.
    kw = dict(momentum=0.9, nesterov=True, weight_decay=0.05, rounding=rounding,
              code_momentum=0.5, code_momentum_dtype=momentum_dtype)
    lr, levels_lr, code_lr = 0.05, 0.6 * gap, 20.0  # code LR: nearest needs big moves to flip
    ref = reference_optim.QuantOptimizer(
        learning_rate=lr, levels_learning_rate=levels_lr, code_learning_rate=code_lr,
        schedule_shape=shape, **kw)
    scheds = dict(learning_rate=lambda s: lr * shape(s),
                  levels_learning_rate=lambda s: levels_lr * shape(s),
                  code_learning_rate=lambda s: code_lr * shape(s))
    if via == "dq_optimizer":
        new = dq_optimizer(**scheds, key=key(3), rounding_stream="per_layer", **kw)
        inner = lambda st: st
        wrap = lambda st, ref_st: _to_new_state(ref_st, st)
    else:
        new = optax.inject_hyperparams(
            dq_optimizer, static_args=("momentum", "nesterov", "weight_decay", "rounding",
                                       "code_momentum", "code_momentum_dtype",
                                       "rounding_stream", "key"))(
            **scheds, key=key(3), rounding_stream="per_layer", **kw)
        inner = lambda st: st.inner_state
        wrap = lambda st, ref_st: st._replace(inner_state=_to_new_state(ref_st, st.inner_state))

    ref_state = ref.init(params, codes, key(3))
    new_state = new.init({"params": params, "codes": codes})
    np.testing.assert_array_equal(jax.random.key_data(ref_state.key), inner(new_state).key)
    crossings = flips = 0
    for step in range(5):  # eager: nothing here is jitted
        g = jax.tree.map(lambda a: a * (1.0 + 0.5 * step), g0)  # a new gradient every step
        for n in push:
            g[n]["kernel_levels"] = jnp.asarray(push[n] * (1 + step))
        gw = jax.tree.map(lambda a: a * (1.0 - 0.3 * step), gw0)
        r_params, r_codes, r_state, r_diag = ref.update(g, gw, ref_state, params, codes)
        unsorted = _unsorted_levels(ref, g, ref_state, params)
        trainable = {"params": params, "codes": codes}
        updates, n_state = new.update({"params": g, "codes": gw}, wrap(new_state, ref_state),
                                      trainable)
        out = optax.apply_updates(trainable, updates)
        # codes, every SGD/Adam statistic (the levels' moments permuted alike) and the key
        jax.tree.map(np.testing.assert_array_equal, out["codes"], r_codes)
        if via == "dq_optimizer":  # the same structure: compare by path
            a, b = _leaves_by_path(inner(n_state).params), _leaves_by_path(r_state.params)
            assert a.keys() == b.keys()
            for path in a:
                np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
        # (W_q momentum: nested like the codes here, keyed by module-path tuples there; the
        # same leaf order, as _to_new_state checks)
        for part in ("params", "codes"):
            for x, y in zip(_stat_leaves(getattr(inner(n_state), part)),
                            _stat_leaves(getattr(r_state, part)), strict=True):
                np.testing.assert_array_equal(x, y)
        if via == "inject_hyperparams":  # the rates it applied: the schedules at this step
            for name, sched in scheds.items():
                np.testing.assert_array_equal(n_state.hyperparams[name],
                                              sched(jnp.asarray(step, jnp.int32)))
        np.testing.assert_array_equal(inner(n_state).key, jax.random.key_data(r_state.key))
        # params: bitwise, except level slots a crossing moved (<= 1 ulp, see docstring)
        n_flat, r_flat = _leaves_by_path(out["params"]), _leaves_by_path(r_params)
        assert n_flat.keys() == r_flat.keys()
        relabelled = set()
        for path, want in r_flat.items():
            got = n_flat[path]
            if path[-1] != "kernel_levels":
                np.testing.assert_array_equal(got, want, err_msg=str(path))
                continue
            moved = want != unsorted[path[0]]  # the sort put another level in this slot
            if moved.any():
                relabelled.add(path[0])
            np.testing.assert_array_equal(got[~moved], want[~moved], err_msg=str(path))
            old = np.asarray(params[path[0]]["kernel_levels"])
            ulp = np.spacing(np.maximum(np.abs(want), np.abs(old)))
            assert np.all(np.abs(got - want)[moved] <= ulp[moved]), (path, got, want)
        # diagnostics: bitwise, but for the flip rate at a step whose sort relabelled codes
        n_diag = optim.code_diagnostics(codes, out["codes"], out["params"])
        assert n_diag.keys() == r_diag.keys()
        for layer in r_diag:
            if layer not in relabelled:
                np.testing.assert_array_equal(n_diag[layer]["code_entropy"],
                                              r_diag[layer]["code_entropy"])
                np.testing.assert_array_equal(n_diag[layer]["flip_rate"],
                                              r_diag[layer]["flip_rate"])
            else:
                assert 0 <= float(n_diag[layer]["flip_rate"]) <= 1
                assert 0 <= float(n_diag[layer]["code_entropy"]) <= 2 + 1e-6
        crossings += bool(relabelled)
        flips += sum(int(np.sum(np.asarray(a) != np.asarray(b)))
                     for a, b in zip(jax.tree.leaves(codes), jax.tree.leaves(r_codes)))
        params, codes, ref_state, new_state = r_params, r_codes, r_state, n_state
    assert crossings >= 1, "the levels never crossed: the test lost its point"
    assert flips > 0, "no code ever flipped: the test lost its point"


def _unsorted_levels(ref, g, state, params) -> dict:
    """The reference's levels after its Adam step and before its sort (its own optax update,
    recomputed eagerly as it does it), by layer."""
    updates, _ = ref.params_tx.update(g, state.params, params)
    new = optax.apply_updates(params, updates)
    return {n: np.asarray(v["kernel_levels"]) for n, v in new.items() if "kernel_levels" in v}


# ---------------------------------------------------------------- composition with optax

def _exact_problem(np_rng):
    """A hand-made two-layer tree where every step is exact float arithmetic: dyadic levels,
    gradients, learning rates and momentum, and levels LR 0 (Adam's step times 0). Results
    of differently compiled programs (a wrapper's lax.cond, jit) then agree bitwise on any
    CPU, so the compositions below are compared exactly."""
    lv = np.float32([[-1.5, -0.5, 0.5, 1.5]])
    params = {"conv": {"kernel_levels": jnp.asarray(lv), "bias": jnp.zeros(8)},
              "dense": {"kernel_levels": jnp.asarray(np.tile(lv, (4, 1)))},
              "head": {"kernel": jnp.ones((4, 2))}}
    codes = {"conv": {"kernel": jnp.asarray(np_rng.integers(0, 4, (3, 3, 2, 8)), jnp.uint8)},
             "dense": {"kernel": jnp.asarray(np_rng.integers(0, 4, (16, 4)), jnp.uint8)}}

    def grads(seed):
        r = np.random.default_rng(seed)
        dy = lambda shape: jnp.asarray(r.integers(-8, 9, shape) / 8, jnp.float32)
        return {"params": jax.tree.map(lambda a: dy(a.shape), params),
                "codes": jax.tree.map(lambda c: dy(c.shape), codes)}
    return {"params": params, "codes": codes}, grads


def _tx(**kw):
    args = dict(learning_rate=0.25, levels_learning_rate=0.0, momentum=0.5,
                weight_decay=0.125, key=jax.random.PRNGKey(7))
    return dq_optimizer(**{**args, **kw})


def _run(tx, trainable, grads, state=None, jit=True):
    state = tx.init(trainable) if state is None else state
    update = jax.jit(tx.update) if jit else tx.update
    updates, state = update(grads, state, trainable)
    return optax.apply_updates(trainable, updates), state, updates


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_updates_are_exact_float_code_deltas(np_rng):
    """Codes get integer-valued deltas in the gradient's dtype; uint8 + delta is exact, also
    with the float zeros a wrapper substitutes; codes really move; the result is uint8."""
    trainable, grads = _exact_problem(np_rng)
    g = jax.tree.map(lambda a: a * 8, grads(0))  # big steps: many codes move by >= 1 level
    new, _, updates = _run(_tx(rounding="nearest"), trainable, g)
    for path, d in flatten(updates["codes"]).items():
        old, c = flatten(trainable["codes"])[path], flatten(new["codes"])[path]
        assert d.dtype == jnp.float32 and np.all(np.asarray(d) == np.round(np.asarray(d)))
        assert c.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(c, np.int32) - np.asarray(old, np.int32), d)
        assert np.any(np.abs(np.asarray(d)) >= 1)
    zeros = optax.apply_updates(trainable, jax.tree.map(jnp.zeros_like, g))
    _assert_trees_equal(zeros, trainable)


def test_chain_with_a_transformation_in_front(np_rng):
    """chain(scale(0.5), dq) on g == dq on g/2 (exact); a huge clip leaves it unchanged."""
    trainable, grads = _exact_problem(np_rng)
    g = grads(1)
    half = jax.tree.map(lambda a: a * 0.5, g)
    direct, s_direct, _ = _run(_tx(), trainable, half)
    chained, s_chain, _ = _run(optax.chain(optax.scale(0.5), _tx()), trainable, g)
    _assert_trees_equal(chained, direct)
    _assert_trees_equal(s_chain[1], s_direct)
    clipped, _, _ = _run(optax.chain(optax.clip_by_global_norm(1e9), _tx()), trainable, half)
    _assert_trees_equal(clipped, direct)


def test_apply_if_finite_skips_a_nonfinite_step_whole(np_rng):
    """A NaN in one dL/dW_q: params, codes, the key and the schedule count stay as they were;
    the next finite step is exactly the first step of an undisturbed run (the skipped step
    did not advance the learning-rate schedule)."""
    trainable, grads = _exact_problem(np_rng)
    sched = optax.piecewise_constant_schedule(0.25, {1: 0.5})  # 0.25, then 0.125
    make = lambda: optax.apply_if_finite(optax.inject_hyperparams(
        dq_optimizer, static_args=("momentum", "weight_decay", "key"))(
            learning_rate=sched, levels_learning_rate=0.0, momentum=0.5, weight_decay=0.125,
            key=jax.random.PRNGKey(7)), max_consecutive_errors=5)
    tx = make()
    bad = grads(2)
    bad["codes"]["dense"]["kernel"] = bad["codes"]["dense"]["kernel"].at[0, 0].set(jnp.nan)
    state0 = tx.init(trainable)
    after_bad, state1, _ = _run(tx, trainable, bad, state0)
    _assert_trees_equal(after_bad, trainable)
    _assert_trees_equal(state1.inner_state, state0.inner_state)  # key, count, momenta
    assert int(state1.total_notfinite) == 1
    skipped_then_good, state2, _ = _run(tx, trainable, grads(3), state1)
    undisturbed, state_u, _ = _run(make(), trainable, grads(3))
    _assert_trees_equal(skipped_then_good, undisturbed)
    _assert_trees_equal(state2.inner_state, state_u.inner_state)
    assert float(state2.inner_state.hyperparams["learning_rate"]) == 0.25


def test_inject_hyperparams_schedules_and_reads_back_the_rate(np_rng):
    """inject_hyperparams(dq_optimizer) over a schedule == dq_optimizer given the schedule,
    3 steps; `hyperparams['learning_rate']` is the rate each step applied."""
    trainable, grads = _exact_problem(np_rng)
    sched = optax.piecewise_constant_schedule(0.25, {1: 0.5, 2: 0.5})
    injected = optax.inject_hyperparams(dq_optimizer, static_args=("momentum", "key"))(
        sched, 0.0, momentum=0.5, key=jax.random.PRNGKey(7))
    direct = dq_optimizer(sched, 0.0, momentum=0.5, key=jax.random.PRNGKey(7))
    a = b = trainable
    sa = sb = None
    for step, want in enumerate((0.25, 0.125, 0.0625)):
        a, sa, _ = _run(injected, a, grads(10 + step), sa)
        b, sb, _ = _run(direct, b, grads(10 + step), sb)
        _assert_trees_equal(a, b)
        assert float(sa.hyperparams["learning_rate"]) == want and int(sa.count) == step + 1
    np.testing.assert_array_equal(sa.inner_state.key, sb.key)


def test_multisteps_updates_codes_once_from_the_accumulated_gradient(np_rng):
    """MultiSteps(k=2): the first micro-batch changes nothing (and keeps the key); the second
    applies one update from the mean dL/dW_q (and mean float gradients), exactly the single
    step on the averaged gradient. Its accumulators are float32 at the uint8 code leaves."""
    trainable, grads = _exact_problem(np_rng)
    g1, g2 = grads(20), grads(21)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)  # exact (dyadic)
    ms = optax.MultiSteps(_tx(), every_k_schedule=2)
    state = ms.init(trainable)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.acc_grads["codes"]))
    first, state, _ = _run(ms, trainable, g1, state)
    _assert_trees_equal(first, trainable)
    np.testing.assert_array_equal(state.inner_opt_state.key, _tx().init(trainable).key)
    second, state, _ = _run(ms, first, g2, state)
    single, s_single, _ = _run(_tx(), trainable, mean)
    _assert_trees_equal(second, single)
    _assert_trees_equal(state.inner_opt_state, s_single)
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
        jax.tree.leaves(second["codes"]), jax.tree.leaves(trainable["codes"])))


def test_flax_train_state_apply_gradients_runs_the_dq_step(small, small_grads):
    """dq_jax.train_state.TrainState (a flax TrainState): create from model.init's variables,
    apply_gradients(grads=jax.grad over differentiable()) == tx.update + apply_updates; the
    activation statistics follow a batch_stats-only `mutable`; a plain optax tx is refused."""
    from dq_jax.train_state import TrainState
    from flax.training import train_state as flax_train_state
    model, params, codes, stats, x, y = small
    tx = dq_optimizer(0.05, 1e-2, key=key(0))
    state = TrainState.create(apply_fn=model.apply, tx=tx,
                              variables={"params": params, "codes": codes, **stats})
    assert isinstance(state, flax_train_state.TrainState)

    def loss_fn(diff):
        logits, new = state.apply_fn(state.variables(diff), x, train=True,
                                     mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.differentiable())
    assert "quant_stats" in new_vars  # added to `mutable` by the state's apply_fn
    g, gw = small_grads  # (another compiled program: equal up to round-off)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads, {"params": g, "perturbations": gw})
    # both eager (op by op): the same operations, so bitwise
    new_state = state.apply_gradients(grads=grads, **new_vars)
    trainable = {"params": params, "codes": codes}
    updates, opt_state = tx.update(
        {"params": grads["params"], "codes": grads["perturbations"]}, state.opt_state, trainable)
    want = optax.apply_updates(trainable, updates)
    assert int(new_state.step) == 1
    jax.tree.map(np.testing.assert_array_equal,
                 (new_state.params, new_state.codes, new_state.opt_state),
                 (want["params"], want["codes"], opt_state))
    with pytest.raises(TypeError, match="does not contain dq_jax.optim.dq_optimizer"):
        TrainState.create(apply_fn=model.apply, tx=optax.sgd(0.1),
                          variables={"params": params, "codes": codes, **stats})


# ---------------------------------------------------------------- stacked (nn.scan) layers

def test_stacked_levels_and_codes_update_like_their_slices(np_rng):
    """Levels [S, G, L] and codes [S, ...kernel] (an nn.scan-stacked QuantConv): the update
    maps over the stack axis. With nearest rounding, each slice's codes and float values are
    those of the same layer updated alone, a crossing in one slice is sorted/remapped there
    only, and Adam's per-level moments follow; stochastic rounding draws per slice."""
    stack = 3
    lv = np.float32([[-1.5, -0.5, 0.5, 1.5]])
    levels = np.stack([lv, lv + 0.25, lv * 2])                       # [S, 1, 4]
    codes = np_rng.integers(0, 4, (stack, 3, 3, 2, 4)).astype(np.uint8)
    gw = (np_rng.integers(-8, 9, codes.shape) / 2).astype(np.float32)
    g_lv = np.zeros_like(levels)
    g_lv[1] = [[-1, 1, -1, 1]]  # slice 1: levels 0/1 and 2/3 cross with a big Adam step
    make = lambda **kw: dq_optimizer(0.25, 0.6, momentum=0.0, rounding="nearest",
                                     key=jax.random.PRNGKey(3), **kw)

    def run(tx, lv_, c_, g_, gw_):
        trainable = {"params": {"l": {"kernel_levels": jnp.asarray(lv_)}},
                     "codes": {"l": {"kernel": jnp.asarray(c_)}}}
        grads = {"params": {"l": {"kernel_levels": jnp.asarray(g_)}},
                 "codes": {"l": {"kernel": jnp.asarray(gw_)}}}
        new, state, _ = _run(tx, trainable, grads)
        return (np.asarray(new["params"]["l"]["kernel_levels"]),
                np.asarray(new["codes"]["l"]["kernel"]), state)

    s_lv, s_c, s_state = run(make(), levels, codes, g_lv, gw)
    for i in range(stack):
        lv_i, c_i, st_i = run(make(), levels[i], codes[i], g_lv[i], gw[i])
        np.testing.assert_allclose(s_lv[i], lv_i, rtol=1e-6)
        np.testing.assert_array_equal(s_c[i], c_i)
        np.testing.assert_allclose(
            s_state.params.inner_states["levels"].inner_state[0].mu["l"]["kernel_levels"][i],
            st_i.params.inner_states["levels"].inner_state[0].mu["l"]["kernel_levels"],
            rtol=1e-6)
    assert np.all(np.diff(s_lv, axis=-1) >= 0)
    assert not np.array_equal(s_c[1], codes[1])  # slice 1 was remapped by its crossing
    # stochastic: runs, keeps the invariants, and slices draw independently
    trainable = {"params": {"l": {"kernel_levels": jnp.asarray(levels)}},
                 "codes": {"l": {"kernel": jnp.asarray(codes)}}}
    same = {"params": {"l": {"kernel_levels": jnp.zeros_like(levels)}},
            "codes": {"l": {"kernel": jnp.full(codes.shape, -0.5, jnp.float32)}}}  # W~ = 1.0
    tx = dq_optimizer(1.0, 0.0, momentum=0.0, key=jax.random.PRNGKey(3))
    new, _, _ = _run(tx, {**trainable, "params": {"l": {"kernel_levels":
                                                         jnp.asarray(np.stack([lv] * 3))}},
                          "codes": {"l": {"kernel": jnp.full(codes.shape, 2, jnp.uint8)}}},
                     same)
    c = np.asarray(new["codes"]["l"]["kernel"])
    assert c.dtype == np.uint8 and c.min() >= 2 and c.max() <= 3  # 0.5 or 1.5, p = 1/2
    assert not np.array_equal(c[0], c[1])  # same inputs per slice, different draws


def test_readme_flax_imagenet_train_step_diff_trains(small):
    """README's diff of the Flax ImageNet example's `train_step`: four lines changed, and the
    changed function (context + '+' lines) trains a DQ model held in train_state.TrainState."""
    import re
    from dq_jax.train_state import TrainState
    from tests.helpers import REPO
    text = (REPO / "README.md").read_text()
    (diff,) = [b for b in re.findall(r"```diff\n(.*?)```", text, flags=re.S)
               if "def train_step" in b]
    lines = diff.splitlines()
    assert sum(l.startswith("-") for l in lines) == 4 == sum(l.startswith("+") for l in lines)
    assert "README" in text and "runs DQ with four lines changed" in text
    after = "\n".join(l[1:] for l in lines if not l.startswith("-"))
    model, params, codes, stats, x, y = small

    def cross_entropy_loss(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def compute_metrics(logits, labels):
        return {"loss": cross_entropy_loss(logits, labels)}

    import dq_jax
    namespace = {"jax": jax, "jnp": jnp, "dq_jax": dq_jax, "cross_entropy_loss": cross_entropy_loss,
                 "compute_metrics": compute_metrics}
    exec(compile(after, "README.md (train_step diff)", "exec"), namespace)
    train = partial(model.apply, train=True)  # the zoo's Small takes train= explicitly
    state = TrainState.create(apply_fn=train, tx=dq_optimizer(0.05, 1e-2, key=key(0)),
                              variables={"params": params, "codes": codes, **stats})
    step = jax.jit(partial(namespace["train_step"], learning_rate_fn=lambda s: 0.05))
    losses = []
    for _ in range(15):
        state, metrics = step(state, {"image": x, "label": y})
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 15
    assert state.codes["QuantConv_0"]["kernel"].dtype == jnp.uint8
    assert not np.array_equal(state.codes["QuantConv_0"]["kernel"], codes["QuantConv_0"]["kernel"])
    assert losses[-1] < losses[0], losses


def test_rounding_temperature_one_is_the_unbiased_rule_and_zero_is_nearest(np_rng):
    """On the exact problem (dyadic targets, levels a unit apart): temperature 1 gives the
    codes of the plain stochastic rule bitwise (p' = (p - 1/2) + 1/2 = p exactly here), and a
    schedule at 0, evaluated by inject_hyperparams, gives nearest rounding's codes wherever the
    target is not exactly on a mid-point (there it stays a coin flip between the two)."""
    trainable, grads = _exact_problem(np_rng)
    g = jax.tree.map(lambda a: a * 4, grads(3))  # steps of up to 1.25 gaps: many crossings
    plain, _, _ = _run(_tx(), trainable, g)
    one, _, _ = _run(_tx(rounding_temperature=1.0), trainable, g)
    _assert_trees_equal(one, plain)

    injected = optax.inject_hyperparams(dq_optimizer, static_args=("momentum", "key"))
    zero_tx = injected(learning_rate=0.25, levels_learning_rate=0.0, momentum=0.5,
                       weight_decay=0.125, key=jax.random.PRNGKey(7),
                       rounding_temperature=lambda count: 0.0)
    zero, zero_state, _ = _run(zero_tx, trainable, g)
    assert float(zero_state.hyperparams["rounding_temperature"]) == 0.0
    nearest, _, _ = _run(_tx(rounding="nearest"), trainable, g)
    lv = np.float64([-1.5, -0.5, 0.5, 1.5])
    for path, c in flatten(trainable["codes"]).items():
        w_q = lv[np.asarray(c)]
        target = w_q - 0.25 * (np.asarray(flatten(g["codes"])[path]) + 0.125 * w_q)  # exact
        on_mid = np.isin(target, [-1.0, 0.0, 1.0])
        got = np.asarray(flatten(zero["codes"])[path])
        want = np.asarray(flatten(nearest["codes"])[path])
        assert on_mid.sum() < on_mid.size and np.any(got != np.asarray(c))
        np.testing.assert_array_equal(got[~on_mid], want[~on_mid])
        assert np.all((got[on_mid] == want[on_mid]) | (got[on_mid] == want[on_mid] + 1))


def test_rounding_temperature_rejects_nearest_and_a_bare_schedule():
    with pytest.raises(ValueError, match="rounding='stochastic' only"):
        dq_optimizer(0.1, 0.0, rounding="nearest", rounding_temperature=0.5)
    with pytest.raises(ValueError, match="inject_hyperparams"):
        dq_optimizer(0.1, 0.0, rounding_temperature=lambda count: 1.0)
    with pytest.raises(ValueError, match=r"rounding_temperature=1.5 must lie in \[0, 1\]"):
        dq_optimizer(0.1, 0.0, rounding_temperature=1.5)


def _two_level_steps(rounding: str, level_grad: float, levels_lr: float, steps: int,
                     shape=(2, 3), step=0.375, residual=None, **kwargs):
    """(trainable, state) after each of `steps` updates of one layer with levels [-1, 1], all
    six codes at level 0, code LR 1 without momentum and dL/dW_q = -step (u = +0.375 a step
    by default, exact in binary); level 1 gets gradient `level_grad` under Adam at
    `levels_lr`; `residual` (optional) is the feedback residual to start from."""
    levels = jnp.float32([[-1.0, 1.0]])
    trainable = {"params": {"l": {"kernel_levels": levels}},
                 "codes": {"l": {"kernel": jnp.zeros(shape, jnp.uint8)}}}
    grads = {"params": {"l": {"kernel_levels": jnp.float32([[0.0, level_grad]])}},
             "codes": {"l": {"kernel": jnp.full(shape, -step)}}}
    tx = dq_optimizer(1.0, levels_lr, momentum=0, rounding=rounding, key=0, **kwargs)
    state = tx.init(trainable)
    if residual is not None:
        state = optim.with_feedback_residual(state, {"l": {"kernel": jnp.full(shape, residual)}})
    for _ in range(steps):
        updates, state = tx.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        yield trainable, state


def test_error_feedback_ablation_carries_the_rounding_residual_hand_computed():
    """rounding='error_feedback' (an ablation: a float residual per weight): nearest rounding
    of W_q + u + r, r = target - new W_q. Levels [-1, 1], W_q = -1, u = +0.375 a step (exact
    in binary): targets -0.625, -0.25, +0.125 (-> level 1, r = -0.875), 0.5 (stays at 1).
    Plain nearest rounding never moves (every step is < half the gap)."""
    seen = {}
    for rounding in ("error_feedback", "nearest"):
        seen[rounding] = []
        for trainable, state in _two_level_steps(rounding, 0.0, 0.0, 4):
            c = trainable["codes"]["l"]["kernel"]
            assert c.dtype == jnp.uint8 and len(set(np.asarray(c).ravel().tolist())) == 1
            r = (np.asarray(state.codes[1]["l"]["kernel"]) if rounding == "error_feedback"
                 else None)
            if r is not None:
                assert r.dtype == np.float32 and len(set(r.ravel().tolist())) == 1
            seen[rounding].append((int(c[0, 0]), None if r is None else float(r[0, 0])))
    assert seen["error_feedback"] == [(0, 0.375), (0, 0.75), (1, -0.875), (1, -0.5)]
    assert seen["nearest"] == [(0, None)] * 4


def test_error_feedback_is_a_config_choice_and_not_annealed():
    from dq_jax import configlib
    c = configlib.base_config()
    c.quant.weights, c.quant.acts, c.rounding = "dq", "dq", "error_feedback"
    configlib.validate(c, device_count=1)
    c.rounding_anneal = True
    with pytest.raises(ValueError, match="rounding_anneal"):
        configlib.validate(c, device_count=1)
    with pytest.raises(ValueError, match="rounding_temperature applies to rounding='stochastic'"):
        dq_optimizer(0.1, 0.0, rounding="error_feedback", rounding_temperature=0.5)


def test_latent_feedback_keeps_the_latent_when_levels_move():
    """rounding='latent_feedback' (ablation: latent-STE in DQ's state): the residual is
    re-measured against the updated levels, so `W_q + r` is a latent that only `u` moves
    (-0.625, -0.25, 0.125: dyadic, exact) and the code is its nearest *updated* level.
    Level 1 moves down by Adam (~0.3 a step: 0.7, 0.4, 0.1). At step 2 the latent -0.25 is
    nearer 0.4 than -1 (0.65 vs 0.75): latent_feedback moves the code; error_feedback, whose
    residual is relative to the code's level and is rounded against the old levels
    (-0.25 vs [-1, 0.7]: 0.75 vs 0.95), does not. No distance is within 0.05 of a tie."""
    seen = {}
    for rounding in ("latent_feedback", "error_feedback"):
        seen[rounding] = []
        steps = _two_level_steps(rounding, 1.0, 0.3, 3)
        for step, ((trainable, state), latent) in enumerate(zip(steps, (-0.625, -0.25, 0.125))):
            lv = np.asarray(trainable["params"]["l"]["kernel_levels"])[0]
            np.testing.assert_allclose(lv, [-1.0, 1.0 - 0.3 * (step + 1)], atol=1e-5)
            c = np.asarray(trainable["codes"]["l"]["kernel"])
            r = np.asarray(state.codes[1]["l"]["kernel"])
            assert c.dtype == np.uint8 and r.dtype == np.float32
            if rounding == "latent_feedback":
                np.testing.assert_allclose(lv[c] + r, latent, atol=1e-6)
                np.testing.assert_array_equal(c, np.full(c.shape, np.argmin(np.abs(lv - latent))))
            seen[rounding].append(int(c[0, 0]))
    assert seen["latent_feedback"] == [0, 1, 1]
    assert seen["error_feedback"] == [0, 0, 1]


def test_feedback_residual_bits_keeps_only_the_cells_position():
    """feedback_residual_bits=b (ablation): only a b-bit position of the residual inside its
    cell is used. Levels [-1, 1] (gap 2). At b=2 the grid is r in {-0.75, -0.25, 0.25, 0.75}:
    from r = 0.25 with u = +0.5 a step the residuals are 0.75, -0.75 (after the flip to level
    1), -0.25, 0.25 — all on the grid, so the path is the float one bitwise. At b=1 (centres
    +-0.5; +-1.5 past the edge, which flips the code) from r = 0 with u = +0.375, the residual
    each update used, r_new - u + (W_q new - W_q old), is on that grid, 0 rounds either way
    (+-0.5) and a push past the upper centre flips codes."""
    for rounding in FEEDBACK_ROUNDINGS:
        run = lambda **kw: list(_two_level_steps(rounding, 0.0, 0.0, 4, step=0.5,
                                                 residual=0.25, **kw))
        exact, two = run(), run(feedback_residual_bits=2)
        chex.assert_trees_all_equal(exact, two)
        assert [int(t["codes"]["l"]["kernel"][0, 0]) for t, _ in two] == [0, 1, 1, 1]
        assert [float(st.codes[1]["l"]["kernel"][0, 0]) for _, st in two] == [
            0.75, -0.75, -0.25, 0.25]
        w_q, used = np.full((32, 32), -1.0), set()
        for t, st in _two_level_steps(rounding, 0.0, 0.0, 3, shape=(32, 32),
                                      feedback_residual_bits=1):
            new_w_q = np.float32([-1.0, 1.0])[np.asarray(t["codes"]["l"]["kernel"])]
            q = np.asarray(st.codes[1]["l"]["kernel"]) - 0.375 + (new_w_q - w_q)
            used |= set(np.unique(q).tolist())
            w_q = new_w_q
        assert {-0.5, 0.5} <= used <= {-1.5, -0.5, 0.5, 1.5}, used
        assert np.any(np.asarray(t["codes"]["l"]["kernel"]) == 1)
    with pytest.raises(ValueError, match="applies to the feedback roundings"):
        dq_optimizer(0.1, 0.0, feedback_residual_bits=2)
    with pytest.raises(ValueError, match="must be an int >= 0"):
        dq_optimizer(0.1, 0.0, rounding="latent_feedback", feedback_residual_bits=-1)
    # a structural choice: inject_hyperparams must keep it static, and says so if it is not
    trainable = {"params": {"l": {"kernel_levels": jnp.float32([[-1.0, 1.0]])}},
                 "codes": {"l": {"kernel": jnp.zeros((2, 3), jnp.uint8)}}}
    with pytest.raises(ValueError, match="list it in inject_hyperparams' static_args"):
        optax.inject_hyperparams(dq_optimizer, static_args=("momentum", "rounding", "key"))(
            0.1, 0.0, rounding="latent_feedback", feedback_residual_bits=2).init(trainable)
    static = optax.inject_hyperparams(dq_optimizer, static_args=(
        "momentum", "rounding", "feedback_residual_bits", "key"))(
        0.1, 0.0, rounding="latent_feedback", feedback_residual_bits=2)
    assert "feedback_residual_bits" not in static.init(trainable).hyperparams


class Twins(nn.Module):
    """Three same-shape per-layer QuantConvs and two same-shape per-channel QuantDenses (a
    refactor that batches same-shape layers, e.g. to compile once per shape, must keep each
    layer's own key, draws and statistics)."""

    quant: QuantConfig

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        for _ in range(3):
            x = nn.relu(QuantConv(4, (3, 3), quant=self.quant)(x, train=train))
        x = x.mean((1, 2))
        for _ in range(2):
            x = QuantDense(4, quant=self.quant.replace(granularity="per_channel"))(
                x, train=train)
        return x[..., :3]


@pytest.mark.parametrize("key_impl", ["threefry2x32", "unsafe_rbg"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_same_shape_layers_match_frozen_reference_bitwise(key_impl, rounding):
    """A model of same-shape layers: 4 eager updates of `dq_optimizer` and of the frozen
    reference give bitwise equal codes, params, optimizer statistics and diagnostics, with
    threefry and unsafe_rbg keys (stochastic rounding: some codes flip)."""
    from tests import reference_optim
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 2)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 3, size=8).astype(np.int32))
    model = Twins(W2A2)
    params, codes, stats = _split(jax.jit(partial(model.init, train=False))(
        jax.random.PRNGKey(0), x[:2]))

    @jax.jit
    def grads(params, codes):
        pert = jax.tree.map(lambda c: jnp.zeros(c.shape, jnp.float32), codes)

        def loss_fn(p, pt):
            out, _ = model.apply({"params": p, "codes": codes, "perturbations": pt, **stats},
                                 x, train=True, mutable=["quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
        return jax.grad(loss_fn, argnums=(0, 1))(params, pert)

    k = jax.random.key(5, impl=key_impl)
    kw = dict(momentum=0.9, nesterov=False, weight_decay=0.01, rounding=rounding,
              code_momentum=0.5, code_momentum_dtype="float32")
    lrs = dict(learning_rate=0.05, levels_learning_rate=1e-3, code_learning_rate=20.0)
    ref = reference_optim.QuantOptimizer(**lrs, schedule_shape=lambda s: 1.0, **kw)
    new = dq_optimizer(**lrs, key=k, rounding_stream="per_layer", **kw)
    ref_state, new_state = ref.init(params, codes, k), new.init({"params": params,
                                                                 "codes": codes})
    flips = 0
    for _ in range(4):
        g, gw = grads(params, codes)
        r_params, r_codes, ref_state, r_diag = ref.update(g, gw, ref_state, params, codes)
        trainable = {"params": params, "codes": codes}
        updates, new_state = new.update({"params": g, "codes": gw}, new_state, trainable)
        out = optax.apply_updates(trainable, updates)
        jax.tree.map(np.testing.assert_array_equal, out["codes"], r_codes)
        jax.tree.map(np.testing.assert_array_equal, out["params"], r_params)
        for a, b in zip(_stat_leaves(new_state.params), _stat_leaves(ref_state.params),
                        strict=True):
            np.testing.assert_array_equal(a, b)
        diag = optim.code_diagnostics(codes, out["codes"], out["params"])
        assert diag.keys() == r_diag.keys() and len(diag) == 5
        for layer in diag:
            for name in ("flip_rate", "code_entropy"):
                np.testing.assert_array_equal(diag[layer][name], r_diag[layer][name])
        flips += sum(float(d["flip_rate"]) for d in diag.values())
        params, codes = r_params, r_codes
    assert flips > 0 or rounding == "nearest"


# ---------------------------------------------------------------- inertia rounding (Bop for L levels)

def _inertia_steps(rule: str, steps: int = 6):
    """One layer, levels [-1, 0, 1, 2], codes [1, 1, 1, 1, 0], constant dL/dW_q
    [-1, 1, -3, 0, 3], code LR 0.25, momentum 0.5 (float32): every number exact in binary.
    Yields (codes, code momentum) after each update."""
    levels = jnp.float32([[-1.0, 0.0, 1.0, 2.0]])
    trainable = {"params": {"l": {"kernel_levels": levels}},
                 "codes": {"l": {"kernel": jnp.uint8([[1, 1, 1, 1, 0]])}}}
    grads = {"params": {"l": {"kernel_levels": jnp.zeros_like(levels)}},
             "codes": {"l": {"kernel": jnp.float32([[-1.0, 1.0, -3.0, 0.0, 3.0]])}}}
    tx = dq_optimizer(0.25, 0.0, momentum=0.5, rounding="inertia", inertia_after_move=rule,
                      code_momentum_dtype="float32", key=0)
    state = tx.init(trainable)
    for _ in range(steps):
        trainable, state, _ = _run(tx, trainable, grads, state)
        trace = [x for x in jax.tree.leaves(state.codes, is_leaf=lambda x: isinstance(
            x, optax.TraceState)) if isinstance(x, optax.TraceState)][0].trace
        yield (np.asarray(trainable["codes"]["l"]["kernel"])[0].tolist(),
               np.asarray(trace["l"]["kernel"])[0].tolist())


@pytest.mark.parametrize("rule, codes2, momentum2", [
    # weight 2: m = 0.5 m + (-3), u = -0.25 m, gap 1. u = 0.75 (stays), 1.125 (moves; subtract
    # leaves u = 0.125, m = -0.5), 0.8125 (stays), 1.15625 (moves to the top, m = -0.625),
    # then the top level never moves outward.
    ("subtract", [1, 2, 2, 3, 3, 3], [-3.0, -0.5, -3.25, -0.625, -3.3125, -4.65625]),
    ("reset", [1, 2, 2, 3, 3, 3], [-3.0, 0.0, -3.0, 0.0, -3.0, -4.5]),
    # Bop's rule kept: a persistent signal moves a level per step (u = 1.3125 at step 3)
    ("keep", [1, 2, 3, 3, 3, 3], [-3.0, -4.5, -5.25, -5.625, -5.8125, -5.90625]),
])
def test_inertia_moves_one_level_only_past_the_threshold_hand_computed(rule, codes2, momentum2):
    """rounding='inertia': a code moves one level toward u = -lr m only when |u| reaches the
    gap to that level; below it nothing moves (weights 0, 1: |u| -> 0.5 < 1; weight 3: no
    gradient), an end level never moves outward (weight 4 at level 0 pushed down: its
    momentum is not spent), and the rule decides what a move leaves of the momentum."""
    seen = list(_inertia_steps(rule))
    assert [c[2] for c, _ in seen] == codes2
    assert [m[2] for _, m in seen] == momentum2
    for codes, m in seen:
        assert codes[0] == codes[1] == codes[3] == 1 and codes[4] == 0
    assert [m[4] for _, m in seen] == [3.0, 4.5, 5.25, 5.625, 5.8125, 5.90625]
    assert [m[0] for _, m in seen][-1] == -1.96875  # no move: plain trace


def test_inertia_threshold_half_is_nearest_rounding_of_the_update():
    """inertia_threshold=0.5: a weight moves when u reaches half the gap (nearest rounding of
    W_q + u); per-channel levels use each channel's own gap (1 vs 4: the same u = 0.75 moves
    channel 0 only); no random draw: another key gives the same codes and momentum."""
    levels = jnp.float32([[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 8.0, 12.0]])
    trainable = {"params": {"l": {"kernel_levels": levels}},
                 "codes": {"l": {"kernel": jnp.ones((3, 2), jnp.uint8)}}}
    grads = {"params": {"l": {"kernel_levels": jnp.zeros_like(levels)}},
             "codes": {"l": {"kernel": jnp.full((3, 2), -3.0)}}}  # u = +0.75
    out = []
    for k in (0, 1):
        tx = dq_optimizer(0.25, 0.0, momentum=0.5, rounding="inertia", inertia_threshold=0.5,
                          key=k)
        new, state, _ = _run(tx, trainable, grads)
        out.append((new, state.codes))
    np.testing.assert_array_equal(np.asarray(out[0][0]["codes"]["l"]["kernel"]),
                                  np.uint8([[2, 1]] * 3))
    _assert_trees_equal(out[0], out[1])


def test_inertia_is_deterministic_and_composes_with_optax_wrappers(np_rng):
    """On the exact problem (big steps, so codes move): another key changes nothing;
    MultiSteps(k=2) is the single update on the mean gradient (codes, momentum) bitwise;
    apply_if_finite skips a NaN step whole (codes, momentum unchanged)."""
    trainable, grads = _exact_problem(np_rng)
    g = lambda seed: jax.tree.map(lambda a: a * 8, grads(seed))
    tx = lambda key=jax.random.PRNGKey(7): _tx(rounding="inertia", key=key)
    a, sa, _ = _run(tx(), trainable, g(0))
    b, sb, _ = _run(tx(jax.random.PRNGKey(8)), trainable, g(0))
    _assert_trees_equal(a, b)
    _assert_trees_equal(sa.codes, sb.codes)
    assert any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(
        jax.tree.leaves(a["codes"]), jax.tree.leaves(trainable["codes"])))

    mean = jax.tree.map(lambda x, y: (x + y) / 2, g(20), g(21))  # exact (dyadic)
    ms = optax.MultiSteps(tx(), every_k_schedule=2)
    first, state, _ = _run(ms, trainable, g(20))
    _assert_trees_equal(first, trainable)
    second, state, _ = _run(ms, first, g(21), state)
    single, s_single, _ = _run(tx(), trainable, mean)
    _assert_trees_equal(second, single)
    _assert_trees_equal(state.inner_opt_state, s_single)

    guarded = optax.apply_if_finite(tx(), max_consecutive_errors=5)
    bad = g(2)
    bad["codes"]["dense"]["kernel"] = bad["codes"]["dense"]["kernel"].at[0, 0].set(jnp.nan)
    s0 = guarded.init(trainable)
    after, s1, _ = _run(guarded, trainable, bad, s0)
    _assert_trees_equal(after, trainable)
    _assert_trees_equal(s1.inner_state, s0.inner_state)


def test_inertia_stacked_levels_update_like_their_slices():
    """Levels [S, G, L] (nn.scan-stacked): each slice moves exactly as the same layer alone."""
    lv = np.float32([[-1.5, -0.5, 0.5, 1.5]])
    levels = np.stack([lv, lv * 2, lv * 4])
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (3, 3, 3, 2, 4)).astype(np.uint8)
    gw = (rng.integers(-16, 17, codes.shape) / 2).astype(np.float32)
    make = lambda: dq_optimizer(0.25, 0.0, momentum=0.5, rounding="inertia", key=0)

    def run(lv_, c_, gw_):
        trainable = {"params": {"l": {"kernel_levels": jnp.asarray(lv_)}},
                     "codes": {"l": {"kernel": jnp.asarray(c_)}}}
        grads = {"params": {"l": {"kernel_levels": jnp.zeros(lv_.shape, jnp.float32)}},
                 "codes": {"l": {"kernel": jnp.asarray(gw_)}}}
        new, state, _ = _run(make(), trainable, grads)
        trace = jax.tree.leaves(state.codes)[0]
        return np.asarray(new["codes"]["l"]["kernel"]), np.asarray(trace)

    stacked_codes, stacked_m = run(levels, codes, gw)
    assert not np.array_equal(stacked_codes, codes)
    for i in range(3):
        c_i, m_i = run(levels[i], codes[i], gw[i])
        np.testing.assert_array_equal(stacked_codes[i], c_i)
        np.testing.assert_array_equal(stacked_m[i], m_i)


def test_with_inertia_residual_seeds_the_code_momentum_hand_computed():
    """with_inertia_residual(state, r, lr): m = -r / lr (so u = r before any gradient). Levels
    [-1, 1] (gap 2), code 0, r = +0.75, lr 0.5, momentum 0.5: a push dL/dW_q = -3.5 gives
    u = 0.5 (3.5 + 0.5 * 1.5) = 2.125 >= 2, a move; from m = 0 it gives 1.75: none."""
    trainable = {"params": {"l": {"kernel_levels": jnp.float32([[-1.0, 1.0]])}},
                 "codes": {"l": {"kernel": jnp.zeros((1, 2), jnp.uint8)}}}
    grads = {"params": {"l": {"kernel_levels": jnp.zeros((1, 2))}},
             "codes": {"l": {"kernel": jnp.full((1, 2), -3.5)}}}
    tx = dq_optimizer(0.5, 0.0, momentum=0.5, rounding="inertia", key=0)
    seeded = optim.with_inertia_residual(tx.init(trainable),
                                         {"l": {"kernel": jnp.full((1, 2), 0.75)}}, 0.5)
    m0 = jax.tree.leaves(seeded.codes)[0]
    assert m0.dtype == jnp.bfloat16 and np.all(np.asarray(m0, np.float32) == -1.5)
    moved, _, _ = _run(tx, trainable, grads, seeded)
    stayed, _, _ = _run(tx, trainable, grads)
    assert np.all(np.asarray(moved["codes"]["l"]["kernel"]) == 1)
    assert np.all(np.asarray(stayed["codes"]["l"]["kernel"]) == 0)
    with pytest.raises(ValueError, match="needs a rate > 0"):
        optim.with_inertia_residual(tx.init(trainable), {"l": {"kernel": jnp.zeros((1, 2))}}, 0)
    with pytest.raises(ValueError, match="must match the codes"):
        optim.with_inertia_residual(tx.init(trainable), {"l": {"kernel": jnp.zeros((2, 2))}}, 1)
    no_momentum = dq_optimizer(0.5, 0.0, momentum=0, rounding="inertia").init(trainable)
    with pytest.raises(ValueError, match="holds no code momentum"):
        optim.with_inertia_residual(no_momentum, {"l": {"kernel": jnp.zeros((1, 2))}}, 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"rounding": "inertia", "inertia_after_move": "zero"}, r"inertia_after_move='zero'.*'subtract', 'reset', 'keep'"),
    ({"rounding": "inertia", "inertia_threshold": 0.0}, r"inertia_threshold=0.0 must be a number > 0"),
    ({"inertia_threshold": 0.5}, r"apply to rounding='inertia' only"),
    ({"inertia_after_move": "reset"}, r"apply to rounding='inertia' only"),
])
def test_inertia_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dq_optimizer(0.1, 0.0, **kwargs)


# ---------------------------------------------------------------- 'hash' random stream (issue 27)

def _stream_problem(p_up: float = 0.3):
    """Three layers (two of one shape, one nn.scan-stacked [3, ...]) with levels [0, 1, 2, 3],
    every code at level 1 and a code step `u = p_up`: stochastic rounding takes level 2 with
    probability p_up. Returns (trainable, grads)."""
    lv = jnp.float32([[0.0, 1.0, 2.0, 3.0]])
    shapes = {"a": (3, 3, 16, 64), "b": (3, 3, 16, 64), "s": (3, 3, 3, 8, 64)}
    params = {n: {"kernel_levels": jnp.tile(lv, (3, 1, 1)) if n == "s" else lv} for n in shapes}
    codes = {n: {"kernel": jnp.ones(s, jnp.uint8)} for n, s in shapes.items()}
    grads = {"params": jax.tree.map(jnp.zeros_like, params),
             "codes": jax.tree.map(lambda c: jnp.full(c.shape, -p_up, jnp.float32), codes)}
    return {"params": params, "codes": codes}, grads


def _stream_draws(key, updates: int = 4, stream: str = "hash") -> list[dict]:
    """Per update (the key advancing in the state as in training): layer -> did each weight
    go up (bool, code-shaped)."""
    trainable, grads = _stream_problem()
    tx = dq_optimizer(1.0, 0.0, momentum=0, code_momentum_dtype="float32", key=key,
                      rounding_stream=stream)
    state, out = tx.init(trainable), []
    update = jax.jit(tx.update)
    for _ in range(updates):
        deltas, state = update(grads, state, trainable)
        out.append({n: np.asarray(d["kernel"]) for n, d in deltas["codes"].items()})
    for draw in out:
        for d in draw.values():
            assert set(np.unique(d)) <= {0.0, 1.0}  # level 1 -> 1 or 2, never further
    return [{n: d == 1.0 for n, d in draw.items()} for draw in out]


def test_hash_stream_is_unbiased_per_layer_and_per_stack_slice():
    """E[code] = the target: the share of weights that go up is p = 0.3 within 5 binomial
    standard deviations, in every layer, every stack slice and every update."""
    for draw in _stream_draws(jax.random.PRNGKey(0)):
        slices = {"a": draw["a"], "b": draw["b"], **{f"s{i}": draw["s"][i] for i in range(3)}}
        for name, up in slices.items():
            n = up.size
            assert abs(up.mean() - 0.3) <= 5 * np.sqrt(0.3 * 0.7 / n), (name, up.mean())


def test_hash_stream_is_independent_across_layers_slices_and_updates():
    """Same-shape layers, stack slices and consecutive updates get different draws whose
    up-indicators are uncorrelated (|r| within 5/sqrt(n)); the same key gives the same draws
    (bitwise: integer arithmetic), another key others."""
    draws = _stream_draws(jax.random.PRNGKey(1))
    pairs = [(draws[0]["a"], draws[0]["b"]), (draws[0]["s"][0], draws[0]["s"][1]),
             (draws[0]["s"][2], draws[0]["a"][:3, :, :8]), (draws[0]["a"], draws[1]["a"])]
    for x, y in pairs:
        x, y = x.ravel().astype(float), y.ravel().astype(float)
        assert not np.array_equal(x, y)
        assert abs(np.corrcoef(x, y)[0, 1]) <= 5 / np.sqrt(x.size)
    again = _stream_draws(jax.random.PRNGKey(1))
    other = _stream_draws(jax.random.PRNGKey(2))
    for a, b, c in zip(draws, again, other):
        for n in a:
            np.testing.assert_array_equal(a[n], b[n])
            assert not np.array_equal(a[n], c[n])
    # a typed key of another impl works too (its first two words seed the hash)
    typed = _stream_draws(jax.random.key(1, impl="unsafe_rbg"), updates=1)[0]
    assert abs(typed["a"].mean() - 0.3) <= 5 * np.sqrt(0.21 / typed["a"].size)


def test_hash_uniform_is_one_counter_stream_and_uniform():
    """A layer's draws are its slice of one counter stream (an offset, no key of its own);
    values lie in [0, 1) on a 2**-24 grid and fill 16 equal bins evenly (5 sigma)."""
    seed = jnp.uint32([12345, 678])
    whole = np.asarray(optim.hash_uniform(seed, 0, (70000,)))
    np.testing.assert_array_equal(np.asarray(optim.hash_uniform(seed, 1000, (30, 100))).ravel(),
                                  whole[1000:4000])
    assert whole.min() >= 0 and whole.max() < 1 and np.all(whole * 2 ** 24 % 1 == 0)
    counts = np.bincount((whole * 16).astype(int), minlength=16)
    expect = whole.size / 16
    assert np.all(np.abs(counts - expect) <= 5 * np.sqrt(expect * 15 / 16)), counts
    with pytest.raises(ValueError, match="at most 2\\*\\*32 DQ weights"):
        optim.hash_uniform(seed, 2 ** 32 - 10, (11,))
    with pytest.raises(ValueError, match=r"seed must be 2 integer words .*got float32\[3\]"):
        optim.hash_uniform(jnp.zeros(3), 0, (4,))


def test_per_layer_stream_is_still_selectable_and_differs_from_hash():
    """rounding_stream='per_layer' (the stream before issue 27, for old workdirs) draws with
    the same distribution and other numbers; an unknown stream is refused in one line."""
    old = _stream_draws(jax.random.PRNGKey(0), updates=1, stream="per_layer")[0]
    new = _stream_draws(jax.random.PRNGKey(0), updates=1)[0]
    assert not np.array_equal(old["a"], new["a"])
    assert abs(old["a"].mean() - 0.3) <= 5 * np.sqrt(0.21 / old["a"].size)
    with pytest.raises(ValueError, match="rounding_stream='philox' is not supported"):
        dq_optimizer(0.1, 0.1, rounding_stream="philox")
