"""dq_jax: direct quantization for low bit-width QAT of CNNs in JAX/Flax.

The public names (`QuantConfig`, `QuantConv`, `quantize_model`, ...) are imported on first use (PEP 562), so
`python -m dq_jax.main` installs its SIGTERM handling before JAX and Flax load.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantConv", "QuantDense", "QuantOverride", "QuantRule", "TrainState", "dq_optimizer",
           "float_params", "from_float", "quantize_model", "__version__"]

_LAZY = {"QuantConfig": "dq_jax.quant.config", "QuantConv": "dq_jax.layers",
         "QuantDense": "dq_jax.layers", "QuantRule": "dq_jax.rules", "QuantOverride": "dq_jax.rules",
         "quantize_model": "dq_jax.rules", "TrainState": "dq_jax.train_state",
         "dq_optimizer": "dq_jax.optim", "float_params": "dq_jax.conversion",
         "from_float": "dq_jax.conversion"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dq_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
