"""Bit-packed export of trained models (`.dqz` files) and size reports.

    python -m dq_jax.export --workdir=DIR --out=model.dqz [--step=N]

reads the latest (or `--step`) orbax checkpoint of a `train_and_evaluate`
workdir plus its `config.json`, writes one `.dqz` file and prints the size
table (exported bytes vs the float32 model, per layer and total). Python:

    rows = export.save(path, model=..., config=..., variables=..., num_classes=...,
                       image_shape=...)          # -> size report
    exp = export.load(path, expected_model=None)  # -> Export (validated)
    export.export_workdir(workdir, out, step=None)
    export.size_report_for_model("resnet18", 2)   # no training, from shapes

What is stored
--------------
Every quantized kernel is stored as its integer codes, bit-packed at b bits per
weight (b = log2 L, L = number of levels, 1..8 bits), plus its levels
`[G, L]` float32. All three quantized weight methods export their *effective*
quantized kernel `W_q` in this one form:

* `dq`: the codes and `kernel_levels` as trained.
* `latent_ste`: codes = nearest level of the latent kernel (exactly what the
  training forward uses), levels = `kernel_levels`; the float latent kernel
  is dropped.
* `lsq`: codes `c = round(clip(w / s, -Qn, Qp)) + Qn` in `[0, L)`, levels
  `s * (c - Qn)` in float32, where `s` is the step *as the forward computes
  it* (`_scale_grad(step, ...)`'s forward value, which can differ from
  `kernel_step` by an ulp) and the conversion runs under `jax.jit` like the
  training forward, so `levels[codes]` equals the LSQ forward's `W_q` bit for
  bit (tested); the float kernel and `kernel_step` are dropped and the layer
  record carries `grid_offset = -Qn` (the integer weight is `c + grid_offset`;
  `levels[:, 1 - grid_offset]` is the step).

The runtime model is therefore always rebuilt with `weights='dq'`
(`Export.runtime_quant`); everything else of the config is unchanged. Every
other leaf (float first/last layers, biases, BatchNorm params and
`batch_stats`, activation `quant_stats`) is stored as float32 (non-float
leaves such as the `initialized` flags keep their own dtype, "raw").

File format (version 1; all integers little-endian)
---------------------------------------------------
    offset  size  field
    0       8     magic b"\\x89DQZ\\r\\n\\x1a\\n"
    8       4     uint32 format version (FORMAT_VERSION)
    12      8     uint64 H = length of the header JSON in bytes
    20      32    sha256 of the header JSON bytes
    52      H     header JSON, UTF-8
    52+H    P     payload: the tensors' bytes back to back (no padding);
                  nothing may follow it

Header JSON keys: `format` ("dq_jax.export"), `format_version`, `model`
(the `dq_jax.models` name), `num_classes`, `image_shape` [H, W, C],
`config` (the full training config dict, as in the workdir's config.json),
`quant` (the training QuantConfig fields), `runtime_weights` ("dq"),
`normalization` ({"mean", "std", "pixel_max"} on the dataset's raw pixel
scale, or null), `layers` (one record per quantized kernel: module, method,
bits, groups, num_weights, grid_offset), `tensors` (one record per stored
array: `name` "collection/module/.../leaf", `encoding` float32 | raw |
bitpack, `dtype`, `shape`, `offset` into the payload, `nbytes`, and `bits`
for bitpack), `payload` ({"size": P, "sha256": hex of the payload}),
`source` (where it came from, informative).

Bit packing (`pack_bits` / `unpack_bits` / `unpack_bits_jnp`): the codes, in
C order, form one bit stream; code i occupies stream bits [i*b, (i+1)*b), its
least significant bit first; stream bit j is bit (j mod 8) of byte j // 8,
counted from the least significant bit ("little" bit order, as
`numpy.packbits(..., bitorder="little")`). The last byte is zero-padded, so a
tensor of n codes takes ceil(n*b/8) bytes.

Integrity: `load` checks, in this order, the prefix length, magic, format
version, header length, header sha256, header JSON, payload length, payload
sha256, (if asked) the model name, the header fields the tensors cannot vouch
for (`quant` equal to `config.quant`, `model` to `config.model`, a positive
class count, [H, W, C], and a plausible `normalization`: per-channel mean in
[0, pixel_max], std in (0, pixel_max]), and the tensor table (ascending names,
back to back from offset 0, covering the payload). `check_model` (run by
`dq_jax.predict` before any prediction) then rebuilds the model the header
describes and requires the table to be exactly its variables: names, shapes,
encodings/dtypes, code bit widths, and the `layers` records. Each failure is a
one-line `ValueError` naming the file, the first thing wrong and what to do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
import sys
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dq_jax.layers import CODES, QUANT_STATS
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig

MAGIC = b"\x89DQZ\r\n\x1a\n"
FORMAT_VERSION = 1
FORMAT_NAME = "dq_jax.export"
_PREFIX = struct.Struct("<8sIQ32s")  # magic, version, header length, header sha256
PREFIX_SIZE = _PREFIX.size  # 52
LEVELS = "kernel_levels"
STEP = "kernel_step"
COLLECTIONS = ("params", CODES, "batch_stats", QUANT_STATS)
RUNTIME_WEIGHTS = "dq"
# Raw pixel scale of the bundled datasets (digits pixels are 0..16).
_PIXEL_MAX = {"digits": 16.0}

PyTree = Any


# --------------------------------------------------------------------------- bit packing

def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an integer in 1..8.")
    return int(bits)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of `count` codes packed at `bits` bits each: ceil(count*bits/8)."""
    return (int(count) * _check_bits(bits) + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packs unsigned codes (< 2**bits) into uint8 bytes, little-endian bit order.

    See the module docstring for the exact layout. Raises ValueError if a code
    does not fit in `bits` bits.
    """
    bits = _check_bits(bits)
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2 ** bits):
        raise ValueError(
            f"cannot pack codes in [{flat.min()}, {flat.max()}] at {bits} bits "
            f"(codes must lie in [0, {2 ** bits - 1}]).")
    flat = flat.astype(np.uint8)
    if bits == 8:
        return flat.copy()
    planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """numpy inverse of `pack_bits`: the first `count` codes, uint8."""
    bits = _check_bits(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size < packed_nbytes(count, bits):
        raise ValueError(f"{packed.size} bytes hold fewer than {count} codes at {bits} bits.")
    if bits == 8:
        return packed[:count].copy()
    planes = np.unpackbits(packed, bitorder="little", count=count * bits).reshape(count, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def unpack_bits_jnp(packed: jax.Array, bits: int, count: int) -> jax.Array:
    """jnp inverse of `pack_bits` (bit ops, traceable under jit): uint8 [count].

    b in {1, 2, 4}: every byte holds 8/b whole codes (shift-and-mask per byte).
    b in {3, 5, 6, 7}: code i starts at bit p = i*b; it lies within the 16-bit
    little-endian word of bytes p//8 and p//8 + 1, so one two-byte gather, a
    shift by p % 8 and a mask decode it. Indices are int32: up to 2**28 codes.
    """
    bits = _check_bits(bits)
    packed = jnp.asarray(packed, jnp.uint8).reshape(-1)
    mask = (1 << bits) - 1
    if bits == 8:
        return packed[:count]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
        codes = (packed[:, None] >> shifts[None, :]) & jnp.uint8(mask)
        return codes.reshape(-1)[:count]
    if count * bits >= 2 ** 31:
        raise ValueError(f"{count} codes at {bits} bits exceed the int32 bit index range.")
    padded = jnp.concatenate([packed, jnp.zeros((1,), jnp.uint8)])
    pos = jnp.arange(count, dtype=jnp.int32) * bits
    byte = pos >> 3
    word = padded[byte].astype(jnp.uint16) | (padded[byte + 1].astype(jnp.uint16) << 8)
    return ((word >> (pos & 7).astype(jnp.uint16)) & jnp.uint16(mask)).astype(jnp.uint8)


# --------------------------------------------------------------------------- conversion

def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
    if not tree:
        return {}
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _name(collection: str, path: Sequence[str]) -> str:
    return "/".join((collection, *path))


def _bits_of(num_levels: int, where: str) -> int:
    bits = int(num_levels).bit_length() - 1
    if num_levels < 2 or 2 ** bits != num_levels or bits > 8:
        raise ValueError(f"{where}: {num_levels} levels is not 2**b for b in 1..8; "
                         "cannot bit-pack its codes.")
    return bits


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One quantized kernel as exported."""
    module: tuple[str, ...]
    method: str              # dq | latent_ste | lsq (the training method)
    bits: int
    groups: int
    shape: tuple[int, ...]   # kernel shape
    grid_offset: int | None  # lsq: integer weight = code + grid_offset

    def record(self) -> dict:
        return {"module": "/".join(self.module), "method": self.method, "bits": self.bits,
                "groups": self.groups, "shape": list(self.shape),
                "num_weights": int(math.prod(self.shape)), "grid_offset": self.grid_offset}


def _quantized_layers(flat_params: Mapping, flat_codes: Mapping,
                      quant: QuantConfig | None) -> list[LayerInfo]:
    """Finds the quantized kernels from the variable structure (shapes only)."""
    layers = []
    for path, leaf in flat_params.items():
        module = path[:-1]
        if path[-1] == LEVELS:
            g, num_levels = np.shape(leaf)
            where = "/".join(module)
            if module + ("kernel",) in flat_codes:
                method, shape = "dq", np.shape(flat_codes[module + ("kernel",)])
            elif module + ("kernel",) in flat_params:
                method, shape = "latent_ste", np.shape(flat_params[module + ("kernel",)])
            else:
                raise ValueError(f"layer {where} has {LEVELS} but neither integer codes nor a "
                                 "latent kernel; the variables are incomplete.")
            layers.append(LayerInfo(module, method, _bits_of(num_levels, where), int(g),
                                    tuple(int(s) for s in shape), None))
        elif path[-1] == STEP:
            where = "/".join(module)
            if quant is None or quant.weights != "lsq":
                raise ValueError(
                    f"layer {where} is an LSQ layer (has {STEP}); exporting it needs the "
                    "training QuantConfig with weights='lsq' (its weight_bits).")
            qn, _ = wq.lsq_bounds(quant.weight_bits)
            shape = tuple(int(s) for s in np.shape(flat_params[module + ("kernel",)]))
            layers.append(LayerInfo(module, "lsq", quant.weight_bits, int(np.shape(leaf)[0]),
                                    shape, int(qn)))
    return sorted(layers, key=lambda l: l.module)


def _lsq_codes_levels(kernel: jax.Array, step: jax.Array, bits: int):
    """Codes in [0, L) and levels [G, L] whose gather equals `wq.lsq_kernel` bit for bit."""
    qn, qp = wq.lsq_bounds(bits)
    per_group = kernel.size // step.shape[0]
    s = wq._scale_grad(step, 1.0 / np.sqrt(per_group * qp))  # the forward's step value
    s_b = s if step.shape[0] > 1 else s[0]
    k = jnp.round(jnp.clip(kernel / s_b, qn, qp))
    codes = (k - qn).astype(wq.CODE_DTYPE)
    grid = jnp.arange(qn, qp + 1, dtype=jnp.float32)
    levels = (s[:, None].astype(jnp.float32) * grid[None, :]).astype(jnp.float32)
    return codes, levels


def _runtime_flat(variables: Mapping, layers: Sequence[LayerInfo]) -> dict[str, jax.Array]:
    """name -> array of the runtime (weights='dq') variables; traceable (eval_shape)."""
    flats = {c: _flat(variables.get(c, {})) for c in COLLECTIONS}
    params, codes = dict(flats["params"]), dict(flats[CODES])
    for layer in layers:
        m = layer.module
        if layer.method == "latent_ste":
            kernel, levels = params.pop(m + ("kernel",)), params[m + (LEVELS,)]
            codes[m + ("kernel",)] = wq.nearest_codes(jnp.asarray(levels), jnp.asarray(kernel))
        elif layer.method == "lsq":
            kernel, step = params.pop(m + ("kernel",)), params.pop(m + (STEP,))
            c, lv = _lsq_codes_levels(jnp.asarray(kernel), jnp.asarray(step), layer.bits)
            codes[m + ("kernel",)], params[m + (LEVELS,)] = c, lv
    out = {}
    for collection, flat in (("params", params), (CODES, codes),
                             ("batch_stats", flats["batch_stats"]),
                             (QUANT_STATS, flats[QUANT_STATS])):
        for path in sorted(flat):
            out[_name(collection, path)] = flat[path]
    return out


def _encoding(name: str, dtype: Any, bits_by_codes: Mapping[str, int]) -> tuple[str, str]:
    if name in bits_by_codes:
        return "bitpack", "uint8"
    if jnp.issubdtype(dtype, jnp.floating):
        return "float32", "float32"
    return "raw", np.dtype(dtype).newbyteorder("<").str


def _tensor_nbytes(encoding: str, shape: Sequence[int], dtype: str, bits: int | None) -> int:
    n = int(math.prod(shape))
    if encoding == "bitpack":
        return packed_nbytes(n, bits)
    return n * np.dtype(dtype).itemsize


def _layout(runtime: Mapping[str, Any], layers: Sequence[LayerInfo]) -> list[dict]:
    """The tensor table (without offsets' data), in payload order."""
    bits_by_codes = {_name(CODES, l.module + ("kernel",)): l.bits for l in layers}
    table, offset = [], 0
    for name, leaf in runtime.items():
        dtype_ = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        encoding, dtype = _encoding(name, dtype_, bits_by_codes)
        shape = [int(s) for s in np.shape(leaf)]
        bits = bits_by_codes.get(name)
        nbytes = _tensor_nbytes(encoding, shape, dtype, bits)
        rec = {"name": name, "encoding": encoding, "dtype": dtype, "shape": shape,
               "offset": offset, "nbytes": nbytes}
        if bits is not None:
            rec["bits"] = bits
        table.append(rec)
        offset += nbytes
    return table


def _encode_tensor(rec: dict, value: Any) -> bytes:
    arr = np.asarray(jax.device_get(value))
    if rec["encoding"] == "bitpack":
        data = pack_bits(arr, rec["bits"])
    elif rec["encoding"] == "float32":
        data = np.ascontiguousarray(arr, dtype="<f4")
    else:
        data = np.ascontiguousarray(arr, dtype=np.dtype(rec["dtype"]))
    raw = data.tobytes()
    assert len(raw) == rec["nbytes"], (rec, len(raw))
    return raw


def _config_dict(config: Any) -> dict:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def quant_of(config: Mapping) -> QuantConfig:
    """The training QuantConfig of a config dict."""
    return QuantConfig.from_mapping(dict(config["quant"]))


# --------------------------------------------------------------------------- save

def encode(*, model: str, config: Any, variables: Mapping, num_classes: int,
           image_shape: Sequence[int], normalization: Mapping | None = None,
           source: Mapping | None = None) -> bytes:
    """The bytes of a `.dqz` file (see the module docstring); `save` writes them."""
    cfg = _config_dict(config)
    if cfg.get("model", model) != model:
        raise ValueError(f"model={model!r} but config.model={cfg.get('model')!r}.")
    quant = quant_of(cfg)
    variables = {c: flax.core.unfreeze(variables.get(c, {})) for c in COLLECTIONS}
    layers = _quantized_layers(_flat(variables["params"]), _flat(variables[CODES]), quant)
    # One compiled conversion (latent_ste/lsq -> codes + levels), not op-by-op dispatch.
    runtime = jax.jit(lambda v: _runtime_flat(v, layers))(variables)
    table = _layout(runtime, layers)
    payload = b"".join(_encode_tensor(rec, runtime[rec["name"]]) for rec in table)
    header = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "model": model, "num_classes": int(num_classes),
        "image_shape": [int(s) for s in image_shape],
        "config": cfg, "quant": dataclasses.asdict(quant), "runtime_weights": RUNTIME_WEIGHTS,
        "normalization": None if normalization is None else {
            "mean": [float(v) for v in np.ravel(normalization["mean"])],
            "std": [float(v) for v in np.ravel(normalization["std"])],
            "pixel_max": float(normalization.get("pixel_max", 255.0))},
        "layers": [l.record() for l in layers],
        "tensors": table,
        "payload": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
        "source": dict(source or {}),
    }
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hjson), hashlib.sha256(hjson).digest())
    return prefix + hjson + payload


def save(path: str, *, model: str, config: Any, variables: Mapping, num_classes: int,
         image_shape: Sequence[int], normalization: Mapping | None = None,
         source: Mapping | None = None) -> dict:
    """Writes a `.dqz` export; returns its size report (see `size_report`).

    Args:
      path: output file.
      model: the `dq_jax.models` name (must equal `config.model`).
      config: the training config (ConfigDict or dict) - stored whole.
      variables: {'params', 'codes', 'batch_stats', 'quant_stats'} (a
        `TrainState.variables()`; other collections are ignored).
      num_classes, image_shape: what the model was built/trained for.
      normalization: {'mean', 'std', 'pixel_max'} of the dataset (raw pixel
        scale), used by the predict CLI; None if unknown.
      source: free-form provenance (workdir, step).
    """
    blob = encode(model=model, config=config, variables=variables, num_classes=num_classes,
                  image_shape=image_shape, normalization=normalization, source=source)
    with open(path, "wb") as f:
        f.write(blob)
    return size_report(_parse(blob, str(path)).header, file_size=len(blob))


# --------------------------------------------------------------------------- load

@dataclasses.dataclass
class Export:
    """A validated `.dqz` file: header, float/raw tensors and packed codes (numpy)."""
    path: str
    header: dict
    tensors: dict[str, np.ndarray]            # decoded float32/raw tensors by name
    packed: dict[str, tuple[np.ndarray, int, tuple[int, ...]]]  # name -> (bytes, bits, shape)
    file_size: int

    @property
    def model_name(self) -> str:
        return self.header["model"]

    @property
    def config(self) -> dict:
        return self.header["config"]

    @property
    def num_classes(self) -> int:
        return self.header["num_classes"]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.header["image_shape"])

    @property
    def normalization(self) -> dict | None:
        return self.header.get("normalization")

    @property
    def training_quant(self) -> QuantConfig:
        return quant_of(self.config)

    @property
    def runtime_quant(self) -> QuantConfig:
        """The QuantConfig the runtime model is built with (weights='dq' if quantized)."""
        q = self.training_quant
        return q if q.weights == "float" else q.replace(weights=RUNTIME_WEIGHTS)

    @property
    def layers(self) -> list[dict]:
        return self.header["layers"]

    def create_model(self):
        """The runtime flax model (same architecture, weights='dq')."""
        from dq_jax import models
        cfg = self.config
        return models.create(
            self.model_name, self.num_classes, quant=self.runtime_quant,
            quantize_first_last=bool(cfg.get("quantize_first_last", False)),
            dtype=jnp.bfloat16 if cfg.get("half_precision", False) else jnp.float32,
            **dict(cfg.get("model_kwargs") or {}))

    def variables(self) -> dict:
        """The runtime variables as nested numpy dicts, codes unpacked with numpy."""
        flat = dict(self.tensors)
        for name, (data, bits, shape) in self.packed.items():
            flat[name] = unpack_bits(data, bits, int(math.prod(shape))).reshape(shape)
        return unflatten_names(flat)

    def size_report(self) -> dict:
        return size_report(self.header, file_size=self.file_size)


def unflatten_names(flat: Mapping[str, Any]) -> dict:
    """{'params/conv/kernel': x} -> {'params': {'conv': {'kernel': x}}}."""
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _fail(path: str, what: str, fix: str) -> None:
    raise ValueError(f"{path}: {what}. {fix}")


_REEXPORT = "Re-export the model with `python -m dq_jax.export --workdir=... --out=...`."


def _parse(blob: bytes, path: str, expected_model: str | None = None) -> Export:
    size = len(blob)
    if size < PREFIX_SIZE:
        _fail(path, f"file is truncated or not a dq_jax export: {size} bytes, shorter than "
              f"the {PREFIX_SIZE}-byte .dqz prefix", _REEXPORT)
    magic, version, hlen, hsha = _PREFIX.unpack_from(blob, 0)
    if magic != MAGIC:
        _fail(path, f"not a dq_jax .dqz export (magic bytes {magic!r}, expected {MAGIC!r})",
              "Pass a file written by `python -m dq_jax.export` / dq_jax.export.save.")
    if version != FORMAT_VERSION:
        _fail(path, f"unsupported .dqz format version {version} (this dq_jax reads version "
              f"{FORMAT_VERSION})", "Load it with the dq_jax version that wrote it, or "
              + _REEXPORT[0].lower() + _REEXPORT[1:])
    if PREFIX_SIZE + hlen > size:
        _fail(path, f"file is truncated: header needs {hlen} bytes but only "
              f"{size - PREFIX_SIZE} follow the prefix", _REEXPORT)
    hjson = blob[PREFIX_SIZE:PREFIX_SIZE + hlen]
    if hashlib.sha256(hjson).digest() != hsha:
        _fail(path, "header checksum mismatch (sha256): the file is corrupted", _REEXPORT)
    try:
        header = json.loads(hjson.decode("utf-8"))
        payload_size = int(header["payload"]["size"])
        payload_sha = str(header["payload"]["sha256"])
        table = list(header["tensors"])
    except (ValueError, KeyError, TypeError) as e:
        _fail(path, f"header is not valid .dqz JSON ({type(e).__name__}: {e})", _REEXPORT)
    if header.get("format") != FORMAT_NAME or header.get("format_version") != version:
        _fail(path, f"header format {header.get('format')!r} v{header.get('format_version')} "
              f"does not match the prefix ({FORMAT_NAME!r} v{version})", _REEXPORT)
    start = PREFIX_SIZE + hlen
    if size - start < payload_size:
        _fail(path, f"file is truncated: payload has {size - start} of {payload_size} bytes",
              _REEXPORT)
    if size - start > payload_size:
        _fail(path, f"{size - start - payload_size} unexpected bytes after the payload "
              "(file was appended to or is not one export)", _REEXPORT)
    payload = memoryview(blob)[start:]
    if hashlib.sha256(payload).hexdigest() != payload_sha:
        _fail(path, "payload checksum mismatch (sha256): the file is corrupted", _REEXPORT)
    if expected_model is not None and header.get("model") != expected_model:
        _fail(path, f"holds model {header.get('model')!r}, not the requested "
              f"{expected_model!r}", f"Pass the export of {expected_model!r}, or do not "
              "ask for a specific model.")
    _check_header_fields(header, path)
    tensors, packed = {}, {}
    names, next_offset = [], 0
    for rec in table:
        try:
            name, enc, shape = rec["name"], rec["encoding"], tuple(int(s) for s in rec["shape"])
            off, nbytes = int(rec["offset"]), int(rec["nbytes"])
            expect = _tensor_nbytes(enc, shape, rec["dtype"], rec.get("bits"))
        except (KeyError, TypeError, ValueError) as e:
            _fail(path, f"bad tensor record {rec!r} ({e})", _REEXPORT)
        if nbytes != expect or off < 0 or off + nbytes > payload_size:
            _fail(path, f"tensor {name} record is inconsistent (offset {off}, {nbytes} bytes, "
                  f"expected {expect} within a {payload_size}-byte payload)", _REEXPORT)
        # The documented layout: ascending names, tensors back to back from offset 0.
        if names and name <= names[-1]:
            _fail(path, f"tensor table is not in ascending name order ({names[-1]!r} before "
                  f"{name!r}) or names a tensor twice", _REEXPORT)
        if off != next_offset:
            _fail(path, f"tensor {name} starts at payload offset {off}, but the tensors are "
                  f"stored back to back and it must start at {next_offset}", _REEXPORT)
        names.append(name)
        next_offset = off + nbytes
        data = np.frombuffer(payload[off:off + nbytes], np.uint8)
        if enc == "bitpack":
            packed[name] = (data.copy(), int(rec["bits"]), shape)
        elif enc == "float32":
            tensors[name] = data.view("<f4").astype(np.float32).reshape(shape)
        elif enc == "raw":
            tensors[name] = data.view(np.dtype(rec["dtype"])).copy().reshape(shape)
        else:
            _fail(path, f"tensor {name} has unknown encoding {enc!r}", _REEXPORT)
    if next_offset != payload_size:
        _fail(path, f"the tensors cover {next_offset} of the {payload_size} payload bytes",
              _REEXPORT)
    return Export(path=path, header=header, tensors=tensors, packed=packed, file_size=size)


def _check_header_fields(header: dict, path: str) -> None:
    """Header fields the tensors cannot vouch for: consistent with each other and plausible."""
    try:
        config_quant = dataclasses.asdict(quant_of(header["config"]))
        recorded = dict(header["quant"])
        num_classes, image_shape = header["num_classes"], header["image_shape"]
    except (KeyError, TypeError, ValueError) as e:
        _fail(path, f"header lacks a valid config/quant/num_classes/image_shape "
              f"({type(e).__name__}: {e})", _REEXPORT)
    for key in sorted(set(config_quant) | set(recorded)):
        if config_quant.get(key) != recorded.get(key):
            _fail(path, f"header quant.{key}={recorded.get(key)!r} but config.quant.{key}="
                  f"{config_quant.get(key)!r}: the header was edited", _REEXPORT)
    if header.get("model") != header["config"].get("model", header.get("model")):
        _fail(path, f"header model {header.get('model')!r} but config.model="
              f"{header['config'].get('model')!r}: the header was edited", _REEXPORT)
    if (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
            or not isinstance(image_shape, list) or len(image_shape) != 3
            or not all(isinstance(v, int) and v > 0 for v in image_shape)):
        _fail(path, f"header num_classes={num_classes!r} / image_shape={image_shape!r} are not "
              "a positive class count and [H, W, C]", _REEXPORT)
    norm = header.get("normalization")
    if norm is not None:
        channels = image_shape[-1]
        try:
            mean = np.asarray(norm["mean"], np.float64)
            std = np.asarray(norm["std"], np.float64)
            pixel_max = float(norm["pixel_max"])
        except (KeyError, TypeError, ValueError) as e:
            _fail(path, f"header normalization {norm!r} is malformed ({e})", _REEXPORT)
        ok = (mean.ndim == 1 and std.ndim == 1 and mean.size in (1, channels)
              and std.size in (1, channels) and math.isfinite(pixel_max) and pixel_max > 0
              and np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)
              and np.all(mean >= 0) and np.all(mean <= pixel_max) and np.all(std <= pixel_max))
        if not ok:
            _fail(path, f"header normalization {norm} is not a per-channel mean in "
                  "[0, pixel_max] and std in (0, pixel_max] for "
                  f"{channels} channel(s)", _REEXPORT)


def check_model(exported: "Export", module=None) -> None:
    """The tensor table must be exactly the variables of the model its header describes.

    Rebuilds the runtime model (`Export.create_model`, or `module`) abstractly and compares
    every variable's name, shape and dtype, the bit width of every code tensor (log2 of its
    levels), and the `layers` records; raises a one-line ValueError naming the first mismatch.
    """
    path = exported.path
    module = exported.create_model() if module is None else module
    where = (f"the {exported.model_name} model rebuilt from its header (num_classes="
             f"{exported.num_classes}, image_shape {list(exported.image_shape)}, "
             f"{exported.runtime_quant.weight_bits}-bit weights)")
    try:
        shapes = jax.eval_shape(lambda: module.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *exported.image_shape), jnp.float32),
            train=False))
    except Exception as e:  # noqa: BLE001  (a model that cannot be built from this header)
        _fail(path, f"cannot rebuild {where} ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:200]})", _REEXPORT)
    shapes = {c: flax.core.unfreeze(shapes.get(c, {})) for c in COLLECTIONS}
    layers = _quantized_layers(_flat(shapes["params"]), _flat(shapes[CODES]),
                               exported.runtime_quant)
    expected = {rec["name"]: rec for rec in _layout(
        {n: v for n, v in _runtime_flat(shapes, layers).items()}, layers)}
    table = {rec["name"]: rec for rec in exported.header["tensors"]}
    for name in sorted(set(expected) | set(table)):
        want, have = expected.get(name), table.get(name)
        if have is None:
            _fail(path, f"tensor {name} of {where} is missing from the file", _REEXPORT)
        if want is None:
            _fail(path, f"tensor {name} in the file is not a variable of {where}", _REEXPORT)
        for field in ("shape", "encoding", "dtype", "bits"):
            if want.get(field) != have.get(field):
                _fail(path, f"tensor {name} has {field} {have.get(field)!r}, {where} expects "
                      f"{want.get(field)!r}", _REEXPORT)
    training = exported.training_quant
    want_layers = {}
    for layer in layers:
        rec = layer.record()
        if training.weights in ("latent_ste", "lsq"):
            rec["method"] = training.weights
        if training.weights == "lsq":
            rec["grid_offset"] = int(wq.lsq_bounds(layer.bits)[0])
        want_layers[rec["module"]] = rec
    have_layers = {rec.get("module"): rec for rec in exported.layers}
    for module_name in sorted(set(want_layers) | set(have_layers)):
        want, have = want_layers.get(module_name), have_layers.get(module_name)
        if want is None or have is None:
            _fail(path, f"layer record {module_name} is {'missing' if have is None else 'extra'}"
                  f" for {where}", _REEXPORT)
        for field in ("method", "bits", "groups", "shape", "num_weights", "grid_offset"):
            if want.get(field) != have.get(field):
                _fail(path, f"layer {module_name} records {field} {have.get(field)!r}, "
                      f"{where} has {want.get(field)!r}", _REEXPORT)


def load(path: str, expected_model: str | None = None) -> Export:
    """Reads and validates a `.dqz` file (see the module docstring).

    Raises:
      FileNotFoundError: no such file.
      ValueError: truncated, wrong magic, wrong format version, corrupted
        (checksum), inconsistent, or (with `expected_model`) another model.
    """
    with open(path, "rb") as f:
        blob = f.read()
    return _parse(blob, str(path), expected_model)


# --------------------------------------------------------------------------- size report

def _layer_key(name: str) -> str:
    parts = name.split("/")[1:-1]  # drop collection and leaf
    if parts and parts[-1] == "act_quant":
        parts = parts[:-1]
    return "/".join(parts) or "(top)"


def size_report(header: Mapping, file_size: int | None = None) -> dict:
    """Exported bytes vs the float32 model, per layer and total.

    The float32 model is the same architecture with every weight a float32
    (params + batch_stats; no levels, no activation statistics). Per layer
    (module path; BatchNorms are their own rows): `weights` (kernel
    entries), `kind` (e.g. 'dq W2' or 'float'), `float32_bytes`,
    `export_bytes` (its tensors in the payload) and `ratio` (float32/export).
    The total adds the prefix + header JSON (`header_bytes`).

    Returns {'rows': [...], 'header_bytes', 'payload_bytes', 'export_bytes',
    'float32_bytes', 'ratio', 'quantized_weight_bytes', 'quantized_weights'}.
    """
    quantized = {l["module"]: l for l in header["layers"]}
    rows: dict[str, dict] = {}
    for rec in header["tensors"]:
        key = _layer_key(rec["name"])
        collection, leaf = rec["name"].split("/")[0], rec["name"].split("/")[-1]
        n = int(math.prod(rec["shape"]))
        row = rows.setdefault(key, {"layer": key, "kind": "float", "weights": 0,
                                    "float32_bytes": 0, "export_bytes": 0})
        row["export_bytes"] += rec["nbytes"]
        if collection in ("params", "batch_stats") and leaf != LEVELS:
            row["float32_bytes"] += 4 * n
        if collection == CODES:
            row["float32_bytes"] += 4 * n
        if leaf == "kernel":
            row["weights"] += n
        if key in quantized:
            l = quantized[key]
            row["kind"] = f"{l['method']} W{l['bits']}"
    out_rows = [rows[k] for k in sorted(rows)]
    for r in out_rows:
        r["ratio"] = r["float32_bytes"] / r["export_bytes"] if r["export_bytes"] else 0.0
    payload = sum(r["export_bytes"] for r in out_rows)
    hbytes = (file_size - payload) if file_size is not None else (
        PREFIX_SIZE + len(json.dumps(header, separators=(",", ":"), sort_keys=True).encode()))
    total = payload + hbytes
    f32 = sum(r["float32_bytes"] for r in out_rows)
    qw = sum(rec["nbytes"] for rec in header["tensors"] if rec["encoding"] == "bitpack")
    return {"rows": out_rows, "header_bytes": hbytes, "payload_bytes": payload,
            "export_bytes": total, "float32_bytes": f32, "ratio": f32 / total,
            "quantized_weight_bytes": qw,
            "quantized_weights": sum(l["num_weights"] for l in header["layers"])}


def format_size_report(report: Mapping) -> str:
    """The size report as a text table."""
    lines = [f"{'layer':<34}{'kind':<14}{'weights':>11}{'float32 B':>13}{'export B':>12}"
             f"{'ratio':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['layer'][:33]:<34}{r['kind']:<14}{r['weights']:>11,}"
                     f"{r['float32_bytes']:>13,}{r['export_bytes']:>12,}{r['ratio']:>7.2f}x")
    lines.append(f"{'(prefix + header JSON)':<34}{'':<14}{'':>11}{0:>13,}"
                 f"{report['header_bytes']:>12,}")
    lines.append(f"{'total':<34}{'':<14}{'':>11}{report['float32_bytes']:>13,}"
                 f"{report['export_bytes']:>12,}{report['ratio']:>7.2f}x")
    return "\n".join(lines)


def _default_num_classes(model_name: str) -> int:
    if model_name == "digits_cnn" or model_name.endswith("_cifar") or model_name in (
            "resnet20", "resnet56"):
        return 10
    return 1000


def size_report_for_model(model_name: str, weight_bits: int, *, weights: str = "dq",
                          act_bits: int | None = None, granularity: str = "per_layer",
                          quantize_first_last: bool = False, num_classes: int | None = None,
                          image_shape: Sequence[int] | None = None,
                          **model_kwargs: Any) -> dict:
    """The export size report of an untrained model, from shapes only (no training).

    Builds `dq_jax.models.create(model_name, ...)` with QuantConfig(weights,
    weight_bits, granularity, acts='dq', act_bits=act_bits or weight_bits),
    takes `jax.eval_shape(model.init)` and lays the export out exactly as
    `save` would (header estimated from the same JSON). Default num_classes:
    1000 for ImageNet models, 10 otherwise.
    """
    from dq_jax import models
    quant = QuantConfig(weights=weights, weight_bits=weight_bits, granularity=granularity,
                        acts="dq", act_bits=act_bits or weight_bits)
    num_classes = num_classes or _default_num_classes(model_name)
    model = models.create(model_name, num_classes, quant=quant,
                          quantize_first_last=quantize_first_last, **model_kwargs)
    shape = tuple(image_shape or models.INPUT_SHAPES[model_name])
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape), jnp.float32),
                           train=False))
    variables = {c: flax.core.unfreeze(variables.get(c, {})) for c in COLLECTIONS}
    layers = _quantized_layers(_flat(variables["params"]), _flat(variables[CODES]), quant)
    runtime = jax.eval_shape(lambda v: _runtime_flat(v, layers), variables)
    table = _layout(runtime, layers)
    from dq_jax.configlib import base_config
    cfg = base_config()
    cfg.model, cfg.quant = model_name, dataclasses.asdict(quant)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": model_name,
              "num_classes": num_classes, "image_shape": list(shape),
              "config": _config_dict(cfg), "quant": dataclasses.asdict(quant),
              "runtime_weights": RUNTIME_WEIGHTS, "normalization": None,
              "layers": [l.record() for l in layers], "tensors": table,
              "payload": {"size": sum(r["nbytes"] for r in table), "sha256": "0" * 64},
              "source": {}}
    return size_report(header)


# --------------------------------------------------------------------------- from a workdir

def _dataset_facts(config) -> dict:
    """num_classes, image_shape and normalization of the training dataset (best effort)."""
    from dq_jax import data, models
    name = config.dataset
    facts: dict[str, Any] = {}
    if name in ("digits", "npz", "cifar10_npz"):
        try:
            ds = data.create_dataset(config, process_index=0, process_count=1)
            facts = {"num_classes": ds.num_classes, "image_shape": tuple(ds.image_shape),
                     "normalization": {"mean": ds.mean, "std": ds.std,
                                       "pixel_max": _PIXEL_MAX.get(name, 255.0)}}
        except (FileNotFoundError, ValueError) as e:
            print(f"dq_jax.export: warning: dataset {name!r} unavailable ({e}); the export "
                  "will have no normalisation constants.", file=sys.stderr)
    if name == "cifar10_npz" and "normalization" not in facts:
        from dq_jax.data.arrays import CIFAR10_MEAN, CIFAR10_STD
        facts["normalization"] = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "pixel_max": 255.0}
    if name in ("cifar10", "cifar100", "imagenet2012"):
        from dq_jax.data.tfds_source import SPECS
        spec = SPECS[name]
        facts["normalization"] = {"mean": spec["mean"], "std": spec["std"], "pixel_max": 255.0}
        facts["num_classes"] = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[name]
        facts["image_shape"] = ((config.image_size, config.image_size, 3)
                                if name == "imagenet2012" else (32, 32, 3))
    if name == "cifar10_npz":
        facts.setdefault("num_classes", 10)
        facts.setdefault("image_shape", (32, 32, 3))
    facts.setdefault("image_shape", tuple(models.INPUT_SHAPES.get(config.model, ())))
    if config.num_classes > 0:
        facts["num_classes"] = int(config.num_classes)
    return facts


def _check_structure(model, variables: Mapping, image_shape, where: str) -> None:
    """The checkpoint's variables must have exactly the shapes of the rebuilt model."""
    expected = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32),
                           train=False))
    for c in COLLECTIONS:
        want = {k: tuple(v.shape) for k, v in _flat(expected.get(c, {})).items()}
        have = {k: tuple(np.shape(v)) for k, v in _flat(variables.get(c, {})).items()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:4]
            raise ValueError(
                f"{where}: the checkpoint's {c} do not match the model rebuilt from its "
                f"config.json (first differences: {diff}); the workdir's config and "
                "checkpoint disagree.")


def export_workdir(workdir: str, out: str, step: int | None = None) -> dict:
    """Exports a training workdir's checkpoint (latest, or `step`) to `out`; returns sizes."""
    import ml_collections
    import orbax.checkpoint as ocp
    from etils import epath
    from dq_jax import checkpoints, configlib, models

    wd = epath.Path(workdir)
    cfg_path = wd / checkpoints.CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist; --workdir must be a directory "
                                "written by dq_jax training (python -m dq_jax.main).")
    try:
        config = ml_collections.ConfigDict(json.loads(cfg_path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is damaged ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); the export needs the training "
                         "config it records: restore it from a backup.") from e
    configlib.validate(config, device_count=1)
    root = wd / checkpoints.CHECKPOINT_DIR
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit()) \
        if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{root} holds no checkpoint; train first.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir}: no checkpoint at step {step}; available: {steps}.")
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    variables = {c: jax.tree.map(np.asarray, restored.get(c) or {}) for c in COLLECTIONS}
    facts = _dataset_facts(config)
    if "num_classes" not in facts:
        raise ValueError(f"{workdir}: cannot tell the number of classes of dataset "
                         f"{config.dataset!r}; set config.num_classes in its config.")
    quant = quant_of(json.loads(config.to_json_best_effort()))
    model = models.create(config.model, facts["num_classes"], quant=quant,
                          quantize_first_last=config.quantize_first_last,
                          **config.model_kwargs.to_dict())
    _check_structure(model, variables, facts["image_shape"], str(workdir))
    return save(out, model=config.model, config=config, variables=variables,
                num_classes=facts["num_classes"], image_shape=facts["image_shape"],
                normalization=facts.get("normalization"),
                source={"workdir": str(workdir), "step": int(step)})


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str]) -> None:
    from absl import flags
    flags_ = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments: {argv[1:]}")
    try:
        report = export_workdir(flags_.workdir, flags_.out, flags_.step)
    except (ValueError, FileNotFoundError) as e:
        print(f"dq_jax.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_size_report(report))
    print(f"wrote {flags_.out}: {report['export_bytes']:,} bytes, "
          f"{report['ratio']:.2f}x smaller than float32 ({report['float32_bytes']:,} bytes)")


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "Training workdir (with config.json and checkpoints/).")
    flags.DEFINE_string("out", None, "Output .dqz file.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
