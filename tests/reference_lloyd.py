"""FROZEN reference: `dq_jax.quant.weights.lloyd_init` as of commit 1890a83 (the scatter-add
Lloyd: every step a nearest-level pass and one segment sum over all weights), copied verbatim
but for the `wq.` prefixes.

Do not edit. The sorted-row Lloyd that replaced it takes each cell's sum in sorted order (block
sums plus two partial blocks) instead of memory order, so its levels equal this one's up to
float round-off; `tests/test_quant_weights.py::test_lloyd_init_matches_the_scatter_add_version`
states how close.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dq_jax.quant import weights as wq


def lloyd_init(w: jax.Array, num_levels: int, granularity: str,
               iters: int = 200) -> tuple[jax.Array, jax.Array]:
    """Levels by Lloyd (1-D k-means) from the quantiles and from a uniform grid; codes = nearest.

    Quantile starts put one level in each equal-mass slice, so no level starts
    empty; each Lloyd step lowers the squared error (empty cells keep their
    level). Each group keeps the better of the two refined starts. Returns
    `(levels [G, L] float32 sorted, codes uint8 kernel-shaped)`.
    """
    wq.check_kernel_shape(w.shape, granularity, num_levels)
    w = jnp.asarray(w, jnp.float32)
    ng = wq.num_groups(w.shape, granularity)
    rows = wq._group_matrix(w, ng)
    quantile_start = wq.quantile_levels(rows, num_levels)
    lo, hi = jnp.min(rows, axis=1, keepdims=True), jnp.max(rows, axis=1, keepdims=True)
    uniform_start = lo + (hi - lo) * (jnp.arange(num_levels, dtype=jnp.float32) / (num_levels - 1))

    def lloyd_step(_, levels):
        codes = wq.nearest_codes(levels, w)
        idx = wq._flat_index(codes, ng, num_levels).reshape(-1)
        # One scatter-add of (w, 1) pairs: each column accumulates in the same order as a
        # scatter of its own (so the same sums bitwise), in about half the time on CPU.
        pairs = jnp.stack([w.reshape(-1), jnp.ones((w.size,), jnp.float32)], axis=-1)
        sums, counts = jax.ops.segment_sum(pairs, idx, ng * num_levels).T
        means = sums / jnp.maximum(counts, 1.0)
        levels = jnp.where(counts > 0, means, levels.reshape(-1)).reshape(ng, num_levels)
        return jnp.sort(levels, axis=-1)

    def refine(start):
        # A loop, not unrolled: one copy of the step per layer keeps model-init compile short.
        # It stops early at the fixed point (a further step would return the same levels
        # bitwise), so `iters` is a cap: heavy-tailed 4-bit kernels need ~100 steps, most
        # 2-bit ones < 10.
        def cond(carry):
            i, _, changed = carry
            return (i < iters) & changed

        def body(carry):
            i, levels, _ = carry
            new = lloyd_step(i, levels)
            return i + 1, new, jnp.any(new != levels)

        _, levels, _ = jax.lax.while_loop(cond, body, (0, start, jnp.array(True)))
        sq = jnp.square(w - wq._lookup(levels, wq.nearest_codes(levels, w)))
        error = jnp.sum(wq._group_matrix(sq, ng), axis=1)
        return levels, error

    # Lloyd only finds a local minimum: from the quantiles (DESIGN 1.1) it can end worse than
    # the uniform min-max grid for small groups and many levels (heavy tails), so both starts
    # are refined and each group keeps the better.
    from_quantiles, err_q = refine(quantile_start)
    from_uniform, err_u = refine(uniform_start)
    levels = jnp.where((err_q <= err_u)[:, None], from_quantiles, from_uniform)
    return levels, wq.nearest_codes(levels, w)
