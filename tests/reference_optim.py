"""FROZEN reference: `dq_jax.optim.QuantOptimizer` as of commit 599f4fe, copied verbatim.

Do not edit. `dq_jax.optim.dq_optimizer` (an optax GradientTransformationExtraArgs) replaced
this class; `tests/test_optim.py::test_new_transform_matches_frozen_reference_bitwise` runs both
on the same inputs and compares params, codes and optimizer statistics bitwise, so the port
cannot change results silently. It depends only on `dq_jax.quant.weights` (the shared maths).

Original module docstring:

The optimizer of a direct-quantized model (DESIGN §1.1, "Update").
One update per step, all in optax:
  * float params (biases, BN, float/latent kernels, LSQ steps): SGD with
    momentum; decoupled-from-loss weight decay on kernels only;
  * quantization levels (`kernel_levels`): Adam with their own peak learning
    rate and the same schedule shape. Adam because `dL/dlevels[k]` is a sum
    over every weight at level k, so its scale grows with layer size; Adam's
    per-coordinate normalisation makes the level step size-free;
  * DQ-W codes: `u = SGD-momentum(dL/dW_q + wd * W_q)` (an optax chain whose
    state is one momentum buffer per weight), target `W~ = W_q + u`, then
    direct re-assignment of each code to the levels bracketing `W~`
    (stochastic by default). The level update follows, then levels are sorted
    and codes remapped so a sort never changes `W_q`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from dq_jax.quant import weights as wq

LEVELS = "kernel_levels"
Schedule = Callable[[jax.Array], jax.Array]
PyTree = Any


class QuantOptState(NamedTuple):
    params: optax.OptState
    codes: optax.OptState
    key: jax.Array


def _flat(tree: PyTree) -> dict[tuple[str, ...], jax.Array]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


def _param_label(path: tuple[str, ...], leaf: jax.Array) -> str:
    if path[-1] == LEVELS:
        return "levels"
    if path[-1] == "kernel" and leaf.ndim > 1:
        return "decay"
    return "no_decay"


def dq_layer_paths(codes: PyTree) -> list[tuple[str, ...]]:
    """Module paths of the DQ-W layers (those holding integer codes)."""
    return sorted(path[:-1] for path in _flat(codes))


def effective_kernels(params: PyTree, codes: PyTree) -> dict[tuple[str, ...], jax.Array]:
    """`W_q` of every DQ-W layer, keyed by module path."""
    p = _flat(params)
    return {path[:-1]: wq.gather_levels(p[path[:-1] + (LEVELS,)], c)
            for path, c in _flat(codes).items()}


def code_histogram_entropy(codes: jax.Array, num_levels: int) -> jax.Array:
    """Entropy (bits) of a layer's code histogram: log2(L) when all levels are used evenly."""
    counts = wq.code_counts(codes, num_levels)  # no scatter (a bincount is one)
    p = counts / codes.size
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def permute_level_statistics(opt_state: PyTree,
                             perms: dict[tuple[str, ...], jax.Array]) -> PyTree:
    """Re-orders every per-level optimizer statistic (e.g. Adam's mu and nu) like its levels.

    Levels are re-sorted after each update; slot k of a moment buffer must follow the level
    it was accumulated for, or a crossing hands one level's momentum to another. `perms` maps
    the levels' param path to the `argsort` used for the sort ([G, L]); optimizer-state
    leaves are matched by the trailing keys of their path and their shape. An identity
    permutation returns the same values (bitwise).
    """
    if not perms:
        return opt_state

    def names(keypath) -> tuple[str, ...]:
        return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)

    def visit(keypath, leaf):
        path = names(keypath)
        for levels_path, perm in perms.items():
            n = len(levels_path)
            if path[-n:] == levels_path and getattr(leaf, "shape", None) == perm.shape:
                return wq.permute_levels(leaf, perm)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, opt_state)


class QuantOptimizer:
    """`init(params, codes, key)` / `update(...)` for params, levels and codes.

    Args:
      learning_rate: peak LR of float params (and of the code update unless
        `code_learning_rate` is given).
      code_learning_rate: peak LR of the direct code update (SGD-momentum on
        W_q). A 2-bit level gap is large next to a float-LR step, so the codes
        may need a larger step than the float params; None = `learning_rate`.
      code_momentum: SGD momentum of the code update; None = `momentum`. A larger one
        (e.g. 0.99) averages the per-weight gradient over more steps before stochastic
        re-assignment acts on it, so fewer flips are driven by gradient noise.
      levels_learning_rate: peak LR of the levels' Adam.
      schedule_shape: step -> multiplier (peak 1.0), shared by every group.
      momentum, nesterov: SGD momentum (float params and W_q).
      weight_decay: L2 on float kernels and on W_q (not levels, BN, biases).
      rounding: 'stochastic' (default, unbiased) or 'nearest' (ablation).
      code_momentum_dtype: dtype of the per-weight momentum of W_q. It is most of
        a DQ model's train state (uint8 codes are 1/4 of it); 'bfloat16' halves it.
    """

    def __init__(self, *, learning_rate: float, levels_learning_rate: float,
                 schedule_shape: Schedule = lambda step: 1.0, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 rounding: str = "stochastic", code_momentum_dtype: str = "float32",
                 code_learning_rate: float | None = None, code_momentum: float | None = None):
        if code_momentum_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"code_momentum_dtype={code_momentum_dtype!r} is not supported; "
                             "allowed values: 'float32', 'bfloat16'.")
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(
                f"rounding={rounding!r} is not supported; allowed values: 'stochastic', 'nearest'.")
        self.rounding = rounding
        self.lr = lambda step: learning_rate * schedule_shape(step)
        self.levels_lr = lambda step: levels_learning_rate * schedule_shape(step)
        self.code_lr = self.lr if code_learning_rate is None else (
            lambda step: code_learning_rate * schedule_shape(step))

        def sgd(wd: float, accumulator_dtype=None, lr=self.lr,
                momentum=momentum) -> optax.GradientTransformation:
            parts = [optax.add_decayed_weights(wd)] if wd else []
            return optax.chain(*parts, optax.sgd(lr, momentum=momentum or None,
                                                 nesterov=nesterov,
                                                 accumulator_dtype=accumulator_dtype))

        self.params_tx = optax.multi_transform(
            {"decay": sgd(weight_decay), "no_decay": sgd(0.0),
             "levels": optax.adam(self.levels_lr)},
            lambda params: flax.traverse_util.path_aware_map(_param_label, params))
        self.codes_tx = sgd(weight_decay, jnp.dtype(code_momentum_dtype), self.code_lr,
                            momentum if code_momentum is None else code_momentum)

    def applied_updates(self, state: QuantOptState) -> jax.Array:
        """How many updates this state has applied: the step its schedules are at.

        A training loop that skips a non-finite step keeps the old state, so this count (not
        the loop's step) is what the learning-rate schedules follow.
        """
        return optax.tree_utils.tree_get(state.codes, "count")

    def init(self, params: PyTree, codes: PyTree, key: jax.Array) -> QuantOptState:
        return QuantOptState(params=self.params_tx.init(params),
                             codes=self.codes_tx.init(effective_kernels(params, codes)),
                             key=key)

    def update(self, grads: PyTree, w_grads: PyTree, state: QuantOptState,
               params: PyTree, codes: PyTree):
        """One step. `w_grads` is the gradient w.r.t. the `perturbations` collection.

        Returns `(new_params, new_codes, new_state, diagnostics)` where
        diagnostics maps 'path/to/layer' -> {'flip_rate', 'code_entropy'}.
        """
        w_q = effective_kernels(params, codes)
        g_w = {path[:-1]: g for path, g in _flat(w_grads).items()}
        if set(g_w) != set(w_q):
            raise ValueError(
                "Gradients w.r.t. the 'perturbations' collection do not match the DQ-W "
                f"layers: got {sorted(g_w)}, expected {sorted(w_q)}.")
        key, step_key = jax.random.split(state.key)

        # 1-3: momentum/wd on W_q, target, direct re-assignment (against the old levels).
        u, codes_state = self.codes_tx.update(g_w, state.codes, w_q)
        flat_params = _flat(params)
        flat_codes = _flat(codes)
        new_codes, diagnostics = {}, {}
        for i, path in enumerate(sorted(w_q)):
            levels = flat_params[path + (LEVELS,)]
            old = flat_codes[path + ("kernel",)]
            new = wq.reassign_codes(levels, w_q[path] + u[path],
                                    jax.random.fold_in(step_key, i), self.rounding)
            new_codes[path] = new
            diagnostics["/".join(path)] = {
                "flip_rate": jnp.mean((new != old).astype(jnp.float32)),
                "code_entropy": code_histogram_entropy(new, levels.shape[-1]),
            }

        # 4: levels (and everything float) take their optax update, then sort.
        updates, params_state = self.params_tx.update(grads, state.params, params)
        new_params = _flat(optax.apply_updates(params, updates))
        perms = {}
        for path in [p for p in new_params if p[-1] == LEVELS]:
            module = path[:-1]
            levels, remapped, perms[path] = wq.sort_levels(
                new_params[path], new_codes.get(module), return_perm=True)
            new_params[path] = levels
            if remapped is not None:
                new_codes[module] = remapped
        params_state = permute_level_statistics(params_state, perms)
        new_codes_tree = flax.traverse_util.unflatten_dict(
            {m + ("kernel",): c for m, c in new_codes.items()})
        return (flax.traverse_util.unflatten_dict(new_params), new_codes_tree,
                QuantOptState(params_state, codes_state, key), diagnostics)
