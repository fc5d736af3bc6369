"""`QuantConv` and `QuantDense`: drop-in quantized `nn.Conv` / `nn.Dense`.

They subclass the Flax layers, so every constructor argument, padding mode and
dtype rule is Flax's own; the only change is *where the kernel comes from*
(`param('kernel', ...)` is intercepted) plus an activation quantizer on the
input. With `QuantConfig.float()` they are exactly `nn.Conv` / `nn.Dense`.

Variables of a quantized layer (DESIGN §1.1):
  params:        `kernel_levels` [G, L] (dq, latent_ste), `kernel` (latent_ste,
                 lsq, float), `kernel_step` [G] (lsq), `bias`
  codes:         `kernel` uint8, kernel-shaped (dq) - integer, not trained by
                 autodiff, updated by `dq_jax.optim`
  quant_stats:   `act_quant/{alpha|levels, initialized[, signed]}` (acts='dq')
  perturbations: `kernel` (dq), *not* created by `init` (nothing to store): pass
                 `zero_perturbations(codes)` when computing gradients; the gradient
                 w.r.t. it is `dL/dW_q`, the signal the code update needs, without any
                 float shadow kernel. Without it the layer runs the same forward.

Train mode (what the activation quantizer does; the weight path - DQ, latent_ste,
lsq - computes the same in both modes): an explicit `train=` (constructor or call)
decides; otherwise the layer is in train mode exactly when the `quant_stats`
collection is mutable, as BatchNorm's `batch_stats` update when mutable in the Flax
ImageNet example. So a model that calls `conv(...)(x)` without `train` trains with
`model.apply(v, x, mutable=['batch_stats', 'quant_stats'])` and evaluates with
`model.apply(v, x)`.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dq_jax.quant import weights as wq
from dq_jax.quant.activations import ActQuantizer
from dq_jax.quant.config import QuantConfig

CODES = "codes"
PERTURBATIONS = "perturbations"
QUANT_STATS = "quant_stats"
# Name (in the `codes` collection, so lifted transforms stack it as they stack the codes) of
# the float initializer draw a DQ layer stores under `deferred_level_fits`.
LEVEL_FIT_DRAW = "kernel_level_fit_draw"

# module path -> (num_levels, granularity, lloyd_iters) while `deferred_level_fits` is active.
_DEFERRED: contextvars.ContextVar = contextvars.ContextVar("dq_jax_deferred_fits", default=None)


@contextlib.contextmanager
def deferred_level_fits() -> Iterator[dict]:
    """While active, a DQ layer's `init` stores its float initializer draw (`codes` entry
    `LEVEL_FIT_DRAW`) with zero levels and codes instead of fitting them; the yielded dict
    maps each such layer's path to its fit's settings, filled as `init` is traced.
    `fit_deferred_levels` then fits them all in a jit of its own, with one Lloyd loop for
    all layers (`lloyd_init_many`).

    Why: inlined into a jitted `init`, every layer's Lloyd fit has a loop of its own and
    XLA:CPU compiles them with the model's init graph, slower than apart (ResNet-18,
    docs/notebook.md §2.2). Same values: the fits read the same draws and give `lloyd_init`'s
    results bitwise (per slice for `nn.scan`-stacked layers).
    """
    fits: dict = {}
    token = _DEFERRED.set(fits)
    try:
        yield fits
    finally:
        _DEFERRED.reset(token)


def fit_deferred_levels(variables: dict, fits: dict) -> dict:
    """`variables` of an `init` under `deferred_level_fits` -> those of a plain `init`: each
    recorded layer's levels and codes fitted from its stored draw (`lloyd_init_many`; each
    slice of a stacked layer on its own), and the draws dropped. Pure; jit it."""
    if not fits:
        return variables
    variables = dict(variables)
    params = flax.traverse_util.flatten_dict(variables["params"])
    codes = flax.traverse_util.flatten_dict(variables[CODES])
    jobs, slots = [], []
    for path, settings in fits.items():
        draw = codes.pop((*path, LEVEL_FIT_DRAW))
        stack = params[(*path, wq.LEVELS)].shape[:-2]       # nn.scan / nn.vmap axes, if any
        slices = draw.reshape(-1, *draw.shape[len(stack):])
        jobs += [(w, *settings) for w in slices]
        slots.append((path, stack, len(slices)))
    fitted, i = wq.lloyd_init_many(jobs), 0
    for path, stack, count in slots:
        levels, layer_codes = zip(*fitted[i:i + count])
        i += count
        if stack:
            levels = jnp.stack(levels).reshape(*stack, *levels[0].shape)
            layer_codes = jnp.stack(layer_codes).reshape(*stack, *layer_codes[0].shape)
        else:
            (levels,), (layer_codes,) = levels, layer_codes
        params[(*path, wq.LEVELS)], codes[(*path, "kernel")] = levels, layer_codes
    variables["params"] = flax.traverse_util.unflatten_dict(params)
    variables[CODES] = flax.traverse_util.unflatten_dict(codes)
    return variables


class _QuantizedKernelMixin:
    """Replaces the float `kernel` parameter by the configured quantized kernel."""

    def param(self, name: str, init_fn, *init_args, unbox: bool = True, **init_kwargs):
        cfg: QuantConfig = self.quant
        if name != "kernel" or cfg.weights == "float":
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        shape, dtype = init_args
        num_levels = cfg.num_weight_levels
        wq.check_kernel_shape(shape, cfg.granularity, num_levels)
        if cfg.weights == "dq":
            return self._direct_kernel(init_fn, shape, dtype)
        kernel = super().param("kernel", init_fn, *init_args, unbox=unbox, **init_kwargs)
        if cfg.weights == "latent_ste":
            levels = super().param(
                wq.LEVELS,
                lambda _: wq.lloyd_init(kernel, num_levels, cfg.granularity, cfg.lloyd_iters)[0])
            return wq.latent_ste_kernel(kernel, levels)
        step = super().param(
            wq.STEP, lambda _: wq.lsq_init_step(kernel, cfg.weight_bits, cfg.granularity))
        return wq.lsq_kernel(kernel, step, cfg.weight_bits)

    def _direct_kernel(self, init_fn, shape, dtype):
        cfg: QuantConfig = self.quant
        if self.has_variable(CODES, "kernel"):
            levels = self.get_variable("params", wq.LEVELS)
            codes = self.get_variable(CODES, "kernel")
        elif self.is_initializing():
            # One float draw of the user's initializer seeds both levels and codes.
            w0 = init_fn(self.make_rng("params"), shape, dtype)
            deferred = _DEFERRED.get()
            if deferred is None:
                levels0, codes0 = wq.lloyd_init(w0, cfg.num_weight_levels, cfg.granularity,
                                                cfg.lloyd_iters)
            else:   # zeros now; `fit_deferred_levels` fits them from the stored draw
                deferred[tuple(self.path)] = (cfg.num_weight_levels, cfg.granularity,
                                              cfg.lloyd_iters)
                self.variable(CODES, LEVEL_FIT_DRAW, lambda: w0)
                levels0 = jnp.zeros((wq.num_groups(shape, cfg.granularity),
                                     cfg.num_weight_levels), jnp.float32)
                codes0 = jnp.zeros(shape, wq.CODE_DTYPE)
            levels = super().param(wq.LEVELS, lambda _: levels0)
            codes = self.variable(CODES, "kernel", lambda: codes0).value
        else:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' uses weights='dq' but its integer "
                f"codes are missing: pass the '{CODES}' collection returned by init, e.g. "
                f"model.apply({{'params': ..., '{CODES}': ..., '{QUANT_STATS}': ...}}, x).")
        if (not self.is_initializing() and not self.is_mutable_collection(PERTURBATIONS)
                and not self.has_variable(PERTURBATIONS, "kernel") and under_autodiff(levels)):
            raise ValueError(
                f"{type(self).__name__} '{'/'.join(self.path)}': its levels are differentiated "
                f"but no '{PERTURBATIONS}' were passed, so no gradient reaches its integer codes "
                "and they would stay frozen. Differentiate w.r.t. {'params': params, "
                f"'{PERTURBATIONS}': dq_jax.layers.zero_perturbations(codes)}} "
                "(dq_jax.train_state.TrainState.differentiable()) and update with "
                "dq_jax.optim.dq_optimizer (TrainState.apply_gradients).")
        with jax.named_scope("dq_weight"):  # a name for profiles and HLO metadata
            w_q = wq.gather_levels(levels, codes)
        # `init` stores no perturbation (f32 zeros as large as 4x the codes, nothing to
        # keep); an apply that passes one gets `W_q + p`, whose gradient is dL/dW_q. A
        # mutable 'perturbations' collection that lacks this layer's entry is not filled
        # either (e.g. `apply(..., mutable=True)`).
        if self.is_initializing() or (self.is_mutable_collection(PERTURBATIONS)
                                      and not self.has_variable(PERTURBATIONS, "kernel")):
            return w_q
        return self.perturb("kernel", w_q, collection=PERTURBATIONS)

    def _train_mode(self, train: Optional[bool]) -> bool:
        """Explicit `train` (constructor or call), else whether `quant_stats` is mutable."""
        if self.train is not None and train is not None:
            raise ValueError(
                f"{type(self).__name__} '{self.name}': `train` was passed both to the "
                f"constructor ({self.train}) and at call time ({train}); pass it once, or "
                f"neither to follow whether '{QUANT_STATS}' is mutable.")
        explicit = self.train if train is None else train
        if explicit is not None:
            return bool(explicit)
        mutable = self.is_mutable_collection(QUANT_STATS)
        if (not mutable and self.is_mutable_collection("batch_stats")
                and not self.is_initializing()):
            warnings.warn(
                f"{type(self).__name__} '{self.name}' runs in eval mode (its activation "
                f"statistics are not updated) because '{QUANT_STATS}' is not mutable while "
                f"'batch_stats' is: to train, pass mutable=['batch_stats', '{QUANT_STATS}'] "
                "(or train=True to the layer).", stacklevel=2)
        return mutable

    def _quantize_input(self, inputs: jax.Array, train: Optional[bool]) -> jax.Array:
        cfg: QuantConfig = self.quant
        if cfg.acts == "float":
            return inputs
        train = self._train_mode(train)
        try:
            return ActQuantizer(cfg, name="act_quant")(inputs, train=train)
        except (flax.errors.ScopeCollectionNotFound, flax.errors.ScopeVariableNotFoundError) as e:
            if QUANT_STATS not in str(e):
                raise
            raise ValueError(
                f"{type(self).__name__} '{'/'.join(self.path)}' finds no activation statistics "
                f"('{QUANT_STATS}') in the variables passed to apply: pass every collection "
                f"init returned (params, {CODES}, batch_stats, {QUANT_STATS}) and keep the "
                f"updated '{QUANT_STATS}' after a train step; a train state that holds only "
                "params and batch_stats (the Flax ImageNet example's) drops them: use "
                "dq_jax.train_state.TrainState and apply with state.variables(...).") from e


class QuantConv(_QuantizedKernelMixin, nn.Conv):
    """`nn.Conv` with a quantized kernel and input (see module docstring).

    Extra fields: `quant` (QuantConfig) and `train` (optional, or at call time, like
    BatchNorm's `use_running_average`). Left out (a model written for `nn.Conv`), the
    activation statistics update exactly when `quant_stats` is mutable.
    """

    quant: QuantConfig = QuantConfig()
    train: Optional[bool] = None

    @nn.compact
    def __call__(self, inputs: jax.Array, train: Optional[bool] = None) -> jax.Array:
        return super().__call__(self._quantize_input(inputs, train))


class QuantDense(_QuantizedKernelMixin, nn.Dense):
    """`nn.Dense` with a quantized kernel and input (see `QuantConv`)."""

    quant: QuantConfig = QuantConfig()
    train: Optional[bool] = None

    @nn.compact
    def __call__(self, inputs: jax.Array, train: Optional[bool] = None) -> jax.Array:
        return super().__call__(self._quantize_input(inputs, train))


def under_autodiff(x: Any) -> bool:
    """Whether `x` is being differentiated (a JVP/linearize tracer, also under `vmap`).

    JAX has no public test for this; the tracer classes are looked up by name so that a JAX
    without them turns the check off instead of failing. Inside `nn.scan` / `nn.remat`
    bodies (traced to a jaxpr first) it cannot tell and says False.
    """
    from jax._src.interpreters import ad  # pylint: disable=import-outside-toplevel
    kinds = tuple(getattr(ad, n) for n in ("JVPTracer", "LinearizeTracer") if hasattr(ad, n))
    while isinstance(x, jax.core.Tracer):
        if isinstance(x, kinds):
            return True
        x = getattr(x, "val", None)  # a BatchTracer wraps the value it batches
    return False


def zero_perturbations(codes: Any, dtype: Any = jnp.float32) -> Any:
    """Zeros shaped like the `codes` collection: the `perturbations` to pass to `apply`
    when computing gradients, whose gradient is then dL/dW_q per DQ layer (init does not
    return them; they hold nothing worth storing)."""
    return jax.tree.map(lambda c: jnp.zeros(c.shape, dtype), codes)
