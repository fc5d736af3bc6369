"""dq_jax: direct quantization for low bit-width QAT of CNNs in JAX/Flax."""
from dq_jax.layers import QuantConv, QuantDense
from dq_jax.quant.config import QuantConfig

__version__ = "0.1.0"
__all__ = ["QuantConfig", "QuantConv", "QuantDense", "__version__"]
