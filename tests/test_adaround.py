"""Output-aware (AdaRound-style) rounding of a float checkpoint into DQ codes."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax import adaround, configlib, train
from dq_jax.main import apply_variant
from dq_jax.quant import weights as wq
from tests.test_train import small_digits


def _correlated_inputs(n: int, d: int, seed: int) -> jax.Array:
    """Inputs with strongly correlated features (as real activations are): nearest rounding
    is then far from the output-error optimum, which is what AdaRound exploits."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * 0.3 + np.eye(d)
    return jnp.asarray(rng.standard_normal((n, d)) @ mix + 1.0, jnp.float32)


@pytest.mark.parametrize("granularity", ["per_channel", "per_layer"])
def test_adaround_codes_lower_the_output_error_and_stay_in_the_bracket(granularity):
    x = _correlated_inputs(512, 48, seed=0)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((48, 24)) * 0.1, jnp.float32)
    levels, nearest = wq.lloyd_init(w, 4, granularity)
    fn = lambda x, k: jnp.dot(x, k)
    codes = adaround.adaround_codes(w, levels, x, fn, steps=400, key=jax.random.PRNGKey(0))
    assert codes.dtype == jnp.uint8 and codes.shape == w.shape
    lo = adaround._bracket(levels, w)[0]
    assert bool(jnp.all((codes == lo) | (codes == lo + 1)))
    err = lambda c: float(jnp.mean(jnp.square(fn(x, wq.gather_levels(levels, c) - w))))
    assert err(codes) < 0.92 * err(nearest), (err(codes), err(nearest))  # measured 0.87, 0.66


def test_adaround_conv_layer_inputs_are_recorded_by_path():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(4, (3, 3), name="a")(x)
            return nn.Dense(3, name="b")(nn.relu(x).mean(axis=(1, 2)))

    net = Net()
    x = jnp.ones((2, 5, 5, 2))
    variables = net.init(jax.random.PRNGKey(0), x)
    rec = adaround.record_layer_inputs(net, variables, x, [("a",), ("b",)])
    assert rec[("a",)][0].shape == (2, 5, 5, 2) and rec[("b",)][0].shape == (2, 4)
    k = variables["params"]["a"]["kernel"]
    y = adaround._linear_fn(rec[("a",)][1])(x, k)
    np.testing.assert_array_equal(y, nn.Conv(4, (3, 3), use_bias=False).apply(
        {"params": {"kernel": k}}, x))
    with pytest.raises(ValueError, match="no nn.Conv/nn.Dense call recorded at .*'c'"):
        adaround.record_layer_inputs(net, variables, x, [("c",)])


def test_adaround_conversion_beats_nearest_in_the_program(tmp_path):
    """init_from + conversion_rounding='adaround': after one W2A2 step from the same float
    digits model, top-1 at least nearest's (measured: 89.6 -> 94.9)."""
    train.train_and_evaluate(apply_variant(small_digits(num_train_steps=100), "float"),
                             str(tmp_path / "float"))
    top1 = {}
    for rounding in ("nearest", "adaround"):
        c = apply_variant(small_digits(num_train_steps=1), "w2a2")
        c.init_from, c.conversion_rounding = str(tmp_path / "float"), rounding
        c.adaround_steps, c.adaround_images = 200, 128
        top1[rounding] = train.train_and_evaluate(c, str(tmp_path / rounding))["eval_top1"]
    assert top1["adaround"] >= top1["nearest"], top1


@pytest.mark.parametrize("override, match", [
    ({"conversion_rounding": "up"}, r"conversion_rounding='up'; allowed: 'nearest', 'adaround'"),
    ({"conversion_rounding": "adaround"}, r"set config.init_from and quant.weights='dq'"),
    ({"conversion_rounding": "adaround", "init_from": "/f", "rounding": "latent_feedback",
      "feedback_residual": "float"}, r"use one of them"),
    ({"conversion_rounding": "adaround", "init_from": "/f", "adaround_steps": 0},
     r"config.adaround_steps=0 must be >= 1"),
])
def test_conversion_rounding_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        configlib.validate(apply_variant(small_digits(**override), "w2a2"), device_count=1)


def test_same_shape_layers_share_one_compiled_adaround_step():
    """The layer function and the Adam transformation are equal for same-shape layers, so
    `_adaround_step` compiles once for them (a closure per layer compiled it per layer); a
    layer with other hyper-parameters gets its own function."""
    a = nn.Conv(8, (3, 3), padding=[(1, 1), (1, 1)])
    b = nn.Conv(8, (3, 3), padding=[(1, 1), (1, 1)])
    c = nn.Conv(8, (3, 3), strides=2)
    fa, fb, fc = (adaround._linear_fn(m) for m in (a, b, c))
    assert fa == fb and hash(fa) == hash(fb) and fa != fc
    assert adaround._linear_fn(nn.Dense(3)) == adaround._linear_fn(nn.Dense(5))  # x @ k
    x = jnp.ones((4, 6, 6, 2))
    k = jnp.asarray(np.random.default_rng(0).standard_normal((3, 3, 2, 8)), jnp.float32)
    np.testing.assert_array_equal(fa(x, k), nn.Conv(8, (3, 3), padding=[(1, 1), (1, 1)],
                                                    use_bias=False).apply(
        {"params": {"kernel": k}}, x))
    before = adaround._adaround_step._cache_size()
    for seed in (1, 2):
        w = jnp.asarray(np.random.default_rng(seed).standard_normal((3, 3, 2, 8)) * 0.1,
                        jnp.float32)
        levels, _ = wq.lloyd_init(w, 4, "per_channel")
        adaround.adaround_codes(w, levels, x, adaround._linear_fn(
            nn.Conv(8, (3, 3), padding=[(1, 1), (1, 1)])), steps=3)
    assert adaround._adaround_step._cache_size() == before + 1
