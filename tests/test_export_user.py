"""Export and predict of a user's own Flax module (not a `dq_jax.models` name)."""
from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import user_models
from dq_jax import export, predict
from helpers import run_python

TESTS = os.path.dirname(os.path.abspath(__file__))
SHAPE = (8, 8, 1)
REF = "user_models:make_model"


@pytest.fixture(scope="module")
def trained():
    """Variables of the user model after init + one train-mode forward (calibrates the
    activation quantizer and moves BatchNorm statistics)."""
    model = user_models.make_model(num_classes=10)
    x = jax.random.normal(jax.random.PRNGKey(0), (16, *SHAPE))
    variables = model.init(jax.random.PRNGKey(1), x, train=False)
    _, updates = model.apply(variables, x, train=True,
                             mutable=["batch_stats", "quant_stats"])
    variables = {**flax.core.unfreeze(variables), **flax.core.unfreeze(updates)}
    variables.pop("perturbations", None)
    return model, variables, x


def test_user_module_round_trips_through_predict(trained, tmp_path):
    model, variables, x = trained
    path = str(tmp_path / "user.dqz")
    report = export.save(path, model=REF, model_kwargs={"num_classes": 10},
                         variables=variables, num_classes=10, image_shape=SHAPE)
    assert report["quantized_weights"] == 3 * 3 * 8 * 16  # conv1 only: stem and head float
    exp = export.load(path)
    assert exp.model_name == REF and exp.model_kwargs == {"num_classes": 10}
    assert exp.apply_kwargs == {"train": False}
    m = predict.load_model(path, batch_size=16)
    assert isinstance(m.module, user_models.TinyNet)
    got = m.predict(np.asarray(x))
    # Same jitted function shape, same variables bit for bit (codes unpacked, levels f32).
    want = jax.jit(lambda v, xb: model.apply(v, xb, train=False))(
        {c: variables[c] for c in export.COLLECTIONS if c in variables}, x)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_raw_pixels_without_normalisation_name_the_export_and_the_fix(trained, tmp_path):
    model, variables, x = trained
    path = str(tmp_path / "user.dqz")
    export.save(path, model=REF, model_kwargs={"num_classes": 10}, variables=variables,
                num_classes=10, image_shape=SHAPE)
    m = predict.load_model(path, batch_size=16)
    with pytest.raises(ValueError, match=r"records none: it was exported without them; export "
                                         r"again with normalization=.*--prenormalized"):
        m.predict_raw(np.zeros((2, *SHAPE), np.float32))


def test_uncalibrated_export_warns_at_load(trained, tmp_path):
    model, variables, x = trained
    fresh = model.init(jax.random.PRNGKey(1), x, train=False)  # never trained: uncalibrated
    path = str(tmp_path / "fresh.dqz")
    export.save(path, model=REF, model_kwargs={"num_classes": 10}, variables=fresh,
                num_classes=10, image_shape=SHAPE)
    with pytest.warns(UserWarning, match="conv1 is evaluated but was never calibrated"):
        predict.load_model(path, batch_size=16)


def test_module_instance_with_non_json_fields_asks_for_a_factory(trained, tmp_path):
    model, variables, _ = trained
    with pytest.raises(ValueError, match="field conv=.*importable factory"):
        export.save(str(tmp_path / "x.dqz"), model=model, variables=variables,
                    num_classes=10, image_shape=SHAPE)


def test_plain_module_instance_is_recorded_by_class_and_fields(tmp_path):
    model = user_models.TinyNet(num_classes=3, bits=3, width=4)   # JSON-able fields only
    x = jnp.zeros((2, *SHAPE))
    variables = flax.core.unfreeze(model.init(jax.random.PRNGKey(0), x, train=False))
    path = str(tmp_path / "plain.dqz")
    export.save(path, model=model, variables=variables, num_classes=3, image_shape=SHAPE)
    exp = export.load(path)
    assert exp.model_name == "user_models:TinyNet"
    assert exp.model_kwargs == {"num_classes": 3, "bits": 3, "width": 4}
    assert [l["bits"] for l in exp.layers] == [3]
    assert exp.create_model() == model


def test_mismatched_module_is_refused(trained, tmp_path):
    _, variables, _ = trained
    path = str(tmp_path / "user.dqz")
    export.save(path, model=REF, model_kwargs={"num_classes": 10}, variables=variables,
                num_classes=10, image_shape=SHAPE)
    with pytest.raises(ValueError, match=r"head/bias has shape \[10\], the given module .* "
                                         r"expects \[5\]. Pass the module this file was"):
        predict.load_model(path, module=user_models.make_model(num_classes=5))
    # Variables that are not the module's are refused before anything is written.
    with pytest.raises(ValueError, match="shape"):
        export.save(str(tmp_path / "bad.dqz"), model=REF, model_kwargs={"num_classes": 5},
                    variables=variables, num_classes=5, image_shape=SHAPE)
    assert not os.path.exists(tmp_path / "bad.dqz")


@pytest.mark.parametrize("model, kwargs, match", [
    ("no_such_pkg_xyz:make", None, "cannot import 'no_such_pkg_xyz'.*PYTHONPATH"),
    ("user_models:nope", None, "has no attribute 'nope'"),
    ("user_models:QuantConfig", None, "not a flax.linen Module"),
    (REF, {"num_classes": object()}, "cannot be recorded"),
])
def test_bad_references_fail_with_the_fix(trained, tmp_path, model, kwargs, match):
    _, variables, _ = trained
    with pytest.raises(ValueError, match=match):
        export.save(str(tmp_path / "x.dqz"), model=model, model_kwargs=kwargs,
                    variables=variables, num_classes=10, image_shape=SHAPE)


def test_cli_exports_and_predicts_a_user_module_with_accuracy(trained, tmp_path):
    _, variables, x = trained
    var_path = tmp_path / "vars.msgpack"
    var_path.write_bytes(flax.serialization.to_bytes(variables))
    out = tmp_path / "cli.dqz"
    env = {"PYTHONPATH": TESTS}
    norm = json.dumps({"mean": [0.0], "std": [1.0], "pixel_max": 16.0})
    proc = run_python(["-m", "dq_jax.export", f"--model={REF}",
                       "--model_kwargs={\"num_classes\": 10}", f"--variables={var_path}",
                       "--num_classes=10", "--image_shape=8,8,1", f"--out={out}",
                       f"--normalization={norm}"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and out.exists()
    pixels = np.clip(np.asarray(x), 0, 16)
    m = predict.load_model(str(out), batch_size=16)
    labels = np.argmax(m.predict_raw(pixels), axis=-1)
    labels[:4] = (labels[:4] + 1) % 10          # 4 of 16 wrong by construction
    images = tmp_path / "images.npz"
    np.savez(images, x_test=pixels, y_test=labels)
    proc = run_python(["-m", "dq_jax.predict", f"--model={out}", f"--images={images}",
                       "--batch_size=16"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accuracy: top-1 0.7500" in proc.stdout, proc.stdout[-500:]
    # Both or neither of the two sources: a clear error, exit 2.
    proc = run_python(["-m", "dq_jax.export", f"--model={REF}", f"--out={out}",
                       "--workdir=/nonexistent"], env=env)
    assert proc.returncode == 2 and "either --workdir" in proc.stderr


def test_mixed_widths_by_rules_round_trip_through_export_predict_and_integer_path(tmp_path):
    """An unmodified model quantized by rules (8-bit stem/head, 2-bit inner convs, issue 28
    item 3): each layer is exported at its own width, predict gives the eval logits exactly,
    and the integer path agrees (exact up to float round-off)."""
    from tests.test_rules import digits, train
    (x, y), (x_test, _) = digits()
    model = user_models.rules_plain_net()
    state, _ = train(model, jax.jit(model.init)(jax.random.key(0), x[:2]), x, y, steps=5)
    variables = jax.tree.map(np.asarray, state.variables())
    path = str(tmp_path / "mixed.dqz")
    report = export.save(path, model="user_models:rules_plain_net", variables=variables,
                         num_classes=10, image_shape=SHAPE)
    bits = {layer["module"]: layer["bits"] for layer in export.load(path).header["layers"]}
    assert bits == {"Conv_0": 8, "Conv_1": 2, "Conv_2": 2, "Dense_0": 8}
    assert report["quantized_weight_bytes"] == (3 * 3 * 32 + 32 * 10) + 2 * (3 * 3 * 32 * 32) // 4
    want = np.asarray(jax.jit(lambda v, xb: model.apply(v, xb, train=False))(variables, x_test))
    m = predict.load_model(path, batch_size=len(x_test))
    np.testing.assert_array_equal(m.predict(x_test), want)
    got = predict.load_model(path, batch_size=len(x_test), integer=True).predict(x_test)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
