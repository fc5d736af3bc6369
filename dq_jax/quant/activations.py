"""Channel-aware activation quantizer (DQ-A), DESIGN §1.2.

The quantizer's levels are *fitted*, not back-propagated: each training batch
takes one closed-form step that lowers the channel-normalised error

    E = sum_c mean_{n,h,w} (x - Q(x))**2 / (mean_{n,h,w} x**2 + eps)

and the result enters an EMA kept in the `quant_stats` collection, like
BatchNorm's running statistics. Gradients pass through a clipped STE.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from typing import Iterator

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dq_jax.quant.config import QuantConfig

# Relative floor of a channel's energy: a (nearly) dead channel's weight is
# capped at 1e6 times the average channel's, so it cannot swamp the fit.
_REL_EPS = 1e-6
# Calibration scans this many clipping fractions of max|x| before refining.
_CALIB_GRID = 24

# Whether an eval-mode quantizer checks (at run time, by a host callback) that it was
# calibrated; `skip_calibration_check` turns it off where a caller checks on the host itself.
_CHECK_CALIBRATION: contextvars.ContextVar = contextvars.ContextVar(
    "dq_jax_check_calibration", default=True)
# Whether train-mode quantizers may assume they are calibrated (`assume_calibrated`).
_ASSUME_CALIBRATED: contextvars.ContextVar = contextvars.ContextVar(
    "dq_jax_assume_calibrated", default=False)


class UncalibratedWarning(UserWarning):
    """An activation quantizer ran in eval mode before any training batch calibrated it."""


@contextlib.contextmanager
def skip_calibration_check() -> Iterator[None]:
    """Traces inside it build eval-mode quantizers without the calibration check.

    The check is a host callback, and JAX's persistent compilation cache does not store
    programs with host callbacks: the training program's eval step and `predict` (whose
    states are calibrated, or checked on the host) trace under this.
    """
    token = _CHECK_CALIBRATION.set(False)
    try:
        yield
    finally:
        _CHECK_CALIBRATION.reset(token)


@contextlib.contextmanager
def assume_calibrated() -> Iterator[None]:
    """Traces inside it build train-mode quantizers with the EMA update only.

    Without it every activation quantizer's train-mode update is a `cond` between the EMA step
    and the first batch's calibration (a scan of clipping points and Lloyd loops), and XLA
    compiles that calibration at every layer although after the first batch it never runs
    (issue 27: compile time; RESULTS §3 has what it saves). Only for states whose
    quantizers are all calibrated (`all_calibrated`): the training program checks that on the
    host before choosing this step. The EMA update computed is the same as the `cond`'s.
    """
    token = _ASSUME_CALIBRATED.set(True)
    try:
        yield
    finally:
        _ASSUME_CALIBRATED.reset(token)


def all_calibrated(quant_stats) -> bool:
    """True when every activation quantizer in `quant_stats` (a `quant_stats` collection, on
    host or device) has its `initialized` flag set; True for a tree without quantizers."""
    flags = [v for path, v in jax.tree_util.tree_leaves_with_path(quant_stats)
             if getattr(path[-1], "key", None) == "initialized"]
    return all(bool(np.all(np.asarray(jax.device_get(f)))) for f in flags)


def _warn_uncalibrated(where: str, initialized) -> None:
    if not np.all(np.asarray(initialized)):
        warnings.warn(
            f"activation quantizer {where or '(root)'} is evaluated but was never calibrated "
            "(quant_stats 'initialized' is False): its step is the init placeholder, so the "
            "outputs are meaningless. Run at least one training batch (quant_stats mutable, "
            "or train=True) before evaluating, or load calibrated quant_stats.",
            UncalibratedWarning, stacklevel=2)


def check_calibrated(where: str, initialized: jax.Array) -> None:
    """Warns (`UncalibratedWarning`) if `initialized` is False: now when it is concrete,
    else when the traced program runs (a `jax.debug.callback`)."""
    if not _CHECK_CALIBRATION.get():
        return
    if isinstance(initialized, jax.core.Tracer):
        jax.debug.callback(functools.partial(_warn_uncalibrated, where), initialized)
    else:
        _warn_uncalibrated(where, initialized)


def grid_bounds(num_levels: int, signed: bool) -> tuple[int, int]:
    """Integer range of the uniform grid: [0, L-1] or [-L/2, L/2-1]."""
    return (-(num_levels // 2), num_levels // 2 - 1) if signed else (0, num_levels - 1)


def channel_weights(x: jax.Array, act_error: str) -> jax.Array:
    """Per-channel weight `w_c`: 1/(channel energy + eps) ('channel') or 1 ('global')."""
    c = x.shape[-1]
    if act_error == "global":
        return jnp.ones((c,), jnp.float32)
    return _weights_of_energy(jnp.mean(jnp.square(x.reshape(-1, c)), axis=0))


def _weights_of_energy(energy: jax.Array) -> jax.Array:
    """`w_c` from the per-channel mean squares: the floor keeps a dead channel finite."""
    eps = _REL_EPS * jnp.mean(energy) + 1e-30
    return 1.0 / (energy + eps)


def _per_channel_sum(v: jax.Array) -> jax.Array:
    return jnp.sum(v.reshape(-1, v.shape[-1]), axis=0)


def uniform_codes(x: jax.Array, alpha: jax.Array, num_levels: int, signed: bool) -> jax.Array:
    lo, hi = grid_bounds(num_levels, signed)
    return jnp.clip(jnp.round(x / alpha), lo, hi)


def uniform_error(x: jax.Array, alpha: jax.Array, w_c: jax.Array,
                  num_levels: int, signed: bool) -> jax.Array:
    """The weighted error E for step `alpha` (up to the constant 1/N)."""
    q = alpha * uniform_codes(x, alpha, num_levels, signed)
    return jnp.sum(w_c * _per_channel_sum(jnp.square(x - q)))


def fit_uniform_step(x: jax.Array, alpha: jax.Array, w_c: jax.Array,
                     num_levels: int, signed: bool) -> jax.Array:
    """One closed-form step: assign to the nearest level, then weighted LS for alpha.

    `alpha = sum_c w_c sum x k / sum_c w_c sum k^2`; with assignments fixed
    this minimises E exactly, so the step never increases E. An all-zero batch
    keeps `alpha`.
    """
    k = uniform_codes(x, alpha, num_levels, signed)
    return _least_squares_step(alpha, w_c, _per_channel_sum(x * k), _per_channel_sum(k * k))


def _least_squares_step(alpha: jax.Array, w_c: jax.Array, sxk: jax.Array,
                        skk: jax.Array) -> jax.Array:
    """The weighted LS step from per-channel sums of `x k` and `k k`; keeps `alpha` when
    the batch gives no (positive) answer."""
    num, den = jnp.sum(w_c * sxk), jnp.sum(w_c * skk)
    new = num / jnp.where(den > 0, den, 1.0)
    return jnp.where((den > 0) & (new > 0), new, alpha)


def fit_uniform_step_one_pass(x: jax.Array, alpha: jax.Array, num_levels: int, signed: bool,
                              act_error: str) -> jax.Array:
    """`fit_uniform_step(x, alpha, channel_weights(x, act_error), ...)` in one pass over `x`.

    The channel energies and the two per-channel sums of the step (`x k`, `k k`) come from
    one variadic reduction instead of three: the train step's EMA reads each activation once
    (issue 27: bytes moved on accelerators; one reduction kernel instead of three).
    The sums are the same up to the order XLA adds them in (float round-off), so the step
    equals `fit_uniform_step`'s to a few ulp, and bitwise where the sums are exact.
    """
    c = x.shape[-1]
    k = uniform_codes(x, alpha, num_levels, signed)
    x2, k2 = x.reshape(-1, c), k.reshape(-1, c)
    zero = jnp.zeros((), x.dtype)
    sxx, sxk, skk = jax.lax.reduce(
        (x2 * x2, x2 * k2, k2 * k2), (zero, zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), (0,))
    w_c = jnp.ones((c,), jnp.float32) if act_error == "global" else \
        _weights_of_energy(sxx / x2.shape[0])
    return _least_squares_step(alpha, w_c, sxk, skk)


def calibrate_uniform(x: jax.Array, w_c: jax.Array, num_levels: int, signed: bool,
                      iters: int) -> jax.Array:
    """First-batch step: best of a clipping grid, then `iters` closed-form steps.

    Lloyd-style iteration only finds a local minimum; scanning clipping points
    first keeps a few outliers from pinning the step at max|x|/(L-1).
    """
    lo, hi = grid_bounds(num_levels, signed)
    top = jnp.max(jnp.abs(x)) / max(hi, -lo, 1)
    top = jnp.where(top > 0, top, 1.0)
    fracs = jnp.geomspace(0.02, 1.0, _CALIB_GRID)
    errors = jax.vmap(lambda a: uniform_error(x, a, w_c, num_levels, signed))(fracs * top)
    alpha = fracs[jnp.argmin(errors)] * top
    return jax.lax.fori_loop(
        0, iters, lambda _, a: fit_uniform_step(x, a, w_c, num_levels, signed), alpha)


# Up to this many levels (2-4 bits) the learned-level lookup and fit are written as
# elementwise selects / compares and L masked reductions (no gather, no scatter, no [..., L]
# intermediate); above, a broadcast compare, a gather and a segment sum keep compile time
# independent of L.
_SELECT_MAX_LEVELS = 16


def nearest_level_index(x: jax.Array, levels: jax.Array) -> jax.Array:
    """Index of the nearest of the sorted 1-D `levels` (ties go down)."""
    mids = 0.5 * (levels[1:] + levels[:-1])
    if levels.shape[0] <= _SELECT_MAX_LEVELS:
        idx = jnp.zeros(x.shape, jnp.int32)
        for k in range(levels.shape[0] - 1):
            idx = idx + (x > mids[k]).astype(jnp.int32)
        return idx
    return jnp.sum(x[..., None] > mids, axis=-1, dtype=jnp.int32)


def _level_of_index(levels: jax.Array, idx: jax.Array) -> jax.Array:
    """`levels[idx]` for 1-D `levels`: selects (the same float, bit for bit) up to 16 levels."""
    if levels.shape[0] > _SELECT_MAX_LEVELS:
        # The result is sharded like the (batch-sharded) indices: under an Explicit mesh a
        # plain `levels[idx]` cannot infer that and fails to trace.
        return levels.at[idx].get(out_sharding=jax.typeof(idx).sharding)
    out = jnp.broadcast_to(levels[0], idx.shape)
    for k in range(1, levels.shape[0]):
        out = jnp.where(idx == k, levels[k], out)
    return out


def fit_learned_levels(x: jax.Array, levels: jax.Array, w_c: jax.Array,
                       nonnegative: bool) -> jax.Array:
    """One Lloyd step of the weighted error: each level -> weighted mean of its cell.

    Per level k, `sum(w_c x)` and `sum(w_c)` over the entries nearest to level k, as L
    masked reductions over the whole batch (no one-hot `[..., C, L]` is built). An empty cell
    keeps its level. `nonnegative` (unsigned, post-ReLU inputs): the lowest level is pinned
    at exactly 0.0, so the exact zeros that make up most of a post-ReLU batch stay exactly 0
    after quantization (the cell's mean would drift above 0 with the small positives in it);
    the other levels take their cell means, clipped at 0. With the assignment fixed this is
    the least-squares optimum under that constraint, so a step never increases the weighted
    error once the lowest level is 0.
    """
    num_levels = levels.shape[0]
    idx = nearest_level_index(x, levels)
    wx = w_c * x  # per-channel weight broadcast over the last axis
    w = jnp.broadcast_to(w_c, x.shape)
    if num_levels <= _SELECT_MAX_LEVELS:
        zero = jnp.zeros((), x.dtype)
        sums = jnp.stack([jnp.sum(jnp.where(idx == k, wx, zero)) for k in range(num_levels)])
        mass = jnp.stack([jnp.sum(jnp.where(idx == k, w, zero)) for k in range(num_levels)])
    else:  # segment sums; the [L] result is replicated like the levels (Explicit meshes)
        into = jnp.zeros_like(levels, dtype=x.dtype)
        out_sharding = jax.typeof(levels).sharding
        sums = into.at[idx].add(wx, out_sharding=out_sharding)
        mass = into.at[idx].add(w, out_sharding=out_sharding)
    new = jnp.where(mass > 0, sums / jnp.where(mass > 0, mass, 1.0), levels)
    if nonnegative:
        new = jnp.concatenate([jnp.zeros((1,), new.dtype), jnp.maximum(new[1:], 0.0)])
    return jnp.sort(new)


def calibrate_learned(x: jax.Array, w_c: jax.Array, num_levels: int, signed: bool,
                      iters: int) -> jax.Array:
    """Learned levels start from the calibrated uniform grid, then Lloyd steps."""
    alpha = calibrate_uniform(x, w_c, num_levels, signed, iters)
    lo, hi = grid_bounds(num_levels, signed)
    levels = alpha * jnp.arange(lo, hi + 1, dtype=jnp.float32)
    return jax.lax.fori_loop(
        0, iters, lambda _, l: fit_learned_levels(x, l, w_c, nonnegative=not signed), levels)


def _clipped_ste(x: jax.Array, q: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Forward `q`; gradient 1 where lo <= x <= hi, else 0."""
    # Not jnp.clip: its gradient is 0.5 at x == lo / x == hi (e.g. exact post-ReLU zeros).
    # `q + (xs - sg(xs))` keeps the forward value exactly `q`.
    inside = (x >= lo) & (x <= hi)
    xs = jnp.where(inside, x, jax.lax.stop_gradient(x))
    return q + (xs - jax.lax.stop_gradient(xs))


def quantize_uniform(x: jax.Array, alpha: jax.Array, num_levels: int, signed: bool) -> jax.Array:
    lo, hi = grid_bounds(num_levels, signed)
    q = alpha * uniform_codes(x, alpha, num_levels, signed)
    return _clipped_ste(x, q.astype(x.dtype), (lo * alpha).astype(x.dtype),
                        (hi * alpha).astype(x.dtype))


def quantize_learned(x: jax.Array, levels: jax.Array) -> jax.Array:
    q = _level_of_index(levels, nearest_level_index(x, levels))
    return _clipped_ste(x, q.astype(x.dtype), levels[0].astype(x.dtype),
                        levels[-1].astype(x.dtype))


def _weighted_error(x: jax.Array, q: jax.Array, w_c: jax.Array) -> jax.Array:
    """The weighted error E of quantized values `q` (up to the constant 1/N)."""
    return jnp.sum(w_c * _per_channel_sum(jnp.square(x - q)))


class ActQuantizer(nn.Module):
    """Quantizes its input to `2**act_bits` fitted levels (DQ-A).

    Statistics live in `quant_stats`: `alpha` (uniform) or `levels`
    (learned), `initialized`, and `signed` when `act_signed=None`. They change only when
    `train=True` and `quant_stats` is mutable, and never during `init` (a dummy init batch
    must not calibrate). The first training batch calibrates; later batches take one
    closed-form step from the running value and blend it in by EMA.

    `act_signed=None` (and >= 2 bits): the first training batch is calibrated on both
    grids and the one with the lower weighted error E is kept (ties: unsigned), so
    normalised pixels get a signed grid and post-ReLU inputs (where a signed grid wastes
    half its levels) an unsigned one. The choice is the bool `signed` in `quant_stats`,
    fixed after calibration (and exported with the other statistics).
    """

    config: QuantConfig

    def _calibrate(self, xs: jax.Array, w_c: jax.Array, signed: bool) -> jax.Array:
        cfg = self.config
        if cfg.act_levels == "uniform":
            return calibrate_uniform(xs, w_c, cfg.num_act_levels, signed, cfg.act_calib_iters)
        return calibrate_learned(xs, w_c, cfg.num_act_levels, signed, cfg.act_calib_iters)

    def _ema(self, xs: jax.Array, cur: jax.Array, w_c: jax.Array, signed: bool) -> jax.Array:
        cfg = self.config
        if cfg.act_levels == "uniform":  # w_c from the step's own pass (one read of xs)
            step = fit_uniform_step_one_pass(xs, cur, cfg.num_act_levels, signed, cfg.act_error)
            return cfg.act_momentum * cur + (1 - cfg.act_momentum) * step
        step = fit_learned_levels(xs, cur, w_c, nonnegative=not signed)
        return jnp.sort(cfg.act_momentum * cur + (1 - cfg.act_momentum) * step)

    def _quantize(self, x: jax.Array, value: jax.Array, signed: bool) -> jax.Array:
        if self.config.act_levels == "uniform":
            return quantize_uniform(x, value, self.config.num_act_levels, signed)
        return quantize_learned(x, value)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cfg = self.config
        num_levels = cfg.num_act_levels
        # Decided from the data only where a signed grid exists (>= 2 bits).
        auto = cfg.act_signed is None and num_levels >= 4
        signed = bool(cfg.act_signed)  # the static grid when not `auto`
        lo, hi = grid_bounds(num_levels, signed)
        initialized = self.variable("quant_stats", "initialized", lambda: jnp.zeros((), jnp.bool_))
        if cfg.act_levels == "uniform":
            state = self.variable("quant_stats", "alpha", lambda: jnp.ones((), jnp.float32))
        else:
            state = self.variable(
                "quant_stats", "levels",
                lambda: jnp.arange(lo, hi + 1, dtype=jnp.float32))
        is_signed = (self.variable("quant_stats", "signed", lambda: jnp.zeros((), jnp.bool_))
                     if auto else None)

        if train and self.is_mutable_collection("quant_stats") and not self.is_initializing():
            xs = jax.lax.stop_gradient(x).astype(jnp.float32)
            w_c = channel_weights(xs, cfg.act_error)
            def ema(cur):  # one EMA step from the running value (on the chosen grid)
                if not auto:
                    return self._ema(xs, cur, w_c, signed)
                return jax.lax.cond(is_signed.value, lambda c: self._ema(xs, c, w_c, True),
                                    lambda c: self._ema(xs, c, w_c, False), cur)

            if _ASSUME_CALIBRATED.get():
                state.value = ema(state.value)
            elif auto:
                def calibrate(cur):
                    fits = [self._calibrate(xs, w_c, s) for s in (False, True)]
                    errs = [_weighted_error(xs, self._quantize(xs, f, s), w_c)
                            for f, s in zip(fits, (False, True))]
                    use_signed = errs[1] < errs[0]
                    return jnp.where(use_signed, fits[1], fits[0]), use_signed

                state.value, is_signed.value = jax.lax.cond(
                    initialized.value, lambda cur: (ema(cur), is_signed.value), calibrate,
                    state.value)
            else:
                state.value = jax.lax.cond(
                    initialized.value, ema, lambda cur: self._calibrate(xs, w_c, signed),
                    state.value)
            initialized.value = jnp.ones((), jnp.bool_)
        elif not self.is_initializing():
            check_calibrated("/".join(self.path[:-1]), initialized.value)

        if cfg.act_levels == "uniform":
            chex.assert_shape(state.value, ())
        else:
            chex.assert_shape(state.value, (num_levels,))
        if auto:
            return jax.lax.cond(is_signed.value, lambda v: self._quantize(x, v, True),
                                lambda v: self._quantize(x, v, False), state.value)
        return self._quantize(x, state.value, signed)
