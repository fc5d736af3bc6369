"""Float -> DQ for any model (issue 28, item 2): `dq_jax.from_float(model, float_variables, x)`,
and the worked example of docs/quantize_any_model.md (rules, conversion, fine-tuning) run as
written."""
from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dq_jax
import user_models
from dq_jax import QuantConfig, QuantRule, quantize_model
from dq_jax.quant import weights as wq
from tests.helpers import REPO, run_python
from tests.test_rules import RULES, PlainNet, digits

FLAT = flax.traverse_util.flatten_dict
_lloyd = jax.jit(wq.lloyd_init, static_argnums=(1, 2, 3))  # what init fits, compiled


@pytest.fixture(scope="module")
def float_and_x():
    (x, _), _ = digits()
    model = PlainNet()
    v = model.init(jax.random.key(3), x[:2])
    # one train-mode forward so batch_stats are not their init values
    _, new = model.apply(v, x[:64], mutable=["batch_stats"])
    return {**v, **new}, x


def test_from_float_converts_by_module_path(float_and_x):
    """Each DQ layer: Lloyd levels of its float kernel at its own width and the nearest codes,
    bitwise what the compiled `lloyd_init` gives (as `init` fits); float layers, biases and
    batch_stats copied exactly."""
    fv, x = float_and_x
    rules = [QuantRule("Conv_0", QuantConfig(weight_bits=8, act_bits=8)),
             QuantRule("Conv_1", QuantConfig(weight_bits=3, granularity="per_channel")),
             QuantRule("Conv_2", QuantConfig(weight_bits=2))]
    model = quantize_model(PlainNet(), rules)
    v = dq_jax.from_float(model, fv, x[:1])
    assert set(v) == {"params", "codes", "batch_stats", "quant_stats"}
    for (name, quant) in (("Conv_0", rules[0].quant), ("Conv_1", rules[1].quant),
                          ("Conv_2", rules[2].quant)):
        levels, codes = _lloyd(jnp.asarray(fv["params"][name]["kernel"]),
                               quant.num_weight_levels, quant.granularity, quant.lloyd_iters)
        np.testing.assert_array_equal(v["params"][name]["kernel_levels"], levels)
        np.testing.assert_array_equal(v["codes"][name]["kernel"], codes)
        np.testing.assert_array_equal(v["params"][name]["bias"], fv["params"][name]["bias"])
    assert v["params"]["Conv_1"]["kernel_levels"].shape == (32, 8)
    np.testing.assert_array_equal(v["params"]["Dense_0"]["kernel"],
                                  fv["params"]["Dense_0"]["kernel"])  # unmatched: float
    jax.tree.map(np.testing.assert_array_equal, v["batch_stats"], fv["batch_stats"])
    assert not any(bool(s) for k, s in FLAT(v["quant_stats"]).items() if k[-1] == "initialized")
    # the variables are a model's: they apply and train like init's
    with pytest.warns(UserWarning, match="never calibrated"):  # fresh quant_stats
        assert model.apply(v, x[:4], train=False).shape == (4, 10)


def test_from_float_adaround_rounds_each_weight_up_or_down(float_and_x):
    fv, x = float_and_x
    model = quantize_model(PlainNet(), RULES)
    nearest = dq_jax.from_float(model, fv, x[:1])
    rounded = dq_jax.from_float(model, fv, x[:1], apply_kwargs={"train": False},
                                adaround_images=x[:64], adaround_steps=30)
    jax.tree.map(np.testing.assert_array_equal, rounded["params"], nearest["params"])
    differ = 0
    for path, c in FLAT(rounded["codes"]).items():
        levels = FLAT(nearest["params"])[path[:-1] + ("kernel_levels",)]
        lo, _, _ = wq.bracketing_levels(levels, jnp.asarray(FLAT(fv["params"])[path]))
        c = np.asarray(c).astype(int)
        assert np.all((c == np.asarray(lo)) | (c == np.asarray(lo) + 1)), path
        differ += int(np.sum(c != np.asarray(FLAT(nearest["codes"])[path])))
    assert differ > 0  # AdaRound chose other than nearest somewhere


def test_from_float_names_a_mismatched_checkpoint(float_and_x):
    fv, x = float_and_x
    model = quantize_model(PlainNet(), RULES)
    other = {"params": {k: v for k, v in fv["params"].items() if k != "Conv_2"},
             "batch_stats": fv["batch_stats"]}
    with pytest.raises(ValueError, match="float_variables has no parameter Conv_2/"):
        dq_jax.from_float(model, other, x[:1])
    with pytest.raises(ValueError, match="must be the float model's variables"):
        dq_jax.from_float(model, fv["params"], x[:1])


def test_docs_worked_example_runs():
    text = (REPO / "docs" / "quantize_any_model.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    proc = run_python(["-c", block])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "'Conv_0': (1, 256)" in out and "'Conv_1': (1, 4)" in out
    assert "'Dense_0': (1, 256)" in out, out
    acc = float(re.search(r"held-out accuracy ([0-9.]+)", out).group(1))
    moved = eval(re.search(r"codes moved (\{.*\})", out).group(1))
    assert acc > 0.5, out  # chance is 0.1
    assert set(moved) == {"Conv_0", "Conv_1", "Conv_2", "Dense_0"}
    assert all(m > 0 for m in moved.values()), moved


def test_from_float_fits_each_slice_of_a_scanned_layer():
    """A layer stacked by nn.scan gets one fit per slice (as `init` would), not one over the
    stack."""
    x = jnp.ones((1, 8, 8, 1))
    fv = user_models.ScannedConvs().init(jax.random.key(0), x)
    model = quantize_model(user_models.ScannedConvs(), [QuantRule("blocks/conv", QuantConfig())])
    v = dq_jax.from_float(model, fv, x)
    kernels = fv["params"]["blocks"]["conv"]["kernel"]
    assert v["params"]["blocks"]["conv"]["kernel_levels"].shape == (3, 1, 4)
    for i in range(3):
        levels, codes = _lloyd(kernels[i], 4, "per_layer", QuantConfig().lloyd_iters)
        np.testing.assert_array_equal(v["params"]["blocks"]["conv"]["kernel_levels"][i], levels)
        np.testing.assert_array_equal(v["codes"]["blocks"]["conv"]["kernel"][i], codes)
