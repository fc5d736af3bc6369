"""Size reports: exported bytes vs the float32 model, per layer and total."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp

from dq_jax.export.convert import (CODES, COLLECTIONS, LEVELS, RUNTIME_WEIGHTS, config_dict, flat,
                                   layout, quantized_layers, runtime_flat)
from dq_jax.export.bitpack import packed_nbytes
from dq_jax.export.prefix import FORMAT_NAME, PREFIX_SIZE
from dq_jax.quant.config import QuantConfig


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
    # At b bits per weight (before any compression: what the widths alone cost).
    qw = sum(packed_nbytes(int(math.prod(rec["shape"])), rec["bits"])
             for rec in header["tensors"] if rec["encoding"] == "bitpack")
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
    layers = quantized_layers(flat(variables["params"]), flat(variables[CODES]), quant)
    runtime = jax.eval_shape(lambda v: runtime_flat(v, layers), variables)
    table = layout(runtime, layers)
    from dq_jax.configlib import base_config
    cfg = base_config()
    cfg.model, cfg.quant = model_name, dataclasses.asdict(quant)
    header = {"format": FORMAT_NAME, "format_version": 1, "model": model_name,
              "num_classes": num_classes, "image_shape": list(shape),
              "config": config_dict(cfg), "quant": dataclasses.asdict(quant),
              "runtime_weights": RUNTIME_WEIGHTS, "normalization": None,
              "layers": [l.record() for l in layers], "tensors": table,
              "payload": {"size": sum(r["nbytes"] for r in table), "sha256": "0" * 64},
              "numerics_sha256": "0" * 64, "source": {}}
    return size_report(header)


def size_report_for_variables(variables: Mapping, quant: QuantConfig | None) -> dict:
    """The export size report of a model's variables (shapes only: nothing is converted)."""
    variables = {c: flax.core.unfreeze(variables.get(c, {}) or {}) for c in COLLECTIONS}
    layers = quantized_layers(flat(variables["params"]), flat(variables[CODES]), quant)
    runtime = jax.eval_shape(lambda v: runtime_flat(v, layers), variables)
    table = layout(runtime, layers)
    header = {"layers": [l.record() for l in layers], "tensors": table}
    report = size_report(header)
    report["layer_shapes"] = {r["module"]: r["shape"] for r in header["layers"]}
    return report


def format_model_summary(report: Mapping) -> str:
    """Per layer: name, kind (method and bits), kernel shape, weights, bytes at its bit width
    (the `.dqz` payload) and as float32; then the model's total size at its bit widths."""
    shapes = report.get("layer_shapes", {})
    lines = [f"{'layer':<30}{'kind':<14}{'kernel shape':<18}{'weights':>10}{'bytes':>11}"
             f"{'float32 B':>12}"]
    for r in report["rows"]:
        shape = "x".join(map(str, shapes[r["layer"]])) if r["layer"] in shapes else ""
        lines.append(f"{r['layer'][:29]:<30}{r['kind']:<14}{shape:<18}{r['weights']:>10,}"
                     f"{r['export_bytes']:>11,}{r['float32_bytes']:>12,}")
    payload, f32 = report["payload_bytes"], report["float32_bytes"]
    lines.append(f"model size at its bit widths: {payload:,} bytes ({payload / 2**20:.2f} MiB) vs "
                 f"{f32:,} as float32 ({f32 / max(payload, 1):.2f}x smaller); "
                 f"{report['quantized_weights']:,} quantized weights in "
                 f"{len(shapes)} layers")
    return "\n".join(lines)
