"""`QuantConv` / `QuantDense` as drop-in Flax layers, and config validation.

References are Flax's own `nn.Conv` / `nn.Dense` run with the same kernel.
"""
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax.layers import QuantConv, QuantDense
from dq_jax.quant import weights as wq
from dq_jax.quant.activations import ActQuantizer
from dq_jax.quant.config import QuantConfig


def key(seed):
    """unsafe_rbg keys: threefry draws of rank-4 kernels take ~9 s each to compile on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


CONV_SETTINGS = [
    dict(features=6, kernel_size=(3, 3)),
    dict(features=4, kernel_size=(3, 3), strides=(2, 2), padding="VALID"),
    dict(features=6, kernel_size=(2, 3), strides=(1, 2), padding=((1, 2), (0, 1)),
         feature_group_count=2, kernel_dilation=(1, 2)),
    dict(features=4, kernel_size=(3, 3), padding="CIRCULAR", use_bias=False),
    dict(features=4, kernel_size=(3, 3), padding=1, input_dilation=(2, 1)),
]


def np_gather(levels, codes):
    """W_q[..., o] = levels[g(o), codes[..., o]], by numpy indexing."""
    levels, codes = np.asarray(levels), np.asarray(codes).astype(np.int64)
    groups = (np.broadcast_to(np.arange(codes.shape[-1]), codes.shape) if levels.shape[0] > 1
              else np.zeros(codes.shape, np.int64))
    return levels[groups, codes]


def _distinct_per_group(w, granularity):
    w = np.asarray(w)
    if granularity == "per_layer":
        return [len(np.unique(w))]
    return [len(np.unique(w[..., o])) for o in range(w.shape[-1])]


# ---------------------------------------------------------------- float = Flax

@pytest.mark.parametrize("kw", CONV_SETTINGS,
                         ids=["same", "valid_s2", "groups_dil", "circ", "in_dil"])
def test_float_quant_conv_is_nn_conv(np_rng, kw):
    x = jnp.asarray(np_rng.normal(size=(2, 7, 7, 4)).astype(np.float32))
    ref, q = nn.Conv(**kw), QuantConv(quant=QuantConfig.float(), **kw)
    v_ref, v_q, y_ref, y_q = jax.jit(lambda k: (
        ref.init(k, x), q.init(k, x), ref.apply(ref.init(k, x), x), q.apply(ref.init(k, x), x)))(
            key(0))
    # same variables (names, shapes, values: same initializer draws)
    assert set(v_q) == {"params"}
    jax.tree.map(np.testing.assert_array_equal, v_q, v_ref)
    np.testing.assert_array_equal(y_q, y_ref)


def test_float_quant_dense_is_nn_dense(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 3, 5)).astype(np.float32))
    for kw in (dict(features=7), dict(features=3, use_bias=False)):
        ref, q = nn.Dense(**kw), QuantDense(quant=QuantConfig.float(), **kw)
        v, v_q, y, y_ref = jax.jit(lambda k: (ref.init(k, x), q.init(k, x),
                                              q.apply(ref.init(k, x), x),
                                              ref.apply(ref.init(k, x), x)))(key(1))
        jax.tree.map(np.testing.assert_array_equal, v_q, v)
        np.testing.assert_array_equal(y, y_ref)


# ---------------------------------------------------------------- DQ-W layers

@pytest.mark.parametrize("granularity", ["per_layer", "per_channel"])
def test_dq_conv_variables_levels_and_forward(np_rng, granularity):
    kw = dict(features=6, kernel_size=(3, 3), strides=(2, 2))
    cfg = QuantConfig(weights="dq", weight_bits=2, granularity=granularity, acts="float")
    q = QuantConv(quant=cfg, **kw)
    x = jnp.asarray(np_rng.normal(size=(2, 6, 6, 3)).astype(np.float32))
    v = jax.jit(q.init)(key(0), x)
    kshape = (3, 3, 3, 6)
    ng = 1 if granularity == "per_layer" else 6
    # no float shadow kernel: params hold levels (+bias); codes are uint8, kernel-shaped
    assert set(v["params"]) == {"kernel_levels", "bias"}
    assert v["params"]["kernel_levels"].shape == (ng, 4)
    assert v["codes"]["kernel"].shape == kshape and v["codes"]["kernel"].dtype == jnp.uint8
    assert int(v["codes"]["kernel"].max()) < 4
    assert "perturbations" not in v  # nothing to store: zero_perturbations(codes) when needed
    assert np.all(np.diff(np.asarray(v["params"]["kernel_levels"]), axis=-1) >= 0)
    w_q = np_gather(v["params"]["kernel_levels"], v["codes"]["kernel"])
    assert max(_distinct_per_group(w_q, granularity)) <= 4
    # the forward is nn.Conv with kernel W_q
    y, y_ref = jax.jit(lambda v_, k: (q.apply(v_, x), nn.Conv(**kw).apply(
        {"params": {"kernel": k, "bias": v_["params"]["bias"]}}, x)))(v, w_q)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def test_dq_init_is_lloyd_of_the_initializer_draw(np_rng):
    """Levels/codes come from one draw of the layer's own kernel_init (same rng as nn.Conv)."""
    kw = dict(features=8, kernel_size=(3, 3), kernel_init=nn.initializers.normal(3.0))
    x = jnp.asarray(np_rng.normal(size=(1, 5, 5, 4)).astype(np.float32))
    cfg = QuantConfig(weights="dq", weight_bits=2, granularity="per_channel", acts="float",
                      lloyd_iters=4)
    v, (levels, codes) = jax.jit(lambda k: (
        QuantConv(quant=cfg, **kw).init(k, x),
        wq.lloyd_init(nn.Conv(**kw).init(k, x)["params"]["kernel"], 4, "per_channel", 4)))(
            key(7))
    np.testing.assert_allclose(v["params"]["kernel_levels"], levels, rtol=1e-6)
    np.testing.assert_array_equal(v["codes"]["kernel"], codes)


@pytest.mark.parametrize("granularity", ["per_channel"])
def test_dq_dense_with_activation_quantizer(np_rng, granularity):
    cfg = QuantConfig(weights="dq", weight_bits=2, granularity=granularity, acts="dq",
                      act_bits=2)
    q = QuantDense(5, quant=cfg)
    x = jnp.asarray(np.maximum(np_rng.normal(size=(8, 12)), 0).astype(np.float32))
    v = jax.jit(partial(q.init, train=False))(key(0), x)
    assert set(v) == {"params", "codes", "quant_stats"}
    w_q = np_gather(v["params"]["kernel_levels"], v["codes"]["kernel"])
    assert max(_distinct_per_group(w_q, granularity)) <= 4
    # train step calibrates the input quantizer; eval = Dense(W_q) of the quantized input

    @jax.jit
    def run(v, w_q):
        _, upd = q.apply(v, x, train=True, mutable=["quant_stats"])
        v = {**v, **upd}
        xq = ActQuantizer(cfg).apply({"quant_stats": v["quant_stats"]["act_quant"]}, x,
                                     train=False)
        y_ref = nn.Dense(5).apply({"params": {"kernel": w_q, "bias": v["params"]["bias"]}}, xq)
        return q.apply(v, x, train=False), y_ref, xq, v["quant_stats"]

    y, y_ref, xq, stats = run(v, w_q)
    assert bool(stats["act_quant"]["initialized"])
    assert len(np.unique(np.asarray(xq))) <= 4
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def test_missing_codes_is_a_clear_error(np_rng):
    cfg = QuantConfig(weights="dq", acts="float")
    q = QuantConv(4, (3, 3), quant=cfg)
    x = jnp.ones((1, 5, 5, 2))
    v = jax.eval_shape(q.init, key(0), x)  # shapes suffice: it fails at trace
    with pytest.raises(ValueError, match=r"codes.*missing.*'codes' collection"):
        q.apply({"params": v["params"]}, x)


def test_train_flag_given_twice_is_a_clear_error():
    q = QuantDense(3, quant=QuantConfig(weights="float", acts="dq"), train=True, name="fc")
    with pytest.raises(ValueError, match=r"QuantDense 'fc'.*both to the constructor.*and at "
                                         r"call time.*pass it once, or neither"):
        q.init(key(0), jnp.ones((2, 4)), train=False)


# ---------------------------------------------------------------- baselines

def test_latent_ste_and_lsq_layers(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 5, 5, 3)).astype(np.float32))
    ste = QuantConv(4, (3, 3), quant=QuantConfig(weights="latent_ste", acts="float"))
    v = jax.jit(ste.init)(key(0), x)
    assert set(v) == {"params"} and set(v["params"]) == {"kernel", "kernel_levels", "bias"}
    p = v["params"]
    lv, kern = np.asarray(p["kernel_levels"][0]), np.asarray(p["kernel"])
    w_q = lv[np.abs(kern[..., None] - lv).argmin(-1)]  # brute-force nearest level
    assert len(np.unique(w_q)) <= 4
    conv_ref = jax.jit(lambda k, b: nn.Conv(4, (3, 3)).apply(
        {"params": {"kernel": k, "bias": b}}, x))
    np.testing.assert_allclose(jax.jit(ste.apply)(v, x), conv_ref(w_q, p["bias"]), rtol=1e-5,
                               atol=1e-6)

    cfg = QuantConfig(weights="lsq", weight_bits=3, granularity="per_channel", acts="float")
    lsq = QuantConv(4, (3, 3), quant=cfg)
    v = jax.jit(lsq.init)(key(0), x)
    assert set(v["params"]) == {"kernel", "kernel_step", "bias"}
    p = v["params"]
    s = np.asarray(p["kernel_step"])
    np.testing.assert_allclose(
        s, 2 * np.abs(np.asarray(p["kernel"])).reshape(-1, 4).mean(0) / np.sqrt(3), rtol=1e-5)
    w_q = np.round(np.clip(np.asarray(p["kernel"]) / s, -4, 3)) * s
    assert max(_distinct_per_group(w_q, "per_channel")) <= 8
    np.testing.assert_allclose(jax.jit(lsq.apply)(v, x), conv_ref(w_q, p["bias"]), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("bad", [0, 9, 2.5, True, -1, "2"])
def test_bits_out_of_range(field, bad):
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field}={bad!r}.*integer in 1\.\.8"):
        QuantConfig(**{field: bad})


@pytest.mark.parametrize("bits", range(1, 9))
def test_bits_in_range_accepted(bits):
    cfg = QuantConfig(weight_bits=bits, act_bits=bits)
    assert cfg.num_weight_levels == cfg.num_act_levels == 2 ** bits


@pytest.mark.parametrize("field,bad,allowed", [
    ("weights", "dorefa", "'dq', 'latent_ste', 'lsq', 'float'"),
    ("acts", "pact", "'dq', 'float'"),
    ("granularity", "per_row", "'per_layer', 'per_channel'"),
    ("act_levels", "log", "'uniform', 'learned'"),
    ("act_error", "l1", "'channel', 'global'"),
])
def test_unknown_method_names(field, bad, allowed):
    with pytest.raises(ValueError, match=rf"QuantConfig\.{field}='{bad}'.*allowed values: "
                                         rf"{allowed}"):
        QuantConfig(**{field: bad})


def test_other_config_errors():
    with pytest.raises(ValueError, match=r"Unknown quantization option.*'wieght_bits'.*known"):
        QuantConfig.from_mapping({"wieght_bits": 2})
    assert QuantConfig.from_mapping({"weight_bits": 3}).weight_bits == 3
    with pytest.raises(ValueError, match=r"weight_bits=1.*lsq"):
        QuantConfig(weights="lsq", weight_bits=1)
    with pytest.raises(ValueError, match=r"act_momentum"):
        QuantConfig(act_momentum=1.0)
    with pytest.raises(ValueError, match=r"lloyd_iters"):
        QuantConfig(lloyd_iters=-1)


def test_layer_rejects_kernel_the_granularity_cannot_serve():
    # 1x1 conv on 2 input channels: 2 weights per output channel < L = 4
    q = QuantConv(8, (1, 1), quant=QuantConfig(granularity="per_channel", acts="float"))
    with pytest.raises(ValueError, match=r"granularity='per_channel' with L=4 levels.*"
                                         r"has 2.*Use granularity='per_layer' or fewer bits"):
        jax.eval_shape(q.init, key(0), jnp.ones((1, 4, 4, 2)))
    for weights in ("dq", "latent_ste"):
        d = QuantDense(3, quant=QuantConfig(weights=weights, weight_bits=4,
                                            granularity="per_channel", acts="float"))
        with pytest.raises(ValueError, match=r"at least 16 weights per output channel"):
            jax.eval_shape(d.init, key(0), jnp.ones((2, 5)))
    # per_layer serves the same kernel
    v = jax.eval_shape(QuantConv(8, (1, 1), quant=QuantConfig(acts="float")).init, key(0),
                       jnp.ones((1, 4, 4, 2)))
    assert v["params"]["kernel_levels"].shape == (1, 4)
