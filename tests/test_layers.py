"""`QuantConv` / `QuantDense` as drop-in Flax layers, and config validation.

References are Flax's own `nn.Conv` / `nn.Dense` run with the same kernel.
"""
from functools import partial

import flax.linen as nn
from flax.traverse_util import flatten_dict
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax.layers import QuantConv, QuantDense, zero_perturbations
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


# ---------------------------------------------------------------- drop-in: train mode

def _stats_run(q, v, x, **kw):
    """(output, quant_stats after the call) of one apply; kw: apply's train/mutable."""
    mutable = kw.pop("mutable", False)
    out = q.apply(v, x, mutable=mutable, **kw)
    y, upd = out if mutable else (out, {})
    return y, upd.get("quant_stats", v["quant_stats"])


def test_train_mode_follows_quant_stats_mutability(np_rng):
    """Without `train`, the statistics update exactly when 'quant_stats' is mutable; an
    explicit train= (constructor or call) still decides."""
    cfg = QuantConfig(weights="dq", acts="dq", act_bits=2)
    x = jnp.asarray(np.abs(np_rng.normal(size=(8, 12))).astype(np.float32) * 5.0)
    q = QuantDense(5, quant=cfg)
    v = jax.jit(q.init)(key(0), x)  # init needs no train flag and calibrates nothing
    assert not bool(v["quant_stats"]["act_quant"]["initialized"])
    assert float(v["quant_stats"]["act_quant"]["alpha"]) == 1.0

    _, s_mut = jax.jit(lambda v: _stats_run(q, v, x, mutable=["quant_stats"]))(v)
    assert bool(s_mut["act_quant"]["initialized"])
    assert float(s_mut["act_quant"]["alpha"]) != 1.0
    # the same update as the explicit train=True call (one program, the same ops)
    _, s_exp = jax.jit(lambda v: _stats_run(q, v, x, train=True, mutable=["quant_stats"]))(v)
    jax.tree.map(np.testing.assert_array_equal, s_mut, s_exp)
    # explicit train=False overrides mutability, at call time or in the constructor
    for layer, kw in ((q, dict(train=False)), (QuantDense(5, quant=cfg, train=False), {})):
        _, s = jax.jit(lambda v: _stats_run(layer, v, x, mutable=["quant_stats"], **kw))(v)
        assert not bool(s["act_quant"]["initialized"])
    # not mutable: eval mode, the output of an explicit train=False call
    v2 = {**v, "quant_stats": s_mut}
    y_imm, y_eval = jax.jit(lambda v: (q.apply(v, x), q.apply(v, x, train=False)))(v2)
    np.testing.assert_array_equal(y_imm, y_eval)


def test_forgotten_quant_stats_in_mutable_warns():
    """The Flax example's train step passes mutable=['batch_stats']: quantizers would then
    never calibrate, so the layer says so (BN re-estimation may want exactly that)."""
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = QuantDense(4, quant=QuantConfig(weights="float", acts="dq"), name="fc")(x)
            return nn.BatchNorm(use_running_average=not self.is_mutable_collection(
                "batch_stats"))(x)

    x = jnp.ones((2, 3))
    v = Net().init(key(0), x)
    with pytest.warns(UserWarning, match=r"QuantDense 'fc' runs in eval mode.*"
                                         r"mutable=\['batch_stats', 'quant_stats'\]"):
        Net().apply(v, x, mutable=["batch_stats"])


# ---------------------------------------------------------------- drop-in: perturbations

def test_init_stores_no_perturbations_and_zero_perturbations_gives_dl_dwq(np_rng):
    cfg = QuantConfig(weights="dq", acts="float")
    kw = dict(features=4, kernel_size=(3, 3))
    q = QuantConv(quant=cfg, **kw)
    x = jnp.asarray(np_rng.normal(size=(2, 5, 5, 3)).astype(np.float32))
    v = jax.jit(q.init)(key(0), x)
    assert set(v) == {"params", "codes"}
    # the init tree round-trips through flax.serialization
    from flax import serialization
    back = serialization.from_bytes(v, serialization.to_bytes(v))
    jax.tree.map(np.testing.assert_array_equal, back, v)
    pert = zero_perturbations(v["codes"])
    assert jax.tree.map(lambda a: (a.shape, a.dtype), pert) == {
        "kernel": ((3, 3, 3, 4), jnp.float32)}
    w_q = np_gather(v["params"]["kernel_levels"], v["codes"]["kernel"])

    @jax.jit
    def grads(v, pert, w_q):
        g_p = jax.grad(lambda p: jnp.sum(q.apply({**v, "perturbations": p}, x) ** 2))(pert)
        g_w = jax.grad(lambda k: jnp.sum(nn.Conv(**kw).apply(
            {"params": {"kernel": k, "bias": v["params"]["bias"]}}, x) ** 2))(w_q)
        # a mutable 'perturbations' collection is not filled by apply
        _, upd = q.apply(v, x, mutable=True)
        return g_p, g_w, upd, q.apply({**v, "perturbations": pert}, x), q.apply(v, x)

    g_p, g_w, upd, y_pert, y = grads(v, pert, w_q)
    np.testing.assert_allclose(g_p["kernel"], g_w, rtol=1e-5, atol=1e-6)
    assert "perturbations" not in upd
    np.testing.assert_array_equal(y_pert, y)  # W_q + 0 == W_q


# ---------------------------------------------------------------- drop-in: signed grid

def _normalised_images(np_rng, n=16):
    """Pixels in [0, 1] standardised per channel (about half of them negative)."""
    x = np_rng.uniform(size=(n, 6, 6, 3)).astype(np.float32)
    return jnp.asarray((x - x.mean((0, 1, 2))) / x.std((0, 1, 2)))


@pytest.mark.parametrize("act_levels", ["uniform", "learned"])
def test_signed_grid_is_decided_from_the_calibration_batch(np_rng, act_levels):
    cfg = QuantConfig(weights="float", acts="dq", act_bits=2, act_levels=act_levels)
    assert cfg.act_signed is None  # the default: decided from data
    q = QuantConv(4, (3, 3), quant=cfg)
    x_img = _normalised_images(np_rng)
    x_relu = jnp.maximum(x_img, 0.0)
    v = jax.jit(q.init)(key(0), x_img)
    assert not bool(v["quant_stats"]["act_quant"]["signed"])

    @jax.jit
    def calibrate_then_quantize(v, x_calib, x_later):
        _, upd = q.apply(v, x_calib, mutable=["quant_stats"])
        v = {**v, **upd}
        xq = ActQuantizer(cfg).apply({"quant_stats": v["quant_stats"]["act_quant"]}, x_later,
                                     train=False)
        # a later training batch keeps the grid the calibration chose
        _, upd2 = q.apply(v, x_later, mutable=["quant_stats"])
        return v["quant_stats"]["act_quant"], xq, upd2["quant_stats"]["act_quant"]["signed"]

    stats, xq, later = calibrate_then_quantize(v, x_img, x_relu)
    assert bool(stats["signed"]) and bool(later)  # normalised pixels: signed grid, kept
    xq_img = calibrate_then_quantize(v, x_img, x_img)[1]
    neg = np.asarray(xq_img) < 0
    # negative inputs are not zeroed: every input clearly below the boundary between the
    # highest negative level and the next one (a margin away, so no rounding tie) stays
    # negative, and that is a large share of the batch
    levels = (np.asarray(stats["alpha"]) * np.arange(-2, 2) if act_levels == "uniform"
              else np.asarray(stats["levels"]))
    top_neg = levels[levels < 0].max()
    above = levels[levels >= 0]
    boundary = 0.5 * (top_neg + above.min()) if above.size else np.inf
    far_negative = np.asarray(x_img) < boundary - 1e-3
    assert far_negative.mean() > 0.2 and np.all(neg[far_negative])

    stats_relu, _, later = calibrate_then_quantize(v, x_relu, x_img)
    assert not bool(stats_relu["signed"]) and not bool(later)  # post-ReLU: unsigned grid


def test_explicit_act_signed_and_one_bit_have_no_signed_statistic(np_rng):
    x = _normalised_images(np_rng, 4)
    for cfg in (QuantConfig(weights="float", act_signed=True),
                QuantConfig(weights="float", act_signed=False),
                QuantConfig(weights="float", act_bits=1)):  # 1 bit: unsigned (no signed grid)
        v = jax.eval_shape(QuantConv(4, (3, 3), quant=cfg).init, key(0), x)
        assert set(v["quant_stats"]["act_quant"]) == {"alpha", "initialized"}, cfg
    with pytest.raises(ValueError, match=r"act_signed=1 must be None.*True.*False"):
        QuantConfig(act_signed=1)
    with pytest.raises(ValueError, match=r"act_bits=1.*act_signed=True"):
        QuantConfig(act_bits=1, act_signed=True)


# ---------------------------------------------------------------- nn.remat / nn.scan

class _Block(nn.Module):
    """conv -> ReLU; `call_train`: None (drop-in: no train argument) or the explicit flag."""
    quant: QuantConfig
    call_train: bool | None = None

    @nn.compact
    def __call__(self, x, _):
        conv = QuantConv(4, (3, 3), quant=self.quant, use_bias=False, name="conv")
        y = conv(x) if self.call_train is None else conv(x, train=self.call_train)
        return nn.relu(y) + x, None


_STACKED = {"params": 0, "codes": 0, "quant_stats": 0, "perturbations": 0}


@pytest.mark.parametrize("transform", ["remat", "scan", "remat_scan"])
@pytest.mark.parametrize("weights", ["dq", "latent_ste", "lsq"])
def test_remat_and_scan_over_quant_blocks(np_rng, transform, weights):
    """Init, train step (grads w.r.t. params and perturbations) and eval through nn.remat /
    nn.scan; the stacked variables have a leading layer axis."""
    cfg = QuantConfig(weights=weights, weight_bits=2, acts="dq", act_bits=2)
    depth = 3

    class Net(nn.Module):
        call_train: bool | None = None

        @nn.compact
        def __call__(self, x):
            block = _Block
            if "remat" in transform:
                block = nn.remat(block)
            if "scan" in transform:
                block = nn.scan(block, variable_axes=_STACKED, split_rngs={"params": True},
                                length=depth)
                x, _ = block(cfg, self.call_train, name="blocks")(x, None)
            else:
                for i in range(depth):
                    x, _ = block(cfg, self.call_train, name=f"block{i}")(x, None)
            return jnp.mean(x, axis=(1, 2))

    x = jnp.asarray(np.abs(np_rng.normal(size=(2, 5, 5, 4))).astype(np.float32))
    v = jax.jit(Net().init)(key(0), x)
    assert "perturbations" not in v
    if "scan" in transform:
        assert v["quant_stats"]["blocks"]["conv"]["act_quant"]["alpha"].shape == (depth,)
        if weights == "dq":
            assert v["codes"]["blocks"]["conv"]["kernel"].shape == (depth, 3, 3, 4, 4)
            assert v["params"]["blocks"]["conv"]["kernel_levels"].shape == (depth, 1, 4)

    for call_train in (None, True):
        net = Net(call_train)

        @jax.jit
        def step(v):
            rest = {k: val for k, val in v.items() if k != "params"}
            pert = zero_perturbations(v.get("codes", {}))

            def loss(p, pt):
                y, upd = net.apply({**rest, "params": p, "perturbations": pt}, x,
                                   mutable=["quant_stats"])
                return jnp.sum(y ** 2), upd
            (l, upd), (g, gw) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
                v["params"], pert)
            y_eval = Net(None if call_train is None else False).apply({**v, **upd}, x)
            return l, g, gw, upd, y_eval

        l, g, gw, upd, y_eval = step(v)
        assert np.isfinite(float(l)) and np.all(np.isfinite(np.asarray(y_eval)))
        assert jax.tree.map(np.shape, g) == jax.tree.map(np.shape, v["params"])
        initialized = [np.asarray(a) for path, a in flatten_dict(upd["quant_stats"]).items()
                       if path[-1] == "initialized"]
        assert len(initialized) == (1 if "scan" in transform else depth)
        assert all(a.all() for a in initialized)  # every block's quantizer calibrated
        if weights == "dq":
            assert jax.tree.map(np.shape, gw) == jax.tree.map(np.shape, v["codes"])
            assert any(float(np.abs(a).sum()) > 0 for a in jax.tree_util.tree_leaves(gw))
        assert any(float(np.abs(a).sum()) > 0 for a in jax.tree_util.tree_leaves(g))
