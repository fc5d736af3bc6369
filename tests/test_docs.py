"""docs/ says what the code does: the .dqz reader of docs/format.md reads real exports, its
constants are the writer's, and the config keys docs/method.md names exist."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax import export, models
from dq_jax.configlib import base_config
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig
from tests.helpers import REPO

FORMAT = (REPO / "docs" / "format.md").read_text()
METHOD = (REPO / "docs" / "method.md").read_text()


def _reader() -> dict:
    blocks = re.findall(r"```python\n(.*?)```", FORMAT, flags=re.S)
    assert len(blocks) == 1, "docs/format.md should hold exactly one python block: the reader"
    namespace: dict = {}
    exec(compile(blocks[0], "docs/format.md", "exec"), namespace)  # pylint: disable=exec-used
    return namespace


def test_format_constants_match_the_writer():
    assert export.MAGIC == b"\x89DQZ\r\n\x1a\n"
    assert " ".join(f"{b:02X}" for b in export.MAGIC) in FORMAT
    assert export.PREFIX_SIZE == 52 and "| 52 | `H` | header" in FORMAT
    assert export.FORMAT_VERSION == 2 and "(version 2)" in FORMAT
    assert f'"{export.FORMAT_NAME}"' in FORMAT
    for field in dataclasses.fields(QuantConfig):
        assert f"`{field.name}`" in FORMAT, field.name


@pytest.mark.parametrize("weights, bits, granularity", [
    ("dq", 2, "per_layer"), ("dq", 3, "per_channel"), ("lsq", 4, "per_layer"),
    ("latent_ste", 8, "per_layer")])
def test_format_reader_reads_exports(tmp_path, weights, bits, granularity):
    quant = QuantConfig(weights=weights, weight_bits=bits, granularity=granularity,
                        acts="dq", act_bits=2)
    cfg = base_config()
    cfg.model, cfg.quant = "digits_cnn", dataclasses.asdict(quant)
    model = models.create("digits_cnn", 10, quant=quant)
    variables = model.init(jax.random.PRNGKey(bits), jnp.zeros((1, 8, 8, 1)), train=False)
    path = str(tmp_path / "m.dqz")
    export.save(path, model="digits_cnn", config=cfg, variables=variables, num_classes=10,
                image_shape=(8, 8, 1), normalization={"mean": [3.0], "std": [4.0],
                                                      "pixel_max": 16.0})
    reader = _reader()
    header, arrays = reader["read_dqz"](path)
    loaded = export.load(path)
    assert header == loaded.header
    flat = {"/".join(k): v for k, v in
            __import__("flax").traverse_util.flatten_dict(loaded.variables()).items()}
    assert sorted(arrays) == sorted(flat)
    for name, value in arrays.items():
        assert value.dtype == flat[name].dtype, name
        np.testing.assert_array_equal(value, flat[name], err_msg=name)
    assert header["layers"] and all(l["bits"] == bits for l in header["layers"])
    for layer in header["layers"]:
        kernel = reader["quantized_kernel"](arrays, layer["module"])
        levels = arrays[f"params/{layer['module']}/kernel_levels"]
        codes = arrays[f"codes/{layer['module']}/kernel"]
        assert kernel.shape == tuple(layer["shape"]) and levels.shape[0] == layer["groups"]
        np.testing.assert_array_equal(kernel, np.asarray(wq.gather_levels(levels, codes)))
    # Offsets are back to back in the documented (ascending name) order.
    table = header["tensors"]
    assert [t["name"] for t in table] == sorted(t["name"] for t in table)
    assert [t["offset"] for t in table] == list(np.cumsum([0] + [t["nbytes"] for t in table])[:-1])


def test_format_reader_rejects_a_corrupted_file(tmp_path):
    quant = QuantConfig(weights="dq", weight_bits=2, acts="float")
    cfg = base_config()
    cfg.model, cfg.quant = "digits_cnn", dataclasses.asdict(quant)
    model = models.create("digits_cnn", 10, quant=quant)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    path = tmp_path / "m.dqz"
    export.save(str(path), model="digits_cnn", config=cfg, variables=variables,
                num_classes=10, image_shape=(8, 8, 1))
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(AssertionError, match="payload checksum"):
        _reader()["read_dqz"](str(path))
    with pytest.raises(ValueError, match="payload checksum"):
        export.load(str(path))


def test_method_names_real_config_keys():
    """Every `key` docs/method.md gives as a setting is a config or QuantConfig key."""
    keys = set(base_config().keys()) | {f.name for f in dataclasses.fields(QuantConfig)}
    named = set(re.findall(r"`([a-z][a-z0-9_]*)(?:[ =<>][^`]*)?`", METHOD))
    settings = {n for n in named if "_" in n and (n.endswith(("_rate", "_dtype", "_iters",
                                                                "_momentum", "_batches"))
                                                   or n.startswith(("act_", "quantize_")))}
    assert {"code_learning_rate", "levels_learning_rate", "lloyd_iters", "act_momentum",
            "act_calib_iters", "quantize_first_last", "bn_recalibration_batches",
            "calibration_batches", "code_momentum_dtype"} <= settings
    assert not settings - keys, sorted(settings - keys)
    for value in ("'per_layer'", "'per_channel'", "'stochastic'", "'nearest'", "'latent_ste'",
                  "'lsq'", "'uniform'", "'learned'", "'global'"):
        assert value in METHOD, value
