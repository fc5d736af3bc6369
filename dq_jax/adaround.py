"""Output-aware rounding of a float checkpoint into DQ codes (AdaRound-style), at conversion.

DQ's conversion (`checkpoints.init_from_float`) keeps, for every weight, only the nearest of
its group's levels: where the float weight sat *inside* its cell is lost, and docs/notebook.md §1.1
measures that this is most of DQ's gap to latent-STE when fine-tuning from a float model.
This module uses those positions once, at conversion, and keeps nothing of them afterwards
(the model state stays levels + integer codes, the paper's frame): each weight chooses the
level just below or just above its float value so that the *layer's output* on calibration
inputs stays close to the float layer's (Nagel et al., "Up or Down? Adaptive Rounding for
Post-Training Quantization", ICML 2020). Per layer, a soft choice `h = rectified_sigmoid(V)`
in [0, 1] starts at the float position, Adam minimises
`mean ||x * (W_soft - W)||^2 / mean ||x * W||^2 + lam * mean(1 - |2h - 1|^beta)` with `beta`
annealed 20 -> 2 after a 20% warm-up (the regulariser pushes every `h` to 0 or 1), and the
code is the level `h` ends nearest to.

Inputs `x` are each layer's inputs in the float model (one forward of the calibration images,
recorded by a Flax method interceptor), so layers are independent and any architecture whose
quantized layers are `nn.Conv` / `nn.Dense` subclasses works unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dq_jax.quant import weights as wq

PyTree = Any
_ZETA, _GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound's values)


def record_layer_inputs(model: nn.Module, variables: PyTree, images: jax.Array,
                        paths: Iterable[tuple[str, ...]],
                        apply_kwargs: Mapping | None = None) -> dict[tuple[str, ...], tuple]:
    """{module path: (input, module)} of the given `nn.Conv`/`nn.Dense` layers, from one
    eval-mode forward of `model` (any quantization: pass the float model for float inputs);
    `apply_kwargs` (default `{'train': False}`) select eval mode."""
    wanted, seen = set(paths), {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = tuple(module.scope.path) if module.scope is not None else ()
        if (context.method_name == "__call__" and path in wanted
                and isinstance(module, (nn.Conv, nn.Dense))):
            seen[path] = (args[0], module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images,
                    **({"train": False} if apply_kwargs is None else apply_kwargs))
    missing = wanted - set(seen)
    if missing:
        raise ValueError(f"adaround: no nn.Conv/nn.Dense call recorded at "
                         f"{sorted('/'.join(p) for p in missing)}; the float model must have "
                         "the quantized model's module paths (same config.model).")
    return seen


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class _LinearFn:
    """`x, kernel -> y` of a conv (its hyper-parameters in `conv`) or dense (`conv=None`) layer
    without bias (the output error is linear in the kernel). Equal and hashable by those
    hyper-parameters, so same-shape layers share one compiled `_adaround_step` (a closure per
    layer compiled it once per layer, ~1-2 s each on CPU)."""

    conv: tuple | None = None

    def __call__(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        if self.conv is None:
            return jnp.dot(x, kernel)
        features, size, strides, padding, input_dil, kernel_dil, groups = self.conv
        conv = nn.Conv(features=features, kernel_size=size, strides=strides, padding=padding,
                       input_dilation=input_dil, kernel_dilation=kernel_dil,
                       feature_group_count=groups, use_bias=False, dtype=jnp.float32,
                       param_dtype=jnp.float32)
        return conv.apply({"params": {"kernel": kernel}}, x)


def _linear_fn(module: nn.Module) -> _LinearFn:
    """`x, kernel -> y` of the layer without bias (see `_LinearFn`)."""
    if not isinstance(module, nn.Conv):
        return _LinearFn(None)
    return _LinearFn(_hashable((module.features, module.kernel_size, module.strides,
                                module.padding, module.input_dilation, module.kernel_dilation,
                                module.feature_group_count)))


def _bracket(levels: jax.Array, w: jax.Array):
    """Per weight: the code just below (clipped to [0, L-2]), and the float position
    `(w - l_lo) / (l_hi - l_lo)` clipped to [0, 1]."""
    lo, l_lo, l_hi = wq.bracketing_levels(levels, w)
    gap = jnp.maximum(l_hi - l_lo, 1e-12)
    return lo, l_lo, gap, jnp.clip((w - l_lo) / gap, 0.0, 1.0)


def _soft(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    """One `optax.adam` per rate: `_adaround_step` takes it as a static argument, and a new
    transformation per layer (new closures) would recompile the step for every layer."""
    return optax.adam(learning_rate)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch", "opt"))
def _adaround_step(v, opt_state, inputs, kernel, l_lo, gap, scale, key, beta, lam, *,
                   apply_fn, batch: int, opt: optax.GradientTransformation):
    """One Adam step on the soft-rounding logits `v` from a random batch of `inputs`."""
    def loss_fn(v):
        h = _soft(v)
        x = inputs[jax.random.choice(key, inputs.shape[0], (batch,), replace=False)]
        err = jnp.mean(jnp.square(apply_fn(x, l_lo + h * gap - kernel))) / scale
        return err + lam * jnp.mean(1.0 - jnp.abs(2.0 * h - 1.0) ** beta)

    updates, opt_state = opt.update(jax.grad(loss_fn)(v), opt_state, v)
    return optax.apply_updates(v, updates), opt_state


def adaround_codes(kernel: jax.Array, levels: jax.Array, inputs: jax.Array, apply_fn, *,
                   steps: int = 500, batch: int = 32, learning_rate: float = 1e-2,
                   reg: float = 0.01, key: jax.Array | None = None) -> jax.Array:
    """Codes (uint8, kernel-shaped) of `kernel` on its sorted `levels` [G, L], each the level
    just below or above the float weight, chosen for the layer's output on `inputs`.

    `apply_fn(x, kernel) -> y` is the layer without bias. Deterministic given `key`.
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    inputs = jnp.asarray(inputs, jnp.float32)
    lo, l_lo, gap, pos = _bracket(levels, kernel)
    pos = jnp.clip(pos, 1e-3, 1.0 - 1e-3)  # a finite logit at the ends
    v0 = -jnp.log((_ZETA - _GAMMA) / (pos - _GAMMA) - 1.0)
    key = jax.random.PRNGKey(0) if key is None else key
    n = inputs.shape[0]
    batch = min(batch, n)
    scale = jnp.mean(jnp.square(apply_fn(inputs[:batch], kernel))) + 1e-12
    opt = _adam(float(learning_rate))
    warmup = int(0.2 * steps)
    v, opt_state = v0, opt.init(v0)
    # A Python loop over one jitted step, not a fori_loop: XLA:CPU runs a convolution inside a
    # while loop ~14x slower than the same jitted convolution called from Python (measured).
    for i in range(steps):
        frac = min(max((i - warmup) / max(steps - warmup, 1), 0.0), 1.0)
        v, opt_state = _adaround_step(
            v, opt_state, inputs, kernel, l_lo, gap, scale, jax.random.fold_in(key, i),
            jnp.float32(20.0 + (2.0 - 20.0) * frac), jnp.float32(0.0 if i < warmup else reg),
            apply_fn=apply_fn, batch=batch, opt=opt)
    return (lo + (_soft(v) >= 0.5).astype(lo.dtype)).astype(wq.CODE_DTYPE)


def round_from_float(float_model: nn.Module, float_variables: PyTree, params: PyTree,
                     codes: PyTree, images: jax.Array, *, steps: int = 500,
                     seed: int = 0, apply_kwargs: Mapping | None = None) -> PyTree:
    """`codes` (the DQ layers' tree) re-chosen by `adaround_codes` from the float kernels in
    `float_variables`, the levels in `params`, and each layer's float-model inputs on `images`."""
    flat_codes = flax.traverse_util.flatten_dict(codes)
    flat_params = flax.traverse_util.flatten_dict(params)
    float_params = flax.traverse_util.flatten_dict(float_variables["params"])
    modules = [k[:-1] for k in flat_codes]
    recorded = record_layer_inputs(float_model, float_variables, images, modules, apply_kwargs)
    out = {}
    for i, (path, c) in enumerate(flat_codes.items()):
        x, module = recorded[path[:-1]]
        levels = flat_params[path[:-1] + (wq.LEVELS,)]
        new = adaround_codes(float_params[path], levels, x, _linear_fn(module), steps=steps,
                             key=jax.random.PRNGKey(seed + i))
        out[path] = new.astype(np.asarray(c).dtype)
    return flax.traverse_util.unflatten_dict(out)
