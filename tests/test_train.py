"""The training program end to end: main entry, resume, sharding, init_from, config errors."""
from __future__ import annotations

import json

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

from dq_jax import checkpoints, configlib, data, train
from dq_jax.main import apply_variant
from dq_jax.optim import DQState
from dq_jax.quant import weights as wq
from tests.helpers import REPO, explicit_mesh, load_config, run_python


def small_digits(**overrides):
    config = load_config("digits")
    config.num_train_steps = 24
    config.log_every_steps = 8
    config.checkpoint_every_steps = 8
    config.eval_every_steps = 1000
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


def test_digits_main_entry_learns_float_and_w2a2(tmp_path):
    """The README's main command (two of its variants): real CLI, real data, real accuracy."""
    proc = run_python(["-m", "dq_jax.main", "--config=configs/digits.py",
                       f"--workdir={tmp_path}", "--variants=float,w2a2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "variant" in proc.stdout and "w2a2" in proc.stdout, proc.stdout
    float_res = json.loads((tmp_path / "float" / "results.json").read_text())
    q_res = json.loads((tmp_path / "w2a2" / "results.json").read_text())
    # Chance is 0.10; the float CNN reaches ~0.98 and DQ W2A2 ~0.97 in 400 steps.
    assert float_res["eval_top1"] >= 0.93, float_res
    assert q_res["eval_top1"] >= 0.90, q_res
    assert q_res["config"]["quant"]["weight_bits"] == 2
    assert q_res["steps"] == 400 and q_res["train_seconds"] > 0
    assert list((tmp_path / "w2a2").glob("events.out.tfevents.*")), "no TensorBoard events"


def _leaves(state):
    return jax.tree_util.tree_leaves_with_path(jax.device_get(state))


def assert_states_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def _one_jit_init(model, opt, image_shape, seed):
    """What `init_state` compiled before it deferred the level fits: one jit of `model.init`
    (fits inline) and the optimizer init."""
    from dq_jax.train_state import TrainState

    @jax.jit
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        state = TrainState.create(apply_fn=model.apply, tx=opt, variables=variables)
        return state.replace(step=jnp.zeros((), jnp.int32))
    return init(jax.random.PRNGKey(seed))


def test_init_state_equals_one_jitted_init_bitwise():
    """`init_state` runs `model.init` with the DQ layers' Lloyd fits deferred, then fits
    them in a second jit (two compiles are cheaper than one holding both, docs/notebook.md §2.2).
    The state must be a plain init's, bitwise: same draws, same fits, each layer with its
    own settings (2-bit per-layer / 4-bit per-channel with 3 Lloyd steps / float / LSQ /
    latent-STE in one model; nn.scan-stacked layers, fitted slice by slice), and no stored
    draw left behind."""
    import flax.linen as nn
    from dq_jax.layers import LEVEL_FIT_DRAW, QuantConv, QuantDense
    from tests.test_layers import _STACKED, _Block
    from dq_jax.quant.config import QuantConfig

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = QuantConv(8, (3, 3), quant=QuantConfig(weights="dq", weight_bits=2))(x)
            x = QuantConv(6, (3, 3), quant=QuantConfig(
                weights="dq", weight_bits=4, granularity="per_channel", lloyd_iters=3,
                acts="dq", act_bits=4))(nn.relu(x))
            x = QuantConv(5, (1, 1), quant=QuantConfig(weights="lsq", weight_bits=2))(x)
            x = QuantConv(5, (1, 1), quant=QuantConfig(weights="latent_ste", weight_bits=2))(x)
            return QuantDense(3, quant=QuantConfig.float())(x.reshape(x.shape[0], -1))

    class Scanned(nn.Module):   # nn.scan-stacked DQ layers: levels [3, 1, 4], one fit per slice
        @nn.compact
        def __call__(self, x, train=False):
            block = nn.scan(_Block, variable_axes=_STACKED, split_rngs={"params": True},
                            length=3)
            x, _ = block(QuantConfig(weights="dq", weight_bits=2), None, name="blocks")(x, None)
            return jnp.mean(x, axis=(1, 2))

    opt = train.create_optimizer(small_digits(), 10, 10)
    for model, shape, layers_fitted in ((Mixed(), (6, 6, 3), 3), (Scanned(), (5, 5, 4), 1)):
        state = train.init_state(model, opt, shape, 5)
        assert_states_equal(state, _one_jit_init(model, opt, shape, 5))
        assert not any(p[-1] == LEVEL_FIT_DRAW
                       for p in flax.traverse_util.flatten_dict(state.codes))
        fitted = [lv for path, lv in flax.traverse_util.flatten_dict(
            jax.device_get(state.params)).items() if path[-1] == wq.LEVELS]
        assert len(fitted) == layers_fitted
        assert all(np.all(np.diff(lv, axis=-1) > 0) for lv in fitted)   # fitted, not zeros
    # A deferred init handed to TrainState.create unfitted: the error names the fix.
    from dq_jax import layers
    from dq_jax.train_state import TrainState
    with layers.deferred_level_fits() as fits:
        variables = Mixed().init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 3)))
    assert len(fits) == 2 and LEVEL_FIT_DRAW in variables["codes"]["QuantConv_0"]
    with pytest.raises(ValueError,
                       match=r"kernel_level_fit_draw.*fit_deferred_levels\(variables, fits\)"):
        TrainState.create(apply_fn=Mixed().apply, tx=opt, variables=variables)


@pytest.mark.parametrize("weights", ["dq", "latent_ste"])
def test_resume_equals_uninterrupted(tmp_path, weights):
    """Stop after 8 steps (checkpoint), resume to 24: bitwise equal to one 24-step run."""
    config = small_digits(**{"quant.weights": weights})
    full = train.train_and_evaluate(config, str(tmp_path / "full"))
    part = train.train_and_evaluate(config, str(tmp_path / "split"), stop_after=8)
    assert part["steps"] == 8 and "eval_top1" not in part
    resumed = train.train_and_evaluate(config, str(tmp_path / "split"))
    assert resumed["resumed_from_step"] == 8
    assert resumed["steps"] == full["steps"] == 24
    assert_states_equal(resumed["state"], full["state"])
    assert resumed["eval_top1"] == full["eval_top1"]


def test_refuses_to_resume_other_config(tmp_path):
    train.train_and_evaluate(small_digits(), str(tmp_path), stop_after=8)
    other = small_digits(**{"quant.weight_bits": 4})
    with pytest.raises(ValueError, match=r"different config.*quant.*force_new"):
        train.train_and_evaluate(other, str(tmp_path))
    other.force_new = True
    out = train.train_and_evaluate(other, str(tmp_path))
    assert out["resumed_from_step"] == 0 and out["steps"] == 24


def test_workdir_of_the_per_layer_stream_resumes_only_with_it(tmp_path):
    """A workdir written before `rounding_stream` existed (its config.json lacks the key) drew
    its stochastic rounding from the per-layer stream: resuming it under the new default is
    refused in one line naming the fix, and resumes with rounding_stream='per_layer'."""
    train.train_and_evaluate(small_digits(), str(tmp_path), stop_after=8)
    path = tmp_path / checkpoints.CONFIG_FILE
    recorded = json.loads(path.read_text())
    assert recorded["config"]["rounding_stream"] == "hash"
    del recorded["config"]["rounding_stream"]  # as a workdir from before issue 27
    path.write_text(json.dumps(recorded))
    with pytest.raises(checkpoints.WorkdirError,
                       match=r"rounding_stream: 'per_layer' -> 'hash'.*"
                             r"--config.rounding_stream=per_layer") as err:
        train.train_and_evaluate(small_digits(), str(tmp_path))
    assert "\n" not in str(err.value)
    out = train.train_and_evaluate(small_digits(rounding_stream="per_layer"), str(tmp_path),
                                   stop_after=16)
    assert out["steps"] == 16
    # no random draws (nearest): the stream does not apply, nothing to refuse
    nearest = small_digits(rounding="nearest")
    assert "rounding_stream" not in configlib.applicable(nearest)
    with pytest.raises(ValueError, match=r"config.rounding_stream='philox'; allowed: 'hash', "
                                         r"'per_layer'"):
        configlib.validate(small_digits(rounding_stream="philox"), device_count=1)


SHARDED_SCRIPT = """
import json, sys, jax, numpy as np
from tests.helpers import load_config
from dq_jax import configlib, data, train
from dq_jax.checkpoints import create_manager
config = load_config('digits')
config.rounding = sys.argv[2]
config.quant.acts = sys.argv[3]   # 'dq' (quantized activations) or 'float'
# float32 momentum: a reduction-order (1-ulp) difference stays 1 ulp; bf16 would round it to
# 2^-8 relative now and then (the buffer's dtype has nothing to do with sharding).
config.code_momentum_dtype = 'float32'
quant = configlib.validate(config, device_count=jax.device_count())
ds = data.create_dataset(config, process_index=jax.process_index(), process_count=jax.process_count())
total = train.total_train_steps(config, ds.steps_per_epoch)
model = train.create_model(config, quant, ds.num_classes)
opt = train.create_optimizer(config, total, ds.steps_per_epoch)
steps = train.Steps(model, opt, train.create_mesh(config))
state = train._initial_state(config, create_manager(__import__('etils').epath.Path(sys.argv[1]), config),
                             model, opt, quant, steps, ds)
out = {}
batches = ds.train_batches(0)
for t in range(1, 7):
  state, _ = steps.train(state, train.to_global(next(batches), steps.batch))
  for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
    out[f'{t}' + jax.tree_util.keystr(p)] = np.asarray(x)
if jax.process_index() == 0:
  np.savez(sys.argv[1] + '/states.npz', **out)
print(json.dumps({'devices': jax.device_count()}))
"""


@pytest.mark.parametrize("rounding, acts", [("nearest", "dq"), ("stochastic", "float")])
def test_sharded_8_devices_equals_1_device(tmp_path, rounding, acts):
    """Same global batch over 8 fake CPU devices vs 1 device, compared step by step.

    Only the gradient all-reduce order differs, so float state agrees to 1e-4
    and codes agree except for entries whose target lies within round-off of a
    rounding threshold (the same PRNG bits are drawn). One such code flip
    legitimately changes every later gradient, so the float comparison runs up
    to and including the first step whose *input* codes differ, never after it;
    at least the first step is always compared, and the differing codes of each
    compared step must be rare (<= 0.1%). Quantized activations have the same kind of
    event, unseen in the state (an activation within round-off of a bin edge): see
    `compare_step_states`.
    """
    states = {}
    for devices in (1, 8):
        wd = tmp_path / f"d{devices}"
        wd.mkdir()
        proc = run_python(["-c", SHARDED_SCRIPT, str(wd), rounding, acts], devices=devices)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["devices"] == devices
        states[devices] = dict(np.load(wd / "states.npz"))
    compare_step_states(states[1], states[8], steps=6, quantized_acts=acts == "dq")


def compare_step_states(one: dict, other: dict, steps: int, atol: float = 1e-4, *,
                        quantized_acts: bool) -> int:
    """Per-step states of two runs that differ only in reduction order (see above).

    Floats agree to `atol` and codes except rare threshold cases, step by step, up to and
    including the first step whose codes differ (later steps start from other codes).
    With `quantized_acts`, an activation within round-off of a bin edge can land in
    another bin in one run — a discrete event like a code flip, but not stored in the
    state (measured: the digits CNN's states parted by 5x at step 3 with equal codes after
    an ulp-level change of the init) — so there the comparison also ends, without failing,
    at the first step after step 1 whose floats part; step 1 must always agree in full.
    Returns how many steps were compared (>= 1).
    """
    assert one.keys() == other.keys()
    compared = 0
    for t in range(1, steps + 1):
        keys = [k for k in one if k.startswith(f"{t}.")]
        code_keys = [k for k in keys if k.startswith(f"{t}.codes")]
        assert code_keys
        n_codes = sum(one[k].size for k in code_keys)
        n_diff = sum(int(np.sum(one[k] != other[k])) for k in code_keys)
        assert n_diff <= 1e-3 * n_codes, (t, n_diff, n_codes)
        floats = [k for k in keys if one[k].dtype.kind == "f"]
        if quantized_acts and t > 1 and not all(
                np.allclose(one[k], other[k], rtol=atol, atol=atol) for k in floats):
            break
        for k in keys:
            if k in floats:
                np.testing.assert_allclose(one[k], other[k], rtol=atol, atol=atol, err_msg=k)
            elif not k.startswith(f"{t}.codes"):
                np.testing.assert_array_equal(one[k], other[k], err_msg=k)
        compared += 1
        if n_diff:
            break
    assert compared >= 1
    return compared


def test_init_from_float_checkpoint_is_really_initialised(tmp_path):
    """init_from: quantized eval accuracy at step 0 equals post-training quantization's.

    PTQ reference: the latent-STE model initialised from the same float
    checkpoint (float kernel, same Lloyd levels, nearest level in its forward).
    A randomly initialised quantized model is near chance, so equality with a
    high PTQ accuracy shows the levels/codes really came from the checkpoint.
    """
    float_cfg = apply_variant(small_digits(num_train_steps=200), "float")
    float_res = train.train_and_evaluate(float_cfg, str(tmp_path / "float"))
    assert float_res["eval_top1"] > 0.9

    def step0_eval(weights, init_from):
        cfg = apply_variant(small_digits(), "w4a4")
        cfg.quant.weights = weights
        cfg.init_from = init_from
        quant = configlib.validate(cfg, device_count=jax.device_count())
        ds = data.create_dataset(cfg)
        model = train.create_model(cfg, quant, ds.num_classes)
        opt = train.create_optimizer(cfg, 10, ds.steps_per_epoch)
        steps = train.Steps(model, opt, train.create_mesh(cfg))
        state = train.init_state(model, opt, ds.image_shape, cfg.seed)
        if init_from:
            state = checkpoints.init_from_float(init_from, state, quant, opt)
        state = steps.calibrate(steps.place(state),
                                train.to_global(next(ds.train_batches(0)), steps.batch))
        return train.evaluate(steps, state, ds.eval_batches())["eval_top1"]

    dq = step0_eval("dq", str(tmp_path / "float"))
    ptq = step0_eval("latent_ste", str(tmp_path / "float"))
    scratch = step0_eval("dq", "")
    assert dq == pytest.approx(ptq, abs=1e-6)
    assert dq > float_res["eval_top1"] - 0.15, (dq, float_res["eval_top1"])
    assert scratch < 0.5, scratch


def test_feedback_residual_float_starts_the_latent_at_the_float_kernel(tmp_path):
    """feedback_residual='float' (ablation): at init_from, the feedback residual is
    float kernel - W_q (one float32 subtraction of the same numbers: exact), so the implied
    latent W_q + r is the float kernel, as latent-STE's is; levels, codes and every other
    leaf are those of the zero-residual start; the program then trains from it (with
    feedback_residual_bits=2: that ablation's path through the program)."""
    float_cfg = apply_variant(small_digits(num_train_steps=8), "float")
    train.train_and_evaluate(float_cfg, str(tmp_path / "float"))
    cfg = apply_variant(small_digits(num_train_steps=8), "w2a2")
    cfg.init_from, cfg.rounding = str(tmp_path / "float"), "latent_feedback"
    quant = configlib.validate(cfg, device_count=jax.device_count())
    ds = data.create_dataset(cfg)
    model = train.create_model(cfg, quant, ds.num_classes)
    opt = train.create_optimizer(cfg, 10, ds.steps_per_epoch)
    state0 = train.init_state(model, opt, ds.image_shape, cfg.seed)
    zero, seeded = (checkpoints.init_from_float(cfg.init_from, state0, quant, opt,
                                                float_residual=f) for f in (False, True))
    float_params = flax.traverse_util.flatten_dict(
        checkpoints.load_float_variables(cfg.init_from)["params"])
    dq_state = lambda s: [x for x in jax.tree.leaves(
        s.opt_state, is_leaf=lambda x: isinstance(x, DQState)) if isinstance(x, DQState)][0]
    flat_codes = flax.traverse_util.flatten_dict(seeded.codes)
    r_zero = flax.traverse_util.flatten_dict(dq_state(zero).codes[1])
    r_seeded = flax.traverse_util.flatten_dict(dq_state(seeded).codes[1])
    assert set(r_seeded) == set(flat_codes) and flat_codes
    for k, c in flat_codes.items():
        levels = flax.traverse_util.flatten_dict(seeded.params)[k[:-1] + ("kernel_levels",)]
        w_q = np.asarray(wq.gather_levels(levels, c))
        kernel = np.asarray(float_params[k], np.float32)
        np.testing.assert_array_equal(np.asarray(r_seeded[k]), kernel - w_q)
        assert np.all(np.asarray(r_zero[k]) == 0) and np.any(np.asarray(r_seeded[k]) != 0)
    chex.assert_trees_all_equal((zero.params, zero.codes, zero.batch_stats),
                                (seeded.params, seeded.codes, seeded.batch_stats))
    # the program trains from it, here with the residual kept to 2 bits of its cell
    cfg.feedback_residual, cfg.feedback_residual_bits = "float", 2
    result = train.train_and_evaluate(cfg, str(tmp_path / "w2a2"))
    assert result["steps"] == 8 and result["eval_top1"] > 0.1, result["eval_top1"]
    residual_after = jax.tree.leaves(dq_state(result["state"]).codes[1])
    assert any(np.any(np.asarray(r) != 0) for r in residual_after)


def test_inertia_float_residual_seeds_the_code_momentum(tmp_path):
    """rounding='inertia' with feedback_residual='float': at init_from the code momentum is
    -(float kernel - W_q) / (code LR of the first update), in its bfloat16 dtype, so the first
    code update starts at the float model's position inside each cell; levels, codes and
    every other leaf are those of the zero start; the program trains from it."""
    float_cfg = apply_variant(small_digits(num_train_steps=8), "float")
    train.train_and_evaluate(float_cfg, str(tmp_path / "float"))
    cfg = apply_variant(small_digits(num_train_steps=8, rounding="inertia",
                                     code_learning_rate=0.5, code_momentum=0.99), "w2a2")
    cfg.init_from = str(tmp_path / "float")
    quant = configlib.validate(cfg, device_count=jax.device_count())
    ds = data.create_dataset(cfg)
    model = train.create_model(cfg, quant, ds.num_classes)
    opt = train.create_optimizer(cfg, 10, ds.steps_per_epoch)
    state0 = train.init_state(model, opt, ds.image_shape, cfg.seed)
    rate = train._code_rate(state0.opt_state)
    assert rate == pytest.approx(0.5)
    zero = checkpoints.init_from_float(cfg.init_from, state0, quant, opt)
    seeded = checkpoints.init_from_float(cfg.init_from, state0, quant, opt, float_residual=True,
                                         inertia_code_rate=rate)
    float_params = flax.traverse_util.flatten_dict(
        checkpoints.load_float_variables(cfg.init_from)["params"])
    trace = lambda s: flax.traverse_util.flatten_dict([
        x for x in jax.tree.leaves(s.opt_state, is_leaf=lambda x: isinstance(
            x, optax.TraceState)) if isinstance(x, optax.TraceState)][-1].trace)
    m_zero, m_seeded = trace(zero), trace(seeded)
    flat_codes = flax.traverse_util.flatten_dict(seeded.codes)
    assert set(m_seeded) == set(flat_codes) and flat_codes
    for k, c in flat_codes.items():
        levels = flax.traverse_util.flatten_dict(seeded.params)[k[:-1] + ("kernel_levels",)]
        r = np.asarray(float_params[k], np.float32) - np.asarray(wq.gather_levels(levels, c))
        assert m_seeded[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(m_seeded[k]),
                                      np.asarray(jnp.asarray(-r / np.float32(rate), jnp.bfloat16)))
        assert np.all(np.asarray(m_zero[k]) == 0) and np.any(np.asarray(m_seeded[k]) != 0)
    chex.assert_trees_all_equal((zero.params, zero.codes, zero.batch_stats),
                                (seeded.params, seeded.codes, seeded.batch_stats))
    cfg.feedback_residual = "float"
    result = train.train_and_evaluate(cfg, str(tmp_path / "w2a2"))
    assert result["steps"] == 8 and result["eval_top1"] > 0.1, result["eval_top1"]
    # after a warm-up from 0 (the ImageNet recipes') the residual is expressed in the peak rate
    cfg.warmup_epochs = 1.0
    opt = train.create_optimizer(cfg, 10, ds.steps_per_epoch)
    state0 = train.init_state(model, opt, ds.image_shape, cfg.seed)
    assert train._code_rate(state0.opt_state) == 0.0
    assert train._inertia_seed_rate(cfg, state0.opt_state) == 0.5
    result = train.train_and_evaluate(cfg, str(tmp_path / "w2a2_warmup"))
    assert result["steps"] == 8 and result["eval_top1"] > 0.1, result["eval_top1"]


@pytest.mark.parametrize("override, match", [
    ({"rounding": "inertia", "inertia_after_move": "zero"}, r"config.inertia_after_move='zero'; allowed"),
    ({"rounding": "inertia", "inertia_threshold": -1.0}, r"inertia_threshold=-1.0 must be a number > 0"),
    ({"inertia_threshold": 0.5}, r"apply to rounding='inertia' only"),
    ({"feedback_residual": "float", "rounding": "inertia"}, r"config.init_from, which is not set: pass --config.init_from="),
    ({"feedback_residual": "latent"}, r"config.feedback_residual='latent'; allowed: 'zero', 'float'"),
    ({"feedback_residual": "float"}, r"feedback_residual='float' seeds the residual.*rounding"),
    ({"feedback_residual": "float", "rounding": "latent_feedback"}, r"config.init_from, which is not set: pass --config.init_from="),
    ({"feedback_residual_bits": 2}, r"feedback_residual_bits=2 keeps a feedback rounding"),
    ({"feedback_residual_bits": -1, "rounding": "latent_feedback"}, r"must be an int >= 0"),
])
def test_feedback_residual_config_errors(override, match):
    with pytest.raises(ValueError, match=match):
        configlib.validate(apply_variant(small_digits(**override), "w2a2"), device_count=1)


def test_with_feedback_residual_needs_a_feedback_state():
    from dq_jax.optim import dq_optimizer, with_feedback_residual
    trainable = {"params": {"l": {"kernel_levels": jnp.float32([[-1.0, 1.0]])}},
                 "codes": {"l": {"kernel": jnp.zeros((2, 3), jnp.uint8)}}}
    residual = {"l": {"kernel": jnp.full((2, 3), 0.25)}}
    with pytest.raises(ValueError, match="holds no residual"):
        with_feedback_residual(dq_optimizer(0.1, 0.0).init(trainable), residual)
    state = with_feedback_residual(
        dq_optimizer(0.1, 0.0, rounding="latent_feedback").init(trainable), residual)
    np.testing.assert_array_equal(state.codes[1]["l"]["kernel"], np.full((2, 3), 0.25))
    with pytest.raises(ValueError, match="no DQState"):
        with_feedback_residual(optax.sgd(0.1).init(trainable), residual)


@pytest.mark.parametrize("override, match", [
    ({"model": "resnet9000"}, r"config.model='resnet9000' is unknown; known models: .*resnet20"),
    ({"dataset": "mnist"}, r"config.dataset='mnist' is unknown; known datasets: .*digits"),
    ({"quant.weight_bits": 9}, r"config.quant.weight_bits=9 is out of range.*1..8"),
    ({"quant.weights": "ternary"}, r"config.quant.weights='ternary'.*'dq'"),
    ({"batch_size": 60}, r"config.batch_size=60 must be a positive multiple of the device count \(8\)"),
    ({"schedule": "linear"}, r"config.schedule='linear'"),
])
def test_config_errors_name_the_key(override, match):
    config = small_digits(**override)
    with pytest.raises(ValueError, match=match):
        configlib.validate(config, device_count=8)


def test_unknown_config_key_suggests_close_match():
    config = small_digits()
    with config.unlocked():
        config.learnig_rate = 0.1
    with pytest.raises(ValueError, match=r"unknown key 'config.learnig_rate'.*learning_rate"):
        configlib.validate(config, device_count=1)


def test_cli_errors_are_one_clear_line(tmp_path):
    proc = run_python(["-m", "dq_jax.main", "--config=configs/digits.py",
                       f"--workdir={tmp_path}", f"--config.init_from={tmp_path}/nope"])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dq_jax: error: config.init_from=") and "does not exist" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["imagenet_resnet", "imagenet_alexnet", "imagenet_mobilenetv2"])
def test_imagenet_configs_build_and_lower_a_step_without_data(name, tmp_path):
    """ImageNet configs: validate, build, lower a sharded train step on synthetic
    batch shapes; without prepared TFDS data they fail fast with instructions."""
    config = load_config(name)
    config.batch_size = 8
    config.init_from = "gs://bucket/float"  # a fine-tuning recipe (validate does not open it)
    quant = configlib.validate(config, device_count=jax.device_count())
    model = train.create_model(config, quant, 1000)
    opt = train.create_optimizer(config, 100, 10)
    steps = train.Steps(model, opt, train.create_mesh(config))
    state = jax.eval_shape(lambda: train.init_state(model, opt, (224, 224, 3), 0))
    batch = {"image": jax.ShapeDtypeStruct((8, 224, 224, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
    lowered = steps.train.lower(state, batch)
    assert "stablehlo" in lowered.as_text()[:20000] or lowered.as_text()
    config.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(FileNotFoundError, match=r"imagenet2012.*(tfds build|download_and_prepare)"):
        data.create_dataset(config)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("*.py")))
def test_every_config_validates_and_documents_its_command(name):
    config = load_config(name)
    module_doc = (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]
    if config.feedback_residual == "float":  # a fine-tuning recipe: its command names the start
        assert "--config.init_from=" in module_doc
        config.init_from = "/float/workdir"
    quant = configlib.validate(config, device_count=1)
    assert quant.weights == "dq"  # every shipped config is a DQ run (float via overrides)
    assert "python -m dq_jax.main" in module_doc and f"configs/{name}.py" in module_doc


def test_bn_recalibration_is_the_plain_average_of_batch_moments():
    """Whatever the BN momentum (0.7 here), re-estimated stats = mean of per-batch moments."""
    import flax.linen as nn

    class BNOnly(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.7)(x)
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    config = small_digits()
    model = BNOnly()
    opt = train.create_optimizer(config, 10, 10)
    steps = train.Steps(model, opt, train.create_mesh(config))
    state = steps.place(train.init_state(model, opt, (2, 2, 5), 0))
    rng = np.random.default_rng(0)
    batches = [{"image": (rng.normal(size=(8, 2, 2, 5)) * (1 + np.arange(5)) + 3).astype(
        np.float32), "label": np.zeros(8, np.int32)} for _ in range(4)]
    out = train.recalibrate_batch_stats(steps, state, iter(batches), 4)
    x = np.stack([b["image"].reshape(-1, 5) for b in batches]).astype(np.float64)
    stats = jax.device_get(out.batch_stats)["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], x.mean(axis=1).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], x.var(axis=1).mean(axis=0), rtol=1e-4)
    # Only batch_stats changed.
    assert_states_equal(out.replace(batch_stats=state.batch_stats), state)


def test_bn_recalibration_in_training_is_saved_and_reported(tmp_path):
    config = small_digits(bn_recalibration_batches=3)
    out = train.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= out["eval_top1_before_bn_recalibration"] <= 1.0
    assert "eval_loss_before_bn_recalibration" in out and out["steps"] == 24
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["eval_top1"] == out["eval_top1"]
    # The final checkpoint holds the re-estimated statistics: resuming the finished run
    # evaluates exactly the same model.
    again = train.train_and_evaluate(config, str(tmp_path))
    assert again["resumed_from_step"] == 24 and again["eval_top1"] == out["eval_top1"]
    assert_states_equal(again["state"], out["state"])


@pytest.mark.parametrize("key,value,match", [
    ("learning_rate", float("nan"), "learning_rate=nan is not a finite"),
    ("learning_rate", float("inf"), "learning_rate=inf is not a finite"),
    ("num_epochs", float("inf"), "num_epochs=inf is not a finite"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps=0 must be >= 1"),
    ("log_every_steps", 0, "log_every_steps=0 must be >= 1"),
    ("keep_checkpoints", 0, "keep_checkpoints=0 must be >= 1 .0 would keep nothing"),
    ("label_smoothing", 2.0, "label_smoothing=2.0 must be in"),
    ("code_learning_rate", 0.0, "code_learning_rate=0.0 must be > 0, or -1"),
    ("code_momentum", 1.0, "code_momentum=1.0 must be in \\[0, 1\\), or -1"),
    ("eval_every_steps", 0, "eval_every_steps=0 must be >= 1, or -1"),
    # Negative counts used to run as 0 (or as -1) without a word.
    ("warmup_epochs", -5.0, r"warmup_epochs=-5.0 must be >= 0 \(0: none\)"),
    ("calibration_batches", -1, r"calibration_batches=-1 must be >= 0"),
    ("num_train_steps", -5, r"num_train_steps=-5 must be >= 1, or -1 \(from num_epochs\)"),
    ("num_classes", 0, r"num_classes=0 must be >= 1, or -1 \(the dataset's\)"),
])
def test_meaningless_values_fail_at_validation(key, value, match):
    config = small_digits(**{key: value})
    with pytest.raises(ValueError, match=match):
        configlib.validate(config, device_count=1)


def test_num_classes_below_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes=5 is below the 10 classes"):
        train.train_and_evaluate(small_digits(num_classes=5), str(tmp_path))


def _poisoned_dataset(monkeypatch, bad_steps):
    """digits whose training batches at `bad_steps` contain a NaN pixel."""
    real = data.create_dataset

    def create(config, **kw):
        ds = real(config, **kw)
        batches = ds.train_batches

        def poisoned(start_step=0):
            for i, b in enumerate(batches(start_step), start=start_step):
                if i in bad_steps:
                    b = dict(b, image=np.where(np.arange(b["image"].size).reshape(
                        b["image"].shape) == 0, np.nan, b["image"]).astype(b["image"].dtype))
                yield b
        ds.train_batches = poisoned
        return ds
    monkeypatch.setattr(data, "create_dataset", create)


def test_skipped_steps_do_not_advance_the_schedule_and_are_reported(tmp_path, monkeypatch):
    """nonfinite_policy='skip': the logged LR is the one applied (the schedule follows applied
    updates), and results.json + stderr say how many steps were skipped."""
    _poisoned_dataset(monkeypatch, {3, 4})
    config = small_digits(nonfinite_policy="skip", log_every_steps=1, schedule="cosine")
    out = train.train_and_evaluate(config, str(tmp_path))
    assert out["skipped_steps"] == 2
    assert json.loads((tmp_path / "results.json").read_text())["skipped_steps"] == 2
    lr = train.learning_rate_schedules(config, 24, 1)["learning_rate"]
    from tests.helpers import read_scalar_series
    lrs = read_scalar_series(tmp_path, "learning_rate")
    # Steps 1..3 apply updates 0..2; steps 4, 5 (batches 3, 4) are skipped and would have
    # applied update 3; step 6 applies update 3 (not 5).
    assert lrs[6] == pytest.approx(float(lr(3)), rel=1e-6)
    assert lrs[3] == pytest.approx(float(lr(2)), rel=1e-6)
    assert lrs[24] == pytest.approx(float(lr(21)), rel=1e-6)


def test_infinite_update_never_reaches_the_state():
    """Finite loss and gradients but a non-finite update (an infinite learning rate, which
    config validation refuses but a library user can pass): the step is refused whole."""
    config = small_digits()
    quant = configlib.validate(config, device_count=1)
    ds = data.create_dataset(config)
    model = train.create_model(config, quant, ds.num_classes)
    from dq_jax.optim import dq_optimizer
    opt = dq_optimizer(float("inf"), 1e-3)  # bare (no injected hyperparameters) works too
    steps = train.Steps(model, opt, train.create_mesh(config))
    state = steps.place(train.init_state(model, opt, ds.image_shape, 0))
    batch = train.to_global(next(ds.train_batches(0)), steps.batch)
    before = jax.device_get(state)
    new, metrics = steps.train(state, batch)
    assert float(metrics["loss"]) == float(metrics["loss"])  # the loss itself was finite
    assert float(metrics["nonfinite"]) == 1.0
    assert int(new.step) == 1
    assert_states_equal(new.replace(step=before.step), before)


def test_finiteness_check_flags_every_non_finite_element_of_every_float_leaf():
    """The guard's check groups leaves by size (one reduction per size, issue 27): a NaN or
    an infinity in any element of any float leaf, whatever its dtype or shape, makes it
    False; integer leaves are not read; no leaves is True."""
    tree = {"a": jnp.zeros((2, 2), jnp.float32), "b": jnp.zeros((4,), jnp.bfloat16),
            "c": jnp.zeros((3,), jnp.float32), "d": jnp.zeros((), jnp.float32),
            "e": jnp.zeros((1, 4), jnp.float16), "codes": jnp.full((4,), 255, jnp.uint8)}
    check = jax.jit(train._all_finite)
    assert bool(check(tree, jnp.float32(1.0)))
    assert bool(check({}, {"codes": tree["codes"]}))
    for name in ("a", "b", "c", "d", "e"):
        for i in range(tree[name].size):
            for bad in (np.nan, np.inf, -np.inf):
                leaf = tree[name].reshape(-1).at[i].set(bad).reshape(tree[name].shape)
                assert not bool(check({**tree, name: leaf})), (name, i, bad)
                assert not bool(check(tree, {"x": leaf})), (name, i, bad)  # in a second tree
    assert not bool(check(tree, jnp.float32(np.nan)))  # a scalar (the loss)


def test_gradient_accumulation_updates_once_per_k_micro_batches(tmp_path):
    """grad_accum_steps=4: MultiSteps around dq_optimizer; the schedule counts updates."""
    config = small_digits(num_train_steps=8, grad_accum_steps=4, batch_size=32,
                          log_every_steps=4, checkpoint_every_steps=4)
    out = train.train_and_evaluate(config, str(tmp_path))
    state = out["state"]
    assert int(train.applied_updates(state.opt_state)) == 2 and out["skipped_steps"] == 0
    assert int(state.step) == 8
    assert isinstance(state.opt_state, optax.MultiStepsState)
    # One micro-step on top of a finished accumulation changes nothing but the accumulator.
    model = train.create_model(config, configlib.validate(config, device_count=1), 10)
    steps = train.Steps(model, state.tx, train.create_mesh(config), 0.0)
    ds = data.create_dataset(config, process_index=0, process_count=1)
    batch = train.to_global(next(iter(ds.train_batches(8))), steps.batch)
    before = {name: jax.device_get(getattr(state, name)) for name in ("params", "codes")}
    after, _ = steps.train(state, batch)  # donates `state`
    for name in ("params", "codes"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(train.applied_updates(after.opt_state)) == 2
    assert int(after.opt_state.mini_step) == 1


def test_grad_accum_steps_must_divide_the_step_count():
    with pytest.raises(ValueError, match="num_train_steps=10 is not a multiple of "
                                         "config.grad_accum_steps=4"):
        configlib.validate(small_digits(num_train_steps=10, grad_accum_steps=4), device_count=1)


def test_half_precision_step_keeps_each_collection_in_its_own_dtype(tmp_path):
    """bf16 activations (half_precision) change no stored dtype: float32 params and levels,
    uint8 codes, bfloat16 code momentum (the default code_momentum_dtype), float32 other
    optimizer statistics and activation statistics, after real steps."""
    out = train.train_and_evaluate(small_digits(num_train_steps=8, half_precision=True),
                                   str(tmp_path))
    state = out["state"]
    assert out["eval_top1"] > 0.0
    flat = jax.tree_util.tree_leaves_with_path
    for path, leaf in flat(state.params):
        assert leaf.dtype == jnp.float32, path
    assert {l.dtype for l in jax.tree.leaves(state.codes)} == {jnp.dtype(jnp.uint8)}
    for path, leaf in flat(state.quant_stats):
        assert leaf.dtype in (jnp.float32, jnp.bool_), path
    code_traces = 0
    for path, leaf in flat(state.opt_state):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim:
            in_codes = ".codes" in jax.tree_util.keystr(path)
            assert leaf.dtype == (jnp.bfloat16 if in_codes else jnp.float32), path
            code_traces += in_codes
    assert code_traces == len(jax.tree.leaves(state.codes))  # one momentum per code tensor


def test_rounding_anneal_temperature_follows_the_lr_shape_after_warmup():
    """1 through the warm-up (the unbiased rule), then the cosine shape down to 0 (nearest);
    the program's optimizer injects it and reads it back; no temperature without the anneal;
    an anneal of nearest rounding is a one-line config error."""
    config = configlib.base_config()
    config.schedule, config.warmup_epochs = "cosine", 1.0
    assert train.rounding_temperature_schedule(config, 110, 10) is None
    config.rounding_anneal = True
    t = train.rounding_temperature_schedule(config, 110, 10)
    assert [float(t(s)) for s in (0, 5, 10, 60, 110)] == pytest.approx([1, 1, 1, 0.5, 0],
                                                                       abs=1e-6)
    trainable = {"params": {"layer": {"kernel_levels": jnp.float32([[-1.0, 1.0]])}},
                 "codes": {"layer": {"kernel": jnp.zeros((2, 2), jnp.uint8)}}}
    tx = train.create_optimizer(config, 110, 10)
    state = tx.init(trainable)
    grads = {"params": {"layer": {"kernel_levels": jnp.zeros((1, 2))}},
             "codes": {"layer": {"kernel": jnp.zeros((2, 2))}}}
    _, state = tx.update(grads, state, trainable)
    assert float(state.hyperparams["rounding_temperature"]) == pytest.approx(1.0)
    config.rounding = "nearest"
    with pytest.raises(ValueError, match="rounding_anneal=True.*rounding='nearest'"):
        configlib.validate(config, device_count=1)


def _pre_issue27_train_step(state, batch, *, model, label_smoothing):
    """The train step before issue 27 (frozen here, from commit edeab95): the same update,
    with the per-layer code diagnostics and per-layer finiteness flags in its metrics."""
    from dq_jax import optim
    from dq_jax.layers import QUANT_STATS
    images, labels = batch["image"], batch["label"]

    def loss_fn(differentiable):
        logits, new_vars = model.apply(state.variables(differentiable), images, train=True,
                                       mutable=["batch_stats", QUANT_STATS])
        one_hot = jax.nn.one_hot(labels, logits.shape[-1])
        if label_smoothing:
            one_hot = optax.smooth_labels(one_hot, label_smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot))
        return loss, (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.differentiable())
    updated = state.apply_gradients(grads=grads, batch_stats=new_vars.get("batch_stats", {}),
                                    quant_stats=new_vars.get(QUANT_STATS, {}))
    diagnostics = optim.code_diagnostics(state.codes, updated.codes, updated.params)
    grads, w_grads = grads["params"], grads.get(optim.PERTURBATIONS, {})
    # The guard as it was: one `all(isfinite)` per leaf (train._all_finite now groups by size).
    per_leaf = lambda leaves: jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)
    ok = jnp.isfinite(loss) & per_leaf(jax.tree.leaves(grads)) & \
        per_leaf(jax.tree.leaves(w_grads)) & per_leaf(train._float_leaves(updated))
    new_state = jax.lax.cond(ok, lambda: updated, lambda: state.replace(step=state.step + 1))
    return new_state, {
        "loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "learning_rate": train._learning_rate(updated.opt_state),
        "nonfinite": 1.0 - ok.astype(jnp.float32), "layers": diagnostics,
        "finite_by_layer": train._finite_by_layer(
            grads, w_grads, new_vars.get(QUANT_STATS, {}), {"params": updated.params},
            {"batch_stats": new_vars.get("batch_stats", {})})}


@pytest.mark.parametrize("rounding", ["inertia", "nearest"])
def test_train_step_without_per_layer_metrics_updates_bitwise_like_before(rounding):
    """Issue 27 moved the per-layer diagnostics and finiteness flags out of the train step:
    4 steps of the program's step and of the step before (which computed them) give bitwise
    the same params, codes, statistics and optimizer state, and the same scalar metrics
    (deterministic roundings: a stochastic one is the same stream in both, but the test
    should not rest on a draw). The step's metrics are now scalars only."""
    config = small_digits(rounding=rounding, code_learning_rate=1000.0)
    quant = configlib.validate(config, device_count=1)
    ds = data.create_dataset(config)
    model = train.create_model(config, quant, ds.num_classes)
    opt = train.create_optimizer(config, 24, ds.steps_per_epoch)
    steps = train.Steps(model, opt, train.create_mesh(config))
    old_step = jax.jit(lambda s, b: _pre_issue27_train_step(s, b, model=model,
                                                            label_smoothing=0.0))
    start = jax.device_get(train.init_state(model, opt, ds.image_shape, 0))
    new, old = steps.place(start), steps.place(start)
    batches = ds.train_batches(0)
    moved = 0
    for _ in range(4):
        batch = train.to_global(next(batches), steps.batch)
        new, m_new = steps.train(new, batch)
        old, m_old = old_step(old, batch)
        assert set(m_new) == {"loss", "accuracy", "learning_rate", "nonfinite"}
        for k in m_new:
            np.testing.assert_array_equal(np.asarray(m_new[k]), np.asarray(m_old[k]), err_msg=k)
        moved += sum(float(d["flip_rate"]) for d in jax.device_get(m_old["layers"]).values())
    assert_states_equal(jax.device_get(new), jax.device_get(old))
    assert moved > 0, "no code moved: the comparison lost its point"


@pytest.mark.parametrize("act_levels,act_signed", [("uniform", False), ("learned", False),
                                                    ("uniform", None)])
def test_calibrated_train_step_updates_bitwise_like_the_general_step(act_levels, act_signed):
    """Issue 27: for a calibrated state the program compiles the train step without the
    activation quantizers' first-batch calibration branch. 4 steps of it and of the general
    step (whose `cond` takes the EMA branch) give bitwise the same state and metrics, for
    fitted uniform and learned levels and for a data-chosen grid sign (`act_signed=None`,
    whose EMA stays a `cond` on the chosen sign). `for_state` picks the general step for an
    uncalibrated state."""
    config = small_digits(rounding="nearest", code_learning_rate=1000.0,
                          **{"quant.act_levels": act_levels, "quant.act_signed": act_signed})
    quant = configlib.validate(config, device_count=1)
    ds = data.create_dataset(config)
    model = train.create_model(config, quant, ds.num_classes)
    opt = train.create_optimizer(config, 24, ds.steps_per_epoch)
    steps = train.Steps(model, opt, train.create_mesh(config))
    batches = ds.train_batches(0)
    state = steps.place(train.init_state(model, opt, ds.image_shape, 0))
    assert steps.for_state(state) is False and steps.train is steps.train_general
    state = steps.calibrate(state, train.to_global(next(batches), steps.batch))
    assert steps.for_state(state) is True and steps.train is steps.train_calibrated
    start = jax.device_get(state)
    lean, general = steps.place(start), steps.place(start)
    for _ in range(4):
        batch = train.to_global(next(batches), steps.batch)
        lean, m_lean = steps.train_calibrated(lean, batch)
        general, m_general = steps.train_general(general, batch)
        for k in m_lean:
            np.testing.assert_array_equal(np.asarray(m_lean[k]), np.asarray(m_general[k]),
                                          err_msg=k)
    lean, general = jax.device_get(lean), jax.device_get(general)
    assert_states_equal(lean, general)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(start.quant_stats), jax.tree.leaves(lean.quant_stats))), \
        "the statistics did not move: the comparison lost its point"


def test_program_mesh_trains_bitwise_like_an_explicit_mesh():
    """`create_mesh` gives Auto axes (issue 27: an Explicit mesh annotated every op of the
    step, 41% of its HLO). On one device the change is compile-only: 4 calibrate-then-train
    steps on the program's mesh and on an Explicit one of the same shape give bitwise the same
    state and metrics."""
    config = small_digits(rounding="nearest", code_learning_rate=1000.0)
    quant = configlib.validate(config, device_count=1)
    ds = data.create_dataset(config)
    model = train.create_model(config, quant, ds.num_classes)
    opt = train.create_optimizer(config, 24, ds.steps_per_epoch)
    auto = train.Steps(model, opt, train.create_mesh(config))
    assert set(auto.mesh.axis_types) == {jax.sharding.AxisType.Auto}
    explicit = train.Steps(model, opt, explicit_mesh(auto.mesh))
    start = jax.device_get(train.init_state(model, opt, ds.image_shape, 0))
    batches = ds.train_batches(0)
    first = next(batches)
    states = []
    for steps in (auto, explicit):
        states.append(steps.calibrate(steps.place(start), train.to_global(first, steps.batch)))
        assert steps.for_state(states[-1])
    for _, host_batch in zip(range(4), batches):
        (states[0], m_auto), (states[1], m_explicit) = [
            steps.train(state, train.to_global(host_batch, steps.batch))
            for steps, state in zip((auto, explicit), states)]
        for k in m_auto:
            np.testing.assert_array_equal(np.asarray(m_auto[k]), np.asarray(m_explicit[k]),
                                          err_msg=k)
    got = [jax.device_get(s) for s in states]
    assert_states_equal(*got)
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(start.codes), jax.tree.leaves(got[0].codes))), \
        "no code moved: the comparison lost its point"


def test_nonfinite_report_replays_the_skipped_steps_per_layer(tmp_path, monkeypatch):
    """A skipped step's layers are named by a separate check re-run on its inputs: exactly
    when the window ends with skipped steps (the state is then theirs), else on the state at
    the log step (said so in the report). The flags equal those the old in-step check gave."""
    _poisoned_dataset(monkeypatch, {6, 7})  # steps 7 and 8: the end of the first window
    with pytest.raises(FloatingPointError, match=r"steps \[7, 8\]; layers: .+"):
        train.train_and_evaluate(small_digits(), str(tmp_path / "a"))
    report = json.loads((tmp_path / "a" / "nonfinite_report.json").read_text())
    assert report["steps"] == [7, 8] and report["layers_checked_at_steps"] == [7, 8]
    assert report["layers_check_exact"] is True and report["layers"]
    # the same inputs through the old step's in-graph flags name the same layers
    config = small_digits()
    quant = configlib.validate(config, device_count=1)
    ds = data.create_dataset(config)
    model = train.create_model(config, quant, ds.num_classes)
    opt = train.create_optimizer(config, 24, ds.steps_per_epoch)
    steps = train.Steps(model, opt, train.create_mesh(config))
    manager = checkpoints.create_manager(__import__("etils").epath.Path(tmp_path / "a"), config)
    state = checkpoints.restore(manager, 8, steps.place(train.init_state(
        model, opt, ds.image_shape, 0)), steps.replicated)
    batch = train.to_global(next(ds.train_batches(6)), steps.batch)
    _, m_old = jax.jit(lambda s, b: _pre_issue27_train_step(
        s, b, model=model, label_smoothing=0.0))(state, batch)
    old_layers = sorted(k for k, ok in jax.device_get(m_old["finite_by_layer"]).items() if not ok)
    assert report["layers"] == old_layers

    monkeypatch.undo()
    _poisoned_dataset(monkeypatch, {3})  # step 4, then finite steps: its inputs are gone
    with pytest.raises(FloatingPointError, match=r"steps \[4\]; layers: .+"):
        train.train_and_evaluate(small_digits(), str(tmp_path / "b"))
    report = json.loads((tmp_path / "b" / "nonfinite_report.json").read_text())
    assert report["layers_checked_at_steps"] == [4] and report["layers_check_exact"] is False
