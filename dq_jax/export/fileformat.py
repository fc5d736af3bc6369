"""The `.dqz` file: writing (`save`/`encode`), reading and validating (`load`, `check_model`).

The byte layout and every header key are specified in docs/format.md. A file describes its model
either by a `dq_jax.models` registry name (with the training config) or, for a user's own Flax
module, by an importable `"package.module:attr"` reference plus JSON keyword arguments
(`model_kwargs`; `attr` is the module class or a factory returning the module), so `predict`
can rebuild it; `check_model` refuses a module whose variables differ from the file's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import zlib
from typing import Any, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dq_jax.export.bitpack import unpack_bits
from dq_jax.export.convert import (CODES, COLLECTIONS, RUNTIME_WEIGHTS, config_dict, encode_tensor,
                                   flat, layout, quant_of, quantized_layers, runtime_flat,
                                   tensor_nbytes)
from dq_jax.export.prefix import (  # noqa: F401  (re-exported)
    _PREFIX, COMPRESSION, FORMAT_NAME, FORMAT_VERSION, MAGIC, PREFIX_SIZE, READ_VERSIONS)
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig

DEFAULT_APPLY_KWARGS = {"train": False}
# Headers are kilobytes (about 200 bytes per tensor); a larger claim is refused unread.
MAX_HEADER_BYTES = 64 * 2**20
# Header keys that cannot change a prediction: everything else is covered by numerics_sha256.
_INFORMATIVE_KEYS = ("source", "numerics_sha256")


def numerics_digest(header: Mapping) -> str:
    """sha256 (hex) of the header without `source` and itself (docs/format.md): every field
    that sets the model's numbers (`config.half_precision`, `normalization`, `quant`, the
    payload's sha256, ...). The header checksum only proves the bytes are as written; this
    also refuses a file whose fields were edited and the header checksum recomputed."""
    body = {k: v for k, v in header.items() if k not in _INFORMATIVE_KEYS}
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), sort_keys=True)
                          .encode("utf-8")).hexdigest()


def is_user_model(name: str) -> bool:
    """A user module reference ("package.module:attr") rather than a registry name."""
    return ":" in str(name)


def _is_json(value: Any) -> bool:
    """`value` survives a JSON round trip unchanged (so the file can record it)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _json_kwargs(kwargs: Mapping | None, what: str) -> dict:
    kwargs = dict(kwargs or {})
    if not _is_json(kwargs):
        raise ValueError(
            f"{what}={kwargs!r} cannot be recorded in the file (not preserved by a JSON round "
            "trip); pass only JSON values (numbers, strings, lists, dicts), or an importable "
            "factory model='package.module:make_model' that builds the module without them.")
    return kwargs


def resolve_model(ref: str, kwargs: Mapping | None = None) -> nn.Module:
    """Imports `"package.module:attr"` and calls it with `kwargs`; must give a Flax module."""
    mod_name, _, attr = str(ref).partition(":")
    if not mod_name or not attr:
        raise ValueError(f"model reference {ref!r} is not 'package.module:attr'.")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"cannot import {mod_name!r} for model {ref!r} ({e}); put the "
                         "package that defines it on PYTHONPATH (or install it).") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {ref!r}: module {mod_name!r} has no attribute {attr!r}; "
                             "fix the reference (package.module:attr).")
        obj = getattr(obj, part)
    module = obj(**dict(kwargs or {}))
    if not isinstance(module, nn.Module):
        raise ValueError(f"model {ref!r} built a {type(module).__name__}, not a flax.linen "
                         "Module; reference the module class or a factory returning one.")
    return module


def _module_reference(module: nn.Module) -> tuple[str, dict]:
    """`("package.module:Class", fields)` of a module instance, for rebuilding it."""
    cls = type(module)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ValueError(
            f"model {cls.__qualname__} is defined in {cls.__module__} and cannot be imported "
            "again to rebuild it; move it into an importable module, or pass "
            "model='package.module:make_model'.")
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    defaults = {f.name: f.default for f in dataclasses.fields(module)}
    kwargs = {k: v for k, v in fields.items() if v is not defaults.get(k) and v != defaults.get(k)}
    for key, value in kwargs.items():
        if not _is_json(value):
            raise ValueError(
                f"model field {key}={value!r} cannot be recorded in the file; pass an "
                "importable factory model='package.module:make_model' (plus JSON model_kwargs) "
                "that builds this module.")
    return f"{cls.__module__}:{cls.__qualname__}", kwargs


def _describe_model(model: Any, config: Any, model_kwargs: Mapping | None):
    """(header model name, model_kwargs, config dict, QuantConfig | None) of `save`'s model."""
    if isinstance(model, nn.Module):
        if model_kwargs:
            raise ValueError("model_kwargs apply to a model reference string, not to a module "
                             "instance (its fields are recorded).")
        ref, kwargs = _module_reference(model)
        if resolve_model(ref, kwargs) != model:
            raise ValueError(f"model {ref} rebuilt from its recorded fields {kwargs} differs from "
                             "the given module; pass model='package.module:make_model'.")
        model, model_kwargs = ref, kwargs
    if not isinstance(model, str) or not model:
        raise ValueError(f"model={model!r} must be a dq_jax.models name, a "
                         "'package.module:attr' reference or a flax.linen Module.")
    if is_user_model(model):
        kwargs = _json_kwargs(model_kwargs, "model_kwargs")
        resolve_model(model, kwargs)  # fails now, not at predict time
        cfg = config_dict(config) if config is not None else {}
        cfg.setdefault("model", model)
        if cfg["model"] != model:
            raise ValueError(f"model={model!r} but config.model={cfg['model']!r}.")
        return model, kwargs, cfg, (quant_of(cfg) if "quant" in cfg else None)
    if model_kwargs:
        raise ValueError("model_kwargs apply to a 'package.module:attr' model; registry models "
                         "take theirs from config.model_kwargs.")
    if config is None:
        raise ValueError(f"model={model!r} is a dq_jax.models name; pass its training config "
                         "(config=...), which says how it was built.")
    cfg = config_dict(config)
    if cfg.get("model", model) != model:
        raise ValueError(f"model={model!r} but config.model={cfg.get('model')!r}.")
    return model, None, cfg, quant_of(cfg)


def encode(*, model: str | nn.Module, variables: Mapping, num_classes: int,
           image_shape: Sequence[int], config: Any = None, model_kwargs: Mapping | None = None,
           apply_kwargs: Mapping | None = None, normalization: Mapping | None = None,
           source: Mapping | None = None) -> bytes:
    """The bytes of a `.dqz` file (docs/format.md); `save` writes them."""
    name, kwargs, cfg, quant = _describe_model(model, config, model_kwargs)
    variables = {c: flax.core.unfreeze(variables.get(c, {})) for c in COLLECTIONS}
    from dq_jax import mixed  # imports the zoo: only when encoding
    layer_quant = quant
    if kwargs is None and mixed.uses_rules(cfg):  # per-layer widths (an LSQ layer's bits)
        layer_quant = mixed.quant_by_layer(mixed.create_model(
            cfg, quant, int(num_classes), image_shape, **dict(cfg.get("model_kwargs") or {})),
            image_shape)
    layers = quantized_layers(flat(variables["params"]), flat(variables[CODES]), layer_quant)
    if kwargs is not None:
        other = sorted({l.method for l in layers} - {"dq"})
        if other:
            raise ValueError(
                f"a user module is rebuilt as it is, so its quantized layers must be "
                f"weights='dq' (found {', '.join(other)}); build the module with "
                "QuantConfig(weights='dq') for export, or train with a dq_jax.models name.")
    # One compiled conversion (latent_ste/lsq -> codes + levels), not op-by-op dispatch.
    runtime = jax.jit(lambda v: runtime_flat(v, layers))(variables)
    table = layout(runtime, layers)
    table, parts = _compress(table, [encode_tensor(rec, runtime[rec["name"]]) for rec in table])
    payload = b"".join(parts)
    version = FORMAT_VERSION if any("compression" in rec for rec in table) else 1
    header = {
        "format": FORMAT_NAME, "format_version": version,
        "model": name, "num_classes": int(num_classes),
        "image_shape": [int(s) for s in image_shape],
        "config": cfg, "quant": None if quant is None else dataclasses.asdict(quant),
        "runtime_weights": RUNTIME_WEIGHTS,
        "apply_kwargs": _json_kwargs(DEFAULT_APPLY_KWARGS if apply_kwargs is None
                                     else apply_kwargs, "apply_kwargs"),
        "normalization": None if normalization is None else {
            "mean": [float(v) for v in np.ravel(normalization["mean"])],
            "std": [float(v) for v in np.ravel(normalization["std"])],
            "pixel_max": float(normalization.get("pixel_max", 255.0))},
        "layers": [l.record() for l in layers],
        "tensors": table,
        "payload": {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
        "source": dict(source or {}),
    }
    if kwargs is not None:
        header["model_kwargs"] = kwargs
    header["numerics_sha256"] = numerics_digest(header)
    hjson = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    prefix = _PREFIX.pack(MAGIC, version, len(hjson), hashlib.sha256(hjson).digest())
    return prefix + hjson + payload


def _compress(table: list[dict], parts: list[bytes]) -> tuple[list[dict], list[bytes]]:
    """Each tensor's bytes zlib-compressed (level 9) where that is smaller, offsets redone.

    Lossless, so predictions are unchanged. Why: codes are not uniform over their levels (a
    Lloyd fit puts more weights on the inner levels): 2-bit codes of a Gaussian kernel carry
    1.91 bits, 8-bit ones 6.8 bits, and zlib reaches about that; float tensors rarely shrink
    and stay as they are."""
    out_table, out_parts, offset = [], [], 0
    for rec, raw in zip(table, parts):
        rec = dict(rec)
        packed = zlib.compress(raw, 9)
        if len(packed) < len(raw):
            rec["compression"], raw = COMPRESSION, packed
        rec["offset"], rec["nbytes"] = offset, len(raw)
        offset += len(raw)
        out_table.append(rec)
        out_parts.append(raw)
    return out_table, out_parts


def _decompress(data: bytes, expect: int, name: str, path: str) -> bytes:
    """A tensor's zlib stream -> exactly `expect` bytes (more is refused unread)."""
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, expect)
        ok = len(raw) == expect and d.eof and not d.unconsumed_tail and not d.unused_data
    except zlib.error as e:
        _fail(path, f"tensor {name}: its zlib stream is corrupt ({e})", _REEXPORT)
    if not ok:
        _fail(path, f"tensor {name}: its zlib stream does not decode to exactly the {expect} "
              "bytes its shape and encoding need", _REEXPORT)
    return raw


def save(path: str, *, model: str | nn.Module, variables: Mapping, num_classes: int,
         image_shape: Sequence[int], config: Any = None, model_kwargs: Mapping | None = None,
         apply_kwargs: Mapping | None = None, normalization: Mapping | None = None,
         source: Mapping | None = None) -> dict:
    """Writes a `.dqz` export; returns its size report (`dq_jax.export.size_report`).

    Args:
      path: output file.
      model: a `dq_jax.models` name (must equal `config.model`), a user module reference
        `"package.module:attr"` (the class, or a factory returning the module, called with
        `model_kwargs`), or a `flax.linen.Module` instance whose class is importable and whose
        fields are JSON values (they are recorded as its kwargs).
      variables: {'params', 'codes', 'batch_stats', 'quant_stats'} (other collections are
        ignored). The file is checked against the rebuilt module before it is written.
      num_classes, image_shape: what the model was built/trained for ([H, W, C]).
      config: the training config (ConfigDict or dict), stored whole; required for registry
        names, optional for user modules.
      model_kwargs: JSON keyword arguments of a `"package.module:attr"` reference.
      apply_kwargs: JSON keyword arguments of `module.apply` at inference (default
        `{"train": False}`).
      normalization: {'mean', 'std', 'pixel_max'} of the dataset (raw pixel scale), used by
        predict to normalise raw pixels and check input ranges; None if unknown.
      source: free-form provenance (workdir, step).
    """
    from dq_jax.export.sizes import size_report
    blob = encode(model=model, config=config, variables=variables, num_classes=num_classes,
                  image_shape=image_shape, model_kwargs=model_kwargs, apply_kwargs=apply_kwargs,
                  normalization=normalization, source=source)
    exported = _parse(blob, str(path))
    if exported.is_user_model:
        check_model(exported)  # a file that predict would refuse is never written
    with open(path, "wb") as f:
        f.write(blob)
    return size_report(exported.header, file_size=len(blob))


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
    def is_user_model(self) -> bool:
        return is_user_model(self.model_name)

    @property
    def model_kwargs(self) -> dict:
        return dict(self.header.get("model_kwargs") or {})

    @property
    def apply_kwargs(self) -> dict:
        """Keyword arguments of `module.apply` at inference (files before them: train=False)."""
        return dict(self.header.get("apply_kwargs", DEFAULT_APPLY_KWARGS))

    @property
    def training_quant(self) -> QuantConfig | None:
        """The training QuantConfig (None for a user module, whose layers carry their own)."""
        return quant_of(self.config) if "quant" in self.config else None

    @property
    def runtime_quant(self) -> QuantConfig | None:
        """The QuantConfig the runtime model is built with (weights='dq' if quantized)."""
        q = self.training_quant
        if q is None:
            return None
        return q if q.weights == "float" else q.replace(weights=RUNTIME_WEIGHTS)

    @property
    def layers(self) -> list[dict]:
        return self.header["layers"]

    def create_model(self) -> nn.Module:
        """The runtime flax model: the user module rebuilt from its reference, or the
        registry model with weights='dq'."""
        if self.is_user_model:
            try:
                return resolve_model(self.model_name, self.model_kwargs)
            except ValueError as e:
                _fail(self.path, str(e).rstrip("."), "Or pass the module itself "
                      "(dq_jax.predict.load_model(path, module=...)).")
        from dq_jax import mixed
        cfg = self.config
        return mixed.create_model(
            {**cfg, "model": self.model_name}, self.runtime_quant, self.num_classes,
            self.image_shape,
            dtype=jnp.bfloat16 if cfg.get("half_precision", False) else jnp.float32,
            **dict(cfg.get("model_kwargs") or {}))

    def variables(self) -> dict:
        """The runtime variables as nested numpy dicts, codes unpacked with numpy."""
        by_name = dict(self.tensors)
        for name, (data, bits, shape) in self.packed.items():
            by_name[name] = unpack_bits(data, bits, int(math.prod(shape))).reshape(shape)
        return unflatten_names(by_name)

    def size_report(self) -> dict:
        from dq_jax.export.sizes import size_report
        return size_report(self.header, file_size=self.file_size)


def unflatten_names(flat: Mapping[str, Any]) -> dict:
    """{'params/conv/kernel': x} -> {'params': {'conv': {'kernel': x}}}."""
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _fail(path: str, what: str, fix: str) -> None:
    raise ValueError(f"{path}: {what}. {fix}")


_REEXPORT = "Re-export the model with `python -m dq_jax.export --workdir=... --out=...`."


def _parse_head(head: bytes, size: int, path: str) -> tuple[dict, int, int]:
    """Checks the prefix and header (`head`: the file's first bytes, at least through the
    header when the prefix is sound) against the file's `size`; returns the header, the
    payload's start and its size. Every size claim is checked before the payload is read."""
    if size < PREFIX_SIZE or len(head) < PREFIX_SIZE:
        _fail(path, f"file is truncated or not a dq_jax export: {size} bytes, shorter than "
              f"the {PREFIX_SIZE}-byte .dqz prefix", _REEXPORT)
    magic, version, hlen, hsha = _PREFIX.unpack_from(head, 0)
    if magic != MAGIC:
        _fail(path, f"not a dq_jax .dqz export (magic bytes {magic!r}, expected {MAGIC!r})",
              "Pass a file written by `python -m dq_jax.export` / dq_jax.export.save.")
    if version not in READ_VERSIONS:
        _fail(path, f"unsupported .dqz format version {version} (this dq_jax reads versions "
              f"{', '.join(map(str, READ_VERSIONS))})", "Load it with the dq_jax version that wrote it, or "
              + _REEXPORT[0].lower() + _REEXPORT[1:])
    if PREFIX_SIZE + hlen > size:
        _fail(path, f"file is truncated: header needs {hlen} bytes but only "
              f"{size - PREFIX_SIZE} follow the prefix", _REEXPORT)
    if hlen > MAX_HEADER_BYTES:
        _fail(path, f"header claims {hlen} bytes, more than the {MAX_HEADER_BYTES} any export "
              "needs (not read)", _REEXPORT)
    hjson = head[PREFIX_SIZE:PREFIX_SIZE + hlen]
    if hashlib.sha256(hjson).digest() != hsha:
        _fail(path, "header checksum mismatch (sha256): the file is corrupted", _REEXPORT)
    try:
        header = json.loads(hjson.decode("utf-8"))
        payload_size = int(header["payload"]["size"])
        str(header["payload"]["sha256"])
        list(header["tensors"])
    except (ValueError, KeyError, TypeError) as e:
        _fail(path, f"header is not valid .dqz JSON ({type(e).__name__}: {e})", _REEXPORT)
    if header.get("format") != FORMAT_NAME or header.get("format_version") != version:
        _fail(path, f"header format {header.get('format')!r} v{header.get('format_version')} "
              f"does not match the prefix ({FORMAT_NAME!r} v{version})", _REEXPORT)
    if "numerics_sha256" in header and header["numerics_sha256"] != numerics_digest(header):
        _fail(path, "header fields that set the model's numbers (config, normalization, quant, "
              "layers, tensors, payload) do not match its numerics_sha256: the header was "
              "edited", _REEXPORT)
    start = PREFIX_SIZE + hlen
    if size - start < payload_size:
        _fail(path, f"file is truncated: payload has {size - start} of {payload_size} bytes",
              _REEXPORT)
    if size - start > payload_size:
        _fail(path, f"{size - start - payload_size} unexpected bytes after the payload "
              "(file was appended to or is not one export)", _REEXPORT)
    return header, start, payload_size


def _parse(blob: bytes | bytearray, path: str, expected_model: str | None = None) -> Export:
    size = len(blob)
    header, start, payload_size = _parse_head(blob, size, path)
    table = list(header["tensors"])
    payload = memoryview(blob)[start:]
    if hashlib.sha256(payload).hexdigest() != str(header["payload"]["sha256"]):
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
            expect = tensor_nbytes(enc, shape, rec["dtype"], rec.get("bits"))
        except (KeyError, TypeError, ValueError) as e:
            _fail(path, f"bad tensor record {rec!r} ({e})", _REEXPORT)
        compressed = "compression" in rec
        if compressed and (header["format_version"] < 2 or rec["compression"] != COMPRESSION):
            _fail(path, f"tensor {name} has compression {rec['compression']!r}, which a "
                  f"version {header['format_version']} file cannot hold (version 2: "
                  f"{COMPRESSION!r})", _REEXPORT)
        if (nbytes != expect and not (compressed and 0 < nbytes)) or off < 0 \
                or off + nbytes > payload_size:
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
        data = payload[off:off + nbytes]
        if compressed:
            data = _decompress(bytes(data), expect, name, path)
        data = np.frombuffer(data, np.uint8)
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
        user = is_user_model(header["model"])
        if user and header.get("quant") is None and "quant" not in header["config"]:
            config_quant = recorded = {}  # a user module's layers carry their own configs
        else:
            config_quant = dataclasses.asdict(quant_of(header["config"]))
            recorded = dict(header["quant"])
        num_classes, image_shape = header["num_classes"], header["image_shape"]
        _json_kwargs(header.get("model_kwargs"), "header model_kwargs")
        _json_kwargs(header.get("apply_kwargs"), "header apply_kwargs")
    except (KeyError, TypeError, ValueError) as e:
        _fail(path, f"header lacks a valid model/config/quant/num_classes/image_shape "
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
    given = module is not None
    module = exported.create_model() if module is None else module
    if not isinstance(module, nn.Module):
        raise ValueError(f"module={module!r} is not a flax.linen Module.")
    bits = (f", {exported.runtime_quant.weight_bits}-bit weights"
            if exported.runtime_quant is not None else "")
    facts = f"num_classes={exported.num_classes}, image_shape {list(exported.image_shape)}{bits}"
    where = (f"the given module (the file's: {facts})" if given else
             f"the {exported.model_name} model rebuilt from its header ({facts})")
    fix = ("Pass the module this file was exported from (same architecture and settings)."
           if given else _REEXPORT)
    try:
        shapes = jax.eval_shape(lambda: module.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *exported.image_shape), jnp.float32),
            **exported.apply_kwargs))
    except Exception as e:  # noqa: BLE001  (a model that cannot be built from this header)
        _fail(path, f"cannot rebuild {where} ({type(e).__name__}: "
              f"{' '.join(str(e).split())[:200]})", fix)
    shapes = {c: flax.core.unfreeze(shapes.get(c, {})) for c in COLLECTIONS}
    layers = quantized_layers(flat(shapes["params"]), flat(shapes[CODES]),
                               exported.runtime_quant)
    expected = {rec["name"]: rec for rec in layout(
        {n: v for n, v in runtime_flat(shapes, layers).items()}, layers)}
    table = {rec["name"]: rec for rec in exported.header["tensors"]}
    for name in sorted(set(expected) | set(table)):
        want, have = expected.get(name), table.get(name)
        if have is None:
            _fail(path, f"tensor {name} of {where} is missing from the file", fix)
        if want is None:
            _fail(path, f"tensor {name} in the file is not a variable of {where}", fix)
        for field in ("shape", "encoding", "dtype", "bits"):
            if want.get(field) != have.get(field):
                _fail(path, f"tensor {name} has {field} {have.get(field)!r}, {where} expects "
                      f"{want.get(field)!r}", fix)
    training = exported.training_quant
    want_layers = {}
    for layer in layers:
        rec = layer.record()
        if training is not None and training.weights in ("latent_ste", "lsq"):
            rec["method"] = training.weights
        if training is not None and training.weights == "lsq":
            rec["grid_offset"] = int(wq.lsq_bounds(layer.bits)[0])
        want_layers[rec["module"]] = rec
    have_layers = {rec.get("module"): rec for rec in exported.layers}
    for module_name in sorted(set(want_layers) | set(have_layers)):
        want, have = want_layers.get(module_name), have_layers.get(module_name)
        if want is None or have is None:
            _fail(path, f"layer record {module_name} is {'missing' if have is None else 'extra'}"
                  f" for {where}", fix)
        for field in ("method", "bits", "groups", "shape", "num_weights", "grid_offset"):
            if want.get(field) != have.get(field):
                _fail(path, f"layer {module_name} records {field} {have.get(field)!r}, "
                      f"{where} has {want.get(field)!r}", fix)


def load(path: str, expected_model: str | None = None) -> Export:
    """Reads and validates a `.dqz` file (see the module docstring).

    Raises:
      FileNotFoundError: no such file.
      ValueError: truncated, wrong magic, wrong format version, corrupted
        (checksum), inconsistent, or (with `expected_model`) another model.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(PREFIX_SIZE)
        if len(head) == PREFIX_SIZE:  # the header, if the file holds it (checked below)
            head += f.read(min(_PREFIX.unpack_from(head, 0)[2], size - PREFIX_SIZE,
                               MAX_HEADER_BYTES))
        _parse_head(head, size, str(path))  # refuses a file whose sizes do not add up unread
        blob = bytearray(size)
        blob[:len(head)] = head
        f.readinto(memoryview(blob)[len(head):])
    return _parse(blob, str(path), expected_model)
