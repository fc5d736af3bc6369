"""Float <-> DQ views of one model's variables: the paper's float -> DQ conversion for any model
(`from_float`) and the float model's `params` seen through a quantized one (`float_params`).

Both rest on the layers keeping the float model's module paths (`dq_jax.quantize_model`, the
zoo, `conv=partial(QuantConv, ...)`): the float `params/<path>/kernel` is the quantized layer's
`params/<path>/kernel_levels` + `codes/<path>/kernel`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dq_jax import adaround
from dq_jax.layers import (CODES, LEVEL_FIT_DRAW, PERTURBATIONS, QUANT_STATS,
                           _QuantizedKernelMixin, deferred_level_fits)
from dq_jax.optim import effective_kernels
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig
from dq_jax.rules import QuantizedModel
from dq_jax.trees import flatten

PyTree = Any
Path = tuple[str, ...]


def _lloyd_one_by_one(settings: tuple, kernels: list) -> list:
    """`wq.lloyd_init` of each kernel, op by op: what `init_from` has always run (its bits)."""
    return [wq.lloyd_init(k, *s) for k, s in zip(kernels, settings)]


@functools.partial(jax.jit, static_argnums=0)
def lloyd_compiled(settings: tuple, kernels: list) -> list:
    """`[jax.jit(wq.lloyd_init)(k, *s) ...]` bitwise (`wq.lloyd_init_many`, what a model's
    `init` computes), one compiled Lloyd loop per level count: an 8-bit fit takes seconds op
    by op. (Op by op and compiled may differ in the last bit of a level.)"""
    return wq.lloyd_init_many([(k, *s) for k, s in zip(kernels, settings)])


def convert_params(float_params: Mapping, params: PyTree, codes: PyTree,
                   quant_of: Callable[[Path], QuantConfig], *, source: str,
                   fit: Callable[[tuple, list], list] = _lloyd_one_by_one,
                   ) -> tuple[dict[Path, Any], dict[Path, Any]]:
    """Flat (params, codes) of a quantized model from the float `float_params` (flat) of the
    same architecture, by path: DQ-W levels by Lloyd on the float kernel + nearest codes,
    latent-STE the kernel plus Lloyd levels, LSQ the kernel plus its initial step; every other
    leaf copied (shapes must match). `params` / `codes` give the target structure (values
    unused); `quant_of(module path)` each quantized layer's config; `source` names the float
    variables in errors; `fit(settings, kernels)` runs the Lloyd fits (`lloyd_compiled`:
    compiled)."""
    target, target_codes = flatten(params), flatten(codes)

    def get(path: Path) -> np.ndarray:
        if path not in float_params:
            raise ValueError(
                f"{source} has no parameter {'/'.join(path)}; it must be a float checkpoint of "
                "the same model architecture (same module paths).")
        return np.asarray(float_params[path])

    new_params, new_codes = {}, {}
    jobs, slots = [], []  # Lloyd fits, all run by one call of `fit`
    for p, leaf in target.items():
        module = p[:-1]
        if p[-1] == wq.LEVELS:
            quant = quant_of(module)
            kernel = jnp.asarray(get(module + ("kernel",)))
            stack = kernel.shape[:np.ndim(leaf) - 2]  # nn.scan / nn.vmap axes: one fit a slice
            slices = kernel.reshape(-1, *kernel.shape[len(stack):])
            jobs += [(k, (quant.num_weight_levels, quant.granularity, quant.lloyd_iters))
                     for k in slices]
            slots.append((p, stack, len(slices)))
        elif p[-1] == wq.STEP:
            quant = quant_of(module)
            (new_params[p],) = _per_slice(
                lambda k: (wq.lsq_init_step(k, quant.weight_bits, quant.granularity),),
                get(module + ("kernel",)), np.ndim(leaf) - 1)
        else:
            value = get(p)
            if value.shape != np.shape(leaf):
                raise ValueError(
                    f"{source}: {'/'.join(p)} has shape {value.shape}, this model expects "
                    f"{np.shape(leaf)}; the architectures differ.")
            new_params[p] = jnp.asarray(value, jnp.asarray(leaf).dtype)
    fitted = fit(tuple(s for _, s in jobs), [k for k, _ in jobs]) if jobs else []
    i = 0
    for p, stack, count in slots:
        levels, layer_codes = (jnp.stack(parts).reshape(*stack, *parts[0].shape)
                               for parts in zip(*fitted[i:i + count]))
        i += count
        new_params[p] = levels
        if p[:-1] + ("kernel",) in target_codes:
            new_codes[p[:-1] + ("kernel",)] = layer_codes
    return new_params, new_codes



def _per_slice(fn: Callable, kernel: np.ndarray, stack_dims: int) -> tuple:
    """`fn(kernel)` (a tuple of arrays), or, for a layer stacked by `nn.scan` / `nn.vmap`
    (`stack_dims` leading axes), each slice's result stacked back."""
    kernel = jnp.asarray(kernel)
    if stack_dims <= 0:
        return fn(kernel)
    stack = kernel.shape[:stack_dims]
    fits = [fn(k) for k in kernel.reshape(-1, *kernel.shape[stack_dims:])]
    return tuple(jnp.stack(parts).reshape(*stack, *parts[0].shape) for parts in zip(*fits))


def _init_without_fits(model: nn.Module, args: tuple, apply_kwargs: Mapping):
    """(variables, {module path: QuantConfig}) of `model.init` with every DQ level fit deferred
    (no Lloyd on random kernels: `from_float` replaces them) and the draws dropped."""
    configs: dict[Path, QuantConfig] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _QuantizedKernelMixin):
            configs[tuple(module.scope.path)] = module.quant
        return next_fun(*call_args, **call_kwargs)

    def init(key, *xs):
        with nn.intercept_methods(interceptor):
            return model.init(key, *xs, **apply_kwargs)

    with deferred_level_fits():
        variables = flax.core.unfreeze(jax.jit(init)(jax.random.PRNGKey(0), *args))
    codes = {k: v for k, v in flatten(variables.get(CODES)).items() if k[-1] != LEVEL_FIT_DRAW}
    variables[CODES] = flax.traverse_util.unflatten_dict(codes) if codes else {}
    return variables, configs


def from_float(model: nn.Module, float_variables: Mapping, *args: Any,
               apply_kwargs: Optional[Mapping] = None,
               adaround_images: Optional[Any] = None, adaround_steps: int = 500,
               float_model: Optional[nn.Module] = None, seed: int = 0) -> dict:
    """The initial variables of the quantized `model` from `float_variables` of the float
    model with the same module paths: the paper's two-stage recipe for your own network.

    Every DQ-W layer gets Lloyd levels of its float kernel at its own width and the nearest
    codes (compiled: bitwise what `init` fits to a kernel, `lloyd_compiled`) (`adaround_images`: codes chosen by AdaRound on those images instead,
    `dq_jax.adaround`); latent-STE / LSQ layers their float kernel plus levels / step; biases,
    float layers and `batch_stats` are copied; `quant_stats` are fresh (the first training
    batch calibrates them). `args` are example inputs for `init` (shapes only), `apply_kwargs`
    the keyword arguments of `init` and of AdaRound's eval-mode float forward (e.g.
    `{'train': False}`). `float_model` (AdaRound only) defaults to the model
    `quantize_model` wrapped. Returns {'params', 'codes', 'batch_stats', 'quant_stats'}.
    """
    apply_kwargs = dict(apply_kwargs or {})
    if "params" not in float_variables:
        raise ValueError("from_float: float_variables must be the float model's variables "
                         f"({{'params': ..., 'batch_stats': ...}}); got keys "
                         f"{sorted(float_variables)}.")
    variables, configs = _init_without_fits(model, args, apply_kwargs)

    def quant_of(module: Path) -> QuantConfig:
        return configs[module]

    params, codes = convert_params(flatten(float_variables["params"]), variables["params"],
                                   variables.get(CODES), quant_of, fit=lloyd_compiled,
                                   source="from_float: float_variables")
    out = {"params": flax.traverse_util.unflatten_dict(params),
           CODES: flax.traverse_util.unflatten_dict(codes) if codes else {}}
    float_stats, stats = flatten(float_variables.get("batch_stats")), flatten(
        variables.get("batch_stats"))
    if set(float_stats) != set(stats):
        raise ValueError(f"from_float: float_variables['batch_stats'] has "
                         f"{sorted('/'.join(k) for k in set(float_stats) ^ set(stats))[:4]} "
                         "where the model differs; the architectures differ.")
    out["batch_stats"] = flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(float_stats[k], stats[k].dtype) for k in stats}) if stats else {}
    out[QUANT_STATS] = variables.get(QUANT_STATS, {})
    if adaround_images is not None and codes:
        if float_model is None:
            if not isinstance(model, QuantizedModel):
                raise ValueError("from_float: AdaRound needs the float model's forward; pass "
                                 "float_model= (the model without quantized layers).")
            float_model = model.model
        out[CODES] = adaround.round_from_float(
            float_model, float_variables, out["params"], out[CODES], adaround_images,
            steps=adaround_steps, seed=seed, apply_kwargs=apply_kwargs)
    return out


def float_params(variables: Mapping) -> dict:
    """`params` as the float model has them: each quantized layer's `kernel` is the kernel it
    trains (DQ: `W_q`, plus the `perturbations` entry when given, so a loss on it reaches
    dL/dW_q; latent-STE / LSQ: their float kernel), its levels / step left out.

    For a loss written over a float model's params, e.g. the Flax ImageNet example's L2
    penalty `tree_leaves(params)` with `ndim > 1`: over `float_params(state.variables(
    params))` it decays what float training decays (with `{'params', 'perturbations'}` alone
    it would decay the levels and give the quantized kernels none).
    """
    flat = dict(flatten(variables["params"]))
    perturbations = flatten(variables.get(PERTURBATIONS))
    for module, w_q in effective_kernels(variables["params"], variables.get(CODES) or {}).items():
        p = perturbations.get(module + ("kernel",))
        flat[module + ("kernel",)] = w_q if p is None else w_q + p
    flat = {k: v for k, v in flat.items() if k[-1] not in (wq.LEVELS, wq.STEP)}
    return flax.traverse_util.unflatten_dict(flat) if flat else {}
