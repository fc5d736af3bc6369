"""Quantization by rules: `quantize_model(model, [QuantRule(module_path, quant), ...])`.

The model stays plain Flax (Qwix's convention): it may hard-code `nn.Conv` / `nn.Dense`. While
the returned module runs, a Flax method interceptor (`nn.intercept_methods`) replaces each
`nn.Conv` / `nn.Dense` call whose module path matches a rule by a `QuantConv` / `QuantDense`
with the same fields, bound to the *same scope*: the layer keeps its path, so the float model's
`params/<path>/kernel` becomes `params/<path>/kernel_levels` + `codes/<path>/kernel` and a float
checkpoint of the same model converts by name (`dq_jax.conversion.from_float`).

Matching: `re.fullmatch(rule.module_path, "/".join(path))` (e.g. `"ResNetBlock_0/Conv_1"`),
first matching rule wins, unmatched layers stay float. A rule that wins no layer during `init`
is an error (a misspelt path would otherwise leave the model float without a word). Layers
that are `QuantConv` / `QuantDense` already (the zoo, `conv=partial(QuantConv, ...)`) keep
their own config unless it is float (`QuantConfig.float()`, e.g. `dq_jax.models.create(name,
...)` without `quant`), in which case a matching rule quantizes them too.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn

from dq_jax.layers import QuantConv, QuantDense, _QuantizedKernelMixin
from dq_jax.quant.config import QuantConfig

# Float layer class -> its quantized twin (same fields plus `quant`, `train`).
_TWINS: dict[type, type] = {nn.Conv: QuantConv, nn.Dense: QuantDense}


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """Layers whose module path fully matches the regex `module_path` get `quant`.

    Hashable (a field of the `quantize_model` module, a static jit argument).
    """

    module_path: str
    quant: QuantConfig

    def __post_init__(self):
        if not isinstance(self.module_path, str):
            raise TypeError(f"QuantRule.module_path={self.module_path!r} must be a regex string.")
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise ValueError(f"QuantRule.module_path={self.module_path!r} is not a valid regex "
                             f"({e}).") from None
        if not isinstance(self.quant, QuantConfig):
            raise TypeError(f"QuantRule({self.module_path!r}).quant must be a dq_jax QuantConfig, "
                            f"got {type(self.quant).__name__}.")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.module_path, path) is not None


def _check_rules(rules: Sequence[QuantRule]) -> tuple[QuantRule, ...]:
    if isinstance(rules, QuantRule) or not isinstance(rules, (list, tuple)):
        raise TypeError("rules must be a list of dq_jax.QuantRule(module_path, quant), "
                        f"got {type(rules).__name__}.")
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rules[{i}] is a {type(rule).__name__}, not a dq_jax.QuantRule.")
    return tuple(rules)


def match(rules: Sequence[QuantRule], path: str) -> Optional[int]:
    """Index of the first rule matching module path `path` ('a/b/c'), or None."""
    for i, rule in enumerate(rules):
        if rule.matches(path):
            return i
    return None


def _replaceable(module: nn.Module) -> bool:
    """An `nn.Conv` / `nn.Dense` a rule may quantize: exactly the Flax class, or one of our
    layers still configured float."""
    if isinstance(module, _QuantizedKernelMixin):
        return module.quant.is_float
    return type(module) in _TWINS


def _quantized_twin(module: nn.Module, quant: QuantConfig) -> nn.Module:
    """`module` as a QuantConv/QuantDense configured with `quant`, bound to its own scope."""
    if isinstance(module, _QuantizedKernelMixin):
        cls = type(module)
        kwargs = {"quant": quant}
    else:
        cls = _TWINS[type(module)]
        kwargs = {"quant": quant, "train": None}
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name", "quant")}
    fields.update(kwargs)
    return cls(**fields, parent=module.scope, name=module.name)


class QuantizedModel(nn.Module):
    """`model` with the layers `rules` select quantized; variables at the model's own paths.

    Built by `quantize_model`. The model runs through its `__call__` (every argument passed on;
    `apply(..., method=...)` is not forwarded); its other attributes read through.
    """

    model: nn.Module
    rules: tuple[QuantRule, ...]

    def setup(self):
        nn.share_scope(self, self.model)  # no 'model/' level in any variable path

    def __getattr__(self, name: str) -> Any:
        """The wrapped model's fields read through (`qmodel.dtype`, `qmodel.num_classes`)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        won: set[int] = set()
        twins: dict[int, nn.Module] = {}  # id(float layer) -> its twin (a layer called twice)
        layer_paths: list[str] = []

        def interceptor(next_fun: Callable, call_args, call_kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, (nn.Conv, nn.Dense)):
                return next_fun(*call_args, **call_kwargs)
            if id(module) in twins:
                return twins[id(module)](*call_args, **call_kwargs)
            if isinstance(module, _QuantizedKernelMixin) and not module.quant.is_float:
                return next_fun(*call_args, **call_kwargs)   # configured by the model itself
            path = "/".join(module.scope.path)
            layer_paths.append(path)
            i = match(self.rules, path)
            if i is None:
                return next_fun(*call_args, **call_kwargs)   # unmatched: stays float
            if not _replaceable(module):
                raise ValueError(
                    f"quantize_model: rule {self.rules[i].module_path!r} matches {path}, a "
                    f"{type(module).__name__} (a subclass of nn.Conv/nn.Dense that may change "
                    "its call), which it cannot replace; narrow the rule, or build that layer "
                    "with dq_jax.QuantConv / QuantDense.")
            won.add(i)
            if self.rules[i].quant.is_float:
                return next_fun(*call_args, **call_kwargs)
            twins[id(module)] = twin = _quantized_twin(module, self.rules[i].quant)
            return twin(*call_args, **call_kwargs)

        with nn.intercept_methods(interceptor):
            out = self.model(*args, **kwargs)
        unused = [r.module_path for i, r in enumerate(self.rules) if i not in won]
        if unused and self.is_initializing():
            raise ValueError(
                f"quantize_model: rule(s) {unused} match no nn.Conv/nn.Dense layer (or only "
                f"layers an earlier rule took); the layer paths are {sorted(set(layer_paths))}.")
        return out


def quantize_model(model: nn.Module, rules: Sequence[QuantRule]) -> QuantizedModel:
    """`model` (any Flax Linen module, unmodified) with its `nn.Conv` / `nn.Dense` layers
    quantized by `rules`: first rule whose `module_path` regex fully matches a layer's path
    wins; unmatched layers stay float. Variables keep the float model's paths.

        rules = [QuantRule("conv_init|Dense_0", QuantConfig(weight_bits=8, act_bits=8)),
                 QuantRule(".*", QuantConfig(weight_bits=2, act_bits=2))]
        qmodel = dq_jax.quantize_model(model, rules)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model: model must be a flax.linen Module, got "
                        f"{type(model).__name__} (for NNX use dq_jax.nnx.quantize_model).")
    return QuantizedModel(model=model, rules=_check_rules(rules))

