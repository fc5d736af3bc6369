"""Flax NNX front end of dq_jax: the same quantizers and update as the Linen layers.

    from flax import nnx
    import dq_jax.nnx as dqnnx

    layer = dqnnx.QuantConv(16, 32, (3, 3), quant=QuantConfig(), rngs=nnx.Rngs(0))
    tx = dq_jax.optim.dq_optimizer(0.05, 1e-3, key=1)
    optimizer = dqnnx.Optimizer(model, tx)
    loss, grads = dqnnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)

See docs/nnx.md. Variable types: `nnx.Param` (levels, float params),
`QuantCodes` (integer codes), `QuantPerturbation` (dL/dW_q hooks),
`QuantStats` (activation statistics).
"""
from dq_jax.nnx.digits import DigitsCNN
from dq_jax.nnx.interop import linen_variables, load_dqz, load_linen_variables, save_dqz
from dq_jax.nnx.layers import (ActQuantizer, QuantCodes, QuantConv, QuantLinear,
                               QuantPerturbation, QuantStats, quant_layers)
from dq_jax.nnx.optim import Optimizer, codes_tree, grad, params_tree, value_and_grad
from dq_jax.nnx.rules import quantize_model

__all__ = ["ActQuantizer", "DigitsCNN", "Optimizer", "QuantCodes", "QuantConv", "QuantLinear",
           "QuantPerturbation", "QuantStats", "codes_tree", "grad",
           "linen_variables", "load_dqz", "load_linen_variables", "params_tree",
           "quant_layers", "quantize_model", "save_dqz", "value_and_grad"]
