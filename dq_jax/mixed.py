"""Mixed widths in the training program: `config.first_last_bits`, `config.rules` (and the
allocator's `config.bit_budget`) -> `rules.QuantOverride`s over a zoo model.

Why a module of its own: the program, the exporter and `predict` must rebuild the *same*
model from a config, so the translation lives in one place; the matching itself is
`dq_jax.rules`'.

Order: `config.rules` in the given order, then the first and last layer (`first_last_bits`,
else float unless `quantize_first_last`); every override matching a layer applies to the
layer's own config (`config.quant`, with the grid sign its architecture fixes), and where two
set the same field the earlier wins: `config.rules` over `first_last_bits`, and both over
`config.allocation` (the widths `dq_jax.allocation` chose for `config.bit_budget`, which covers
only the layers the other two leave at `config.quant`).

The first layer's input: with `first_last_bits=b` the first conv's weights *and its input*
(the normalised image) are quantized at b bits, on a signed grid fitted on the calibration
batch, like every other layer's input: the whole network then runs on b-bit integers. (An
8-bit image normalised per channel already has at most 256 values per channel; a fitted 8-bit
grid keeps its error within half a step of that grid.)
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dq_jax import models, rules
from dq_jax.quant.config import QuantConfig

FLOAT_CHANGES = (("acts", "float"), ("weights", "float"))


def uses_rules(config: Mapping) -> bool:
    """True when the config asks for per-layer widths (else the model is built as before
    these keys existed, bit for bit)."""
    return (bool(config.get("first_last_bits", 0)) or bool(config.get("rules") or ())
            or bool(config.get("bit_budget", 0.0)) or bool(config.get("allocation") or ()))


def first_last_paths(model: nn.Module, image_shape: Sequence[int]) -> tuple[str, str]:
    """Module paths of the first and the last conv/dense layer called (the stem and head)."""
    paths = list(rules.layer_configs(model, jnp.zeros((1, *image_shape), jnp.float32),
                                     train=False))
    return paths[0], paths[-1]


def fan_ins(model: nn.Module, image_shape: Sequence[int]) -> dict[str, int]:
    """Module path -> weights per output channel (the kernel's size over its last axis) of
    every conv/dense layer, from an abstract init (shapes only)."""
    out: dict[str, int] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            fan = int(call_args[0].shape[-1])
            if isinstance(module, nn.Conv):
                size = module.kernel_size
                fan = fan // module.feature_group_count * int(
                    np.prod((size,) if isinstance(size, int) else size))
            out["/".join(module.scope.path)] = fan
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                          jnp.zeros((1, *image_shape), jnp.float32),
                                          train=False))
    return out


def edge_overrides(config: Mapping, base: nn.Module, image_shape: Sequence[int]
                   ) -> list[rules.QuantOverride]:
    """`first_last_bits=b` as overrides of the stem and the head. Where per-channel levels
    cannot exist (a channel with fewer weights than the 2^b levels: the 3x3x3 stem of a
    CIFAR ResNet holds 27 per channel, its 64->10 head 64, both under 8 bits' 256) that layer
    gets one level set (`granularity='per_layer'`, as LSQ's 8-bit first/last keep one step):
    the convention works on every model instead of stopping at start."""
    bits = int(config.get("first_last_bits", 0))
    first, last = first_last_paths(base, image_shape)
    changes = {"weight_bits": bits, "act_bits": bits}
    if config["quant"].get("granularity") != "per_channel":
        return [rules.QuantOverride(f"{re.escape(first)}|{re.escape(last)}", changes)]
    fans = fan_ins(base, image_shape)
    return [rules.QuantOverride(
        re.escape(path), dict(changes, **({"granularity": "per_layer"}
                                          if fans[path] < 2 ** bits else {})))
        for path in dict.fromkeys((first, last))]


def program_overrides(config: Mapping, base: nn.Module,
                      image_shape: Sequence[int]) -> tuple[rules.QuantOverride, ...]:
    """The overrides the config's mixed-width keys give over `base` (a zoo model built with
    its first and last layer quantized)."""
    out = list(rules.overrides_from_pairs(tuple(config.get("rules") or ())))
    if int(config.get("first_last_bits", 0)):
        out.extend(edge_overrides(config, base, image_shape))
    elif not config.get("quantize_first_last", False):
        first, last = first_last_paths(base, image_shape)
        out.append(rules.QuantOverride(f"{re.escape(first)}|{re.escape(last)}",
                                       dict(FLOAT_CHANGES)))
    if config.get("bit_budget", 0.0) and not config.get("allocation"):
        raise ValueError("config.bit_budget needs the allocation it leads to: train with "
                         "dq_jax.train.train_and_evaluate (it computes config.allocation), or "
                         "set config.allocation=((layer path, bits), ...).")
    out.extend(rules.overrides_from_allocation(tuple(config.get("allocation") or ())))
    return tuple(out)


def create_model(config: Mapping, quant: QuantConfig, num_classes: int,
                 image_shape: Sequence[int] | None = None, **create_kwargs: Any) -> nn.Module:
    """The zoo model `config` describes, with its mixed-width overrides (if any) applied by
    `rules.quantize_model`; without them exactly `models.create(...)` as before.

    `create_kwargs` go to `models.create` (dtype, model_kwargs' entries)."""
    if not uses_rules(config):
        return models.create(config["model"], num_classes, quant=quant,
                             quantize_first_last=bool(config.get("quantize_first_last", False)),
                             **create_kwargs)
    base = models.create(config["model"], num_classes, quant=quant, quantize_first_last=True,
                         **create_kwargs)
    shape = tuple(image_shape or models.INPUT_SHAPES[config["model"]])
    model = rules.quantize_model(base, program_overrides(config, base, shape))
    try:
        quant_by_layer(model, shape)  # a rule matching no layer fails here, naming the paths
    except ValueError as e:  # one line: without the note JAX adds to errors under tracing
        raise ValueError(f"per-layer widths (config.rules, first_last_bits, bit_budget): "
                         f"{str(e).splitlines()[0]}") from None
    return model


def quant_by_layer(model: nn.Module, image_shape: Sequence[int]) -> dict[tuple[str, ...],
                                                                         QuantConfig]:
    """Module path tuple -> the layer's QuantConfig (for per-layer conversion and export)."""
    configs = rules.layer_configs(model, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return {tuple(p.split("/")): q for p, q in configs.items()}


def widths_by_layer(config: Mapping, model: nn.Module, image_shape: Sequence[int]
                    ) -> dict[tuple[str, ...], QuantConfig] | None:
    """`quant_by_layer` when the config has per-layer widths, else None."""
    return quant_by_layer(model, image_shape) if uses_rules(config) else None


def _width(q: QuantConfig) -> dict:
    return {"weights": q.weights, "weight_bits": None if q.weights == "float" else q.weight_bits,
            "acts": q.acts, "act_bits": None if q.acts == "float" else q.act_bits}


def format_widths(layer_quant: Mapping[tuple[str, ...], QuantConfig]) -> str:
    """One line per conv/dense layer: its path, W<b>A<b> (or float) and the weights' level
    sets (per_layer / per_channel: first_last_bits may set per_layer on its own)."""
    def kind(q: QuantConfig) -> str:
        if q.is_float:
            return "float"
        w = "Wfloat" if q.weights == "float" else f"{q.weights} W{q.weight_bits}"
        sets = "" if q.weights == "float" else f"  {q.granularity}"
        return f"{w} A{'float' if q.acts == 'float' else q.act_bits}{sets}"
    return "\n".join(f"  {'/'.join(p):<40}{kind(q)}" for p, q in layer_quant.items())


def results_entries(config: Mapping, model: nn.Module, image_shape: Sequence[int]) -> dict:
    """results.json's per-layer widths (`layer_widths`), only for a config with per-layer
    widths (a run without them writes the same results.json as before)."""
    layer_quant = widths_by_layer(config, model, image_shape)
    if layer_quant is None:
        return {}
    return {"layer_widths": {"/".join(p): _width(q) for p, q in layer_quant.items()}}
