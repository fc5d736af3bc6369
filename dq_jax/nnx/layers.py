"""`QuantConv` / `QuantLinear`: drop-in quantized `nnx.Conv` / `nnx.Linear`.

They subclass the NNX layers, so every constructor argument (`rngs=` included),
padding mode and dtype rule is Flax's own; the forward *is* `nnx.Conv.__call__` /
`nnx.Linear.__call__`, run with the quantized kernel in place of the float one,
on the quantized input. The maths is `dq_jax.quant` (the same functions, and
the same Linen `ActQuantizer`, the Linen layers use). With
`QuantConfig.float()` a layer is exactly `nnx.Conv` / `nnx.Linear`.

Variables of a quantized layer (NNX path -> Linen collection/path):
  `kernel_levels`   nnx.Param [G, L]          params/.../kernel_levels   (dq, latent_ste)
  `kernel`          nnx.Param                 params/.../kernel          (latent_ste, lsq, float)
  `kernel_step`     nnx.Param [G]             params/.../kernel_step     (lsq)
  `bias`            nnx.Param                 params/.../bias
  `kernel_codes`    QuantCodes uint8          codes/.../kernel           (dq)
  `kernel_perturbation` QuantPerturbation     perturbations/.../kernel   (dq)
  `act_quant.alpha|levels`, `act_quant.initialized`  QuantStats
                                              quant_stats/.../act_quant/...  (acts='dq')

The perturbation hook holds a scalar 0 (no memory) except inside
`dq_jax.nnx.value_and_grad`, which widens it to the kernel's shape so that its
gradient is `dL/dW_q`; a scalar hook is not added to the kernel.

Train/eval: activation statistics are fitted (EMA) only when
`use_running_average` is False, NNX's BatchNorm attribute, so `model.train()` /
`model.eval()` switch them; a call-time `use_running_average=` overrides it.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from dq_jax.quant import activations as qa
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig

LEVELS, STEP = wq.LEVELS, wq.STEP  # re-exported for the NNX API
CODES_ATTR = "kernel_codes"
PERTURBATION_ATTR = "kernel_perturbation"


class QuantCodes(nnx.Variable):
    """Integer (uint8) codes of a DQ-W kernel: not trained by autodiff, updated by
    `dq_jax.nnx.Optimizer` (direct re-assignment)."""


class QuantPerturbation(nnx.Variable):
    """Zero added to a DQ-W kernel `W_q`; its gradient is `dL/dW_q` (see module docstring)."""


class QuantStats(nnx.Variable):
    """Fitted activation-quantizer statistics (EMA, updated only in train mode)."""


# One Lloyd init per kernel shape, compiled (eager op-by-op dispatch is slow).
_lloyd_init = jax.jit(wq.lloyd_init, static_argnums=(1, 2, 3))


@functools.lru_cache(maxsize=None)
def _initial_act_stats(config: QuantConfig) -> dict:
    """The Linen quantizer's initial `quant_stats` (no calibration happens at init)."""
    with jax.ensure_compile_time_eval():  # constants, also when a model is built under jit
        variables = qa.ActQuantizer(config).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.float32), train=False)
        return jax.device_get(flax.core.unfreeze(variables["quant_stats"]))


class ActQuantizer(nnx.Module):
    """NNX holder of a DQ-A quantizer's statistics; the maths is the Linen
    `dq_jax.quant.activations.ActQuantizer`, applied functionally."""

    def __init__(self, config: QuantConfig):
        self.config = config
        for name, value in _initial_act_stats(config).items():
            setattr(self, name, QuantStats(jnp.asarray(value)))

    def _stat_names(self) -> tuple[str, ...]:
        return tuple(sorted(_initial_act_stats(self.config)))

    def __call__(self, x: jax.Array, *, update: bool) -> jax.Array:
        """Quantizes `x`; with `update=True` first fits the statistics on `x` (train)."""
        stats = {name: getattr(self, name)[...] for name in self._stat_names()}
        module = qa.ActQuantizer(self.config)
        if not update:
            return module.apply({"quant_stats": stats}, x, train=False)
        y, new = module.apply({"quant_stats": stats}, x, train=True, mutable=["quant_stats"])
        for name, value in new["quant_stats"].items():
            getattr(self, name).set_value(value)
        return y


class _KernelView:
    """`self` for the parent's `__call__`: every attribute is the layer's, except
    `kernel`, which is the quantized kernel."""

    def __init__(self, layer: nnx.Module, kernel: jax.Array):
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "kernel", _Const(kernel))

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_layer"), name)


class _Const:
    def __init__(self, value: jax.Array):
        self.value = value

    def __getitem__(self, index):
        return self.value if index is Ellipsis else self.value[index]

    @property
    def shape(self):
        return self.value.shape


class _QuantMixin:
    """Replaces the float kernel by the configured quantized kernel, quantizes the input."""

    _flax_layer: type  # nnx.Conv or nnx.Linear

    # One constructor and call for both layers: the Flax layer's own arguments pass through
    # (cooperative super() reaches nnx.Conv / nnx.Linear), plus `quant` and the train flag.
    def __init__(self, *args: Any, quant: QuantConfig = QuantConfig(),
                 use_running_average: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._setup_quant(quant, use_running_average)

    def __call__(self, inputs: jax.Array, out_sharding=None, *,
                 use_running_average: Optional[bool] = None) -> jax.Array:
        return self._quant_call(inputs, use_running_average, out_sharding=out_sharding)

    def _setup_quant(self, quant: QuantConfig, use_running_average: bool) -> None:
        if not isinstance(quant, QuantConfig):
            raise TypeError(f"{type(self).__name__}: quant must be a dq_jax QuantConfig, got "
                            f"{type(quant).__name__}.")
        self.quant = quant
        self.use_running_average = use_running_average
        cfg = quant
        if cfg.acts != "float":
            self.act_quant = ActQuantizer(cfg)
        if cfg.weights == "float":
            return
        kernel = self.kernel[...]  # the one float draw of the user's kernel_init
        num_levels = cfg.num_weight_levels
        wq.check_kernel_shape(kernel.shape, cfg.granularity, num_levels)
        if cfg.weights == "dq":
            levels, codes = _lloyd_init(kernel, num_levels, cfg.granularity, cfg.lloyd_iters)
            del self.kernel  # no float kernel: levels + integer codes only
            setattr(self, LEVELS, nnx.Param(levels))
            setattr(self, CODES_ATTR, QuantCodes(codes))
            setattr(self, PERTURBATION_ATTR, QuantPerturbation(jnp.zeros((), levels.dtype)))
        elif cfg.weights == "latent_ste":
            levels, _ = _lloyd_init(kernel, num_levels, cfg.granularity, cfg.lloyd_iters)
            setattr(self, LEVELS, nnx.Param(levels))
        else:  # lsq
            setattr(self, STEP, nnx.Param(
                wq.lsq_init_step(kernel, cfg.weight_bits, cfg.granularity)))

    def quantized_kernel(self) -> jax.Array:
        """The kernel the forward uses (`W_q`; the float kernel when weights='float')."""
        cfg = self.quant
        if cfg.weights == "float":
            return self.kernel[...]
        if cfg.weights == "dq":
            w_q = wq.gather_levels(getattr(self, LEVELS)[...], getattr(self, CODES_ATTR)[...])
            hook = getattr(self, PERTURBATION_ATTR)[...]
            # A scalar hook is inactive; value_and_grad widens it to W_q's shape.
            return w_q + hook if hook.shape == w_q.shape else w_q
        if cfg.weights == "latent_ste":
            return wq.latent_ste_kernel(self.kernel[...], getattr(self, LEVELS)[...])
        return wq.lsq_kernel(self.kernel[...], getattr(self, STEP)[...], cfg.weight_bits)

    def _quant_call(self, inputs: jax.Array, use_running_average: Optional[bool],
                    **kwargs: Any) -> jax.Array:
        cfg = self.quant
        if cfg.acts != "float":
            use_ra = nnx.module.first_from(
                use_running_average, self.use_running_average,
                error_msg="No `use_running_average` argument was provided to "
                          f"{type(self).__name__} as either a __call__ argument or "
                          "class attribute")
            inputs = self.act_quant(inputs, update=not use_ra)
        if cfg.weights == "float":
            return self._flax_layer.__call__(self, inputs, **kwargs)
        return self._flax_layer.__call__(_KernelView(self, self.quantized_kernel()), inputs,
                                         **kwargs)


class QuantConv(_QuantMixin, nnx.Conv):
    """`nnx.Conv` with a quantized kernel and input (see the module docstring).

    Same arguments as `nnx.Conv`, plus keyword-only `quant` (QuantConfig,
    default DQ W2A2) and `use_running_average` (default False, like
    `nnx.BatchNorm`; set by `model.train()` / `model.eval()`).
    """

    _flax_layer = nnx.Conv


class QuantLinear(_QuantMixin, nnx.Linear):
    """`nnx.Linear` with a quantized kernel and input (see `QuantConv`)."""

    _flax_layer = nnx.Linear


def quant_layers(model: nnx.Module) -> list[tuple[tuple, _QuantMixin]]:
    """(path, layer) of every QuantConv / QuantLinear in `model`."""
    return [(path, node) for path, node in nnx.iter_graph(model)
            if isinstance(node, _QuantMixin)]


def set_perturbation_hooks(model: nnx.Module, *, wide: bool) -> None:
    """Sets every DQ-W layer's hook to kernel-shaped zeros (`wide`) or to a scalar 0."""
    for _, layer in quant_layers(model):
        hook = getattr(layer, PERTURBATION_ATTR, None)
        if hook is not None:
            shape = getattr(layer, CODES_ATTR).shape if wide else ()
            hook.set_value(jnp.zeros(shape, hook.get_value().dtype))
