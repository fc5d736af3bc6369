"""The optimizer of a direct-quantized model (DESIGN §1.1, "Update"), as one optax transformation.

`dq_optimizer(...)` is an `optax.GradientTransformationExtraArgs` over the model's trainable
tree `{"params": params, "codes": codes}` (the variables the model is applied with). Its
gradient tree has the same structure: `{"params": dL/dparams, "codes": dL/dW_q}`, the float
gradient w.r.t. each DQ-W layer's quantized kernel sitting at its code leaf
(`dq_grads(jax.grad(...)(...))` builds it from a gradient over `{"params", "perturbations"}`).
One update:
  * float params (biases, BN, float/latent kernels, LSQ steps): SGD with momentum;
    weight decay on kernels only (ndim > 1 'kernel'; `init` warns about other float params of
    ndim > 1 under a nonzero decay: `UndecayedParamsWarning`);
  * quantization levels (`kernel_levels`): Adam with their own learning rate. Adam because
    `dL/dlevels[k]` is a sum over every weight at level k, so its scale grows with layer size;
    Adam's per-coordinate normalisation makes the level step size-free;
  * DQ-W codes: `u = SGD-momentum(dL/dW_q + wd * W_q)` (its own LR, momentum and momentum
    dtype), target `W~ = W_q + u`, direct re-assignment of each code to the (old) levels
    bracketing `W~` (stochastic by default). The level update follows, then levels are sorted
    and codes remapped so a sort never changes `W_q`; per-level Adam moments follow the sort.

Its updates are exact under `optax.apply_updates`, so it composes with optax wrappers placed
*around* it (`inject_hyperparams`, `apply_if_finite`, `MultiSteps`, a `chain` with gradient
transformations in front); it must be the last transformation of a chain (a transformation
after it would rescale the integer code deltas).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dq_jax.layers import CODES, PERTURBATIONS
from dq_jax.quant import weights as wq
from dq_jax.quant.config import (FEEDBACK_ROUNDINGS, INERTIA_AFTER_MOVE, RANDOM_STREAMS,
                                 ROUNDINGS)
from dq_jax.trees import flatten

LEVELS = wq.LEVELS
PARAMS = "params"
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
PyTree = Any


class DQState(NamedTuple):
    """State of `dq_optimizer`. `key` is raw key data (uint32), so every optax wrapper's
    `jnp.where` over states and every checkpointer handles it; it is split once per update."""
    params: optax.OptState  # SGD-momentum of float params, Adam of levels (multi_transform)
    codes: optax.OptState   # SGD-momentum of W_q: one buffer per weight, shaped like `codes`
    key: jax.Array


class UndecayedParamsWarning(UserWarning):
    """`dq_optimizer(weight_decay > 0)` over float params it does not decay (ndim > 1, not named
    'kernel'): where optax's `add_decayed_weights` or the Flax example's `ndim > 1` penalty
    decays them, this optimizer would not, silently."""


def _param_label(path: tuple[str, ...], leaf: jax.Array) -> str:
    if path[-1] == LEVELS:
        return "levels"
    if path[-1] == "kernel" and leaf.ndim > 1:
        return "decay"
    return "no_decay"


def dq_layer_paths(codes: PyTree) -> list[tuple[str, ...]]:
    """Module paths of the DQ-W layers (those holding integer codes)."""
    return sorted(path[:-1] for path in flatten(codes))


def _stack_dims(levels: jax.Array) -> int:
    """Leading stack axes of a levels table ([*S, G, L]; S from `nn.scan`/`nn.vmap`)."""
    return levels.ndim - 2


def _over_stack(fn: Callable, n: int) -> Callable:
    """`fn` mapped over `n` leading (stack) axes of all its arguments."""
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


# One counter-based hash for every layer's random draws (issue 27): no per-layer key split,
# no per-layer threefry loop; elementwise uint32 arithmetic that fuses into the consumer.
_MIX = (np.uint32(0x21F0AAAD), np.uint32(0x735A2D97))  # lowbias32 (C. Wellons): full avalanche


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective uint32 -> uint32 mix in which every input bit flips every output bit with
    probability ~1/2."""
    x = x ^ (x >> 16)
    x = x * _MIX[0]
    x = x ^ (x >> 15)
    x = x * _MIX[1]
    return x ^ (x >> 15)


def hash_uniform(seed: jax.Array, offset: int, shape: tuple[int, ...]) -> jax.Array:
    """U[0, 1) float32 numbers (24-bit) for the counters `offset + 0 .. offset + size - 1` of
    the stream `seed` (uint32 [2]): `mix(mix(counter ^ seed[0]) ^ seed[1])`, flat, reshaped.

    Counter-based: each number depends on its counter and the seed only, so every layer of
    an update draws from one stream at its own offset (the layers' sizes laid end to end),
    the draws of different counters are distinct (a bijection of the counter for a given
    seed), and the same on every backend.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if offset < 0 or offset + size > 2 ** 32:
        raise ValueError(f"hash_uniform: counters [{offset}, {offset + size}) leave uint32; "
                         "the 'hash' random stream covers at most 2**32 DQ weights per model.")
    seed = jnp.asarray(seed)
    if seed.shape != (2,) or not jnp.issubdtype(seed.dtype, jnp.integer):
        raise ValueError(f"hash_uniform: seed must be 2 integer words (uint32 [2], e.g. a raw "
                         f"PRNGKey); got {seed.dtype}{list(seed.shape)}.")
    seed = seed.astype(jnp.uint32)
    counter = jax.lax.iota(jnp.uint32, size) + np.uint32(offset)
    bits = _mix32(_mix32(counter ^ seed[0]) ^ seed[1])
    return ((bits >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)).reshape(shape)


def _seed_words(key: jax.Array) -> jax.Array:
    """The first two uint32 words of a key (raw key data or a typed key): a hash seed."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.reshape(-1)[:2]


def _lookup(levels: jax.Array, codes: jax.Array) -> jax.Array:
    return _over_stack(wq.gather_levels, _stack_dims(levels))(levels, codes)


def effective_kernels(params: PyTree, codes: PyTree) -> dict[tuple[str, ...], jax.Array]:
    """`W_q` of every DQ-W layer, keyed by module path."""
    p = flatten(params)
    return {path[:-1]: _lookup(p[path[:-1] + (LEVELS,)], c) for path, c in flatten(codes).items()}


def code_histogram_entropy(codes: jax.Array, num_levels: int) -> jax.Array:
    """Entropy (bits) of a layer's code histogram: log2(L) when all levels are used evenly."""
    counts = wq.code_counts(codes, num_levels)  # no scatter (a bincount is one)
    p = counts / codes.size
    return -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0))


def code_diagnostics(old_codes: PyTree, new_codes: PyTree,
                     params: PyTree) -> dict[str, dict[str, jax.Array]]:
    """Per DQ-W layer ('path/to/layer'): `flip_rate` (fraction of codes that changed) and
    `code_entropy` (bits, of the new code histogram). `params` gives each layer's L.

    Pure, from the codes before and after an update: at a step where two levels crossed and
    the sort relabelled codes, the relabelled ones count as flips too (crossings are rare).
    """
    flat_p, old = flatten(params), flatten(old_codes)
    out = {}
    for path, new in flatten(new_codes).items():
        out["/".join(path[:-1])] = {
            "flip_rate": jnp.mean((new != old[path]).astype(jnp.float32)),
            "code_entropy": code_histogram_entropy(new, flat_p[path[:-1] + (LEVELS,)].shape[-1]),
        }
    return out


def dq_grads(grads: PyTree) -> dict:
    """`{"params": g, "perturbations": g_w}` (jax.grad over those two collections) ->
    `{"params": g, "codes": g_w}`, the gradient tree of `dq_optimizer`.

    The layers name the perturbation of a DQ-W kernel like its code leaf (`kernel`, same
    module path), so this is a rename. A tree already keyed `codes` is returned as is.
    """
    if not isinstance(grads, dict) and not hasattr(grads, "keys"):
        raise ValueError(f"dq_grads expects a dict with 'params' and 'perturbations'; got "
                         f"{type(grads).__name__}. Differentiate w.r.t. "
                         "{'params': params, 'perturbations': zero_perturbations(codes)}.")
    keys = set(grads.keys())
    if keys == {PARAMS, CODES}:
        return dict(grads)
    if not keys <= {PARAMS, PERTURBATIONS} or PARAMS not in keys:
        raise ValueError(f"dq_grads expects keys 'params' and 'perturbations'; got "
                         f"{sorted(keys)}. Differentiate w.r.t. "
                         "{'params': params, 'perturbations': zero_perturbations(codes)}.")
    return {PARAMS: grads[PARAMS], CODES: grads.get(PERTURBATIONS, {})}


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


def _check_tree(tree: Any, what: str) -> None:
    if not hasattr(tree, "keys") or set(tree.keys()) != {PARAMS, CODES}:
        got = sorted(tree.keys()) if hasattr(tree, "keys") else type(tree).__name__
        fix = (" Convert a gradient over {'params', 'perturbations'} with "
               "dq_jax.optim.dq_grads(grads)." if what == "updates" else "")
        raise ValueError(f"dq_optimizer's {what} must be the trainable tree "
                         f"{{'params': ..., 'codes': ...}}; got {got}.{fix}")


def _key_data(key: jax.Array | int) -> tuple[jax.Array, Any]:
    """(raw key data, impl or None) of a key; an int seeds `jax.random.PRNGKey` (raw)."""
    if isinstance(key, (int, np.integer)):
        return jax.random.PRNGKey(int(key)), None
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key), jax.random.key_impl(key)
    if key.dtype != jnp.uint32:
        raise ValueError(f"key must be a PRNG key or an int seed; got an array of dtype "
                         f"{key.dtype}. Pass e.g. key=jax.random.PRNGKey(0) or key=0.")
    return key, None


def with_key(opt_state: PyTree, key: jax.Array | int) -> PyTree:
    """`opt_state` with the code-update key of every `DQState` in it replaced (e.g. one
    transformation, several seeds). The key must be of the kind the transformation was built
    with (an int seed or raw key for an int/raw one, the same impl for a typed one)."""
    data = _key_data(key)[0]
    is_dq = lambda x: isinstance(x, DQState)
    if not any(is_dq(x) for x in jax.tree.leaves(opt_state, is_leaf=is_dq)):
        raise ValueError("with_key: opt_state holds no DQState (not a dq_optimizer state).")
    return jax.tree.map(lambda x: x._replace(key=data) if is_dq(x) else x, opt_state,
                        is_leaf=is_dq)


def with_feedback_residual(opt_state: PyTree, residual: PyTree) -> PyTree:
    """`opt_state` with the residual of every feedback-rounding `DQState` replaced by
    `residual` (float32, the codes' tree), e.g. the float kernel minus `W_q` when fine-tuning
    from a float checkpoint, so the implied latent starts at the float weights."""
    is_dq = lambda x: isinstance(x, DQState)
    residual = jax.tree.map(lambda r: jnp.asarray(r, jnp.float32), residual)
    found = []

    def replace(x):
        if not is_dq(x):
            return x
        ok = (isinstance(x.codes, tuple) and len(x.codes) == 2
              and jax.tree.structure(x.codes[1]) == jax.tree.structure(residual)
              and all(np.shape(a) == np.shape(b) for a, b in
                      zip(jax.tree.leaves(x.codes[1]), jax.tree.leaves(residual))))
        if not ok:
            raise ValueError("with_feedback_residual: the DQState holds no residual shaped like "
                             "the given one; build dq_optimizer with rounding='error_feedback' or "
                             "'latent_feedback' and pass a residual per code leaf.")
        found.append(True)
        return x._replace(codes=(x.codes[0], residual))

    out = jax.tree.map(replace, opt_state, is_leaf=is_dq)
    if not found:
        raise ValueError("with_feedback_residual: opt_state holds no DQState (not a "
                         "dq_optimizer state).")
    return out


def dq_optimizer(learning_rate: ScalarOrSchedule, levels_learning_rate: ScalarOrSchedule, *,
                 momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
                 rounding: str = "stochastic", code_momentum_dtype: str = "bfloat16",
                 code_learning_rate: ScalarOrSchedule | None = None,
                 code_momentum: float | None = None,
                 rounding_temperature: ScalarOrSchedule | None = None,
                 feedback_residual_bits: int | None = None,
                 inertia_threshold: float = 1.0, inertia_after_move: str = "subtract",
                 rounding_stream: str = "hash",
                 key: jax.Array | int = 0) -> optax.GradientTransformationExtraArgs:
    """The DQ update as one optax transformation over `{"params": params, "codes": codes}`.

    Args:
      learning_rate: LR (float or optax schedule of the update count) of float params, and
        of the code update unless `code_learning_rate` is given.
      levels_learning_rate: LR of the levels' Adam.
      momentum, nesterov: SGD momentum of float params (and of W_q unless `code_momentum`).
        A Python 0 means no momentum buffer.
      weight_decay: L2 on float kernels and on W_q (not levels, BN, biases).
      rounding: 'stochastic' (default, unbiased), 'nearest' (ablation: frozen codes), or
        'error_feedback' (ablation, *not* the method: nearest rounding of `W_q + u + r`,
        where the residual `r = target - new W_q` is carried per weight in float32 in the
        state (`DQState.codes` becomes `(momentum state, residual)`): a float shadow weight
        in all but name, which measures what DQ's missing accumulator is worth; the residual
        is relative to the code's level, so the implied latent `W_q + r` moves with it), or
        'latent_feedback' (ablation: the same residual, re-measured after the levels' update
        and sort, with the codes re-chosen as the nearest updated level, so the latent
        `W_q + r` stays put when levels move: latent-STE re-expressed in DQ's state, except
        that weight decay acts on W_q and the momentum has the code momentum's dtype), or
        'inertia' (the multi-level form of Bop, Helwegen et al. 2019): the code momentum is
        the evidence; a weight moves one level toward `u = -code_lr * m` only when
        `|u| >= inertia_threshold * gap` to that level, deterministically, else it stays (no
        random draws). The code momentum is a plain trace (`nesterov` does not apply to it).
      code_momentum_dtype: dtype of the per-weight momentum of W_q, most of a DQ model's train
        state: 'bfloat16' (default; 2 bytes next to the 1-byte code) or 'float32' (twice the
        buffer; no better on the CIFAR-10 protocol, docs/notebook.md §1.1).
      code_learning_rate: LR of the direct code update; None = `learning_rate`. A 2-bit level
        gap is large next to a float-LR step, so the codes may want another step.
      code_momentum: SGD momentum of the code update; None = `momentum`. A larger one averages
        the per-weight gradient over more steps before stochastic re-assignment acts on it.
      rounding_temperature: None (default: the unbiased stochastic rule), or a float in
        [0, 1] (a schedule through `optax.inject_hyperparams`) that sharpens the
        re-assignment probability toward nearest rounding (0 = nearest; see
        `quant.weights.stochastic_codes`), e.g. annealed with the learning rate to cut the
        re-assignment's variance late in training.
      feedback_residual_bits: feedback roundings only (ablation): None or 0 (default) uses the
        float32 residual as it is; b >= 1 uses only its b-bit position inside the cell
        (`quant.weights.quantize_cell_residual`, stochastic, unbiased) at every update, so
        the carried information is that of a b-bit memory per weight (stored in float32
        here): how many bits of the within-cell position DQ's state would need.
      inertia_threshold: rounding='inertia' only: the evidence a move needs, in gaps to the
        next level (1: the update must reach it; 0.5: nearest rounding of `W_q + u`).
      inertia_after_move: rounding='inertia' only: what a move does to the weight's code
        momentum: 'subtract' (default: the gap it moved is spent, `u <- u - moved`, so the
        momentum carries the rest), 'reset' (to 0: the evidence starts anew) or 'keep' (Bop's
        binary rule; with several levels a persistent signal moves a level per step).
      rounding_stream: where the random roundings' uniforms come from (stochastic
        re-assignment, `feedback_residual_bits`): 'hash' (default) — one counter-based hash
        (`hash_uniform`) seeded by the update's key, every layer at its own offset (its
        weights after those of the layers before it, sorted by module path): no per-layer
        key split or draw, which XLA compiles as one elementwise op chain per layer;
        'per_layer' — the stream before issue 27 (`fold_in(update key, layer index)`, then
        `jax.random.uniform`, one key per stack slice), kept so a workdir trained with it
        resumes bitwise. The two are different streams with the same distribution.
      key: PRNG key (or int seed, made into `jax.random.PRNGKey(seed)` at `init`) of the
        stochastic re-assignment. It lives in the state and is split once per update, so a
        resumed state continues the same random stream.

    Use `optax.inject_hyperparams(dq_optimizer, static_args=("momentum", "nesterov",
    "weight_decay", "rounding", "code_momentum_dtype", "code_momentum",
    "feedback_residual_bits", "inertia_threshold", "inertia_after_move", "rounding_stream",
    "key"))(...)` to schedule the learning rates and read them back
    from `opt_state.hyperparams`.

    Updates: float params get their optax update unchanged. Levels get it too, except the
    slots a crossing moved (sorted), which get `sorted - old`: `old + (sorted - old)` is
    `sorted` exactly when the two are within a factor 2 of each other (Sterbenz), otherwise up
    to the rounding of that difference, at most 1 ulp of the larger magnitude (an additive
    update cannot always reach a given float exactly). Codes get `new - old` as an integer
    valued float in the gradient's dtype (|delta| <= 255, exact in float32/bfloat16/float16),
    so `uint8 + delta -> uint8` is exact and wrappers that substitute zeros of the gradient's
    dtype (`apply_if_finite`, `MultiSteps`) type-check and apply exactly.
    """
    if code_momentum_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"code_momentum_dtype={code_momentum_dtype!r} is not supported; "
                         "allowed values: 'float32', 'bfloat16'.")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not supported; allowed values: "
                         f"{', '.join(repr(r) for r in ROUNDINGS)}.")
    if rounding_stream not in RANDOM_STREAMS:
        raise ValueError(f"rounding_stream={rounding_stream!r} is not supported; allowed "
                         f"values: {', '.join(repr(r) for r in RANDOM_STREAMS)}.")
    # A typed key (e.g. jax.random.key(0, impl='unsafe_rbg')) is stored as its data and
    # re-wrapped with its impl at each update; a raw key or an int seed needs no impl.
    impl = None if isinstance(key, (int, np.integer)) else _key_data(key)[1]
    if rounding_temperature is not None and rounding != "stochastic":
        raise ValueError(f"rounding_temperature applies to rounding='stochastic' only (got "
                         f"rounding={rounding!r}); pass rounding_temperature=None.")
    if isinstance(rounding_temperature, (int, float)) and not 0 <= rounding_temperature <= 1:
        raise ValueError(f"rounding_temperature={rounding_temperature} must lie in [0, 1] "
                         "(1 = unbiased stochastic rounding, 0 = nearest).")
    if callable(rounding_temperature):
        raise ValueError("rounding_temperature is a schedule: wrap the optimizer in "
                         "optax.inject_hyperparams(dq_optimizer, ...)(rounding_temperature="
                         "schedule, ...), which evaluates it at each update.")
    if isinstance(feedback_residual_bits, jax.Array):
        raise ValueError("feedback_residual_bits is a structural choice, not a hyperparameter: "
                         "pass it as a Python int and list it in inject_hyperparams' "
                         "static_args.")
    if feedback_residual_bits is not None and (
            not isinstance(feedback_residual_bits, (int, np.integer))
            or feedback_residual_bits < 0):
        raise ValueError(f"feedback_residual_bits={feedback_residual_bits!r} must be an int "
                         ">= 0 (0 = the float32 residual as it is).")
    if feedback_residual_bits and rounding not in FEEDBACK_ROUNDINGS:
        raise ValueError(f"feedback_residual_bits={feedback_residual_bits} applies to the "
                         f"feedback roundings {FEEDBACK_ROUNDINGS} only (got rounding="
                         f"{rounding!r}); pass feedback_residual_bits=0.")
    inertia = rounding == "inertia"
    if inertia_after_move not in INERTIA_AFTER_MOVE:
        raise ValueError(f"inertia_after_move={inertia_after_move!r} is not supported; allowed "
                         f"values: {', '.join(repr(r) for r in INERTIA_AFTER_MOVE)}.")
    # A Python number is checked here; an injected one (inject_hyperparams) is a traced value.
    static_threshold = isinstance(inertia_threshold, (int, float))
    if static_threshold and not 0 < inertia_threshold < np.inf:
        raise ValueError(f"inertia_threshold={inertia_threshold!r} must be a number > 0 (the "
                         "evidence a move needs, in level gaps; e.g. 1.0).")
    if not inertia and ((static_threshold and inertia_threshold != 1.0)
                        or inertia_after_move != "subtract"):
        raise ValueError(f"inertia_threshold / inertia_after_move apply to rounding='inertia' "
                         f"only (got rounding={rounding!r}); leave them at 1.0 / 'subtract'.")
    code_lr = learning_rate if code_learning_rate is None else code_learning_rate
    code_mom = momentum if code_momentum is None else code_momentum

    def sgd(lr, wd, mom, accumulator_dtype=None, nesterov=nesterov
            ) -> optax.GradientTransformation:
        # A Python 0 (weight decay, momentum) leaves the transformation out, as optax.sgd
        # does for momentum=None; a traced value (inject_hyperparams) keeps it.
        static_zero = lambda v: isinstance(v, (int, float)) and not v
        parts = [] if static_zero(wd) else [optax.add_decayed_weights(wd)]
        return optax.chain(*parts, optax.sgd(lr, momentum=None if static_zero(mom) else mom,
                                             nesterov=nesterov,
                                             accumulator_dtype=accumulator_dtype))

    params_tx = optax.multi_transform(
        {"decay": sgd(learning_rate, weight_decay, momentum),
         "no_decay": sgd(learning_rate, 0.0, momentum),
         "levels": optax.adam(levels_learning_rate)},
        lambda params: flax.traverse_util.path_aware_map(_param_label, params))
    # The inertia rule thresholds the momentum itself: a plain trace, whose scale it spends.
    codes_tx = sgd(code_lr, weight_decay, code_mom, jnp.dtype(code_momentum_dtype),
                   nesterov=nesterov and not inertia)

    def init_fn(trainable: PyTree) -> DQState:
        _check_tree(trainable, "params")
        params, codes = trainable[PARAMS], trainable[CODES]
        flat_p = flatten(params)
        _warn_undecayed(flat_p, weight_decay)
        for path, c in flatten(codes).items():
            levels = flat_p.get(path[:-1] + (LEVELS,))
            if levels is None or not jnp.issubdtype(c.dtype, jnp.integer):
                raise ValueError(f"codes/{'/'.join(path)} needs integer codes and a "
                                 f"params/{'/'.join(path[:-1])}/{LEVELS} table; pass the "
                                 "'params' and 'codes' collections model.init returned.")
        w_q = _w_q_tree(params, codes)
        codes_state = codes_tx.init(w_q)
        if rounding in FEEDBACK_ROUNDINGS:
            codes_state = (codes_state, jax.tree.map(
                lambda w: jnp.zeros(w.shape, jnp.float32), w_q))
        return DQState(params=params_tx.init(params), codes=codes_state,
                       key=_key_data(key)[0])

    def update_fn(updates: PyTree, state: DQState, params: PyTree = None,
                  **extra_args: Any) -> tuple[PyTree, DQState]:
        del extra_args
        if params is None:
            raise ValueError("dq_optimizer.update needs params (the trainable tree "
                             "{'params': ..., 'codes': ...}): call tx.update(grads, state, "
                             "params).")
        _check_tree(updates, "updates")
        _check_tree(params, "params")
        p, c = params[PARAMS], params[CODES]
        g, g_w = updates[PARAMS], updates[CODES]
        flat_c, flat_gw = flatten(c), flatten(g_w)
        if set(flat_gw) != set(flat_c) or any(
                np.shape(flat_gw[k]) != np.shape(flat_c[k])
                or not jnp.issubdtype(jnp.asarray(flat_gw[k]).dtype, jnp.floating)
                for k in flat_c):
            raise ValueError(
                "updates['codes'] must hold dL/dW_q (float, kernel-shaped) at every code leaf: "
                f"got {sorted('/'.join(k) for k in flat_gw)}, expected "
                f"{sorted('/'.join(k) for k in flat_c)}; differentiate w.r.t. the "
                "'perturbations' collection and convert with dq_jax.optim.dq_grads.")
        rng = state.key if impl is None else jax.random.wrap_key_data(state.key, impl=impl)
        rng, step_key = jax.random.split(rng)

        # 1-3: momentum/wd on W_q, target, direct re-assignment (against the old levels).
        w_q = _w_q_tree(p, c)
        feedback = rounding in FEEDBACK_ROUNDINGS
        targets = {}
        momentum_state, residual = state.codes if feedback else (state.codes, None)
        u, codes_state = codes_tx.update(g_w, momentum_state, w_q)
        flat_p, flat_wq, flat_u = flatten(p), flatten(w_q), flatten(u)
        flat_r = flatten(residual) if feedback else {}
        new_codes, new_r = {}, {}
        draws = rounding == "stochastic" or (feedback and bool(feedback_residual_bits))
        uniforms = _hash_uniforms(step_key, c) if draws and rounding_stream == "hash" \
            else {}
        if inertia:
            moved = {}
            for module in dq_layer_paths(c):
                path = module + ("kernel",)
                new_codes[path], moved[path] = _inertia(
                    flat_p[module + (LEVELS,)], flat_c[path], flat_u[path], inertia_threshold)
            codes_state = _spend_evidence(codes_state, flat_u, moved, inertia_after_move)
        for i, module in enumerate([] if inertia else dq_layer_paths(c)):
            path = module + ("kernel",)
            target = flat_wq[path] + flat_u[path]
            # 'hash': this layer's slice of the one stream; 'per_layer': its own key.
            layer_key = None if uniforms else jax.random.fold_in(step_key, i)
            if feedback:
                r = flat_r[path]
                if feedback_residual_bits:
                    r = _quantize_residual(flat_p[module + (LEVELS,)], flat_c[path], r,
                                           feedback_residual_bits, layer_key,
                                           uniforms.get(path))
                target = targets[path] = target + r
            new_codes[path] = _reassign(flat_p[module + (LEVELS,)], target, layer_key,
                                        "nearest" if feedback else rounding,
                                        rounding_temperature, uniforms.get(path))
            if rounding == "error_feedback":  # against the levels the codes were chosen from
                new_r[path] = (target - _lookup(flat_p[module + (LEVELS,)],
                                                new_codes[path])).astype(jnp.float32)

        # 4: levels (and everything float) take their optax update, then sort.
        p_updates, params_state = params_tx.update(g, state.params, p)
        flat_upd = flatten(p_updates)
        new_p = flatten(optax.apply_updates(p, p_updates))
        perms = {}
        for path in [k for k in new_p if k[-1] == LEVELS]:
            code_path = path[:-1] + ("kernel",)
            levels, remapped, perms[path] = _sort(new_p[path], new_codes.get(code_path))
            iota = jax.lax.broadcasted_iota(jnp.int32, levels.shape, levels.ndim - 1)
            flat_upd[path] = jnp.where(perms[path] == iota, flat_upd[path],
                                       levels - flat_p[path])
            if remapped is not None:
                new_codes[code_path] = remapped
                if rounding == "latent_feedback":  # the latent stays; its nearest level moves
                    new_codes[code_path] = _reassign(levels, targets[code_path], step_key,
                                                     "nearest")
                    new_r[code_path] = (targets[code_path] - _lookup(
                        levels, new_codes[code_path])).astype(jnp.float32)
        if feedback:
            codes_state = (codes_state, _replace_leaves(residual, new_r))
        params_state = permute_level_statistics(params_state, perms)
        code_deltas = {k: (new.astype(jnp.int16) - flat_c[k].astype(jnp.int16)).astype(
            jnp.asarray(flat_gw[k]).dtype) for k, new in new_codes.items()}
        out = {PARAMS: _replace_leaves(p_updates, flat_upd),
               CODES: _replace_leaves(g_w, code_deltas)}
        return out, DQState(params_state, codes_state, jax.random.key_data(rng)
                            if impl is not None else rng)

    def scoped_update_fn(updates: PyTree, state: DQState, params: PyTree = None,
                         **extra_args: Any) -> tuple[PyTree, DQState]:
        # A name for profiles and HLO metadata (kernel tables attribute time to the update).
        with jax.named_scope("dq_update"):
            return update_fn(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, scoped_update_fn)


def _warn_undecayed(flat_params: dict, weight_decay: Any) -> None:
    """Warns (`UndecayedParamsWarning`) when a nonzero weight decay skips float params with
    ndim > 1 that are not named 'kernel' (e.g. a custom `self.param('w', ...)`, an embedding)."""
    if isinstance(weight_decay, (int, float)) and not weight_decay:
        return
    skipped = ["/".join(p) for p, x in flat_params.items()
               if _param_label(p, x) == "no_decay" and np.ndim(x) > 1
               and jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(
            f"dq_optimizer(weight_decay={weight_decay}) decays float params named 'kernel' "
            f"(ndim > 1) and W_q only; params/{', params/'.join(skipped[:3])}{more} get no "
            "decay. To decay them, chain optax.masked(optax.add_decayed_weights(wd), mask) in "
            "front of dq_optimizer (mask True at those leaves only) or name them 'kernel'; if "
            "that is intended (e.g. embeddings), filter dq_jax.optim.UndecayedParamsWarning.",
            UndecayedParamsWarning, stacklevel=3)


def _path_names(keypath) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)


def _replace_leaves(tree: PyTree, flat: dict[tuple[str, ...], jax.Array]) -> PyTree:
    """`tree` (its own container types kept) with the leaves at `flat`'s paths replaced."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: flat.get(_path_names(kp), x), tree)


def _w_q_tree(params: PyTree, codes: PyTree) -> dict:
    """W_q of every DQ-W layer, in the codes' tree structure."""
    flat = {m + ("kernel",): w for m, w in effective_kernels(params, codes).items()}
    return _replace_leaves(codes, flat) if flat else {}


def _keyed_over_stack(fn: Callable, levels: jax.Array, key: jax.Array, *arrays: jax.Array):
    """`fn(levels, *arrays, key)` over the leading stack axes of `levels` too (one key per
    slice; the key itself when there are none)."""
    n = _stack_dims(levels)
    if n == 0:
        return fn(levels, *arrays, key)
    return _over_stack(fn, n)(levels, *arrays, jax.random.split(key, levels.shape[:n]))


def _hash_uniforms(step_key: jax.Array, codes: dict) -> dict:
    """Code path -> its U[0, 1) draws (code-shaped) from the one hash stream of this update:
    the layers laid end to end in `dq_layer_paths` order, each at its offset."""
    seed, offset, out, flat = _seed_words(step_key), 0, {}, flatten(codes)
    for module in dq_layer_paths(codes):
        path = module + ("kernel",)
        out[path] = hash_uniform(seed, offset, flat[path].shape)
        offset += int(np.prod(flat[path].shape, dtype=np.int64))
    return out


def _reassign(levels: jax.Array, target: jax.Array, key: jax.Array | None, rounding: str,
              temperature: jax.Array | float | None = None,
              uniform: jax.Array | None = None) -> jax.Array:
    """`wq.reassign_codes`, over the leading stack axes of `levels` too: stochastic draws
    from `uniform` (target-shaped) when given, else from `key` (one key per slice)."""
    n = _stack_dims(levels)
    if n and target.shape[:n] != levels.shape[:n]:
        raise ValueError(f"stacked levels {levels.shape} and codes {target.shape} disagree on "
                         "their leading (stack) axes.")
    if uniform is not None and rounding == "stochastic":
        return _over_stack(lambda lv, t, u: wq.stochastic_codes(
            lv, t, None, uniform=u, temperature=temperature), n)(levels, target, uniform)
    return _keyed_over_stack(
        lambda lv, t, k: wq.reassign_codes(lv, t, k, rounding, temperature), levels, key, target)


def _inertia(levels: jax.Array, codes: jax.Array, step: jax.Array, threshold: float):
    """`wq.inertia_codes` over the leading stack axes of `levels` too."""
    return _over_stack(lambda lv, c, u: wq.inertia_codes(lv, c, u, threshold),
                       _stack_dims(levels))(levels, codes, step)


def _spend_evidence(codes_state: PyTree, steps: dict, moved: dict, rule: str) -> PyTree:
    """The code momentum after the inertia moves (`rule`: see `dq_optimizer`). The step is
    `u = -lr * m`, so scaling `m` by `(u - moved) / u` leaves `u - moved`: the evidence the
    move did not use. A code update without momentum has no trace: nothing to spend."""
    if rule == "keep":
        return codes_state

    def spend(m, u, d):
        hit = d != 0
        m32 = m.astype(jnp.float32)
        if rule == "reset":
            out = jnp.where(hit, 0.0, m32)
        else:
            out = jnp.where(hit, m32 * ((u - d) / jnp.where(hit, u, 1.0)), m32)
        return out.astype(m.dtype)

    def visit(x):
        if not isinstance(x, optax.TraceState):
            return x
        flat = flatten(x.trace)
        return x._replace(trace=_replace_leaves(x.trace, {
            k: spend(m, steps[k], moved[k]) for k, m in flat.items()}))

    return jax.tree.map(visit, codes_state, is_leaf=lambda x: isinstance(x, optax.TraceState))


def with_inertia_residual(opt_state: PyTree, residual: PyTree,
                          code_learning_rate: float) -> PyTree:
    """`opt_state` of a rounding='inertia' optimizer with its code momentum set so that the
    first code update starts from `residual` (kernel-shaped, e.g. float kernel - W_q when
    converting a float checkpoint): `m = -residual / code_learning_rate` (the rate of the first
    update), so `u = -lr * m = residual` before the first gradient, and a weight the float
    model put near a mid-point moves after a small push. No state is added: it is the
    momentum the code update keeps anyway (at its dtype)."""
    if not code_learning_rate > 0:
        raise ValueError(f"with_inertia_residual: the first update's code learning rate is "
                         f"{code_learning_rate}; a residual needs a rate > 0 (no warm-up from 0).")
    flat_r = {k: jnp.asarray(r, jnp.float32) for k, r in flatten(residual).items()}
    found = []

    def visit(x):
        if not isinstance(x, optax.TraceState):
            return x
        flat = flatten(x.trace)
        if set(flat) != set(flat_r) or any(np.shape(flat[k]) != np.shape(flat_r[k])
                                           for k in flat):
            raise ValueError("with_inertia_residual: the residual's leaves must match the codes "
                             f"({sorted('/'.join(k) for k in flat)}).")
        found.append(True)
        return x._replace(trace=_replace_leaves(x.trace, {
            k: (-flat_r[k] / code_learning_rate).astype(m.dtype) for k, m in flat.items()}))

    is_dq = lambda x: isinstance(x, DQState)
    out = jax.tree.map(lambda x: x._replace(codes=jax.tree.map(
        visit, x.codes, is_leaf=lambda y: isinstance(y, optax.TraceState))) if is_dq(x) else x,
        opt_state, is_leaf=is_dq)
    if not found:
        raise ValueError("with_inertia_residual: opt_state holds no code momentum of a "
                         "dq_optimizer (build it with rounding='inertia' and code momentum > 0).")
    return out


def _quantize_residual(levels: jax.Array, codes: jax.Array, residual: jax.Array, bits: int,
                       key: jax.Array | None, uniform: jax.Array | None = None) -> jax.Array:
    """`wq.quantize_cell_residual` over the leading stack axes of `levels` too, from `uniform`
    (code-shaped) when given, else from `key` (one key per slice). The feedback roundings
    draw no other random numbers, so the layer's draws are free."""
    if uniform is not None:
        return _over_stack(lambda lv, c, r, u: wq.quantize_cell_residual(
            lv, c, r, bits, uniform=u), _stack_dims(levels))(levels, codes, residual, uniform)
    return _keyed_over_stack(lambda lv, c, r, k: wq.quantize_cell_residual(lv, c, r, bits, k),
                             levels, key, codes, residual)


def _sort(levels: jax.Array, codes: jax.Array | None):
    """`wq.sort_levels(..., return_perm=True)` over the leading stack axes of `levels` too."""
    n = _stack_dims(levels)
    if codes is None:
        fn = lambda lv: wq.sort_levels(lv, None, return_perm=True)
        sorted_, _, perm = _over_stack(fn, n)(levels)
        return sorted_, None, perm
    return _over_stack(lambda lv, c: wq.sort_levels(lv, c, return_perm=True), n)(levels, codes)
