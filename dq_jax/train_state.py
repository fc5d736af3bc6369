"""`TrainState`: Flax's `train_state.TrainState` for a model with quantized layers.

It carries the DQ-W layers' integer `codes` and the `batch_stats` / `quant_stats` collections
beside `params`, and its `apply_gradients(grads=...)` runs the whole DQ update (float params,
levels + sort, direct code re-assignment) through `tx`, a transformation containing
`dq_jax.optim.dq_optimizer`. The Flax ImageNet example's `train_step` works with four lines
changed (README.md; the whole script's diff: docs/quantize_any_model.md).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import optax
from flax import struct
from flax.training import train_state

from dq_jax import optim
from dq_jax.layers import LEVEL_FIT_DRAW, QUANT_STATS, zero_perturbations

PyTree = Any


def _with_quant_stats(apply_fn: Callable) -> Callable:
    """`apply_fn` that also updates `quant_stats` whenever a call updates `batch_stats`.

    Activation quantizers fit their statistics in train mode exactly like BatchNorm does, so a
    train step written for BatchNorm (`mutable=['batch_stats']`) keeps them current too.
    """
    def apply(variables, *args, mutable=False, **kwargs):
        if (QUANT_STATS in variables and isinstance(mutable, (list, tuple))
                and "batch_stats" in mutable and QUANT_STATS not in mutable):
            mutable = [*mutable, QUANT_STATS]
        return apply_fn(variables, *args, mutable=mutable, **kwargs)

    apply.__wrapped__ = apply_fn
    return apply


class TrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` plus `codes`, `batch_stats`, `quant_stats`.

    `tx` must contain `dq_jax.optim.dq_optimizer` when the model has DQ-W layers (it updates
    the trainable tree `{'params', 'codes'}`). A train step differentiates w.r.t.
    `state.differentiable()` (params and the zero `perturbations` whose gradient is dL/dW_q)
    and applies the model to `state.variables(those)`.
    """

    # Keyword-only: a subclass may redeclare one without a default, as the Flax ImageNet
    # example's TrainState declares `batch_stats: Any`.
    codes: PyTree = struct.field(default_factory=dict, kw_only=True)
    batch_stats: PyTree = struct.field(default_factory=dict, kw_only=True)
    quant_stats: PyTree = struct.field(default_factory=dict, kw_only=True)

    @classmethod
    def create(cls, *, apply_fn: Callable, tx: optax.GradientTransformation,
               variables: PyTree | None = None, params: PyTree | None = None,
               **kwargs: Any) -> "TrainState":
        """From `model.init`'s `variables` (or `params=`, `codes=`, ... given one by one).

        `apply_fn` (e.g. `model.apply`) is wrapped to update `quant_stats` whenever a call
        updates `batch_stats` (see `_with_quant_stats`).
        """
        if variables is not None:
            if params is not None:
                raise ValueError("TrainState.create: give variables= or params=, not both.")
            variables = dict(flax.core.unfreeze(variables))
            variables.pop(optim.PERTURBATIONS, None)
            params = variables.pop("params")
            for name in ("codes", "batch_stats", QUANT_STATS):
                kwargs.setdefault(name, variables.pop(name, {}))
            if variables:
                raise ValueError(f"TrainState.create: unexpected collections {sorted(variables)}"
                                 "; the state holds params, codes, batch_stats and quant_stats.")
        if params is None:
            raise ValueError("TrainState.create needs variables= (model.init's output) or "
                             "params=.")
        codes = kwargs.get("codes", {})
        if any(path[-1] == LEVEL_FIT_DRAW for path in flax.traverse_util.flatten_dict(codes)):
            raise ValueError(
                f"TrainState.create: the codes hold '{LEVEL_FIT_DRAW}' entries (an init under "
                "dq_jax.layers.deferred_level_fits): fit the levels first with "
                "dq_jax.layers.fit_deferred_levels(variables, fits).")
        opt_state = tx.init({optim.PARAMS: params, optim.CODES: codes})
        if jax.tree.leaves(codes) and not _holds_dq_state(opt_state):
            raise TypeError("TrainState.create: the model has DQ-W codes but tx does not "
                            "contain dq_jax.optim.dq_optimizer (a plain optax optimizer would add "
                            "float updates to the integer codes); build tx with dq_optimizer.")
        return cls(step=0, apply_fn=_with_quant_stats(apply_fn), params=params, tx=tx,
                   opt_state=opt_state, **kwargs)

    def differentiable(self) -> dict:
        """`{'params': params, 'perturbations': zeros}`: what a train step differentiates
        (the gradient w.r.t. the zeros, shaped like the codes, is dL/dW_q)."""
        return {optim.PARAMS: self.params,
                optim.PERTURBATIONS: zero_perturbations(self.codes)}

    def variables(self, differentiable: dict | None = None, **collections: PyTree) -> dict:
        """The collections to apply the model with: the state's own, then `differentiable`
        (params, perturbations), then `collections` (any override) on top."""
        if differentiable is not None and (
                not hasattr(differentiable, "keys")
                or not set(differentiable.keys()) <= {optim.PARAMS, optim.PERTURBATIONS}):
            got = sorted(differentiable.keys()) if hasattr(differentiable, "keys") else type(
                differentiable).__name__
            raise ValueError(
                f"TrainState.variables(differentiable): expected {{'params', 'perturbations'}} "
                f"(differentiate w.r.t. state.differentiable()), got {got}; the params alone "
                "would leave the codes without a gradient.")
        out = {optim.PARAMS: self.params, optim.CODES: self.codes,
               "batch_stats": self.batch_stats, QUANT_STATS: self.quant_stats}
        out.update(differentiable or {})
        out.update(collections)
        return out

    def apply_gradients(self, *, grads: PyTree, **kwargs: Any) -> "TrainState":
        """One DQ step: `grads` as `jax.grad` returns them over `differentiable()`
        (`{'params', 'perturbations'}`) or already `{'params', 'codes'}`; `kwargs` replace
        other fields (e.g. the new `batch_stats`, `quant_stats`)."""
        trainable = {optim.PARAMS: self.params, optim.CODES: self.codes}
        updates, opt_state = self.tx.update(optim.dq_grads(grads), self.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        return self.replace(step=self.step + 1, params=new[optim.PARAMS],
                            codes=new[optim.CODES], opt_state=opt_state, **kwargs)


def _holds_dq_state(opt_state: PyTree) -> bool:
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optim.DQState))
    return any(isinstance(x, optim.DQState) for x in nodes)
