"""NNX model state <-> the Linen variable dicts (`.dqz` export, Linen checkpoints).

The NNX layers keep the Linen layers' variable names, so an NNX model's state
maps one to one onto `{'params', 'codes', 'batch_stats', 'quant_stats'}`:

    nnx.Param              -> params/<path>
    QuantCodes kernel_codes -> codes/<layer path>/kernel
    nnx.BatchStat          -> batch_stats/<path>
    QuantStats             -> quant_stats/<path>

(`QuantPerturbation`, RNG state and other variables have no Linen counterpart
and are skipped.) `linen_variables(model)` is therefore what `dq_jax.export.save`
takes; `dq_jax.nnx.DigitsCNN` has exactly the layout of the zoo's
`digits_cnn`, so its export runs in `dq_jax.predict` like a Linen one.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dq_jax import export
from dq_jax.layers import CODES, QUANT_STATS
from dq_jax.nnx.layers import CODES_ATTR, QuantCodes, QuantStats, set_perturbation_hooks

_COLLECTIONS = (("params", nnx.Param), (CODES, QuantCodes), ("batch_stats", nnx.BatchStat),
                (QUANT_STATS, QuantStats))


def _linen_paths(model: nnx.Module) -> dict[tuple[str, ...], tuple]:
    """(collection, *linen path) -> NNX path, for every variable that has a Linen twin."""
    out = {}
    for collection, kind in _COLLECTIONS:
        for path, _ in nnx.to_flat_state(nnx.state(model, kind)):
            key = tuple(str(p) for p in path)
            if kind is QuantCodes:
                if key[-1] != CODES_ATTR:
                    raise ValueError(f"unexpected QuantCodes variable {'/'.join(key)}")
                key = key[:-1] + ("kernel",)
            out[(collection,) + key] = tuple(path)
    return out


def linen_variables(model: nnx.Module) -> dict:
    """The model's state as Linen variables: {'params', 'codes', 'batch_stats', 'quant_stats'}."""
    values = {tuple(p): v for p, v in nnx.to_flat_state(nnx.as_pure(nnx.state(model)))}
    out: dict = {c: {} for c, _ in _COLLECTIONS}
    flat = {k: values[p] for k, p in _linen_paths(model).items()}
    out.update(flax.traverse_util.unflatten_dict(flat) if flat else {})
    return out


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> None:
    """Sets the model's state from Linen variables (e.g. a Linen model's, or an export's).

    Every NNX variable with a Linen twin must be present with the same shape and
    dtype; extra entries are an error too (the architectures differ). The dL/dW_q hooks
    are reset to scalar zeros, so an abstract model (`nnx.eval_shape(lambda: Net(...))`,
    no init computed) becomes a complete one.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(
        {c: variables.get(c, {}) for c, _ in _COLLECTIONS if variables.get(c)}))
    paths = _linen_paths(model)
    current = {tuple(p): v for p, v in nnx.to_flat_state(nnx.as_pure(nnx.state(model)))}
    if set(flat) != set(paths):
        missing = sorted("/".join(k) for k in set(paths) - set(flat))[:4]
        extra = sorted("/".join(k) for k in set(flat) - set(paths))[:4]
        raise ValueError(f"variables do not match the NNX model: missing {missing}, "
                         f"unexpected {extra}.")
    updates = []
    for key, path in paths.items():
        value = jnp.asarray(flat[key])
        want = current[path]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"{'/'.join(key)}: {value.dtype}{list(value.shape)} does not match "
                             f"the NNX model's {want.dtype}{list(want.shape)}.")
        updates.append((path, value))
    nnx.update(model, nnx.from_flat_state(updates))
    set_perturbation_hooks(model, wide=False)


def save_dqz(path: str, model: nnx.Module, *, model_name: str, config: Any,
             num_classes: int, image_shape: Sequence[int],
             normalization: Mapping | None = None, source: Mapping | None = None) -> dict:
    """`dq_jax.export.save` of an NNX model (its `linen_variables`); returns the size report.

    `config` needs `quant` (the QuantConfig fields) and may be a plain dict.
    `model_name` is stored in the header: a `dq_jax.models` name whose Linen
    layout the model has (e.g. 'digits_cnn' for `dq_jax.nnx.DigitsCNN`) lets
    `dq_jax.predict` run it; any other name still loads with `load_dqz`.
    """
    cfg = dict(config)
    cfg.setdefault("model", model_name)
    if "quant" not in cfg and not export.is_user_model(model_name):
        raise ValueError(
            f"save_dqz: config={sorted(cfg)} has no 'quant': {model_name!r} is a "
            "dq_jax.models name, rebuilt from config['quant'] (the QuantConfig fields its inner "
            "layers were trained with); pass config={'model': ..., 'quant': "
            "dataclasses.asdict(quant_config)}.")
    return export.save(path, model=model_name, config=cfg,
                       variables=jax.tree.map(np.asarray, linen_variables(model)),
                       num_classes=num_classes, image_shape=image_shape,
                       normalization=normalization, source=source)


def load_dqz(path: str, model: nnx.Module, *, expected_model: str | None = None) -> None:
    """Loads a `.dqz` export into an NNX model built with the export's `runtime_quant`.

    Codes are unpacked and every variable is checked against the model.
    """
    exported = export.load(path, expected_model=expected_model)
    load_linen_variables(model, exported.variables())
