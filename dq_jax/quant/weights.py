"""Weight quantizers: direct (DQ-W), latent-STE and LSQ, as pure functions.

Conventions (DESIGN §1.1): a kernel's output channels are its last axis (HWIO
for conv, IO for dense). `levels` is float32 `[G, L]`, sorted ascending along
the last axis, with G = 1 (per layer) or G = out channels (per channel).
`codes` are uint8 with the kernel's shape, values in `[0, L)`.
"""
from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

CODE_DTYPE = jnp.uint8
# Variable names of a quantized kernel's levels [G, L] and of an LSQ layer's step [G]: the one
# home of these names (layers, optimizer, export and the integer path import them).
LEVELS = "kernel_levels"
STEP = "kernel_step"
# Up to this many levels, nearest/bracket search compares against every
# level (fused elementwise work, fastest on accelerators for 2-4 bits); above,
# a binary search per group keeps the cost O(log L).
_COMPARE_ALL_MAX_LEVELS = 32


def num_groups(shape: Sequence[int], granularity: str) -> int:
    return 1 if granularity == "per_layer" else int(shape[-1])


def check_kernel_shape(shape: Sequence[int], granularity: str, num_levels: int) -> None:
    """Rejects kernels that a granularity cannot serve, with the fix in the message."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s <= 0 for s in shape):
        raise ValueError(f"Cannot quantize a kernel of shape {shape}: it is empty.")
    if granularity == "per_channel":
        if len(shape) < 2:
            raise ValueError(
                f"granularity='per_channel' needs a kernel with an output-channel "
                f"axis (ndim >= 2); got shape {shape}. Use granularity='per_layer'.")
        per_group = int(np.prod(shape[:-1]))
        if per_group < num_levels:
            raise ValueError(
                f"granularity='per_channel' with L={num_levels} levels needs at "
                f"least {num_levels} weights per output channel, but kernel shape "
                f"{shape} has {per_group}. Use granularity='per_layer' or fewer bits.")
    elif granularity != "per_layer":
        raise ValueError(
            f"granularity={granularity!r} is not supported; allowed values: "
            "'per_layer', 'per_channel'.")


def _group_ids(shape: Sequence[int], num_groups_: int) -> jax.Array:
    """Group index of every kernel entry (broadcast along the last axis)."""
    if num_groups_ == 1:
        return jnp.zeros(shape, jnp.int32)
    return jnp.broadcast_to(jnp.arange(num_groups_, dtype=jnp.int32), shape)


def _flat_index(codes: jax.Array, num_groups_: int, num_levels: int) -> jax.Array:
    idx = codes.astype(jnp.int32)
    if num_groups_ > 1:
        idx = idx + _group_ids(codes.shape, num_groups_) * num_levels
    return idx


# Up to this many levels (2-4 bits) a lookup `table[g, codes]` is a chain of elementwise
# selects and the level gradient L masked reductions: no gather and no scatter-add, which
# accelerators serialise (TPU) or contend on (GPU atomics into G*L addresses). Above, the
# general gather / segment-sum path keeps the cost independent of L.
SELECT_MAX_LEVELS = 16


def _group_column(table: jax.Array, k: int) -> jax.Array:
    """Entry k of every group's table, broadcastable against a kernel: [G] or a scalar."""
    return table[:, k] if table.shape[0] > 1 else table[0, k]


def _select_lookup(table: jax.Array, codes: jax.Array) -> jax.Array:
    """`table[g, codes]` as L-1 selects; the value returned is the table's entry, bit for bit.

    Codes must lie in [0, L) (as everywhere in this module); an out-of-range code would give
    entry 0 here, where the gather clamps.
    """
    num_levels = table.shape[-1]
    out = jnp.broadcast_to(_group_column(table, 0), codes.shape)
    for k in range(1, num_levels):
        out = jnp.where(codes == k, _group_column(table, k), out)
    return out


def _masked_level_sums(values: jax.Array, codes: jax.Array, num_groups_: int,
                       num_levels: int) -> jax.Array:
    """`out[g, k] = sum of values over the entries of group g with code k`, as L reductions.

    One masked sum per level over the non-group axes (all axes for G = 1, all but the
    last for per-channel), which XLA fuses; no scatter. The summation order is XLA's reduce
    order, not the segment-sum's sequential one: the same sums up to float round-off, and
    bitwise equal where every partial sum is exact (e.g. small integers).
    """
    axes = tuple(range(codes.ndim)) if num_groups_ == 1 else tuple(range(codes.ndim - 1))
    zero = jnp.zeros((), values.dtype)
    sums = [jnp.sum(jnp.where(codes == k, values, zero), axis=axes) for k in range(num_levels)]
    return jnp.stack(sums, axis=-1).reshape(num_groups_, num_levels)


def _lookup(levels: jax.Array, codes: jax.Array) -> jax.Array:
    """`levels[g, codes]` for a [G, L] table (float levels, or an int code map)."""
    g, l = levels.shape
    if l <= SELECT_MAX_LEVELS:
        return _select_lookup(levels, codes)
    return levels.reshape(-1)[_flat_index(codes, g, l)]


@jax.custom_vjp
def gather_levels(levels: jax.Array, codes: jax.Array) -> jax.Array:
    """`W_q[..., o] = levels[g(o), codes[..., o]]`.

    The VJP is exact: `dL/dlevels[g, k]` is the sum of `dL/dW_q` over entries
    of group g with code k (no one-hot matmul). Up to `SELECT_MAX_LEVELS` levels
    the forward is a chain of selects and the backward L masked reductions (no
    gather, no scatter); above, a gather and one scatter-add (segment sum).
    Codes are integers and get a `float0` cotangent.
    """
    return _lookup(levels, codes)


def _gather_fwd(levels, codes):
    return _lookup(levels, codes), (codes, levels)  # levels: tiny [G, L], for shape/dtype


def _gather_bwd(res, g):
    codes, levels = res
    ng, nl = levels.shape
    acc = jnp.promote_types(levels.dtype, jnp.float32)
    if nl <= SELECT_MAX_LEVELS:
        d_levels = _masked_level_sums(g.astype(acc), codes, ng, nl)
    else:
        idx = _flat_index(codes, ng, nl)
        d_levels = jax.ops.segment_sum(
            g.reshape(-1).astype(acc), idx.reshape(-1), num_segments=ng * nl)
    zero_codes = np.zeros(codes.shape, dtype=jax.dtypes.float0)
    # The cotangent must have the primal's dtype (float64 levels get float64).
    return d_levels.reshape(ng, nl).astype(levels.dtype), zero_codes


gather_levels.defvjp(_gather_fwd, _gather_bwd)


def count_levels_below(levels: jax.Array, w: jax.Array, *, inclusive: bool) -> jax.Array:
    """Per entry, how many of its group's (sorted) values are < w (<= if inclusive).

    `levels`: [G, K] sorted; `w`: kernel-shaped. Returns int32, kernel-shaped.
    """
    ng, nk = levels.shape
    if nk <= _COMPARE_ALL_MAX_LEVELS:
        # One compare per level, summed elementwise: the count fuses into its consumer (the
        # re-assignment) as one loop; a `[..., K]` compare reduced over K was a reduction
        # kernel of its own per layer (issue 27). The same integer count.
        count = jnp.zeros(w.shape, jnp.int32)
        for k in range(nk):
            column = _group_column(levels, k)
            count = count + ((w >= column) if inclusive else (w > column)).astype(jnp.int32)
        return count
    side = "right" if inclusive else "left"
    flat = w.reshape(-1, ng).T  # [G, n]
    out = jax.vmap(lambda t, v: jnp.searchsorted(t, v, side=side))(levels, flat)
    return out.T.reshape(w.shape).astype(jnp.int32)


def nearest_codes(levels: jax.Array, w: jax.Array) -> jax.Array:
    """Deterministic projection onto the nearest (sorted) level; ties go down."""
    chex.assert_rank(levels, 2)
    mids = 0.5 * (levels[:, 1:] + levels[:, :-1])
    return count_levels_below(mids, w, inclusive=False).astype(CODE_DTYPE)


def bracketing_levels(levels: jax.Array, target: jax.Array):
    """Per entry, `(k, l_k, l_{k+1})` with `l_k <= target < l_{k+1}` (int32 `k` clipped to
    [0, L-2], so a target outside the range gets the end pair): the two levels a rounding of
    `target` chooses between. `levels`: [G, L] sorted."""
    k = jnp.clip(count_levels_below(levels, target, inclusive=True) - 1, 0, levels.shape[-1] - 2)
    return k, _lookup(levels, k), _lookup(levels, k + 1)


def stochastic_codes(levels: jax.Array, target: jax.Array, key: jax.Array,
                     uniform: jax.Array | None = None,
                     temperature: jax.Array | float | None = None) -> jax.Array:
    """Unbiased re-assignment between the two levels that bracket `target`.

    With `l_k <= t < l_{k+1}`, picks `k+1` with probability
    `(t - l_k) / (l_{k+1} - l_k)`, so `E[level] = t` inside the range; outside
    it the nearest end level is taken (clipping). Tied levels pick the lower.
    `uniform` (optional) supplies the U[0,1) draws, for tests.

    `temperature` (optional, in [0, 1]) sharpens that probability toward nearest rounding:
    `p' = clip((p - 1/2) / temperature + 1/2, 0, 1)`; 1 is the unbiased rule, 0 nearest (a
    target exactly half-way stays a coin flip). Annealing it with the learning rate trades
    the re-assignment's variance (which sets the accuracy floor of training on the grid, Li et
    al. 2017) for bias late in training. None (default) skips it: the unbiased rule exactly.
    """
    chex.assert_rank(levels, 2)
    k, lo, hi = bracketing_levels(levels, target)
    gap = hi - lo
    p = jnp.where(gap > 0, (target - lo) / jnp.where(gap > 0, gap, 1.0), 0.0)
    p = jnp.clip(p, 0.0, 1.0)
    if temperature is not None:
        t = jnp.asarray(temperature, jnp.float32)
        p = jnp.clip((p - 0.5) / jnp.maximum(t, jnp.finfo(jnp.float32).tiny) + 0.5, 0.0, 1.0)
    if uniform is None:
        # A flat draw, reshaped: XLA compiles rank-1 threefry far faster than rank-4.
        uniform = jax.random.uniform(key, (target.size,), jnp.float32).reshape(target.shape)
    return (k + (uniform < p).astype(jnp.int32)).astype(CODE_DTYPE)


def quantize_cell_residual(levels: jax.Array, codes: jax.Array, residual: jax.Array,
                           bits: int, key: jax.Array | None = None,
                           uniform: jax.Array | None = None) -> jax.Array:
    """A weight's offset from its level, kept to `bits` bits of its cell (feedback ablation).

    `residual` (kernel-shaped) is measured from `levels[codes]`. In units of the level gap on
    its side (`z = r / gap`: the gap up for r >= 0, down for r < 0; an end level uses its one
    inner gap on both sides), clipped to the cell `[-1/2, 1/2]`, it is stochastically rounded
    to the centres of the cell's `2**bits` equal sub-intervals, `z_q = (j + 1/2) / 2**bits`
    (`j = floor(z 2**bits - 1/2 + U)`), and mapped back with the gap on `z_q`'s side. Centres,
    not edges: a position on the mid-point between two levels would flip its code at any push
    and back (measured: 13x the float residual's flip rate). A push past the outermost centre
    may round to the next cell's first centre, `z_q = +-(1/2 + 1/2**(bits+1))`, so the code flips
    (clipping `j` to the cell instead absorbed every outward push: no weight ever flipped). So
    `bits` = 1 keeps which half of the cell a weight is in (`+-gap/4`), 2 its quarter. Unbiased
    in `z` over the cell; a residual on the grid stays there (up to the rounding of
    `r / gap`), so within a cell only what was added to it is re-rounded. An offset toward a
    zero gap (tied levels) counts as z = 0; a zero gap on `z_q`'s side gives 0.
    `uniform` (optional) supplies the U[0,1) draws, for tests.
    """
    chex.assert_rank(levels, 2)
    if int(bits) < 1:
        raise ValueError(f"bits={bits} must be >= 1 (0 would keep no position).")
    top, n = levels.shape[-1] - 1, 2 ** int(bits)
    k = codes.astype(jnp.int32)
    at = _lookup(levels, k)
    up = _lookup(levels, jnp.minimum(k + 1, top)) - at
    down = at - _lookup(levels, jnp.maximum(k - 1, 0))
    up, down = jnp.where(k == top, down, up), jnp.where(k == 0, up, down)
    side = lambda z, gap_up, gap_down: jnp.where(z >= 0, gap_up, gap_down)
    gap = side(residual, up, down)
    z = jnp.clip(residual / jnp.where(gap > 0, gap, 1.0), -0.5, 0.5)
    z = jnp.where(gap > 0, z, 0.0)
    if uniform is None:
        uniform = jax.random.uniform(key, (residual.size,), jnp.float32).reshape(residual.shape)
    z_q = (jnp.floor(z * n - 0.5 + uniform) + 0.5) / n
    return (z_q * side(z_q, up, down)).astype(residual.dtype)


def inertia_codes(levels: jax.Array, codes: jax.Array, step: jax.Array,
                  threshold: float) -> tuple[jax.Array, jax.Array]:
    """Deterministic, evidence-thresholded re-assignment (the multi-level form of Bop).

    A weight moves at most one level per update, toward the sign of `step` (its code update
    `u`, in weight units), and only when `|u| >= threshold * gap`, the gap to the neighbouring
    level on that side; otherwise it stays. An end level never moves outward. Returns the new
    codes and the realised displacement `l_new - l_old` (0 where nothing moved), which the
    optimizer uses to spend the evidence a move consumed. `levels`: [G, L] sorted.
    """
    chex.assert_rank(levels, 2)
    top = levels.shape[-1] - 1
    k = codes.astype(jnp.int32)
    at = _lookup(levels, k)
    up = _lookup(levels, jnp.minimum(k + 1, top)) - at
    down = at - _lookup(levels, jnp.maximum(k - 1, 0))
    step = step.astype(at.dtype)
    move_up = (step > 0) & (k < top) & (step >= threshold * up)
    move_down = (step < 0) & (k > 0) & (-step >= threshold * down)
    moved = jnp.where(move_up, up, jnp.where(move_down, -down, jnp.zeros_like(at)))
    new = k + move_up.astype(jnp.int32) - move_down.astype(jnp.int32)
    return new.astype(CODE_DTYPE), moved


def reassign_codes(levels: jax.Array, target: jax.Array, key: jax.Array,
                   rounding: str, temperature: jax.Array | float | None = None) -> jax.Array:
    """Direct re-assignment of codes to the target values `W~` (DESIGN §1.1 step 3);
    `temperature`: see `stochastic_codes` (stochastic rounding only)."""
    if rounding == "stochastic":
        return stochastic_codes(levels, target, key, temperature=temperature)
    if rounding == "nearest":
        return nearest_codes(levels, target)
    raise ValueError(
        f"rounding={rounding!r} is not supported; allowed values: 'stochastic', 'nearest'.")


def sort_levels(levels: jax.Array, codes: jax.Array | None = None, *,
                return_perm: bool = False):
    """Sorts each group's levels; remaps codes so `gather_levels` is unchanged.

    Returns `(sorted_levels, remapped_codes)` (codes None if not given), and with
    `return_perm=True` also `perm` ([G, L] int32, `sorted = take_along_axis(levels, perm)`:
    what per-level statistics need, see `permute_levels`). The levels are sorted together
    with their positions in one `lax.sort` (the sort `jnp.argsort` runs), so no gather is
    needed to apply the permutation; the code remap is a `_lookup` (selects up to
    `SELECT_MAX_LEVELS` levels).
    """
    if levels.shape[-1] <= SELECT_MAX_LEVELS:
        # Ranks by compares (elementwise over [..., L, L]): no `sort` op, which XLA compiles as
        # a comparator and a loop per layer (issue 27: compile time); the same order.
        inverse = _stable_ranks(levels)            # old code -> new code
        perm = _inverse_permutation(inverse)
        sorted_levels = permute_levels(levels, perm)
    else:
        iota = jax.lax.broadcasted_iota(jnp.int32, levels.shape, levels.ndim - 1)
        sorted_levels, perm = jax.lax.sort_key_val(levels, iota, dimension=levels.ndim - 1)
        # old code -> new code: the inverse permutation, by a second (integer) sort
        inverse = jax.lax.sort_key_val(perm, iota, dimension=levels.ndim - 1)[1] \
            if codes is not None else None
    new_codes = None if codes is None else _lookup(inverse, codes).astype(codes.dtype)
    return (sorted_levels, new_codes, perm) if return_perm else (sorted_levels, new_codes)


def _stable_ranks(levels: jax.Array) -> jax.Array:
    """Each level's position after a stable ascending sort along the last axis, in
    `lax.sort`'s order for floats (`_order_key`: -0 = +0, NaNs last; denormals tie with 0 as
    XLA:CPU's comparator flushes them): the count of levels before it in that order."""
    tiny = jnp.abs(levels) < jnp.finfo(jnp.float32).tiny
    key = _order_key(jnp.where(tiny, jnp.zeros_like(levels), levels))
    a, b = key[..., :, None], key[..., None, :]
    idx = jnp.arange(levels.shape[-1])
    before = (b < a) | ((b == a) & (idx[None, :] < idx[:, None]))
    return jnp.sum(before, axis=-1, dtype=jnp.int32)


def _inverse_permutation(ranks: jax.Array) -> jax.Array:
    """`perm` with `perm[..., ranks[..., k]] = k` (the argsort of a stable sort)."""
    idx = jnp.arange(ranks.shape[-1], dtype=jnp.int32)
    return jnp.sum(jnp.where(ranks[..., None, :] == idx[:, None], idx[None, :], 0), axis=-1,
                   dtype=jnp.int32)


def permute_levels(x: jax.Array, perm: jax.Array) -> jax.Array:
    """`take_along_axis(x, perm, axis=-1)` for per-level tables `[..., L]` (e.g. optimizer
    statistics following a level sort), as selects up to `SELECT_MAX_LEVELS` levels."""
    num_levels = x.shape[-1]
    if num_levels > SELECT_MAX_LEVELS:
        return jnp.take_along_axis(x, perm, axis=-1)
    out = jnp.broadcast_to(x[..., :1], perm.shape)
    for k in range(1, num_levels):
        out = jnp.where(perm == k, x[..., k:k + 1], out)
    return out


def code_counts(codes: jax.Array, num_levels: int) -> jax.Array:
    """`bincount(codes, length=L)` (int32), as L masked reductions up to `SELECT_MAX_LEVELS`
    levels (a bincount is a scatter-add over every weight)."""
    if num_levels > SELECT_MAX_LEVELS:
        return jnp.bincount(codes.reshape(-1).astype(jnp.int32), length=num_levels)
    return jnp.stack([jnp.sum(codes == k, dtype=jnp.int32) for k in range(num_levels)])


def _group_matrix(w: jax.Array, num_groups_: int) -> jax.Array:
    """Kernel as [G, n]: row g holds group g's weights."""
    return w.reshape(1, -1) if num_groups_ == 1 else w.reshape(-1, num_groups_).T


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 in the order `lax.sort` uses for floats (-inf < ... < +inf < NaN,
    -0 = +0): sign bit set -> all bits flipped, else the sign bit set; zeros as +0, NaNs as
    the top key (which `_from_order_key` reads back as a NaN). Denormals keep their order by
    value; XLA:CPU's float comparator flushes them (ties them with 0), which only moves values
    that a flushing multiply then reads as 0 anyway."""
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    u = jnp.where(u & jnp.uint32(0x7FFFFFFF) == 0, jnp.uint32(0), u)   # -0 -> +0 (bits: DAZ-proof)
    key = jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x), jnp.uint32(0xFFFFFFFF), key)


def _from_order_key(k: jax.Array) -> jax.Array:
    u = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(u, jnp.float32)


def quantile_levels(rows: jax.Array, num_levels: int) -> jax.Array:
    """Per row, the quantiles at `(k + 1/2) / L`, k < L: `jnp.quantile(rows, qs, axis=1).T`
    bitwise (its 'linear' rule in float32; a zero's sign aside: zeros read as +0), [G, L]
    float32; a row holding a NaN gives NaNs.

    Why not `jnp.quantile` (measured on XLA:CPU, 3x3x512x512 kernel): its float sort runs in
    1.2-1.6 s — most of a DQ model's init run — where a sort of the values' uint32 order keys
    (same order, so the same values at every rank) runs in ~0.25 s; and its kernel-wide NaN
    guard (`where(any(isnan(row)), nan, row)`) alone took ~1 s to compile. The positions are
    static, so they and the interpolation weights are computed once in NumPy (the same
    float32 operations) and read by static slices of the sorted keys.
    """
    rows = jnp.asarray(rows, jnp.float32)
    return _quantiles_of_sorted_keys(jax.lax.sort(_order_key(rows), dimension=1), num_levels)


def _quantiles_of_sorted_keys(keys: jax.Array, num_levels: int) -> jax.Array:
    n = keys.shape[1]
    qs = (np.arange(num_levels, dtype=np.float32) + np.float32(0.5)) / np.float32(num_levels)
    pos = qs * np.float32(n - 1)
    low, high = np.floor(pos), np.ceil(pos)
    high_weight = pos - low
    low_weight = np.float32(1.0) - high_weight
    low = np.clip(low, 0, n - 1).astype(int)
    high = np.clip(high, 0, n - 1).astype(int)
    column = lambda i: jax.lax.slice_in_dim(keys, int(i), int(i) + 1, axis=1)
    lo = _from_order_key(jnp.concatenate([column(i) for i in low], axis=1))
    hi = _from_order_key(jnp.concatenate([column(i) for i in high], axis=1))
    out = lo * low_weight + hi * high_weight
    has_nan = keys[:, -1:] == jnp.uint32(0xFFFFFFFF)              # NaNs sort last
    return jnp.where(has_nan, jnp.nan, out)


# Values per block of a sorted row in Lloyd's cell sums: fixed (not sized per kernel) so that
# every kernel's sums are grouped alike alone or batched with other kernels.
_LLOYD_BLOCK = 256


def _pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the last axis in a fixed pairwise order ((x0 + x1) + (x2 + x3)) + ...,
    zero-padded to a power of two: so appending zeros never changes the result (the sums of
    a kernel's cells are the same bits alone and batched with longer rows)."""
    n = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << max(0, (n - 1).bit_length())) - n)])
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x[..., 0]


class _LloydRows:
    """Sorted rows of one or more kernels (each [G_i, n_i]), cut into blocks of B values,
    with each block's sum: what a Lloyd step on sorted data reads, for every row at once.

    On sorted data a level's cell is an index range: its edges come from a search (count of
    block heads <= the mid-point, then one block), its sum is the block sums between the
    edges plus the partial sums of the edges' blocks. O(n/B + B) per cell instead of a pass
    and a scatter-add over every weight per step; only within-block partial sums are
    subtracted, so a cell's sum loses at most a block's magnitude to round-off, not the
    row's (as prefix-sum differences would). Search rows are `copies` stacked copies of
    all kernels' rows (one per Lloyd start); per-row arrays are padded to the longest row
    (heads +inf, sums 0), which changes no count and, summed pairwise, no sum.
    """

    def __init__(self, keys: Sequence[jax.Array], copies: int):
        b = _LLOYD_BLOCK
        nbs = [-(-k.shape[1] // b) for k in keys]
        self.num_blocks = nb_max = max(nbs)
        self.values, heads, sums, offsets, ns = [], [], [], [], []
        offset = 0
        for k, nb in zip(keys, nbs):
            g, n = k.shape
            # +inf pads sort last and are never <= a finite mid-point; sums leave them out.
            v = jnp.pad(_from_order_key(k), ((0, 0), (0, nb * b - n)), constant_values=jnp.inf)
            self.values.append(v)
            valid = (jnp.arange(nb * b) < n).reshape(nb, b)
            # A plain reduce here: its shape is the kernel's own, alone or batched. The sums in
            # the loop, whose shapes grow with the batch, are pairwise: XLA:CPU's reduce order
            # follows the shape (a plain sum there gave other bits batched; tested).
            block_sums = jnp.sum(jnp.where(valid, v.reshape(g, nb, b), 0.0), axis=-1)
            heads.append(jnp.pad(v[:, ::b], ((0, 0), (0, nb_max - nb)), constant_values=jnp.inf))
            sums.append(jnp.pad(block_sums, ((0, 0), (0, nb_max - nb))))
            offsets.append(offset + np.arange(g) * nb)
            ns.append(np.full(g, n))
            offset += g * nb
        self.blocks = jnp.concatenate([v.reshape(-1, b) for v in self.values])
        tile = lambda xs: jnp.concatenate(list(xs) * copies)
        self.heads, self.block_sums = tile(heads), tile(sums)                  # [R, nb_max]
        self.block_row = jnp.asarray(np.concatenate(offsets * copies), jnp.int32)[:, None]
        self.n = jnp.asarray(np.concatenate(ns * copies), jnp.int32)[:, None]   # [R, 1]

    def edges(self, mids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """For thresholds `mids` [R, K]: the count of values <= each, as (block q, the
        count q B + i, the sum of block q's first i values)."""
        q = jnp.sum(self.heads[:, None, :] <= mids[..., None], axis=-1, dtype=jnp.int32) - 1
        q = jnp.maximum(q, 0)
        blk = jnp.take(self.blocks, self.block_row + q, axis=0, mode="clip")    # [R, K, B]
        below = blk <= mids[..., None]
        inside = jnp.sum(below, axis=-1, dtype=jnp.int32)
        head_sum = _pairwise_sum(jnp.where(below, blk, 0.0))
        return q, q * _LLOYD_BLOCK + inside, head_sum

    def cell_sums(self, q: jax.Array, head_sum: jax.Array) -> jax.Array:
        """Sums of the cells between consecutive edges ([R, K + 1] from `edges` outputs
        [R, K], with the row's start and end added): block sums [q_k, q_{k+1}) plus the
        partial sum at edge k+1 minus the one at edge k."""
        r = q.shape[0]
        q = jnp.concatenate([jnp.zeros((r, 1), jnp.int32), q,
                             jnp.full((r, 1), self.num_blocks, jnp.int32)], axis=1)
        zero = jnp.zeros((r, 1), jnp.float32)
        part = jnp.concatenate([zero, head_sum, zero], axis=1)
        j = jnp.arange(self.num_blocks, dtype=jnp.int32)
        between = (j >= q[:, :-1, None]) & (j < q[:, 1:, None])                  # [R, K+1, nb]
        whole = _pairwise_sum(jnp.where(between, self.block_sums[:, None, :], 0.0))
        return whole + (part[:, 1:] - part[:, :-1])

    def step(self, levels: jax.Array) -> jax.Array:
        """One Lloyd step for every row: each level -> the mean of its cell (an empty cell
        keeps its level); sorted. Cells are `nearest_codes`'s: mid-points between levels,
        a tie to the lower level."""
        r = levels.shape[0]
        q, counts_below, head_sum = self.edges(0.5 * (levels[:, 1:] + levels[:, :-1]))
        edges = jnp.concatenate([jnp.zeros((r, 1), jnp.int32), counts_below, self.n], axis=1)
        counts = (edges[:, 1:] - edges[:, :-1]).astype(jnp.float32)
        means = self.cell_sums(q, head_sum) / jnp.maximum(counts, 1.0)
        return jnp.sort(jnp.where(counts > 0, means, levels), axis=-1)


def lloyd_init(w: jax.Array, num_levels: int, granularity: str,
               iters: int = 200) -> tuple[jax.Array, jax.Array]:
    """Levels by Lloyd (1-D k-means) from the quantiles and from a uniform grid; codes = nearest.

    Quantile starts put one level in each equal-mass slice, so no level starts
    empty; each Lloyd step lowers the squared error (empty cells keep their
    level). Each group keeps the better of the two refined starts. Returns
    `(levels [G, L] float32 sorted, codes uint8 kernel-shaped)`; a group holding a NaN
    gets NaN levels. `lloyd_init_many` fits several kernels with the same results.

    Lloyd runs on the sorted rows (the sort the quantile start needs anyway): a cell is an
    index range, its sum a sum of block sums (`_LloydRows`), so a step costs O(L (n/B + B))
    instead of a pass and a scatter-add over all n weights. Both starts are rows of one
    loop. The cell sums are taken in sorted order, not memory order: the same sums up to
    float round-off (measured against the former scatter-add version:
    tests/test_quant_weights.py).
    """
    return lloyd_init_many([(w, num_levels, granularity, iters)])[0]


def lloyd_init_many(fits: Sequence[tuple[jax.Array, int, str, int]]
                    ) -> list[tuple[jax.Array, jax.Array]]:
    """`[lloyd_init(w, num_levels, granularity, iters) for ...]`, the same bits, with one
    Lloyd loop per distinct `num_levels` instead of one per kernel: what a model's init
    compiles (one loop body instead of one per layer; ResNet-18, docs/notebook.md §2.2)."""
    out: list = [None] * len(fits)
    by_levels: dict[int, list[int]] = {}
    for i, (w, num_levels, granularity, _) in enumerate(fits):
        check_kernel_shape(w.shape, granularity, num_levels)
        by_levels.setdefault(num_levels, []).append(i)
    for num_levels, idx in by_levels.items():
        kernels = [jnp.asarray(fits[i][0], jnp.float32) for i in idx]
        groups = [num_groups(w.shape, fits[i][2]) for i, w in zip(idx, kernels)]
        keys = [jax.lax.sort(_order_key(_group_matrix(w, g)), dimension=1)
                for w, g in zip(kernels, groups)]
        data = _LloydRows(keys, copies=2)                                # 2 starts per row
        starts, caps = [], []
        for k, v in zip(keys, data.values):
            lo, hi = v[:, :1], _from_order_key(k[:, -1:])
            starts.append(_quantiles_of_sorted_keys(k, num_levels))
            starts.append(lo + (hi - lo) * (jnp.arange(num_levels, dtype=jnp.float32)
                                            / (num_levels - 1)))
        # rows: every kernel's quantile starts, then every kernel's uniform starts
        starts = starts[0::2] + starts[1::2]
        for i, g in zip(idx, groups):
            caps.append(np.full(g, fits[i][3]))
        cap = jnp.asarray(np.concatenate(caps * 2), jnp.int32)[:, None]
        max_cap = max(fits[i][3] for i in idx)

        # A loop, not unrolled: one compiled step for all kernels. It stops at the fixed
        # point (a further step would return the same levels bitwise), so each row's cap is
        # a cap: heavy-tailed 4-bit kernels need ~100 steps, most 2-bit ones < 30. A row
        # that has converged (or reached its kernel's cap) stays fixed meanwhile.
        def cond(carry):
            i, _, changed = carry
            return (i < max_cap) & changed

        def body(carry, data=data, cap=cap):
            i, levels, _ = carry
            new = jnp.where(i < cap, data.step(levels), levels)
            return i + 1, new, jnp.any(new != levels)

        _, refined, _ = jax.lax.while_loop(
            cond, body, (0, jnp.concatenate(starts), jnp.array(True)))
        total = sum(groups)
        row = 0
        for i, w, g, k, v in zip(idx, kernels, groups, keys, data.values):
            from_quantiles = refined[row:row + g]
            from_uniform = refined[total + row:total + row + g]
            row += g
            # Lloyd only finds a local minimum: from the quantiles (DESIGN 1.1) it can end
            # worse than the uniform min-max grid for small groups and many levels (heavy
            # tails), so both starts are refined and each group keeps the better.
            # Both starts' errors in one pass: the rows twice, against [2G, L] levels.
            values = jnp.concatenate([v, v]).T                                  # [n', 2G]
            both = jnp.concatenate([from_quantiles, from_uniform])
            valid = (jnp.arange(values.shape[0]) < k.shape[1])[:, None]
            sq = jnp.square(values - _lookup(both, nearest_codes(both, values)))
            err = jnp.sum(jnp.where(valid, sq, 0.0), axis=0)                      # [2G]
            levels = jnp.where((err[:g] <= err[g:])[:, None], from_quantiles, from_uniform)
            levels = jnp.where(k[:, -1:] == jnp.uint32(0xFFFFFFFF), jnp.nan, levels)  # NaN row
            out[i] = (levels, nearest_codes(levels, w))
    return out


def latent_ste_kernel(kernel: jax.Array, levels: jax.Array) -> jax.Array:
    """LQ-Nets-like baseline: nearest level of a float latent kernel, with STE.

    Forward value equals `gather_levels(levels, nearest_codes(levels, kernel))`;
    the kernel receives `dL/dW_q` unchanged (straight-through) and the levels
    the same exact scatter-add gradient as DQ-W.
    """
    codes = nearest_codes(jax.lax.stop_gradient(levels), jax.lax.stop_gradient(kernel))
    w_q = gather_levels(levels, codes)
    return w_q + (kernel - jax.lax.stop_gradient(kernel)).astype(w_q.dtype)


def lsq_bounds(bits: int) -> tuple[int, int]:
    """Symmetric signed integer grid of LSQ: [-2^(b-1), 2^(b-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def lsq_init_step(kernel: jax.Array, bits: int, granularity: str) -> jax.Array:
    """LSQ's initial step `2 mean|w| / sqrt(Qp)` per group: [G]."""
    _, qp = lsq_bounds(bits)
    rows = _group_matrix(jnp.asarray(kernel, jnp.float32), num_groups(kernel.shape, granularity))
    return 2.0 * jnp.mean(jnp.abs(rows), axis=1) / np.sqrt(qp)


def _scale_grad(x: jax.Array, scale: float) -> jax.Array:
    """Identity forward, gradient multiplied by `scale` (LSQ step-size scaling)."""
    return jax.lax.stop_gradient(x - x * scale) + x * scale


def _round_ste(x: jax.Array) -> jax.Array:
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def lsq_kernel(kernel: jax.Array, step: jax.Array, bits: int) -> jax.Array:
    """LSQ (Esser et al. 2019): `round(clip(w/s, -Qn, Qp)) * s`.

    Gradients follow the paper: STE through round inside the range, and the
    step's gradient scaled by `1/sqrt(N_group * Qp)`. `step`: [G] (G = 1 or
    out channels).
    """
    qn, qp = lsq_bounds(bits)
    per_group = kernel.size // step.shape[0]
    s = _scale_grad(step, 1.0 / np.sqrt(per_group * qp))
    s = s if step.shape[0] > 1 else s[0]
    v = jnp.clip(kernel / s, qn, qp)
    return _round_ste(v) * s
