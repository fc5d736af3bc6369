"""Training variables -> the runtime form every export stores (docs/format.md).

All three quantized weight methods export their *effective* kernel `W_q` as integer codes
plus levels `[G, L]`: `dq` as trained; `latent_ste` codes = nearest level of the latent kernel
(what its forward uses); `lsq` codes `round(clip(w / s, -Qn, Qp)) + Qn` with levels
`s * (c - Qn)`, `s` the step as the forward computes it, under `jax.jit` like the forward, so
`levels[codes]` equals the LSQ forward's `W_q` bit for bit. The runtime model is therefore
always rebuilt with `weights='dq'`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dq_jax.export.bitpack import pack_bits, packed_nbytes
from dq_jax.layers import CODES, QUANT_STATS
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig
from dq_jax.trees import flatten as flat

LEVELS, STEP = wq.LEVELS, wq.STEP
COLLECTIONS = ("params", CODES, "batch_stats", QUANT_STATS)
RUNTIME_WEIGHTS = "dq"

PyTree = Any


def _shape(leaf: Any) -> tuple[int, ...]:
    """Shape of an array, a jax.ShapeDtypeStruct or a Python scalar."""
    return tuple(int(d) for d in getattr(leaf, "shape", np.shape(leaf)))


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


def quantized_layers(flat_params: Mapping, flat_codes: Mapping,
                      quant: QuantConfig | Mapping[tuple, QuantConfig] | None
                      ) -> list[LayerInfo]:
    """Finds the quantized kernels from the variable structure (shapes only). `quant`: the
    training config, or module path tuple -> each layer's (mixed widths: an LSQ layer's bits
    are not in its shapes)."""
    layers = []
    by_layer = quant if isinstance(quant, Mapping) else None
    for path, leaf in flat_params.items():
        module = path[:-1]
        if path[-1] == LEVELS:
            g, num_levels = _shape(leaf)
            where = "/".join(module)
            if module + ("kernel",) in flat_codes:
                method, shape = "dq", _shape(flat_codes[module + ("kernel",)])
            elif module + ("kernel",) in flat_params:
                method, shape = "latent_ste", _shape(flat_params[module + ("kernel",)])
            else:
                raise ValueError(f"layer {where} has {LEVELS} but neither integer codes nor a "
                                 "latent kernel; the variables are incomplete.")
            layers.append(LayerInfo(module, method, _bits_of(num_levels, where), int(g),
                                    tuple(int(s) for s in shape), None))
        elif path[-1] == STEP:
            where = "/".join(module)
            if by_layer is not None:
                quant = by_layer.get(module)
            if quant is None or quant.weights != "lsq":
                raise ValueError(
                    f"layer {where} is an LSQ layer (has {STEP}); exporting it needs the "
                    "training QuantConfig with weights='lsq' (its weight_bits).")
            qn, _ = wq.lsq_bounds(quant.weight_bits)
            shape = tuple(int(s) for s in _shape(flat_params[module + ("kernel",)]))
            layers.append(LayerInfo(module, "lsq", quant.weight_bits, int(_shape(leaf)[0]),
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


def runtime_flat(variables: Mapping, layers: Sequence[LayerInfo]) -> dict[str, jax.Array]:
    """name -> array of the runtime (weights='dq') variables; traceable (eval_shape)."""
    flats = {c: flat(variables.get(c, {})) for c in COLLECTIONS}
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
    for collection, leaves in (("params", params), (CODES, codes),
                                  ("batch_stats", flats["batch_stats"]),
                                  (QUANT_STATS, flats[QUANT_STATS])):
        for path in sorted(leaves):
            out[_name(collection, path)] = leaves[path]
    return out


def _encoding(name: str, dtype: Any, bits_by_codes: Mapping[str, int]) -> tuple[str, str]:
    if name in bits_by_codes:
        return "bitpack", "uint8"
    if jnp.issubdtype(dtype, jnp.floating):
        return "float32", "float32"
    return "raw", np.dtype(dtype).newbyteorder("<").str


def tensor_nbytes(encoding: str, shape: Sequence[int], dtype: str, bits: int | None) -> int:
    n = int(math.prod(shape))
    if encoding == "bitpack":
        return packed_nbytes(n, bits)
    return n * np.dtype(dtype).itemsize


def layout(runtime: Mapping[str, Any], layers: Sequence[LayerInfo]) -> list[dict]:
    """The tensor table (without offsets' data), in payload order."""
    bits_by_codes = {_name(CODES, l.module + ("kernel",)): l.bits for l in layers}
    table, offset = [], 0
    for name, leaf in runtime.items():
        dtype_ = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        encoding, dtype = _encoding(name, dtype_, bits_by_codes)
        shape = [int(s) for s in _shape(leaf)]
        bits = bits_by_codes.get(name)
        nbytes = tensor_nbytes(encoding, shape, dtype, bits)
        rec = {"name": name, "encoding": encoding, "dtype": dtype, "shape": shape,
               "offset": offset, "nbytes": nbytes}
        if bits is not None:
            rec["bits"] = bits
        table.append(rec)
        offset += nbytes
    return table


def encode_tensor(rec: dict, value: Any) -> bytes:
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


def config_dict(config: Any) -> dict:
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def quant_of(config: Mapping) -> QuantConfig:
    """The training QuantConfig of a config dict."""
    return QuantConfig.from_mapping(dict(config["quant"]))
