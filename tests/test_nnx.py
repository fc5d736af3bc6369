"""`dq_jax.nnx`: the NNX front end (issue 14).

Exactness: the NNX layers run Flax's own `nnx.Conv` / `nnx.Linear` forward and
the `dq_jax.quant` functions the Linen layers call, on the same numbers, so
Linen and NNX perform the same operations in the same order: logits, gradients,
statistics and codes are compared bit for bit. No comparison here has two
*different* computations meet at a rounding threshold.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dq_jax.nnx as dqnnx
from dq_jax import data, models, optim, predict, train
from dq_jax.layers import PERTURBATIONS, zero_perturbations
from dq_jax.quant.config import QuantConfig
from tests.helpers import load_config

W2A2 = QuantConfig()


def key(seed):
    """unsafe_rbg keys: threefry draws of rank-4 kernels take ~9 s each to compile on CPU."""
    return jax.random.key(seed, impl="unsafe_rbg")


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    """Same structure and dtypes; floats within round-off; integers (codes) equal except at
    most 0.1% of the entries (values within round-off of a rounding threshold)."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if np.issubdtype(x.dtype, np.inexact):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=name)
        elif x.dtype == np.uint8:  # codes
            assert np.sum(x != y) <= max(1, 1e-3 * x.size), name
        else:  # counts, PRNG keys, steps: exact
            np.testing.assert_array_equal(x, y, err_msg=name)


def pure(model_or_state):
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return nnx.to_pure_dict(nnx.as_pure(state))


# ---------------------------------------------------------------- float = Flax

@pytest.mark.parametrize("kw", [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 3), strides=(2, 2), padding="VALID", use_bias=False),
    dict(kernel_size=(2, 3), strides=(1, 2), padding=((1, 2), (0, 1)), feature_group_count=2,
         kernel_dilation=(1, 2)),
], ids=["same", "valid_s2", "groups_dil"])
def test_float_quant_conv_is_nnx_conv(np_rng, kw):
    x = jnp.asarray(np_rng.normal(size=(2, 7, 7, 4)).astype(np.float32))
    ref = nnx.Conv(4, 6, rngs=nnx.Rngs(key(0)), **kw)
    q = dqnnx.QuantConv(4, 6, quant=QuantConfig.float(), rngs=nnx.Rngs(key(0)), **kw)
    assert_trees_equal(pure(q), pure(ref))  # same names, shapes, values (same draws)
    np.testing.assert_array_equal(q(x), ref(x))
    q.eval()
    np.testing.assert_array_equal(q(x), ref(x))


def test_float_quant_linear_is_nnx_linear(np_rng):
    x = jnp.asarray(np_rng.normal(size=(2, 3, 5)).astype(np.float32))
    for kw in (dict(), dict(use_bias=False)):
        ref = nnx.Linear(5, 7, rngs=nnx.Rngs(key(1)), **kw)
        q = dqnnx.QuantLinear(5, 7, quant=QuantConfig.float(), rngs=nnx.Rngs(key(1)), **kw)
        assert_trees_equal(pure(q), pure(ref))
        np.testing.assert_array_equal(q(x), ref(x))


# ---------------------------------------------------------------- variables, train/eval

def test_variable_types_filters_and_train_eval(np_rng):
    x = jnp.asarray(np.abs(np_rng.normal(size=(4, 5, 5, 3))).astype(np.float32))
    layer = dqnnx.QuantConv(3, 8, (3, 3), quant=W2A2, rngs=nnx.Rngs(key(2)))
    shapes = lambda t: jax.tree.map(lambda v: (v.shape, str(v.dtype)), pure(t))
    assert shapes(nnx.state(layer, nnx.Param)) == {
        "kernel_levels": ((1, 4), "float32"), "bias": ((8,), "float32")}  # no float kernel
    assert shapes(nnx.state(layer, dqnnx.QuantCodes)) == {
        "kernel_codes": ((3, 3, 3, 8), "uint8")}
    assert shapes(nnx.state(layer, dqnnx.QuantPerturbation)) == {
        "kernel_perturbation": ((), "float32")}  # a scalar hook outside value_and_grad
    assert shapes(nnx.state(layer, dqnnx.QuantStats)) == {
        "act_quant": {"alpha": ((), "float32"), "initialized": ((), "bool"),
                      "signed": ((), "bool")}}  # act_signed=None: the grid is data-decided
    np.testing.assert_array_equal(
        layer.quantized_kernel(),
        dqnnx.layers.wq.gather_levels(layer.kernel_levels[...], layer.kernel_codes[...]))

    before = pure(nnx.state(layer, dqnnx.QuantStats))
    layer.eval()
    assert layer.use_running_average is True
    y_eval = layer(x)
    assert_trees_equal(pure(nnx.state(layer, dqnnx.QuantStats)), before)  # eval: unchanged
    layer(x, use_running_average=False)  # call-time override: fits (calibrates)
    after = pure(nnx.state(layer, dqnnx.QuantStats))
    assert bool(after["act_quant"]["initialized"]) and after["act_quant"]["alpha"] != 1.0
    layer.train()
    assert layer.use_running_average is False
    layer(2.0 * x)  # train: one EMA step towards the new batch's fit
    assert pure(nnx.state(layer, dqnnx.QuantStats))["act_quant"]["alpha"] != \
        after["act_quant"]["alpha"]
    assert y_eval.shape == (4, 5, 5, 8)



# ---------------------------------------------------------------- Linen == NNX

@pytest.mark.parametrize("kind,quant", [
    ("conv", QuantConfig(granularity="per_channel", act_levels="learned")),
    ("linear", QuantConfig(weights="dq", act_signed=True)),
    ("conv", QuantConfig(weights="latent_ste", act_signed=True)),
    ("linear", QuantConfig(weights="lsq", weight_bits=3, acts="float")),
], ids=["conv_dq_per_channel_learned_acts", "linear_dq_signed", "conv_latent_ste_signed",
        "linear_lsq"])
def test_each_method_layer_equals_linen_layer(np_rng, kind, quant):
    """One layer, Linen vs NNX from the same variables (loading checks that the variable
    names, shapes and dtypes match exactly): train-mode output, fitted statistics and the
    gradients of every Param (and dL/dW_q) are bitwise equal."""
    from dq_jax.layers import QuantConv as LinenConv, QuantDense as LinenDense
    shape = (2, 5, 5, 4) if kind == "conv" else (3, 4)
    x = jnp.asarray(np_rng.normal(size=shape).astype(np.float32))
    if not quant.act_signed:
        x = jnp.abs(x)
    if kind == "conv":
        lin = LinenConv(6, (3, 3), quant=quant, train=True)
        make = lambda: dqnnx.QuantConv(4, 6, (3, 3), quant=quant, rngs=nnx.Rngs(key(6)))
    else:
        lin = LinenDense(6, quant=quant, train=True)
        make = lambda: dqnnx.QuantLinear(4, 6, quant=quant, rngs=nnx.Rngs(key(6)))
    variables = flax.core.unfreeze(jax.jit(lambda k: lin.init(k, x))(key(5)))
    has_hooks = "codes" in variables  # DQ-W: init stores no perturbations, zeros from codes
    zeros = zero_perturbations(variables.get("codes", {}))
    layer = nnx.eval_shape(make)  # abstract: every value comes from the Linen variables
    dqnnx.load_linen_variables(layer, variables)

    @jax.jit
    def linen(variables):
        def loss(params, perturbations):
            y, new = lin.apply({**variables, "params": params, PERTURBATIONS: perturbations}, x,
                               mutable=["quant_stats"])
            return jnp.sum(jnp.sin(y)), (y, new)
        (_, (y, new)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
            variables["params"], zeros)
        return y, new.get("quant_stats", {}), grads

    @nnx.jit
    def nnx_(layer):
        def loss(layer):
            y = layer(x)
            return jnp.sum(jnp.sin(y)), y
        (_, y), grads = dqnnx.value_and_grad(loss, has_aux=True)(layer)
        return y, grads

    l_y, l_stats, (l_grads, l_wgrads) = linen(variables)
    n_y, n_grads = nnx_(layer)
    np.testing.assert_array_equal(n_y, l_y)
    assert_trees_equal(dqnnx.linen_variables(layer)["quant_stats"], l_stats)
    assert_trees_equal(dqnnx.params_tree(nnx.filter_state(n_grads, nnx.Param)), l_grads)
    w = nnx.to_pure_dict(nnx.as_pure(nnx.filter_state(n_grads, dqnnx.QuantPerturbation)))
    assert_trees_equal({"kernel": w["kernel_perturbation"]} if has_hooks else {}, l_wgrads)


def _nnx_loss(model, images, labels):
    """The Linen train step's loss (`train.train_step`), on an NNX model."""
    logits = model(images)
    one_hot = jax.nn.one_hot(labels, logits.shape[-1])
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot)), logits


def nnx_train_step(model, optimizer, batch):
    (loss, logits), grads = dqnnx.value_and_grad(_nnx_loss, has_aux=True)(
        model, batch["image"], batch["label"])
    diagnostics = optimizer.update(model, grads)
    return loss, logits, grads, diagnostics


def test_optimizer_rejects_plain_nnx_grads(np_rng):
    model = dqnnx.QuantLinear(6, 4, quant=QuantConfig(acts="float"), rngs=nnx.Rngs(key(4)))
    tx = optim.dq_optimizer(0.1, 1e-3)
    optimizer = dqnnx.Optimizer(model, tx)
    x = jnp.asarray(np_rng.normal(size=(3, 6)).astype(np.float32))
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)  # Params only: no dL/dW_q
    with pytest.raises(ValueError, match="dL/dW_q of .*value_and_grad"):
        optimizer.update(model, grads)
    with pytest.raises(TypeError, match="tx must contain dq_jax.optim.dq_optimizer"):
        dqnnx.Optimizer(model, optax.sgd(0.1))


# ---------------------------------------------------------------- digits W2A2: Linen vs NNX

DIGITS_STEPS = 200
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def digits_runs():
    """Per seed, the zoo's Linen W2A2 digits_cnn trained by the real `train.train_step` and
    `dq_jax.nnx.DigitsCNN` loaded with the same initial numbers and optimizer key, trained on
    the same batches: seeds 0 and 1 with `nnx.jit`, seed 2 with a pure `jax.jit` step over
    nnx.split / nnx.merge. Records the full state of both after the first step, and eval
    accuracies and codes at the end."""
    config = load_config("digits")
    ds = data.create_dataset(config, process_index=0, process_count=1)
    it = ds.train_batches(0)
    batches = [next(it) for _ in range(DIGITS_STEPS)]
    evals = list(ds.eval_batches())
    tx = train.create_optimizer(config, DIGITS_STEPS, ds.steps_per_epoch)
    lm = models.create("digits_cnn", 10, quant=W2A2)
    linen_init = jax.jit(lambda k: lm.init(k, jnp.zeros((1, 8, 8, 1)), train=False))
    linen_step = jax.jit(lambda s, b: train.train_step(s, b, model=lm, label_smoothing=0.0))
    linen_eval = jax.jit(lambda s, b: train.eval_step(s, b, model=lm)["top1"])
    nnx_jit_step = nnx.jit(lambda m, o, b: nnx_train_step(m, o, b)[3])

    @nnx.jit
    def nnx_eval(model, batch):
        logits = model(batch["image"])
        return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]), logits

    results, first_steps = [], []
    for seed in SEEDS:
        variables = flax.core.unfreeze(linen_init(key(seed)))
        variables.pop(PERTURBATIONS, None)
        # Built abstractly (no NNX init computed), then every variable comes from Linen.
        model = nnx.eval_shape(lambda: dqnnx.DigitsCNN(10, quant=W2A2, rngs=nnx.Rngs(key(0))))
        dqnnx.load_linen_variables(model, variables)
        assert_trees_equal(dqnnx.linen_variables(model), variables)
        codes = variables["codes"]
        state = train.TrainState.create(apply_fn=lm.apply, tx=tx, variables=variables)
        state = state.replace(step=jnp.zeros((), jnp.int32),
                              opt_state=optim.with_key(state.opt_state, seed + 1))
        optimizer = dqnnx.Optimizer(model, tx, key=seed + 1)
        model.train()
        if seed != 2:
            nnx_step = nnx_jit_step
        else:
            graphdef, pstate = nnx.split((model, optimizer))

            @jax.jit
            def pure_step(pstate, batch):
                m, o = nnx.merge(graphdef, pstate)
                diagnostics = nnx_train_step(m, o, batch)[3]
                return nnx.state((m, o)), diagnostics

            def nnx_step(model, optimizer, batch):
                nonlocal pstate
                pstate, diagnostics = pure_step(pstate, batch)
                return diagnostics
        for i, b in enumerate(batches):
            state, metrics = linen_step(state, b)
            diagnostics = nnx_step(model, optimizer, b)
            if i == 0:
                m_, o_ = nnx.merge(graphdef, pstate) if seed == 2 else (model, optimizer)
                first_steps.append(dict(
                    # the program's step has no per-layer metrics (issue 27): the same
                    # diagnostics, computed outside it
                    linen=jax.device_get((state, optim.code_diagnostics(
                        codes, state.codes, state.params))), start_codes=codes,
                    nnx=jax.device_get((dqnnx.linen_variables(m_), diagnostics,
                                        nnx.as_pure(o_.opt_state)))))
        if seed == 2:
            model, optimizer = nnx.merge(graphdef, pstate)
        model.eval()
        linen_acc = sum(float(linen_eval(state, b)) for b in evals) / ds.eval_size
        nnx_out = [nnx_eval(model, b) for b in evals]
        nnx_acc = sum(float(hits) for hits, _ in nnx_out) / ds.eval_size
        same_codes = all(np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(state.codes), jax.tree.leaves(dqnnx.linen_variables(model)["codes"])))
        results.append((linen_acc, nnx_acc, same_codes))
    return dict(results=results, first_steps=first_steps, config=config, model=model,
                optimizer=optimizer, images=evals[0]["image"], logits=np.asarray(nnx_out[0][1]))


def test_linen_and_nnx_same_first_step(digits_runs):
    """Same numbers in: after one step with the same key, the same codes, levels, float params,
    BN and activation statistics, per-layer diagnostics and optimizer state, whose
    momentum buffers hold the gradients (dL/dW_q included); for nnx.jit and pure jax.jit."""
    for first in digits_runs["first_steps"]:
        state, l_diag = first["linen"]
        n_vars, n_diag, n_opt_state = first["nnx"]
        # Two different XLA programs compute the same maths: floats agree to round-off, and
        # codes (the same key, the same random bits) except where a target lies within
        # round-off of a rounding threshold (at most 0.1%; on this machine none).
        assert_trees_close(n_vars["codes"], state.codes)  # the code update (same key)
        assert_trees_close(n_vars["params"], state.params)
        assert_trees_close(n_vars["batch_stats"], state.batch_stats)
        assert_trees_close(n_vars["quant_stats"], state.quant_stats)
        assert_trees_close(n_diag, l_diag, atol=2e-3)  # flip rates: a code or two of 1e3+
        assert_trees_close(n_opt_state, state.opt_state)
        changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(
            jax.tree.leaves(first["start_codes"]), jax.tree.leaves(state.codes)))
        assert changed > 0  # the comparison saw real code flips


def test_nnx_digits_w2a2_trains_to_linen_accuracy(digits_runs):
    """Issue 14: NNX W2A2 on digits reaches the Linen model's accuracy (3 seeds, mean within
    0.5 points). Both start from the same numbers, so the comparison measures the NNX front
    end (gradients, statistics, optimizer, train/eval) rather than init noise; 60 steps
    (200 steps, ~10 epochs, ~0.95 top-1: past the steep part, so the seed-to-seed spread of a
    diverged pair is small) keep it at a few seconds per seed."""
    results = digits_runs["results"]
    linen = np.array([r[0] for r in results])
    nnx_ = np.array([r[1] for r in results])
    assert abs(nnx_.mean() - linen.mean()) <= 0.005, results
    assert linen.min() > 0.8, results  # both really learned (chance is 0.1)
    # The runs are often identical, but Linen's and NNX's steps are two different XLA
    # programs: a value within round-off of a rounding threshold can take another code on
    # another CPU or with other XLA flags, and every later step then differs. So identity is
    # not asserted; the accuracy criterion above is the issue's.


# ---------------------------------------------------------------- export, checkpoint

def test_nnx_export_and_predict_equal_eval_logits(digits_runs, tmp_path):
    t = digits_runs
    path = str(tmp_path / "nnx.dqz")
    report = dqnnx.save_dqz(path, t["model"], model_name="digits_cnn",
                            config=t["config"].to_dict(), num_classes=10, image_shape=(8, 8, 1))
    assert report["ratio"] > 1.0
    n = len(t["images"])
    # dq_jax.predict rebuilds the Linen digits_cnn from the packed codes: the same logits
    # (same batch size as the NNX eval, so the same compiled shapes).
    m = predict.load_model(path, expected_model="digits_cnn", batch_size=n)
    np.testing.assert_array_equal(m.predict(t["images"]), t["logits"])
    # ... and the export loaded into a fresh NNX model gives the same eval forward.
    fresh = nnx.eval_shape(lambda: dqnnx.DigitsCNN(10, quant=m.exported.runtime_quant,
                                                    rngs=nnx.Rngs(key(12))))
    dqnnx.load_dqz(path, fresh)
    assert_trees_equal(dqnnx.linen_variables(fresh), dqnnx.linen_variables(t["model"]))
    fresh.eval()
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(fresh, t["images"]), t["logits"])


def test_save_dqz_names_a_missing_quant(tmp_path):
    """A registry model name without config['quant'] is named, not a bare KeyError."""
    model = dqnnx.DigitsCNN(10, quant=W2A2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"has no 'quant': 'digits_cnn' is a dq_jax.models "
                                         r"name.*dataclasses.asdict"):
        dqnnx.save_dqz(str(tmp_path / "m.dqz"), model, model_name="digits_cnn",
                       config={"model": "digits_cnn"}, num_classes=10, image_shape=(8, 8, 1))


def test_orbax_checkpoint_round_trip_of_nnx_state(digits_runs, tmp_path):
    import orbax.checkpoint as ocp
    t = digits_runs
    saved = nnx.state((t["model"], t["optimizer"]))

    def fresh():
        model = dqnnx.DigitsCNN(10, quant=W2A2, rngs=nnx.Rngs(key(13)))
        return model, dqnnx.Optimizer(model, t["optimizer"].tx, key=0)

    graphdef, abstract = nnx.split(nnx.eval_shape(fresh))  # shapes/dtypes only: no init run
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", saved)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "ckpt", abstract)
    assert_trees_equal(pure(restored), pure(saved))  # codes uint8, flags bool, floats: bitwise
    model, _ = nnx.merge(graphdef, restored)
    model.eval()
    np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(model, t["images"]),
                                  t["logits"])


def test_docs_nnx_example_runs(capsys):
    """docs/nnx.md's README-section example (the NNX twin of the README's Linen one) runs.

    Its `nnx.Rngs(0)` becomes an unsafe_rbg key here (threefry rank-4 draws compile slowly)."""
    import re
    from tests.helpers import REPO
    text = (REPO / "docs" / "nnx.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    assert block.count("nnx.Rngs(0)") == 1
    block = block.replace("nnx.Rngs(0)", "nnx.Rngs(jax.random.key(0, impl='unsafe_rbg'))")
    exec(compile(block, "docs/nnx.md", "exec"), {"__name__": "docs_nnx_example"})
    out = capsys.readouterr().out
    assert "codes dtype uint8" in out, out
