"""Proposed (not yet in the package) speed-ups of the DQ train step, measured by step_time.py.

Both reuse the program's own `train.train_step` unchanged:
  * `act_fit_every=k`: the channel-aware activation-statistic fit (DESIGN 1.2) runs on one
    step in k; the other steps use the running statistics (the quantizer is applied with
    `quant_stats` immutable, exactly like eval). Two jitted steps, chosen on the host.
  * `rbg=True`: JAX's 'unsafe_rbg' PRNG for the stochastic re-assignment bits instead of
    threefry (set for the trace; the optimizer's key is created under it).
"""
from __future__ import annotations

import contextlib
import statistics
import time

import jax

from dq_jax import train
from dq_jax.layers import QUANT_STATS


class NoActFit:
    """`model.apply` with `quant_stats` read-only: quantizes with the running statistics."""

    def __init__(self, model):
        self.model = model

    def apply(self, variables, *args, mutable=(), **kwargs):
        mutable = [m for m in mutable if m != QUANT_STATS]
        out, new = self.model.apply(variables, *args, mutable=mutable, **kwargs)
        new = dict(new)
        new[QUANT_STATS] = variables.get(QUANT_STATS, {})
        return out, new

    def __hash__(self):
        return hash(("NoActFit", id(self.model)))


@contextlib.contextmanager
def prng_impl(name: str | None):
    if name is None:
        yield
        return
    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", name)
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", old)


class FastSteps:
    def __init__(self, model, optimizer, mesh, *, act_fit_every: int = 1, rbg: bool = False):
        self.every = act_fit_every
        self.impl = "unsafe_rbg" if rbg else None
        self.fit = train.Steps(model, optimizer, mesh)
        self.nofit = train.Steps(NoActFit(model), optimizer, mesh) if act_fit_every > 1 \
            else self.fit
        self.model, self.optimizer = model, optimizer

    def step(self, state, batch, host_step: int):
        steps = self.fit if host_step % self.every == 0 else self.nofit
        return steps.train(state, batch)

    def time(self, image_shape, seed, batch, repeats: int) -> float:
        """Median over `repeats` cycles of `act_fit_every` steps, per step (compile excluded)."""
        with prng_impl(self.impl):
            state = self.fit.place(train.init_state(self.model, self.optimizer, image_shape,
                                                    seed))
            for i in range(self.every + 2):              # compile both + calibrate
                state, m = self.step(state, batch, i)
            jax.block_until_ready(state)
            times, i = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                for _ in range(self.every):
                    state, m = self.step(state, batch, i)
                    i += 1
                jax.block_until_ready((state, m))
                times.append((time.perf_counter() - t0) / self.every)
        return statistics.median(times)
