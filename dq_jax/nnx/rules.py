"""`quantize_model(model, rules)` for Flax NNX: the Linen rules (`dq_jax.rules`) over an NNX
module's `nnx.Conv` / `nnx.Linear` layers.

An NNX module holds its weights, so this is a conversion, done in place: each layer whose path
(`"/".join(str(k) for k in path)`, e.g. `"blocks/0/conv"`) fully matches a rule becomes a
`dq_jax.nnx.QuantConv` / `QuantLinear` at the same attribute, its levels and codes fitted to the
layer's *current* kernel (Lloyd levels + nearest codes, as `dq_jax.from_float` does for Linen):
on a trained float model that is the paper's float -> DQ conversion. First match wins, unmatched
layers stay as they are, a rule that matches no layer is an error.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

from flax import nnx

from dq_jax.nnx.layers import QuantConv, QuantLinear, _QuantMixin
from dq_jax.quant.config import QuantConfig
from dq_jax.rules import QuantRule, _check_rules, match

_TWINS: dict[type, type] = {nnx.Conv: QuantConv, nnx.Linear: QuantLinear}


def _twin(layer: nnx.Module, quant: QuantConfig) -> nnx.Module:
    """`layer` (an `nnx.Conv` / `nnx.Linear`) as our layer with `quant`, from its weights."""
    cls = _TWINS[type(layer)]
    names = [n for n in inspect.signature(type(layer).__init__).parameters
             if n not in ("self", "rngs") and hasattr(layer, n)]
    twin = cls(**{n: getattr(layer, n) for n in names}, quant=QuantConfig.float(),
               rngs=nnx.Rngs(0))
    twin.kernel.set_value(layer.kernel.get_value())
    if layer.bias is not None:
        twin.bias.set_value(layer.bias.get_value())
    twin._setup_quant(quant, False)  # the float kernel becomes levels + codes
    return twin


def _walk(model: Any, path: tuple) -> Any:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def quantize_model(model: nnx.Module, rules: Sequence[QuantRule]) -> nnx.Module:
    """Quantizes `model`'s `nnx.Conv` / `nnx.Linear` layers by `rules`, in place; returns it.

    Layers that are `dq_jax.nnx` layers already keep their config unless it is float. Layer
    variables keep their paths (`linen_variables(model)` then has the Linen layers' layout).
    """
    rules = _check_rules(rules)
    layers = [(path, node) for path, node in nnx.iter_graph(model)
              if isinstance(node, (nnx.Conv, nnx.Linear)) and path]
    won, replaced = set(), {}
    for path, layer in layers:
        where = "/".join(str(k) for k in path)
        i = match(rules, where)
        if i is None:
            continue
        quant = rules[i].quant
        if isinstance(layer, _QuantMixin):
            if layer.quant.is_float:
                won.add(i)
                if not quant.is_float:
                    layer._setup_quant(quant, layer.use_running_average)
            continue
        if type(layer) not in _TWINS:
            raise ValueError(
                f"quantize_model: rule {rules[i].module_path!r} matches {where}, a "
                f"{type(layer).__name__} (a subclass of nnx.Conv/nnx.Linear), which it cannot "
                "replace; narrow the rule, or build that layer with dq_jax.nnx.QuantConv.")
        won.add(i)
        if quant.is_float:
            continue
        twin = _twin(layer, quant)
        parent, key = _walk(model, path[:-1]), path[-1]
        if isinstance(key, int):
            parent[key] = twin
        else:
            setattr(parent, key, twin)
        replaced[id(layer)] = where
    unused = [r.module_path for i, r in enumerate(rules) if i not in won]
    if unused:
        raise ValueError(
            f"quantize_model: rule(s) {unused} match no nnx.Conv/nnx.Linear layer (or only "
            "layers an earlier rule took); the layer paths are "
            f"{sorted('/'.join(str(k) for k in p) for p, _ in layers)}.")
    shared = [replaced[id(n)] for _, n in nnx.iter_graph(model) if id(n) in replaced]
    if shared:
        raise ValueError(f"quantize_model: layer(s) {shared} are referenced from several places "
                         "(shared weights); build them with dq_jax.nnx.QuantConv / QuantLinear.")
    return model
