"""Bit-packed export, packed-model inference and the integer inference path."""
from __future__ import annotations

import math
import struct
import zlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax import export, intpath, models, predict
from dq_jax.layers import QuantConv, QuantDense
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig
from tests.helpers import load_config, run_python


# --------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_numpy_unpack_jnp_round_trip(bits):
    rng = np.random.default_rng(bits)
    unpack = jax.jit(export.unpack_bits_jnp, static_argnums=(1, 2))
    for n in (1, 7, 13, 1001):
        codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
        codes[0] = 2 ** bits - 1  # the top code always occurs
        packed = export.pack_bits(codes, bits)
        assert packed.dtype == np.uint8 and packed.size == math.ceil(n * bits / 8)
        np.testing.assert_array_equal(np.asarray(unpack(jnp.asarray(packed), bits, n)), codes)
        np.testing.assert_array_equal(export.unpack_bits(packed, bits, n), codes)


def test_bit_order_is_little_endian_and_documented():
    # codes 1, 2, 3 at 3 bits: stream bits (LSB first) 100 010 110 -> byte0 = 0b11010001.
    np.testing.assert_array_equal(export.pack_bits(np.array([1, 2, 3]), 3), [0b11010001, 0])
    np.testing.assert_array_equal(export.pack_bits(np.array([1, 0, 3, 2]), 2), [0b10110001])
    with pytest.raises(ValueError, match=r"cannot pack codes in \[0, 4\] at 2 bits"):
        export.pack_bits(np.array([0, 4]), 2)


# --------------------------------------------------------------------------- helpers

def _random_variables(model, x, rng) -> dict:
    """Variables of `model` with random (valid) values, without running its init.

    `jax.eval_shape(model.init)` gives the structure; filling it directly avoids
    compiling the Lloyd initialisation, which dominates the test time on CPU.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    out = {}
    flat_params = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes["params"]))
    for collection in ("params", "codes", "batch_stats", "quant_stats"):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes.get(collection, {})))
        values = {}
        for path, s in flat.items():
            leaf = path[-1]
            if collection == "codes":
                num_levels = flat_params[path[:-1] + ("kernel_levels",)].shape[-1]
                v = rng.integers(0, num_levels, s.shape)
            elif leaf == "kernel_levels":
                v = np.sort(rng.normal(size=s.shape), axis=-1) * 0.3
            elif leaf in ("kernel_step", "var", "alpha"):
                v = rng.uniform(0.05, 0.5, s.shape)
            elif leaf == "initialized":
                v = np.ones(s.shape, bool)
            elif leaf == "levels":  # learned activation levels
                v = np.sort(rng.uniform(0, 2, s.shape))
            elif leaf == "scale":
                v = rng.uniform(0.5, 1.5, s.shape)
            else:
                v = rng.normal(size=s.shape) * (0.3 if leaf == "kernel" else 0.1)
            values[path] = np.asarray(v, s.dtype)
        out[collection] = flax.traverse_util.unflatten_dict(values) if values else {}
    return out


def _digits_variables(weights: str, bits: int, granularity: str = "per_layer",
                      quantize_first_last: bool = True, widths=(32, 64, 64)):
    """A digits_cnn config, model, random variables and inputs."""
    config = load_config("digits")
    config.quant.weights, config.quant.weight_bits = weights, bits
    config.quant.granularity = granularity
    config.quantize_first_last = quantize_first_last
    config.model_kwargs = {"widths": widths}
    quant = QuantConfig.from_mapping(config.quant)
    model = models.create("digits_cnn", 10, quant=quant, quantize_first_last=quantize_first_last,
                          widths=widths)
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32)
    return config, model, _random_variables(model, x, rng), x


def _save(path, config, variables, model="digits_cnn"):
    return export.save(str(path), model=model, config=config, variables=variables,
                       num_classes=10, image_shape=(8, 8, 1),
                       normalization={"mean": [4.9], "std": [6.0], "pixel_max": 16.0})


# --------------------------------------------------------------------------- size

def test_exported_size_is_within_2_percent_of_ideal(tmp_path):
    bits = 3  # an odd width: codes straddle bytes
    config, _, variables, _ = _digits_variables("dq", bits, widths=(32, 128, 128))
    path = tmp_path / "m.dqz"
    report = _save(path, config, variables)
    size = path.stat().st_size
    hlen = struct.unpack_from("<Q", path.read_bytes(), 12)[0]

    ideal = export.PREFIX_SIZE + hlen
    for collection in ("params", "codes", "batch_stats", "quant_stats"):
        for leaf in jax.tree.leaves(variables[collection]):
            leaf = np.asarray(leaf)
            if collection == "codes":
                ideal += bits * leaf.size / 8
            elif leaf.dtype == np.bool_:
                ideal += leaf.size
            else:
                ideal += 4 * leaf.size  # levels, float layers, biases, BN, act stats
    assert abs(size - ideal) <= 0.02 * ideal, (size, ideal)
    assert report["export_bytes"] == size
    n_q = sum(np.asarray(c).size for c in jax.tree.leaves(variables["codes"]))
    assert report["quantized_weights"] == n_q
    assert report["quantized_weight_bytes"] == sum(
        math.ceil(bits * np.asarray(c).size / 8) for c in jax.tree.leaves(variables["codes"]))
    table = export.format_size_report(report)
    assert "conv2" in table and "dq W3" in table and "total" in table


def test_size_report_for_resnet18_from_shapes():
    report = export.size_report_for_model("resnet18", 4)
    # 11,689,512 params + 9,600 BN running statistics (mean, var), float32.
    assert report["float32_bytes"] == 4 * (11_689_512 + 9_600)
    conv = next(r for r in report["rows"] if r["layer"] == "stage4_block2/conv2")
    assert conv["kind"] == "dq W4" and conv["weights"] == 3 * 3 * 512 * 512
    # 4-bit codes (n/2 bytes) + 16 levels + alpha (4) + initialized (1).
    assert conv["export_bytes"] == conv["weights"] // 2 + 16 * 4 + 5
    head = next(r for r in report["rows"] if r["layer"] == "head")
    assert head["kind"] == "float" and head["export_bytes"] == head["float32_bytes"]
    assert 5.5 < report["ratio"] < 6.5


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("weights,bits,granularity", [
    ("lsq", 3, "per_channel"), ("latent_ste", 1, "per_layer")])
def test_export_predict_equals_fake_quant_eval(tmp_path, weights, bits, granularity):
    config, model, variables, x = _digits_variables(weights, bits, granularity)
    ref = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    path = tmp_path / "m.dqz"
    _save(path, config, variables)
    loaded = export.load(str(path))
    assert all(l["method"] == weights and l["bits"] == bits for l in loaded.layers)
    assert len(loaded.layers) == 4  # first conv and head quantized too
    assert not any(n.endswith("kernel_step") for n in loaded.tensors)
    # The exported codes + levels rebuild the training forward's W_q bit for bit.
    runtime = loaded.variables()
    for layer in loaded.layers:
        name = layer["module"]
        p = jax.tree.map(jnp.asarray, variables["params"][name])  # as in training: jnp, jit
        if weights == "lsq":
            w_train = jax.jit(wq.lsq_kernel, static_argnums=2)(
                p["kernel"], p["kernel_step"], bits)
        else:
            w_train = jax.jit(wq.latent_ste_kernel)(p["kernel"], p["kernel_levels"])
        w_export = wq.gather_levels(runtime["params"][name]["kernel_levels"],
                                    runtime["codes"][name]["kernel"])
        np.testing.assert_array_equal(w_export, w_train, err_msg=name)
    m = predict.load_model(str(path))
    # Bit-exact: W_q is rebuilt bit for bit (LSQ levels use the forward's own step value).
    np.testing.assert_array_equal(m.predict(x), ref)
    if weights != "lsq":  # once is enough: device (jnp) unpacking == numpy unpacking
        dev = flax.traverse_util.flatten_dict(jax.device_get(m.variables()["codes"]))
        host = flax.traverse_util.flatten_dict(loaded.variables()["codes"])
        assert dev.keys() == host.keys()
        for k in dev:
            np.testing.assert_array_equal(dev[k], host[k])
    _check_integer_model(path, x, ref, "affine" if weights == "lsq" else "thermometer")


def _check_integer_model(path, x, ref, kind):
    mi = predict.load_model(str(path), integer=True)
    assert {p.kind for p in mi.plan.values()} == {kind} and len(mi.plan) == 4
    np.testing.assert_allclose(mi.predict(x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DQ W2A2 digits model from the real training program (30 steps)."""
    from dq_jax import configlib, data, train
    config = load_config("digits")
    config.num_train_steps = 30
    config.log_every_steps = 10
    config.checkpoint_every_steps = 30
    config.eval_every_steps = 1000
    workdir = tmp_path_factory.mktemp("digits_w2a2")
    results = train.train_and_evaluate(config, str(workdir))
    quant = configlib.validate(config, device_count=1)
    model = train.create_model(config, quant, 10)
    ds = data.create_dataset(config, process_index=0, process_count=1)
    batch = next(ds.eval_batches())
    n = int(batch["mask"].sum())
    images = batch["image"][:n]
    # The training program's own eval forward (eval_step's model.apply).
    logits = jax.jit(lambda s, x: model.apply(s.variables(), x, train=False))(
        results["state"], images)
    margin = act_threshold_margin(model, results["state"].variables(), images)
    return dict(config=config, workdir=workdir, results=results, images=images,
                logits=np.asarray(logits), labels=batch["label"][:n], ds=ds, margin=margin)


def act_threshold_margin(model, variables, images) -> np.ndarray:
    """Per image: the smallest distance, in grid steps, of any quantized activation from a
    rounding threshold (k + 1/2) of its uniform grid, in the eval forward.

    A value within float round-off of a threshold may land in either bin on another CPU or
    another (e.g. integer) computation of the same layer; the images where that can happen
    are the only ones allowed to differ.
    """
    from dq_jax.quant.activations import ActQuantizer, grid_bounds
    margins = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, ActQuantizer) and context.method_name == "__call__":
            lo, hi = grid_bounds(module.config.num_act_levels, module.config.act_signed)
            v = args[0] / module.get_variable("quant_stats", "alpha")
            nearest_threshold = jnp.clip(jnp.floor(v) + 0.5, lo + 0.5, hi - 0.5)
            d = jnp.abs(v - nearest_threshold)
            margins.append(np.asarray(d.reshape(d.shape[0], -1).min(axis=1)))
        return next_fun(*args, **kwargs)

    with flax.linen.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    assert margins, "no quantized activation seen"
    return np.min(np.stack(margins), axis=0)


def test_trained_digits_export_load_predict_equals_training_eval(trained, tmp_path):
    out = tmp_path / "digits.dqz"
    report = export.export_workdir(str(trained["workdir"]), str(out))
    assert report["export_bytes"] == out.stat().st_size and report["ratio"] > 5
    m = predict.load_model(str(out), expected_model="digits_cnn")
    assert m.image_shape == (8, 8, 1) and m.num_classes == 10
    logits = m.predict(trained["images"])
    np.testing.assert_allclose(logits, trained["logits"], rtol=0, atol=1e-5)
    assert np.mean(np.argmax(logits, -1) == trained["labels"]) == pytest.approx(
        trained["results"]["eval_top1"], abs=1e-6)
    ref = trained["logits"]
    mi = predict.load_model(str(out), integer=True)
    assert {p.kind for p in mi.plan.values()} == {"thermometer"} and len(mi.plan) == 2
    # The integer path computes each layer differently (int8 operands, int32 sums), so an
    # activation within round-off of a rounding threshold may change bins: only images with
    # such a value (margin < 1e-5 grid steps, ~100x float32 round-off of these sums) may
    # differ. With ~3,000 activations per image that excludes a few percent of the images.
    robust = trained["margin"] >= 1e-5
    assert robust.mean() >= 0.9, robust.mean()
    np.testing.assert_allclose(mi.predict(trained["images"])[robust], ref[robust], rtol=0,
                               atol=1e-5 * np.abs(ref).max())
    # predict_raw normalises raw digits pixels (0..16) with the header's mean/std.
    raw = trained["ds"]._x_eval[:len(ref)]
    np.testing.assert_allclose(m.predict_raw(raw), ref, rtol=0, atol=1e-5)


def test_cli_export_and_predict(trained, tmp_path):
    out = tmp_path / "cli.dqz"
    proc = run_python(["-m", "dq_jax.export", f"--workdir={trained['workdir']}", f"--out={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "conv2" in proc.stdout and "dq W2" in proc.stdout and "total" in proc.stdout
    n = len(trained["logits"])
    npz = tmp_path / "x.npz"
    np.savez(npz, x_test=trained["ds"]._x_eval[:n])  # raw uint8 pixels, dataset scale
    logits_path = tmp_path / "logits.npy"
    proc = run_python(["-m", "dq_jax.predict", f"--model={out}", f"--images={npz}",
                       f"--output={logits_path}", "--top_k=2", "--expected_model=digits_cnn"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == n
    np.testing.assert_allclose(np.load(logits_path), trained["logits"], rtol=0, atol=1e-5)


def test_load_images_folder(tmp_path):
    from PIL import Image
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")  # resized, gray
    x, names = predict.load_images(str(tmp_path), (8, 8, 1), pixel_max=16.0)
    assert names == ["a.png", "b.png"] and x.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(x[0], 0.0)
    np.testing.assert_allclose(x[1], 16.0)


# --------------------------------------------------------------------------- integer path

def _random_layer_vars(layer, x, rng, *, affine: bool, alpha=0.37):
    variables = _random_variables(layer, x, rng)
    g, num_levels = variables["params"]["kernel_levels"].shape
    if affine:  # LSQ-style symmetric grid s_g * (c - L/2)
        s = (np.abs(rng.normal(size=(g, 1))) + 0.1).astype(np.float32)
        grid = np.arange(num_levels, dtype=np.float32) - num_levels // 2
        variables["params"]["kernel_levels"] = (s * grid).astype(np.float32)
    variables["quant_stats"]["act_quant"]["alpha"] = np.float32(alpha)
    return variables


CONV_CASES = [
    dict(strides=1, padding="SAME"),
    dict(strides=2, padding=((1, 2), (0, 1))),
    dict(strides=1, padding="VALID", feature_group_count=4),
    dict(strides=(2, 1), padding="CIRCULAR", kernel_dilation=2, use_bias=False),
]


@pytest.mark.parametrize("bits", [1, 2, 4])  # 3 bits: the dense and LSQ-model tests
def test_integer_conv_equals_float_path(bits):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(size=(2, 9, 9, 8)), jnp.float32)
    for i, kw in enumerate(CONV_CASES):
        signed, affine = i % 2 == 1, bits > 1 and i >= 2
        quant = QuantConfig(weight_bits=bits, act_bits=3 if signed else 2, act_signed=signed,
                            granularity="per_channel" if i % 2 else "per_layer")
        layer = QuantConv(8, (3, 3), quant=quant, **kw)
        xin = x if signed else jnp.abs(x)
        variables = _random_layer_vars(layer, xin, rng, affine=affine)
        plan = intpath.plan_layers(variables)
        assert plan[()].kind == ("affine" if affine else "thermometer"), (kw, plan)

        @jax.jit
        def run(v, x):
            f = layer.apply(v, x, train=False)
            y = intpath.apply_integer(layer, v, x, train=False, plan=plan)
            # Forcing the thermometer form on an affine layer is exact too.
            y2 = intpath.apply_integer(layer, v, x, train=False, plan={})
            return f, y, y2

        f, y, y2 = run(variables, xin)
        assert y.shape == f.shape and y.dtype == f.dtype
        tol = 5e-6 * float(jnp.abs(f).max())
        np.testing.assert_allclose(y, f, rtol=0, atol=tol, err_msg=str(kw))
        np.testing.assert_allclose(y2, f, rtol=0, atol=tol, err_msg=str(kw))


@pytest.mark.parametrize("bits,act_bits,affine", [(1, 2, False), (3, 8, False), (4, 8, True)])
def test_integer_dense_equals_float_path(bits, act_bits, affine):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(np.abs(rng.normal(size=(3, 4, 40))), jnp.float32)  # two batch dims
    layer = QuantDense(6, quant=QuantConfig(weight_bits=bits, act_bits=act_bits))
    variables = _random_layer_vars(layer, x, rng, affine=affine, alpha=0.05)
    plan = intpath.plan_layers(variables)
    assert plan[()].kind == ("affine" if affine else "thermometer")
    f, y = jax.jit(lambda v, x: (layer.apply(v, x, train=False), intpath.apply_integer(
        layer, v, x, train=False, plan=plan)))(variables, x)
    np.testing.assert_allclose(y, f, rtol=0, atol=5e-6 * float(jnp.abs(f).max()))


def test_integer_path_feeds_int8_to_the_conv_and_a_nearby_affine_fit_is_not_used():
    rng = np.random.default_rng(0)
    layer = QuantConv(4, (3, 3), quant=QuantConfig(weight_bits=2, act_bits=2))
    x = jnp.abs(jnp.asarray(rng.normal(size=(1, 5, 5, 3)), jnp.float32))
    variables = _random_layer_vars(layer, x, rng, affine=True)
    jaxpr = jax.make_jaxpr(lambda v, x: intpath.apply_integer(
        layer, v, x, train=False, plan=intpath.plan_layers(variables)))(variables, x)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert convs and all(e.invars[0].aval.dtype == jnp.int8 and
                         e.invars[1].aval.dtype == jnp.int8 and
                         e.outvars[0].aval.dtype == jnp.int32 for e in convs), convs
    # One ulp off an affine grid: not exactly affine -> the (exact) thermometer form.
    levels = np.array(variables["params"]["kernel_levels"])
    assert intpath.affine_grid(levels) == -2
    levels[0, 3] = np.nextafter(levels[0, 3], np.float32(np.inf))
    assert intpath.affine_grid(levels) is None


# --------------------------------------------------------------------------- bad files

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    config, _, variables, _ = _digits_variables("dq", 2, quantize_first_last=False)
    path = tmp_path_factory.mktemp("dqz") / "good.dqz"
    _save(path, config, variables)
    return path


def _write(tmp_path, data: bytes, name="bad.dqz"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_good_file_loads(good_file):
    exp = export.load(str(good_file), expected_model="digits_cnn")
    assert exp.model_name == "digits_cnn" and exp.header["format_version"] == 2
    assert any(r.get("compression") == "zlib" for r in exp.header["tensors"])


@pytest.mark.parametrize("cut", [10, 60, -500, -1])
def test_truncated_file_is_rejected(good_file, tmp_path, cut):
    data = good_file.read_bytes()
    path = _write(tmp_path, data[:cut])
    with pytest.raises(ValueError, match=r"bad\.dqz: file is truncated.*Re-export"):
        export.load(path)


def test_corrupted_payload_is_rejected(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    data[-100] ^= 0x10
    with pytest.raises(ValueError, match=r"bad\.dqz: payload checksum mismatch.*corrupted"):
        export.load(_write(tmp_path, bytes(data)))


def test_corrupted_header_is_rejected(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    data[export.PREFIX_SIZE + 30] ^= 0x01
    with pytest.raises(ValueError, match=r"bad\.dqz: header checksum mismatch"):
        export.load(_write(tmp_path, bytes(data)))


def test_wrong_magic_and_trailing_bytes_are_rejected(good_file, tmp_path):
    data = good_file.read_bytes()
    with pytest.raises(ValueError, match=r"bad\.dqz: not a dq_jax \.dqz export.*dq_jax\.export"):
        export.load(_write(tmp_path, b"PK\x03\x04" + data[4:]))
    with pytest.raises(ValueError, match=r"unexpected bytes after the payload"):
        export.load(_write(tmp_path, data + b"\0"))


def test_wrong_format_version_is_rejected(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    struct.pack_into("<I", data, 8, 3)
    with pytest.raises(ValueError, match=r"bad\.dqz: unsupported \.dqz format version 3 "
                                         r"\(this dq_jax reads versions 1, 2\)"):
        export.load(_write(tmp_path, bytes(data)))


def test_wrong_model_name_is_rejected(good_file):
    with pytest.raises(ValueError, match=r"good\.dqz: holds model 'digits_cnn', not the "
                                         r"requested 'resnet20'"):
        predict.load_model(str(good_file), expected_model="resnet20")


def test_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        export.export_workdir(str(tmp_path), str(tmp_path / "x.dqz"))
    (tmp_path / "config.json").write_text('{"identity": {"model": "dig')
    with pytest.raises(ValueError, match=r"config.json is damaged \(JSONDecodeError.*restore it"):
        export.export_workdir(str(tmp_path), str(tmp_path / "x.dqz"))


# --------------------------------------------------------------------------- table vs model

def _edited(good_file, tmp_path, edit, numerics=True):
    """The good export with its header (and payload) edited by `edit(header, tensors)`, and
    every checksum recomputed (with `numerics=False`, all but numerics_sha256): only the
    model check can tell."""
    import hashlib
    import json
    blob = good_file.read_bytes()
    _, _, hlen, _ = struct.unpack_from("<8sIQ32s", blob, 0)
    header = json.loads(blob[export.PREFIX_SIZE:export.PREFIX_SIZE + hlen])
    payload = blob[export.PREFIX_SIZE + hlen:]
    tensors = {r["name"]: payload[r["offset"]:r["offset"] + r["nbytes"]]
               for r in header["tensors"]}
    edit(header, tensors)
    table, offset = [], 0
    for rec in header["tensors"]:
        if rec.pop("keep_offset", False):
            table.append(rec)
            offset += rec["nbytes"]
            continue
        table.append(dict(rec, offset=offset))
        offset += rec["nbytes"]
    header["tensors"] = table
    new_payload = b"".join(tensors[r["name"]] for r in sorted(
        table, key=lambda r: r["offset"]))
    header["payload"] = {"size": len(new_payload),
                         "sha256": hashlib.sha256(new_payload).hexdigest()}
    if numerics and "numerics_sha256" in header:
        header["numerics_sha256"] = export.numerics_digest(header)
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    prefix = struct.pack("<8sIQ32s", export.MAGIC, header["format_version"], len(hjson),
                         hashlib.sha256(hjson).digest())
    return _write(tmp_path, prefix + hjson + new_payload)


def _drop(name):
    def edit(header, tensors):
        header["tensors"] = [r for r in header["tensors"] if r["name"] != name]
        tensors.pop(name)
    return edit


def _rename(old, new):
    def edit(header, tensors):
        for r in header["tensors"]:
            if r["name"] == old:
                r["name"] = new
        header["tensors"].sort(key=lambda r: r["name"])
        tensors[new] = tensors.pop(old)
    return edit


def _set(*keys, value):
    def edit(header, tensors):
        target = header
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return edit


def _set_both_quant(key, value):
    def edit(header, tensors):
        header["quant"][key] = value
        header["config"]["quant"][key] = value
    return edit


def _swap_offsets(header, tensors):
    # Two tensors' bytes exchanged: same sizes, back to back, but each reads the other's data.
    recs = [r for r in header["tensors"] if r["name"].startswith("batch_stats/")][:2]
    assert recs[0]["nbytes"] == recs[1]["nbytes"]
    tensors[recs[0]["name"]], tensors[recs[1]["name"]] = (tensors[recs[1]["name"]],
                                                          tensors[recs[0]["name"]])
    a, b = recs
    a["offset"], b["offset"] = b["offset"], a["offset"]
    a["keep_offset"] = b["keep_offset"] = True


def _layer_bits(header, tensors):
    header["layers"][0]["bits"] = 3


def _codes_bits(header, tensors):
    rec = next(r for r in header["tensors"] if r["encoding"] == "bitpack")
    if rec.pop("compression", None):
        tensors[rec["name"]] = zlib.decompress(tensors[rec["name"]])
    rec["bits"] = 1
    rec["nbytes"] = export.packed_nbytes(math.prod(rec["shape"]), 1)
    tensors[rec["name"]] = tensors[rec["name"]][:rec["nbytes"]]


def _raw_dtype(header, tensors):
    rec = next(r for r in header["tensors"] if r["encoding"] == "raw")
    rec["dtype"] = "|i1"


@pytest.mark.parametrize("edit, match", [
    (_drop("params/head/bias"), r"tensor params/head/bias of the digits_cnn model rebuilt "
                                r"from its header .* is missing from the file"),
    (_rename("params/bn2/scale", "params/bn9/scale"),
     r"tensor params/bn2/scale of the digits_cnn model .* is missing"),
    (_set("num_classes", value=5), r"tensor params/head/bias has shape \[10\], the "
                                   r"digits_cnn model rebuilt from its header \(num_classes=5"),
    (_set("config", "quant", "act_bits", value=4), r"header quant.act_bits=2 but "
                                                   r"config.quant.act_bits=4"),
    (_set_both_quant("act_levels", "learned"), r"tensor quant_stats/conv2/act_quant/alpha in "
                                               r"the file is not a variable of the digits_cnn"),
    (_set_both_quant("weight_bits", 3), r"tensor codes/conv2/kernel has bits 2, .* expects 3"),
    (_codes_bits, r"tensor codes/.*/kernel has bits 1, .* expects 2"),
    (_layer_bits, r"layer conv2 records bits 3, .* has 2"),
    (_raw_dtype, r"tensor quant_stats/.*initialized has dtype '\|i1', .* expects '\|b1'"),
    (_swap_offsets, r"tensor batch_stats/.* starts at payload offset \d+, but the tensors are "
                    r"stored back to back"),
    (_set("normalization", "std", value=[0.0]), r"header normalization .* std in \(0, "
                                                 r"pixel_max\]"),
    (_set("normalization", "mean", value=[400.0]), r"header normalization .* mean in "
                                                    r"\[0, pixel_max\]"),
], ids=["dropped_tensor", "renamed_tensor", "num_classes", "act_bits_config_only",
        "act_levels", "weight_bits", "codes_bits", "layer_bits", "raw_dtype", "swapped_offsets",
        "zero_std", "mean_off_scale"])
def test_tensor_table_is_checked_against_the_rebuilt_model(good_file, tmp_path, edit, match):
    """An edited export with consistent checksums never reaches predict: one ValueError line
    naming the first mismatch (names, shapes, dtypes, bits, class count, quant, layout)."""
    path = _edited(good_file, tmp_path, edit)
    with pytest.raises(ValueError, match=r"bad\.dqz: " + match) as info:
        predict.load_model(path)
    assert "\n" not in str(info.value) and "Re-export" in str(info.value)


@pytest.mark.parametrize("keys, value", [
    (("config", "half_precision"), True),          # bf16 activations: other logits
    (("normalization", "mean"), [1.0]),            # other inputs to the first layer
    (("apply_kwargs",), {"train": False, "x": 1}),
])
def test_header_fields_that_change_numbers_are_covered(good_file, tmp_path, keys, value):
    """A header field edited and the header checksum recomputed (but not numerics_sha256):
    refused, though the field alone is plausible and the model check would pass."""
    path = _edited(good_file, tmp_path, _set(*keys, value=value), numerics=False)
    with pytest.raises(ValueError, match=r"bad\.dqz: header fields that set the model's "
                                         r"numbers .* do not match its numerics_sha256"):
        export.load(path)
    # Only the free-form provenance may change.
    export.load(_edited(good_file, tmp_path, _set("source", value={"note": "moved"}),
                        numerics=False))


def test_a_file_from_before_numerics_sha256_still_loads(good_file, tmp_path):
    """Files written before the key existed carry none; they load (unchecked, as before)."""
    path = _edited(good_file, tmp_path, lambda header, tensors: header.pop("numerics_sha256"))
    assert "numerics_sha256" not in export.load(path).header
    assert predict.load_model(path).num_classes == 10


def test_sizes_that_do_not_add_up_are_refused_before_the_payload_is_read(good_file, tmp_path,
                                                                          monkeypatch):
    """A large file whose header claims another size is refused from its prefix and header
    alone: nothing past the header is read (a 1 GiB file costs no 1 GiB read)."""
    from dq_jax.export import fileformat
    data = good_file.read_bytes()
    path = tmp_path / "big.dqz"
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(len(data) + 2**30)   # sparse: 1 GiB of zeros after the payload
    read = []

    class Counting:  # the loader's file, counting the bytes it reads
        def __init__(self, *args):
            self.f = open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, n=-1):
            read.append(len(out := self.f.read(n)))
            return out

        def readinto(self, buffer):
            read.append(n := self.f.readinto(buffer))
            return n
    monkeypatch.setattr(fileformat, "open", Counting, raising=False)
    with pytest.raises(ValueError, match=r"big\.dqz: 1073741824 unexpected bytes after the "
                                         r"payload"):
        export.load(str(path))
    assert 0 < sum(read) < len(data), read
    assert export.load(str(good_file)).file_size == len(data) == sum(read[-3:])
    huge = bytearray(data)
    struct.pack_into("<Q", huge, 12, 2**40)   # a header claimed larger than the file
    with pytest.raises(ValueError, match=r"bad\.dqz: file is truncated: header needs "
                                         r"1099511627776 bytes"):
        export.load(_write(tmp_path, bytes(huge)))


def test_unedited_round_trip_passes_the_model_check(good_file, tmp_path):
    path = _edited(good_file, tmp_path, lambda header, tensors: None)
    m = predict.load_model(path)
    assert m.num_classes == 10


def test_predict_warns_on_nonfinite_and_out_of_range_inputs(good_file):
    import warnings
    m = predict.load_model(str(good_file), batch_size=8)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 16, (4, 8, 8)).astype(np.float32)  # digits' raw scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in-range inputs: no warning at all
        m.predict_raw(pixels)
        m.predict(m.normalize(pixels))
    bad = pixels.copy()
    bad[2, 3, 3] = np.nan
    with pytest.warns(predict.InputWarning, match=r"1 of 4 images contain NaN or inf values "
                                                  r"\(first: image 2\)"):
        m.predict_raw(bad)
    with pytest.warns(predict.InputWarning, match=r"far outside the raw pixel range .*0..16"):
        m.predict_raw(pixels * 1e5)
    with pytest.warns(predict.InputWarning, match=r"far outside the normalised pixel range .*"
                                                  r"are they raw pixels"):
        m.predict(pixels * 255 / 16)
    with pytest.warns(predict.InputWarning, match="contain NaN or inf"):
        m.predict(np.full((1, 8, 8, 1), np.inf, np.float32))


def test_predict_cli_warns_on_bad_inputs(good_file, tmp_path):
    x = np.full((3, 8, 8), 1e6, np.float32)
    x[0, 0, 0] = np.nan
    np.savez(tmp_path / "x.npz", x_test=x)
    proc = run_python(["-m", "dq_jax.predict", f"--model={good_file}",
                       f"--images={tmp_path / 'x.npz'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    warned = [l for l in proc.stderr.splitlines() if l.startswith("dq_jax.predict: warning:")]
    assert len(warned) == 2, proc.stderr[-2000:]
    assert "1 of 3 images contain NaN" in warned[0] and "far outside" in warned[1]


@pytest.mark.parametrize("signed", [True, False])
def test_integer_path_follows_a_data_decided_activation_grid(signed):
    """act_signed=None: the plan carries the `signed` statistic, and the integer path uses
    that grid (negative inputs stay negative on a signed grid)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 7, 7, 4)), jnp.float32)
    layer = QuantConv(8, (3, 3), quant=QuantConfig(weight_bits=2, act_bits=3))
    assert layer.quant.act_signed is None
    variables = _random_layer_vars(layer, x, rng, affine=False, alpha=0.3)
    variables["quant_stats"]["act_quant"]["signed"] = np.bool_(signed)
    plan = intpath.plan_layers(variables)
    assert plan[()].signed is signed
    f, y = jax.jit(lambda v, x: (layer.apply(v, x, train=False), intpath.apply_integer(
        layer, v, x, train=False, plan=plan)))(variables, x)
    np.testing.assert_allclose(y, f, rtol=0, atol=5e-6 * float(jnp.abs(f).max()))
    # The integer conv ran (int8 inputs), not the float fallback.
    jaxpr = jax.make_jaxpr(lambda v, x: intpath.apply_integer(
        layer, v, x, train=False, plan=plan))(variables, x)
    assert any(e.primitive.name == "conv_general_dilated" and
               e.invars[0].aval.dtype == jnp.int8 for e in jaxpr.eqns)
    # Without the statistic in the plan the layer falls back to the (exact) float path.
    g = jax.jit(lambda v, x: intpath.apply_integer(layer, v, x, train=False, plan={
        (): intpath.LayerPlan("thermometer")}))(variables, x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(f), rtol=0,
                               atol=5e-6 * float(jnp.abs(f).max()))


def test_bfloat16_model_export_predict_matches_eval_logits(tmp_path):
    """half_precision (bf16 activations, the ImageNet recipes' default): the export keeps the
    stored dtypes (uint8 codes bit-packed, float32 levels/params), predict rebuilds the bf16
    model and its logits equal the eval logits to bf16 precision.

    Tolerance: 2% of the largest |logit| (bf16 has an 8-bit mantissa, 0.4% relative; the
    predict program is another jit of the same model, and a rounding difference just below a
    2-bit activation step moves that activation by a whole step). Measured: 0.0 (identical)."""
    config, _, variables, x = _digits_variables("dq", 2, quantize_first_last=False)
    config.half_precision = True
    model = models.create("digits_cnn", 10, quant=QuantConfig.from_mapping(config.quant),
                          quantize_first_last=False, dtype=jnp.bfloat16, widths=(32, 64, 64))
    path = tmp_path / "bf16.dqz"
    _save(path, config, variables)
    exp = export.load(str(path))
    assert {r["dtype"] for r in exp.header["tensors"] if r["encoding"] == "bitpack"} == {"uint8"}
    assert all(r["dtype"] == "float32" for r in exp.header["tensors"]
               if r["name"].endswith("kernel_levels"))
    m = predict.load_model(str(path), batch_size=16)
    assert m.module.dtype == jnp.bfloat16
    got = m.predict(np.asarray(x))
    want = np.asarray(jax.jit(lambda v, xb: model.apply(v, xb, train=False))(
        {c: variables[c] for c in export.COLLECTIONS if c in variables}, x), np.float32)
    assert got.dtype == np.float32 and got.shape == want.shape
    print("bf16 export max |diff|", float(np.abs(got - want).max()), "of", float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * float(np.abs(want).max()))


def _decompressed(header, tensors):
    """What a version-1 writer wrote: every tensor as its encoding lays it out."""
    for rec in header["tensors"]:
        if rec.pop("compression", None):
            tensors[rec["name"]] = zlib.decompress(tensors[rec["name"]])
            rec["nbytes"] = len(tensors[rec["name"]])
    header["format_version"] = 1


def test_a_version_1_file_still_loads_and_equals_the_compressed_one(good_file, tmp_path):
    """Files written before compression (version 1, no `compression` field) load, with the
    same variables bit for bit: compression is lossless."""
    path = _edited(good_file, tmp_path, _decompressed)
    old, new = export.load(path), export.load(str(good_file))
    assert old.header["format_version"] == 1 and old.file_size > new.file_size
    a = flax.traverse_util.flatten_dict(old.variables())
    b = flax.traverse_util.flatten_dict(new.variables())
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    predict.load_model(path)  # passes the model check


def _first_compressed(header):
    return next(r for r in header["tensors"] if r.get("compression"))


def _v1_with_compression(header, tensors):
    header["format_version"] = 1


def _zlib_garbage(header, tensors):
    rec = _first_compressed(header)
    tensors[rec["name"]] = b"\x00" * rec["nbytes"]


def _zlib_short(header, tensors):
    rec = _first_compressed(header)
    raw = zlib.decompress(tensors[rec["name"]])
    tensors[rec["name"]] = zlib.compress(raw[:-1], 9)
    rec["nbytes"] = len(tensors[rec["name"]])


def _zlib_long(header, tensors):
    rec = _first_compressed(header)
    raw = zlib.decompress(tensors[rec["name"]])
    tensors[rec["name"]] = zlib.compress(raw + b"\x00" * 4096, 9)
    rec["nbytes"] = len(tensors[rec["name"]])


def _unknown_compression(header, tensors):
    _first_compressed(header)["compression"] = "lz4"


@pytest.mark.parametrize("edit, match", [
    (_v1_with_compression, r"has compression 'zlib', which a version 1 file cannot hold"),
    (_unknown_compression, r"has compression 'lz4', which a version 2 file cannot hold"),
    (_zlib_garbage, r"its zlib stream is corrupt"),
    (_zlib_short, r"its zlib stream does not decode to exactly the \d+ bytes"),
    (_zlib_long, r"its zlib stream does not decode to exactly the \d+ bytes"),
], ids=["v1", "unknown", "garbage", "short", "long"])
def test_compressed_tensors_are_checked(good_file, tmp_path, edit, match):
    path = _edited(good_file, tmp_path, edit)
    with pytest.raises(ValueError, match=r"bad\.dqz: tensor .*" + match) as info:
        export.load(path)
    assert "\n" not in str(info.value) and "Re-export" in str(info.value)
