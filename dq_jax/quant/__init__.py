"""Quantizers: direct weights (DQ-W), baselines, channel-aware activations (DQ-A)."""
from dq_jax.quant.activations import ActQuantizer
from dq_jax.quant.config import QuantConfig
from dq_jax.quant.weights import (gather_levels, lloyd_init, nearest_codes, reassign_codes,
                                  sort_levels, stochastic_codes)

__all__ = ["ActQuantizer", "QuantConfig", "gather_levels", "lloyd_init", "nearest_codes",
           "reassign_codes", "sort_levels", "stochastic_codes"]
