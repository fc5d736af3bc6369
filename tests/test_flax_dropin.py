"""Drop-in means unchanged model code (issue 13): a ResNet written as in the Flax ImageNet
example (`tests/flax_example_resnet.py`, which knows nothing about quantization) is built
with `conv=partial(QuantConv, quant=W2A2)` and trained with the library's optimizer.

Nothing in the model passes `train` to a conv: the quantizers train exactly when
'quant_stats' is mutable (as BatchNorm's 'batch_stats' in the example), the stem conv
reading normalised pixels gets a signed activation grid from its calibration batch, and
`init` returns only what must be stored.
"""
import os
import sys
from functools import partial

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from dq_jax import predict
from dq_jax.layers import QuantConv, QuantDense
from dq_jax.optim import dq_optimizer
from dq_jax.quant.config import QuantConfig
from dq_jax.train_state import TrainState
from tests import flax_example_resnet as example
from tests.helpers import run_python

W2A2 = QuantConfig(weights="dq", weight_bits=2, acts="dq", act_bits=2)
STEPS, BATCH = 60, 64


def digits_16x16():
    """scikit-learn's bundled 8x8 digits, upsampled 2x (nearest) and standardised like
    ImageNet pixels (about 40% of the inputs are negative); a fixed train/test split."""
    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    x = np.kron(x, np.ones((2, 2), np.float32))[..., None]
    x = (x - x.mean()) / x.std()
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], d.target[perm].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def data():
    return digits_16x16()


def make_model():
    return example.ResNetTiny(num_classes=10, conv=partial(QuantConv, quant=W2A2))


def test_init_needs_no_train_flag_and_stores_only_state(data):
    (x, _), _ = data
    model = make_model()
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    # what must be stored: no f32 'perturbations' zeros next to the uint8 codes
    assert set(variables) == {"params", "codes", "batch_stats", "quant_stats"}
    assert all(c.dtype == jnp.uint8 for c in jax.tree.leaves(variables["codes"]))
    back = flax.serialization.from_bytes(variables, flax.serialization.to_bytes(variables))
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    # every conv is quantized (its 'kernel' replaced by levels + codes); the head stays float
    paths = flax.traverse_util.flatten_dict(variables["params"])
    assert not any(p[-1] == "kernel" and p[0] != "Dense_0" for p in paths)


def test_flax_example_resnet_trains_with_quant_conv(data, tmp_path):
    (x, y), (x_test, y_test) = data
    model = make_model()
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    tx = dq_optimizer(learning_rate=0.05, levels_learning_rate=1e-3, momentum=0.9, key=1)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(differentiable):  # params and the zero perturbations (dL/dW_q)
            logits, new_state = state.apply_fn(
                state.variables(differentiable), images,
                mutable=["batch_stats", "quant_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_state
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.differentiable())
        return state.apply_gradients(grads=grads, **new_state), loss

    @jax.jit
    def accuracy(state, images, labels):
        logits = model.apply(state.variables(), images, train=False)  # nothing mutable
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    rng = np.random.default_rng(1)
    losses = []
    for _ in range(STEPS):
        idx = rng.choice(len(x), BATCH, replace=False)
        state, loss = train_step(state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        losses.append(float(loss))
    stats = flax.traverse_util.flatten_dict(state.quant_stats)
    # every quantizer calibrated on the first batch; the stem (normalised pixels) chose a
    # signed grid, every post-ReLU conv an unsigned one
    assert all(bool(v) for k, v in stats.items() if k[-1] == "initialized")
    signed = {k[:-2]: bool(v) for k, v in stats.items() if k[-1] == "signed"}
    assert len(signed) == 6  # stem, 2 convs per block, the strided block's projection
    assert signed.pop(("conv_init",)) is True
    assert not any(signed.values()), signed
    acc = float(accuracy(state, jnp.asarray(x_test), jnp.asarray(y_test)))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f}, held-out accuracy {acc:.3f}")
    assert np.isfinite(losses).all()
    assert last < 0.5 * first  # the loss drops clearly (log 10 = 2.30 at chance)
    assert acc > 0.5           # chance is 0.1

    # ... and `python -m dq_jax.export` ships it: the file records the factory that rebuilds
    # it (tests/user_models.py), predict loads it from that reference and agrees.
    variables = {k: v for k, v in state.variables().items()}
    (tmp_path / "vars.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = run_python(["-m", "dq_jax.export", "--model=user_models:flax_example_resnet_tiny",
                       f"--variables={tmp_path / 'vars.msgpack'}", "--num_classes=10",
                       "--image_shape=16,16,1", f"--out={tmp_path / 'resnet.dqz'}"],
                      env={"PYTHONPATH": tests_dir})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dq W2" in proc.stdout  # the size table names the quantized convs
    sys.path.insert(0, tests_dir)
    try:
        m = predict.load_model(str(tmp_path / "resnet.dqz"))
    finally:
        sys.path.remove(tests_dir)
    assert type(m.module).__name__ == "ResNet"
    exported_acc = float(np.mean(np.argmax(m.predict(x_test), -1) == y_test))
    assert abs(exported_acc - acc) <= 2 / len(y_test), (exported_acc, acc)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(QuantConv(16, (3, 3), quant=W2A2.replace(act_signed=False),
                                 name="conv")(x)), None


class _StackedNet(nn.Module):
    """stem (+BN) -> nn.scan over 3 DQ conv blocks (stacked levels [3, 1, 4]) -> BN -> an nn.vmap ensemble
    of 2 DQ W4A4 dense heads (stacked levels [2, 1, 16]) averaged."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
        x = nn.relu(norm("stem_bn")(nn.Conv(16, (3, 3), strides=2, name="stem")(x)))
        stacked = {"params": 0, "codes": 0, "quant_stats": 0, "perturbations": 0}
        x, _ = nn.scan(_ScanBlock, variable_axes=stacked, split_rngs={"params": True},
                       length=3)(name="blocks")(x, None)
        x = norm("pool_bn")(jnp.mean(x, axis=(1, 2)))
        heads = nn.vmap(QuantDense, variable_axes=stacked, split_rngs={"params": True},
                        in_axes=None, out_axes=0, axis_size=2)
        return jnp.mean(heads(10, quant=W2A2.replace(weight_bits=4, act_bits=4), name="heads")(x), 0)


def test_scan_and_vmap_stacked_quant_layers_train(data):
    """Stacked DQ layers (nn.scan, nn.vmap) train end to end with TrainState + dq_optimizer:
    every slice keeps its own levels and codes, and the loss drops."""
    (x, y), (x_test, y_test) = data
    model = _StackedNet()
    variables = jax.jit(model.init)(jax.random.key(0), x[:2])
    assert variables["params"]["blocks"]["conv"]["kernel_levels"].shape == (3, 1, 4)
    assert variables["params"]["heads"]["kernel_levels"].shape == (2, 1, 16)
    tx = dq_optimizer(learning_rate=0.1, levels_learning_rate=1e-3, key=2)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)
    codes0 = jax.tree.map(np.asarray, state.codes)

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(differentiable):
            logits, new_state = state.apply_fn(state.variables(differentiable), images,
                                               mutable=["batch_stats", "quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), \
                new_state
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.differentiable())
        return state.apply_gradients(grads=grads, **new_state), loss

    rng = np.random.default_rng(2)
    losses = []
    for _ in range(60):
        idx = rng.choice(len(x), 64, replace=False)
        state, loss = train_step(state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses
    for path, c in flax.traverse_util.flatten_dict(state.codes).items():
        c0 = flax.traverse_util.flatten_dict(codes0)[path]
        assert c.dtype == jnp.uint8 and c.shape == c0.shape
        moved = np.mean(np.asarray(c) != c0, axis=tuple(range(1, c.ndim)))
        assert (moved > 0).all(), (path, moved)  # every slice's codes were re-assigned
    levels = state.params["blocks"]["conv"]["kernel_levels"]
    assert bool(jnp.all(jnp.diff(levels, axis=-1) > 0))  # each slice's levels stay sorted
    logits = model.apply(state.variables(), jnp.asarray(x_test), train=False)
    assert np.isfinite(np.asarray(logits)).all()
    # What the stacked layers learned, read with the test batch's own BN statistics: after 60
    # steps the running statistics still lag (eval-mode accuracy 0.14-0.54 over keys 2-6 and
    # both random streams, however well it trained), while batch-statistics accuracy is
    # 0.88-0.93 for every key and stream - so 0.7 asserts learning with a wide margin.
    batch_logits, _ = model.apply(state.variables(), jnp.asarray(x_test), train=True,
                                  mutable=["batch_stats", "quant_stats"])
    assert float(jnp.mean(jnp.argmax(batch_logits, -1) == y_test)) > 0.7


# ------------------------------------------------ the traps of issue 28 (item 7): named errors

def _example_variables(model, x):
    return jax.jit(model.init)(jax.random.key(0), x[:2])


def test_swapping_only_the_conv_names_the_missing_quant_stats(data):
    """The Flax example keeps only params and batch_stats: the missing activation statistics
    are named with the fix, not a generic ScopeCollectionNotFound."""
    (x, _), _ = data
    model = make_model()
    v = _example_variables(model, x)
    example_vars = {"params": v["params"], "batch_stats": v["batch_stats"]}
    for mutable in (["batch_stats"], False):
        with pytest.raises(ValueError, match=r"'conv_init' finds no activation statistics "
                                             r"\('quant_stats'\).*state.variables"):
            model.apply(example_vars, x[:2], mutable=mutable, train=bool(mutable))


@pytest.mark.filterwarnings("ignore:.*never calibrated")
def test_plain_train_state_and_optax_sgd_is_an_error_not_frozen_codes(data):
    """A plain Flax TrainState with optax.sgd (or any variables without 'perturbations'),
    differentiated w.r.t. params, would train with the codes frozen: it is an error."""
    from flax.training import train_state
    (x, y), _ = data
    model = make_model()
    v = _example_variables(model, x)
    state = train_state.TrainState.create(apply_fn=model.apply, params=v["params"],
                                          tx=optax.sgd(0.1, momentum=0.9))

    @jax.jit
    def train_step(state, images, labels):
        def loss_fn(params):
            logits, new = state.apply_fn({**v, "params": params}, images,
                                         mutable=["batch_stats", "quant_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

    with pytest.raises(ValueError, match=r"'conv_init': its levels are differentiated but no "
                                         r"'perturbations' were passed.*frozen"):
        train_step(state, jnp.asarray(x[:8]), jnp.asarray(y[:8]))
    # a DQ TrainState given the params alone says the same before the model runs
    dq_state = TrainState.create(apply_fn=model.apply, variables=v,
                                 tx=dq_optimizer(0.05, 1e-3, key=1))
    with pytest.raises(ValueError, match=r"expected \{'params', 'perturbations'\}"):
        dq_state.variables(dq_state.params)
    # nn.vmap-stacked layers are found under their batching tracer too
    stacked = _StackedNet()
    sv = jax.jit(stacked.init)(jax.random.key(0), x[:2])
    with pytest.raises(ValueError, match="'heads': its levels are differentiated"):
        jax.grad(lambda p: jnp.sum(stacked.apply({**sv, "params": p}, x[:2], train=False)))(
            sv["params"])
    # differentiating w.r.t. the input only (e.g. a saliency map) is not an error
    g = jax.grad(lambda im: jnp.sum(model.apply(v, im, train=False)))(jnp.asarray(x[:2]))
    assert g.shape == x[:2].shape


def test_evaluating_an_uncalibrated_quantizer_warns(data):
    (x, y), _ = data
    model = make_model()
    v = _example_variables(model, x)
    evaluate = jax.jit(lambda v, im: model.apply(v, im, train=False))
    with pytest.warns(UserWarning, match="conv_init is evaluated but was never calibrated"):
        jax.block_until_ready(evaluate(v, x[:4]))
        jax.effects_barrier()
    with pytest.warns(UserWarning, match="never calibrated"):  # eager: at once
        model.apply(v, x[:4], train=False)
    _, new = model.apply(v, x[:64], mutable=["batch_stats", "quant_stats"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # calibrated: silent
        jax.block_until_ready(evaluate({**v, **new}, x[:4]))
        jax.effects_barrier()


def test_float_params_gives_the_example_l2_penalty_to_w_q(data):
    """The Flax example's penalty over `tree_leaves(params)` (ndim > 1) decays what float
    training decays when given `dq_jax.float_params(state.variables(params))`: its gradient
    w.r.t. the perturbations is W_q (decay 1, so d/dW (0.5 * W**2) = W exactly); over
    `{'params', 'perturbations'}` itself it would be zero (the trap)."""
    import dq_jax
    from dq_jax.optim import effective_kernels
    (x, _), _ = data
    model = make_model()
    v = _example_variables(model, x)
    state = TrainState.create(apply_fn=model.apply, variables=v,
                              tx=dq_optimizer(0.05, 1e-3, key=1))

    def penalty(leaves):
        return 0.5 * sum(jnp.sum(w ** 2) for w in leaves if w.ndim > 1)

    g = jax.grad(lambda d: penalty(jax.tree_util.tree_leaves(
        dq_jax.float_params(state.variables(d)))))(state.differentiable())
    w_q = effective_kernels(state.params, state.codes)
    assert set(w_q) == {k[:-1] for k in flax.traverse_util.flatten_dict(state.codes)}
    for module, w in w_q.items():
        got = flax.traverse_util.flatten_dict(g["perturbations"])[module + ("kernel",)]
        np.testing.assert_array_equal(got, w)
    # the float head is decayed as in float training; levels are not penalised directly
    np.testing.assert_array_equal(g["params"]["Dense_0"]["kernel"],
                                  state.params["Dense_0"]["kernel"])
    view = dq_jax.float_params(state.variables())
    assert all(k[-1] != "kernel_levels" for k in flax.traverse_util.flatten_dict(view))
    trap = jax.grad(lambda d: penalty(jax.tree_util.tree_leaves(d)))(state.differentiable())
    assert not any(np.any(p) for p in jax.tree.leaves(trap["perturbations"]))
