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

`QuantOverride(module_path, changes)` is the other kind of rule: it changes fields of the config
the layer already has (a zoo layer's, with the grid sign its architecture fixed; a plain
`nn.Conv` / `nn.Dense` has `QuantConfig.float()`), e.g. `{"weight_bits": 8, "act_bits": 8}`. Overrides
compose: every override matching a layer applies, and where two set the same field the earlier
one wins (so `{"granularity": "per_layer"}` on the head and the 8 bits of first/last both hold).
The training program's `config.rules` and `config.first_last_bits` are overrides; a layer the
model configured itself is matched against overrides only (a `QuantRule` never replaces it).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax

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


@dataclasses.dataclass(frozen=True)
class QuantOverride:
    """Layers whose module path fully matches `module_path` get their own config with
    `changes` (field -> value pairs of QuantConfig) applied. Hashable (sorted pairs)."""

    module_path: str
    changes: tuple[tuple[str, Any], ...]

    def __post_init__(self):
        QuantRule(self.module_path, QuantConfig())  # the same regex checks
        changes = dict(self.changes.items() if isinstance(self.changes, dict) else self.changes)
        known = {f.name for f in dataclasses.fields(QuantConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"QuantOverride({self.module_path!r}): unknown QuantConfig "
                             f"field(s) {unknown}; known: {sorted(known)}.")
        QuantConfig().replace(**changes)  # the value checks, with the field named
        object.__setattr__(self, "changes", tuple(sorted(changes.items())))

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.module_path, path) is not None

    def apply(self, quant: QuantConfig) -> QuantConfig:
        return quant.replace(**dict(self.changes))


def _check_rules(rules: Sequence[QuantRule]) -> tuple[QuantRule, ...]:
    if isinstance(rules, QuantRule) or not isinstance(rules, (list, tuple)):
        raise TypeError("rules must be a list of dq_jax.QuantRule(module_path, quant), "
                        f"got {type(rules).__name__}.")
    for i, rule in enumerate(rules):
        if not isinstance(rule, (QuantRule, QuantOverride)):
            raise TypeError(f"rules[{i}] is a {type(rule).__name__}, not a dq_jax.QuantRule.")
    return tuple(rules)


def match(rules: Sequence[QuantRule | QuantOverride], path: str, *,
          overrides_only: bool = False) -> Optional[int]:
    """Index of the first rule matching module path `path` ('a/b/c'), or None; with
    `overrides_only`, the first matching `QuantOverride`."""
    for i, rule in enumerate(rules):
        if overrides_only and not isinstance(rule, QuantOverride):
            continue
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
        # id(float layer) -> (that layer, its twin): a layer called twice reuses its twin. The
        # entry holds the layer itself, so its id cannot pass to another module while this call
        # runs (nn.scan / nn.remat trace their body more than once: the first trace's modules
        # die, and a new one at the same address took a dead twin, whose variables were lost).
        twins: dict[int, tuple[nn.Module, nn.Module]] = {}

        def twin_of(module: nn.Module, quant: QuantConfig) -> nn.Module:
            twins[id(module)] = (module, _quantized_twin(module, quant))
            return twins[id(module)][1]
        layer_paths: list[str] = []

        def interceptor(next_fun: Callable, call_args, call_kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not isinstance(module, (nn.Conv, nn.Dense)):
                return next_fun(*call_args, **call_kwargs)
            seen = twins.get(id(module))
            if seen is not None and seen[0] is module:
                return seen[1](*call_args, **call_kwargs)
            path = "/".join(module.scope.path)
            configured = isinstance(module, _QuantizedKernelMixin) and not module.quant.is_float
            i = match(self.rules, path, overrides_only=configured)
            layer_paths.append(path)
            if configured and i is None:
                return next_fun(*call_args, **call_kwargs)   # configured by the model itself
            if i is None:
                return next_fun(*call_args, **call_kwargs)   # unmatched: stays float
            rule = self.rules[i]
            if isinstance(rule, QuantOverride):
                if not isinstance(module, _QuantizedKernelMixin) and type(module) not in _TWINS:
                    raise ValueError(
                        f"quantize_model: override {rule.module_path!r} matches {path}, a "
                        f"{type(module).__name__} it cannot replace; narrow the rule.")
                own = module.quant if isinstance(module, _QuantizedKernelMixin) \
                    else QuantConfig.float()
                # Every matching override applies; on a field two of them set, the earlier.
                hits = [j for j, r in enumerate(self.rules)
                        if isinstance(r, QuantOverride) and r.matches(path)]
                won.update(hits)
                new = own
                for j in reversed(hits):
                    new = self.rules[j].apply(new)
                if new == own:
                    return next_fun(*call_args, **call_kwargs)
                return twin_of(module, new)(*call_args, **call_kwargs)
            if not _replaceable(module):
                raise ValueError(
                    f"quantize_model: rule {self.rules[i].module_path!r} matches {path}, a "
                    f"{type(module).__name__} (a subclass of nn.Conv/nn.Dense that may change "
                    "its call), which it cannot replace; narrow the rule, or build that layer "
                    "with dq_jax.QuantConv / QuantDense.")
            won.add(i)
            if self.rules[i].quant.is_float:
                return next_fun(*call_args, **call_kwargs)
            return twin_of(module, self.rules[i].quant)(*call_args, **call_kwargs)

        with nn.intercept_methods(interceptor):
            out = self.model(*args, **kwargs)
        unused = [r.module_path for i, r in enumerate(self.rules) if i not in won]
        if unused and self.is_initializing():
            raise ValueError(
                f"quantize_model: rule(s) {unused} match no nn.Conv/nn.Dense layer (or only "
                f"layers an earlier rule took); the layer paths are {sorted(set(layer_paths))}.")
        return out


def layer_configs(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, QuantConfig]:
    """Module path ('a/b') -> the QuantConfig each conv / dense layer of `model` runs with
    (`QuantConfig.float()` for a plain one), in call order, from an abstract
    `model.init(PRNGKey(0), *args, **kwargs)` (shapes only: nothing is computed).

    Why: a mixed-width model's per-layer widths (the start-up summary, the float -> DQ
    conversion, LSQ's export bits) come from here, not from one global config."""
    seen: dict[str, QuantConfig] = {}

    def record(next_fun: Callable, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            path = "/".join(module.scope.path)
            # a twin's call (after its float layer's) overwrites it, keeping the position
            seen[path] = module.quant if isinstance(module, _QuantizedKernelMixin) \
                else QuantConfig.float()
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))
    return seen


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


def overrides_from_pairs(pairs: Sequence, where: str = "config.rules") -> tuple[
        QuantOverride, ...]:
    """`((regex, {field: value, ...}), ...)` (tuples or JSON lists) -> QuantOverrides; each
    bad entry fails with one line naming it and the expected form."""
    form = (f"{where} must be a tuple of (module-path regex, {{QuantConfig field: value}}) "
            f"pairs, e.g. --{where}='((\"stage1_.*\", {{\"weight_bits\": 4}}),)'")
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, (list, tuple)):
        raise ValueError(f"{form}; got {pairs!r}.")
    out = []
    for i, pair in enumerate(pairs):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not isinstance(pair[0], str) or not isinstance(pair[1], Mapping)):
            raise ValueError(f"{form}; entry {i} is {pair!r}.")
        try:
            out.append(QuantOverride(pair[0], dict(pair[1])))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{i}]: {e}") from None
    return tuple(out)


def overrides_from_allocation(allocation: Sequence) -> tuple[QuantOverride, ...]:
    """`config.allocation` ((layer path, bits), ...; see dq_jax/allocation.py) -> overrides of
    `weight_bits`, one per layer, matched by its exact path."""
    return tuple(QuantOverride(re.escape(str(p)), {"weight_bits": int(b)})
                 for p, b in allocation)
