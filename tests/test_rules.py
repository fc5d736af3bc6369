"""Quantization by rules (issue 28, item 1): `dq_jax.quantize_model(model, rules)` quantizes an
unmodified Linen model that hard-codes `nn.Conv` / `nn.Dense`, keeping its module paths.

Bar `rules-unmodified-model`: 8-bit stem and head, W2A2 inner convs, float paths kept; init,
train steps with `dq_optimizer` that move codes in every quantized layer, eval.
"""
from __future__ import annotations

import builtins

from functools import partial

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import user_models
from dq_jax import models
from dq_jax import QuantConfig, QuantRule, quantize_model
from dq_jax.layers import QuantConv
from dq_jax.optim import dq_optimizer
from dq_jax.train_state import TrainState

W8A8 = QuantConfig(weight_bits=8, act_bits=8)
W2A2 = QuantConfig(weight_bits=2, act_bits=2)
RULES = [QuantRule("Conv_0|Dense_0", W8A8), QuantRule("Conv_.*", W2A2)]


class PlainNet(nn.Module):
    """Plain Flax: hard-coded nn.Conv / nn.Dense, nothing here knows about quantization."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(32, (3, 3))(x)))               # stem: Conv_0
        x = nn.relu(norm()(nn.Conv(32, (3, 3), strides=2)(x)))    # Conv_1
        x = nn.relu(norm()(nn.Conv(32, (3, 3))(x)))               # Conv_2
        return nn.Dense(10)(x.mean((1, 2)))                       # head: Dense_0


def digits():
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    x = (x - x.mean()) / x.std()  # normalised pixels: the stem's input is signed
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], d.target[perm].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def data():
    return digits()


def _module_paths(tree) -> set:
    return {k[:-1] for k in flax.traverse_util.flatten_dict(tree)}


def train(model, variables, x, y, steps, lr=0.05):
    tx = dq_optimizer(learning_rate=lr, levels_learning_rate=1e-3, key=1)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)

    @jax.jit
    def step(state, images, labels):
        def loss_fn(differentiable):
            logits, new = state.apply_fn(state.variables(differentiable), images,
                                         mutable=["batch_stats", "quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.differentiable())
        return state.apply_gradients(grads=grads, **new), loss

    rng, losses = np.random.default_rng(1), []
    for _ in range(steps):
        idx = rng.choice(len(x), 64, replace=False)
        state, loss = step(state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        losses.append(float(loss))
    return state, losses


def test_rules_unmodified_model_end_to_end(data):
    """The bar: init keeps the float paths, 8-bit stem/head and 2-bit inner convs train (codes
    move in every quantized layer), and eval runs with nothing mutable."""
    (x, y), (x_test, y_test) = data
    float_vars = PlainNet().init(jax.random.key(0), x[:2])
    model = quantize_model(PlainNet(), RULES)
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    assert set(variables) == {"params", "codes", "batch_stats", "quant_stats"}
    # every module path is the float model's; only the kernels of the quantized layers changed
    assert _module_paths(variables["params"]) == _module_paths(float_vars["params"])
    assert _module_paths(variables["batch_stats"]) == _module_paths(float_vars["batch_stats"])
    levels = {k[0]: v.shape for k, v in flax.traverse_util.flatten_dict(variables["params"]).items()
              if k[-1] == "kernel_levels"}
    assert levels == {"Conv_0": (1, 256), "Dense_0": (1, 256), "Conv_1": (1, 4), "Conv_2": (1, 4)}
    for name, c in variables["codes"].items():  # codes: the float kernel's shape, uint8
        assert c["kernel"].shape == float_vars["params"][name]["kernel"].shape
        assert c["kernel"].dtype == jnp.uint8
    assert "kernel" not in flax.traverse_util.flatten_dict(variables["params"])

    state, losses = train(model, variables, x, y, steps=40)
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    for name, c in state.codes.items():
        moved = float(np.mean(np.asarray(c["kernel"]) != np.asarray(variables["codes"][name]["kernel"])))
        assert moved > 0, name  # the code update reached every quantized layer
    stats = flax.traverse_util.flatten_dict(state.quant_stats)
    assert all(bool(v) for k, v in stats.items() if k[-1] == "initialized")
    assert bool(state.quant_stats["Conv_0"]["act_quant"]["signed"])       # normalised pixels
    assert not bool(state.quant_stats["Conv_1"]["act_quant"]["signed"])   # post-ReLU
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(state.variables(), x_test)
    assert float(jnp.mean(jnp.argmax(logits, -1) == y_test)) > 0.5  # chance is 0.1


def test_first_matching_rule_wins_and_unmatched_layers_stay_float(data):
    (x, _), _ = data
    rules = [QuantRule("Conv_1", W2A2.replace(weight_bits=3)), QuantRule("Conv_[12]", W2A2)]
    variables = quantize_model(PlainNet(), rules).init(jax.random.key(0), x[:2])
    p = variables["params"]
    assert p["Conv_1"]["kernel_levels"].shape == (1, 8)   # the first rule, not the second
    assert p["Conv_2"]["kernel_levels"].shape == (1, 4)
    assert set(p["Conv_0"]) == {"kernel", "bias"} and set(p["Dense_0"]) == {"kernel", "bias"}
    assert set(variables["codes"]) == {"Conv_1", "Conv_2"}


def test_float_rules_give_the_float_model_bitwise(data):
    """A model whose rules are all float computes exactly what the float model computes."""
    (x, _), _ = data
    float_vars = PlainNet().init(jax.random.key(0), x[:2])
    model = quantize_model(PlainNet(), [QuantRule(".*", QuantConfig.float())])
    variables = model.init(jax.random.key(0), x[:2])
    jax.tree.map(np.testing.assert_array_equal, variables, float_vars)
    np.testing.assert_array_equal(model.apply(variables, x[:8], train=False),
                                  PlainNet().apply(float_vars, x[:8], train=False))


def test_rules_apply_to_the_zoo_and_conv_field_models(data):
    """The zoo (float-configured QuantConv layers) and a model whose conv class is a field both
    take rules; a layer the model already quantizes keeps its own config."""
    (x, _), _ = data
    zoo = models.create("digits_cnn", 10)  # float: every layer a float QuantConv/Dense
    v = quantize_model(zoo, [QuantRule("conv[23]", W2A2)]).init(jax.random.key(0), x[:2],
                                                                train=False)
    assert set(v["codes"]) == {"conv2", "conv3"} and "kernel" in v["params"]["conv1"]

    class ConvField(nn.Module):
        conv: type = nn.Conv

        @nn.compact
        def __call__(self, x):
            return self.conv(8, (3, 3), name="first")(nn.Conv(8, (3, 3), name="second")(x))

    m = ConvField(conv=partial(QuantConv, quant=W2A2.replace(weight_bits=4)))
    v = quantize_model(m, [QuantRule(".*", W2A2)]).init(jax.random.key(0), x[:2])
    assert v["params"]["first"]["kernel_levels"].shape == (1, 16)  # the model's own config
    assert v["params"]["second"]["kernel_levels"].shape == (1, 4)  # the rule's


def test_a_layer_called_twice_shares_its_quantized_kernel(data):
    (x, _), _ = data

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            conv = nn.Conv(1, (3, 3))
            return conv(nn.relu(conv(x)))

    model = quantize_model(Shared(), [QuantRule("Conv_0", W2A2)])
    v = model.init(jax.random.key(0), x[:2])
    assert set(v["params"]["Conv_0"]) == {"kernel_levels", "bias"}
    assert model.apply(v, x[:2]).shape == (2, 8, 8, 1)


def test_a_dead_layers_id_does_not_hand_its_twin_to_a_new_layer(monkeypatch):
    """nn.scan traces its body more than once; the first trace's layers die, and CPython may
    give a new layer the same address. The twin of a layer called twice was found by `id`
    alone, so the new layer took the dead one's twin: its variables went to a dead scope
    (a flaky `from_float` without the scanned layer, or a leaked tracer). Simulated here by
    giving every float conv the same id: each still gets its own twin."""
    from dq_jax import rules

    float_conv = lambda m: isinstance(m, nn.Conv) and not isinstance(
        m, rules._QuantizedKernelMixin)
    monkeypatch.setattr(rules, "id", lambda obj: 0 if float_conv(obj) else builtins.id(obj),
                        raising=False)
    x = jnp.ones((1, 8, 8, 1))
    model = quantize_model(user_models.ScannedConvs(), [QuantRule("blocks/conv", W2A2)])
    v = model.init(jax.random.key(0), x)
    assert v["params"]["blocks"]["conv"]["kernel_levels"].shape == (3, 1, 4)
    assert v["codes"]["blocks"]["conv"]["kernel"].shape == (3, 3, 3, 8, 8)


def test_bad_rules_are_named(data):
    (x, _), _ = data
    with pytest.raises(ValueError, match=r"rule\(s\) \['conv_9'\] match no .*Conv_0"):
        quantize_model(PlainNet(), [QuantRule("conv_9", W2A2)]).init(jax.random.key(0), x[:2])
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantRule("Conv_(", W2A2)
    with pytest.raises(TypeError, match="must be a dq_jax QuantConfig"):
        QuantRule("Conv_0", {"weight_bits": 2})
    with pytest.raises(TypeError, match="list of dq_jax.QuantRule"):
        quantize_model(PlainNet(), QuantRule("Conv_0", W2A2))

    class MyConv(nn.Conv):
        pass

    class Sub(nn.Module):
        @nn.compact
        def __call__(self, x):
            return MyConv(4, (3, 3))(x)

    with pytest.raises(ValueError, match="MyConv .*cannot replace"):
        quantize_model(Sub(), [QuantRule(".*", W2A2)]).init(jax.random.key(0), x[:2])


# ------------------------------------------------------------------------------- NNX

def test_nnx_rules_convert_a_float_model_in_place_and_train(data):
    """dq_jax.nnx.quantize_model: the same rules over an NNX model's nnx.Conv / nnx.Linear;
    each matched layer's levels and codes are fitted to its current (float) kernel, and the
    model trains with dq_jax.nnx.Optimizer (codes move in every quantized layer)."""
    from flax import nnx
    import dq_jax.nnx as dqnnx
    from dq_jax.nnx.layers import _lloyd_init

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(32, rngs=rngs)
            self.blocks = nnx.List([nnx.Conv(32, 32, (3, 3), rngs=rngs) for _ in range(2)])
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.conv1(x)))
            for block in self.blocks:
                x = nnx.relu(block(x))
            return self.head(x.mean((1, 2)))

    (x, y), (x_test, y_test) = data
    model = Net(nnx.Rngs(0))
    float_kernel, float_bias = model.blocks[1].kernel[...], model.blocks[1].bias[...]
    rules = [QuantRule("conv1|head", W8A8), QuantRule("blocks/.*", W2A2)]
    assert dqnnx.quantize_model(model, rules) is model
    assert type(model.blocks[1]) is dqnnx.QuantConv and type(model.head) is dqnnx.QuantLinear
    levels, codes = _lloyd_init(float_kernel, 4, "per_layer", W2A2.lloyd_iters)
    np.testing.assert_array_equal(model.blocks[1].kernel_levels[...], levels)
    np.testing.assert_array_equal(model.blocks[1].kernel_codes[...], codes)
    np.testing.assert_array_equal(model.blocks[1].bias[...], float_bias)
    assert model.conv1.kernel_levels.shape == model.head.kernel_levels.shape == (1, 256)
    linen = dqnnx.linen_variables(model)
    assert set(linen["codes"]) == {"conv1", "blocks", "head"}

    optimizer = dqnnx.Optimizer(model, dq_optimizer(0.05, 1e-3, key=1))
    codes0 = {p: np.asarray(l.kernel_codes[...]) for p, l in dqnnx.quant_layers(model)}

    @nnx.jit
    def step(model, optimizer, xb, yb):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()
        loss, grads = dqnnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    rng = np.random.default_rng(0)
    for _ in range(15):
        idx = rng.choice(len(x), 64, replace=False)
        step(model, optimizer, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
    for p, layer in dqnnx.quant_layers(model):
        assert np.any(np.asarray(layer.kernel_codes[...]) != codes0[p]), p
    model.eval()
    assert model(jnp.asarray(x_test[:8])).shape == (8, 10)
    with pytest.raises(ValueError, match=r"rule\(s\) \['conv9'\] match no .*blocks/0"):
        dqnnx.quantize_model(Net(nnx.Rngs(1)), [QuantRule("conv9", W2A2)])
