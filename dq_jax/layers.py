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
  perturbations: `kernel` zeros (dq) - its gradient is `dL/dW_q`, the signal the
                 code update needs, without any float shadow kernel
  quant_stats:   `act_quant/{alpha|levels, initialized}` (acts='dq')
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from dq_jax.quant import weights as wq
from dq_jax.quant.activations import ActQuantizer
from dq_jax.quant.config import QuantConfig

CODES = "codes"
PERTURBATIONS = "perturbations"
QUANT_STATS = "quant_stats"


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
                "kernel_levels",
                lambda _: wq.lloyd_init(kernel, num_levels, cfg.granularity, cfg.lloyd_iters)[0])
            return wq.latent_ste_kernel(kernel, levels)
        step = super().param(
            "kernel_step", lambda _: wq.lsq_init_step(kernel, cfg.weight_bits, cfg.granularity))
        return wq.lsq_kernel(kernel, step, cfg.weight_bits)

    def _direct_kernel(self, init_fn, shape, dtype):
        cfg: QuantConfig = self.quant
        if self.has_variable(CODES, "kernel"):
            levels = self.get_variable("params", "kernel_levels")
            codes = self.get_variable(CODES, "kernel")
        elif self.is_initializing():
            # One float draw of the user's initializer seeds both levels and codes.
            w0 = init_fn(self.make_rng("params"), shape, dtype)
            levels0, codes0 = wq.lloyd_init(w0, cfg.num_weight_levels, cfg.granularity,
                                            cfg.lloyd_iters)
            levels = super().param("kernel_levels", lambda _: levels0)
            codes = self.variable(CODES, "kernel", lambda: codes0).value
        else:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' uses weights='dq' but its integer "
                f"codes are missing: pass the '{CODES}' collection returned by init, e.g. "
                f"model.apply({{'params': ..., '{CODES}': ..., '{QUANT_STATS}': ...}}, x).")
        w_q = wq.gather_levels(levels, codes)
        return self.perturb("kernel", w_q, collection=PERTURBATIONS)

    def _quantize_input(self, inputs: jax.Array, train: Optional[bool]) -> jax.Array:
        cfg: QuantConfig = self.quant
        if cfg.acts == "float":
            return inputs
        train = nn.merge_param("train", self.train, train)
        return ActQuantizer(cfg, name="act_quant")(inputs, train=train)


class QuantConv(_QuantizedKernelMixin, nn.Conv):
    """`nn.Conv` with a quantized kernel and input (see module docstring).

    Extra fields: `quant` (QuantConfig) and `train` (may instead be passed at
    call time, like BatchNorm's `use_running_average`; needed when acts != 'float').
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


def split_variables(variables: Any) -> tuple[dict, dict]:
    """Splits init output into (trainable params, everything else except perturbations)."""
    variables = dict(variables)
    variables.pop(PERTURBATIONS, None)
    params = variables.pop("params", {})
    return params, variables
