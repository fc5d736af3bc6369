"""The update of an NNX model with quantized layers: `value_and_grad` + `Optimizer`.

    tx = dq_jax.optim.dq_optimizer(0.05, 1e-3, key=1)
    optimizer = dq_jax.nnx.Optimizer(model, tx)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = dq_jax.nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)    # floats, levels (+ sort) and codes
        return loss

`Optimizer` mirrors `nnx.Optimizer` (`update(model, grads)`, state held in
`nnx.OptState` variables, a `step` counter) and runs `tx` (containing
`dq_jax.optim.dq_optimizer`) on the trainable tree the Linen train step gives it,
`{'params': params, 'codes': codes}` - params keyed by module path and leaf name, codes
and `dL/dW_q` keyed `module/.../kernel` - so the same key gives the same code update.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dq_jax import optim
from dq_jax.nnx.layers import (CODES_ATTR, PERTURBATION_ATTR, QuantCodes, QuantPerturbation,
                               set_perturbation_hooks)

PyTree = Any


def _key(path: tuple) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def _flat(state: nnx.State) -> dict[tuple, Any]:
    """Original NNX path -> pure value."""
    return {tuple(path): value for path, value in nnx.to_flat_state(nnx.as_pure(state))}


def _nested(flat: dict[tuple, Any]) -> dict:
    return flax.traverse_util.unflatten_dict(flat) if flat else {}


def _renamed(flat: dict[tuple, Any], attr: str) -> dict[tuple[str, ...], Any]:
    """{(..., 'layer', attr): x} -> {('...', 'layer', 'kernel'): x} (the Linen layout)."""
    out = {}
    for path, value in flat.items():
        if path[-1] != attr:
            raise ValueError(f"unexpected {attr!r} variable at {'/'.join(_key(path))}")
        out[_key(path[:-1]) + ("kernel",)] = value
    return out


def params_tree(state: nnx.State) -> dict:
    """Param values as the Linen `params` dict (string keys)."""
    return _nested({_key(p): v for p, v in _flat(state).items()})


def codes_tree(model_or_state: Any) -> dict:
    """QuantCodes values as the Linen `codes` dict ('layer/.../kernel')."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else \
        nnx.state(model_or_state, QuantCodes)
    return _nested(_renamed(_flat(nnx.filter_state(state, QuantCodes)), CODES_ATTR))


def value_and_grad(fn: Callable[..., Any], *, has_aux: bool = False,
                   wrt: nnx.filterlib.Filter = nnx.Param) -> Callable[..., Any]:
    """`nnx.value_and_grad(fn)` for a model with DQ-W layers.

    Returns `g(model, *args, **kwargs) -> (value, grads)` (`((value, aux), grads)`
    with `has_aux`), where `grads` is an `nnx.State` holding the gradients of the
    `wrt` variables (default every `nnx.Param`: float params and levels) and of
    every `QuantPerturbation` (`dL/dW_q`, kernel-shaped): what
    `Optimizer.update` takes. The model's other variables (BatchNorm and
    activation statistics) are updated as `fn` leaves them, as with
    `nnx.value_and_grad`. The hooks are kernel-shaped zeros only during the call.
    """
    grad_fn = nnx.value_and_grad(fn, argnums=nnx.DiffState(0, nnx.Any(wrt, QuantPerturbation)),
                                 has_aux=has_aux)

    def wrapped(model: nnx.Module, *args: Any, **kwargs: Any):
        set_perturbation_hooks(model, wide=True)
        try:
            return grad_fn(model, *args, **kwargs)
        finally:
            set_perturbation_hooks(model, wide=False)

    return wrapped


def grad(fn: Callable[..., Any], *, has_aux: bool = False,
         wrt: nnx.filterlib.Filter = nnx.Param) -> Callable[..., Any]:
    """Like `value_and_grad`, returning only the gradients (and aux)."""
    vg = value_and_grad(fn, has_aux=has_aux, wrt=wrt)

    def wrapped(model: nnx.Module, *args: Any, **kwargs: Any):
        (value, grads) = vg(model, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped


def _variables(tree: PyTree) -> list[nnx.Variable]:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Optimizer(nnx.Pytree):
    """`nnx.Optimizer` for models with quantized layers (`dq_jax.optim.dq_optimizer` maths).

    Args:
      model: the NNX model (its `wrt` params and `QuantCodes` set the state's structure).
      tx: an optax transformation containing `dq_jax.optim.dq_optimizer` (learning rates,
        momentum, weight decay, rounding, the code-update key), e.g. the one the Linen train
        step uses (`dq_jax.train.create_optimizer`).
      wrt: the Param filter the gradients were taken for (as `value_and_grad`).
      key: optional code-update key replacing `tx`'s own in the initial state
        (`dq_jax.optim.with_key`): one `tx`, several seeds.

    Attributes:
      step: `nnx.OptState` step counter.
      opt_state: `tx`'s state (a `dq_jax.optim.DQState` inside), leaves held in
        `nnx.OptState` variables (so `nnx.state(optimizer)` / `nnx.split` carry it).
    """

    def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, *,
                 wrt: nnx.filterlib.Filter = nnx.Param, key: jax.Array | int | None = None):
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError("tx must be an optax transformation containing "
                            f"dq_jax.optim.dq_optimizer; got {type(tx).__name__}.")
        self.tx = tx
        self.wrt = wrt
        self.step = nnx.OptState(jnp.array(0, dtype=jnp.uint32))
        codes = codes_tree(model)
        state = tx.init({optim.PARAMS: params_tree(nnx.state(model, wrt)), optim.CODES: codes})
        if jax.tree.leaves(codes) and not any(
                isinstance(x, optim.DQState)
                for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optim.DQState))):
            raise TypeError("tx must contain dq_jax.optim.dq_optimizer: the model has DQ-W codes, "
                            "which a plain optax optimizer would corrupt with float updates "
                            "(for a float model, use nnx.Optimizer).")
        if key is not None:
            state = optim.with_key(state, key)
        self.opt_state = nnx.data(nnx.training.optimizer.to_opt_state(state))

    def update(self, model: nnx.Module, grads: nnx.State, /) -> dict:
        """One step: float params and levels (optax), codes (direct re-assignment), level sort.

        `grads` are from `dq_jax.nnx.value_and_grad` (Params and `dL/dW_q`).
        Returns the per-layer diagnostics ({'layer/path': {'flip_rate',
        'code_entropy'}}) of `dq_jax.optim.code_diagnostics`.
        """
        param_state = nnx.state(model, self.wrt)
        param_paths = {_key(p): p for p in _flat(param_state)}
        code_values = _flat(nnx.state(model, QuantCodes))
        code_paths = {_key(p[:-1]) + ("kernel",): p for p in code_values}
        params = params_tree(param_state)
        codes = codes_tree(model)
        g_flat = _flat(nnx.filter_state(grads, self.wrt)) if isinstance(grads, nnx.State) else {}
        g_params = _nested({_key(p): v for p, v in g_flat.items()})
        if set(_key(p) for p in g_flat) != set(param_paths):
            raise ValueError(
                "grads do not hold the gradient of every optimized Param: compute them with "
                "dq_jax.nnx.value_and_grad(fn, wrt=...) using this optimizer's `wrt`; missing "
                f"{sorted(set(param_paths) - set(_key(p) for p in g_flat))[:4]}.")
        w_flat = _renamed(_flat(nnx.filter_state(grads, QuantPerturbation)), PERTURBATION_ATTR)
        for path, code_path in code_paths.items():
            shape = code_values[code_path].shape
            if path not in w_flat or w_flat[path].shape != shape:
                raise ValueError(
                    f"grads lack dL/dW_q of {'/'.join(path[:-1])} (kernel-shaped "
                    f"QuantPerturbation gradient); compute them with "
                    "dq_jax.nnx.value_and_grad, not nnx.grad.")
        opt_state = nnx.as_pure(self.opt_state)
        trainable = {optim.PARAMS: params, optim.CODES: codes}
        updates, new_state = self.tx.update(
            {optim.PARAMS: g_params, optim.CODES: _nested(w_flat)}, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        new_params, new_codes = new[optim.PARAMS], new[optim.CODES]
        diagnostics = optim.code_diagnostics(codes, new_codes, new_params)

        flat_new_params = flax.traverse_util.flatten_dict(new_params) if new_params else {}
        flat_new_codes = flax.traverse_util.flatten_dict(new_codes) if new_codes else {}
        updates = [(param_paths[k], v) for k, v in flat_new_params.items()]
        updates += [(code_paths[k], v) for k, v in flat_new_codes.items()]
        nnx.update(model, nnx.from_flat_state(updates))
        holders = _variables(self.opt_state)
        values = jax.tree.leaves(new_state)
        if jax.tree.structure(opt_state) != jax.tree.structure(new_state):
            raise AssertionError("optimizer state changed structure")
        for holder, value in zip(holders, values):
            holder.set_value(value)
        self.step[...] += 1
        return diagnostics
