"""Quantization configuration shared by every quantized layer.

A single frozen (hashable) dataclass so it can be a field of a `flax.linen`
module and a static argument of `jax.jit`. Validation happens at construction so
a bad config fails before any tracing, with the field name and allowed values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

WEIGHT_METHODS = ("dq", "latent_ste", "lsq", "float")
ACT_METHODS = ("dq", "float")
GRANULARITIES = ("per_layer", "per_channel")
ACT_LEVELS = ("uniform", "learned")
ACT_ERRORS = ("channel", "global")
# DQ code re-assignment (optimizer, config); one home. 'error_feedback' is an ablation, not
# the method: nearest rounding of W_q + u + r with the residual r carried per weight (a float
# shadow weight in all but name), to measure what the missing accumulator is worth;
# 'latent_feedback' keeps W_q + r fixed when levels move (latent-STE in DQ's state).
FEEDBACK_ROUNDINGS = ("error_feedback", "latent_feedback")
# 'inertia': the multi-level form of Bop (Helwegen et al. 2019): a weight moves one level when
# its code update reaches the gap to that level, deterministically; the code momentum is the
# evidence, and INERTIA_AFTER_MOVE says what a move does to it.
ROUNDINGS = ("stochastic", "nearest") + FEEDBACK_ROUNDINGS + ("inertia",)
INERTIA_AFTER_MOVE = ("subtract", "reset", "keep")
# The weight widths bit allocation chooses among (dq_jax/allocation.py; config.bit_budget).
CANDIDATE_BITS: tuple[int, ...] = (2, 3, 4, 8)
# Where the random roundings' uniforms come from: 'hash' (one counter-based hash over all
# layers, issue 27) or 'per_layer' (a threefry key per layer: the stream before it).
RANDOM_STREAMS = ("hash", "per_layer")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"QuantConfig.{field}={value!r} is not supported; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}.")


def _check_bits(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(
            f"QuantConfig.{field}={value!r} is out of range; bits must be an "
            "integer in 1..8 (L = 2**bits quantization levels).")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one layer quantizes its kernel and its input activations.

    Attributes:
      weights: 'dq' (direct: learnable levels + integer codes, no float
        kernel), 'latent_ste' (float latent kernel + learnable levels + STE),
        'lsq' (uniform symmetric levels with a learned step), or 'float'.
      weight_bits: bits per weight, 1..8 (L = 2**bits levels).
      granularity: 'per_layer' (one level set) or 'per_channel' (one level set
        per output channel, the kernel's last axis).
      acts: 'dq' (channel-aware fitted activation quantizer) or 'float'.
      act_bits: bits per activation, 1..8.
      act_levels: 'uniform' (levels alpha*k, fitted step) or 'learned'
        (L sorted fitted levels).
      act_error: 'channel' (per-channel normalised error, the method) or
        'global' (plain squared error, the ablation).
      act_signed: grid of the input quantizer. None (default): decided from the data at
        calibration - the signed grid (levels on both sides of zero) if it fits the first
        training batch with a lower error than the unsigned one, so a layer reading
        normalised pixels gets a signed grid and a post-ReLU layer an unsigned one without a
        flag; the choice is stored in `quant_stats` (`signed`) and fixed afterwards.
        True / False: always signed / unsigned (the library's models set it per layer).
        With act_bits=1 None means unsigned (a signed grid needs >= 2 bits).
      act_momentum: EMA momentum of the fitted activation statistics.
      act_calib_iters: closed-form fit iterations on the first batch.
      lloyd_iters: cap on the Lloyd (1-D k-means) iterations of the weight-level init;
        it stops at the fixed point. 200: on ResNet-20 kernels 5 left the 4-bit error up
        to 2.2x the converged one (docs/notebook.md §1), heavy tails need ~100.
    """

    weights: str = "dq"
    weight_bits: int = 2
    granularity: str = "per_layer"
    acts: str = "dq"
    act_bits: int = 2
    act_levels: str = "uniform"
    act_error: str = "channel"
    act_signed: Optional[bool] = None
    act_momentum: float = 0.9
    act_calib_iters: int = 10
    lloyd_iters: int = 200

    def __post_init__(self):
        _check_choice("weights", self.weights, WEIGHT_METHODS)
        _check_choice("acts", self.acts, ACT_METHODS)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        _check_choice("act_levels", self.act_levels, ACT_LEVELS)
        _check_choice("act_error", self.act_error, ACT_ERRORS)
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        if self.weights == "lsq" and self.weight_bits < 2:
            raise ValueError(
                "QuantConfig.weight_bits=1 is not supported with weights='lsq' "
                "(symmetric LSQ needs >= 2 bits); use weights='dq' for 1 bit.")
        if not (self.act_signed is None or isinstance(self.act_signed, bool)):
            raise ValueError(
                f"QuantConfig.act_signed={self.act_signed!r} must be None (decided from the "
                "calibration batch), True (signed grid) or False (unsigned grid).")
        if self.acts == "dq" and self.act_signed is True and self.act_bits < 2:
            raise ValueError(
                "QuantConfig.act_bits=1 is not supported with act_signed=True "
                "(a signed grid needs >= 2 bits).")
        if not 0.0 <= self.act_momentum < 1.0:
            raise ValueError(
                f"QuantConfig.act_momentum={self.act_momentum!r} must be in [0, 1).")
        for name in ("act_calib_iters", "lloyd_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"QuantConfig.{name}={value!r} must be a non-negative integer.")

    @property
    def num_weight_levels(self) -> int:
        return 2 ** self.weight_bits

    @property
    def num_act_levels(self) -> int:
        return 2 ** self.act_bits

    @property
    def is_float(self) -> bool:
        return self.weights == "float" and self.acts == "float"

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def float(cls) -> "QuantConfig":
        """A config that quantizes nothing (the layer equals nn.Conv/nn.Dense).

        `act_signed=False`, not None: the sign does not matter without an activation
        quantizer, and the CLI's base config (built from this) keeps a bool-typed field, so
        `--config.quant.act_signed=...` parses and recorded run configs stay as they were.
        """
        return cls(weights="float", acts="float", act_signed=False)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "QuantConfig":
        """Builds from a dict / ConfigDict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(
                f"Unknown quantization option(s) {unknown}; known options: "
                f"{sorted(known)}.")
        return cls(**dict(mapping))
