"""Bit allocation under a size budget (HAWQ-V2/V3 style, on the library's own quantizer).

Per layer l with float kernel W_l (n_l weights) and candidate width b in `CANDIDATE_BITS`:

    sensitivity_l(b) = (tr(H_l) / n_l) * ||W_l - Q_b(W_l)||^2

where H_l is the Hessian of the loss w.r.t. W_l on calibration batches, its trace estimated by
Hutchinson's method (Rademacher probes v, tr(H) = E[v^T H v], with H v a forward-over-reverse
`jax.jvp` of `jax.grad`), and Q_b the Lloyd level fit DQ starts from (`quant.weights`: the
levels and nearest codes a float -> DQ conversion gives). The widths then minimise the summed
sensitivity subject to sum_l n_l * b_l <= budget * sum_l n_l, solved *exactly* by a dynamic
programme over layers that keeps every Pareto-optimal (bits used, sensitivity) pair: the
costs are integers (bits), so nothing is discretised and the optimum is the true one.

Why the per-weight trace times the squared error: a second-order expansion of the loss around
the trained weights gives dL ~ 1/2 dW^T H dW; with the quantization noise spread over the
layer, E[dW^T H_l dW] ~ (tr(H_l) / n_l) * ||dW||^2 (HAWQ-V2, Dong et al. 2020).

The program (`--config.bit_budget=2.5`, with `--config.init_from=FLOAT`) runs it once on the
float weights before conversion (`resolve_config`): the chosen widths become
`config.allocation` (recorded in config.json, results.json and the export; a resume reuses
them from `allocation.json` in the workdir instead of recomputing).
"""
from __future__ import annotations

import copy
import fractions
import json
import math
import random
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dq_jax.quant import weights as wq
from dq_jax.quant.config import CANDIDATE_BITS, QuantConfig

ALLOCATION_FILE = "allocation.json"

PyTree = Any


# --------------------------------------------------------------------------- sensitivity

def rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
    """A pytree of independent +-1 entries shaped like `tree` (float32)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.rademacher(k, jnp.shape(x), jnp.float32)
                              for k, x in zip(keys, leaves)])


def hutchinson_traces(loss_fn: Callable[..., jax.Array], kernels: Mapping[str, jax.Array],
                      key: jax.Array, num_probes: int, args: tuple = ()) -> dict[str, float]:
    """Hutchinson estimates of tr(d^2 loss / dW_l^2) for each entry W_l of `kernels`, where the
    loss is `loss_fn(kernels, *args)` (`args`: data and other weights, passed as jit
    arguments: closed over, XLA would constant-fold the convolutions while compiling).

    One probe v draws every layer at once; v_l^T (H v)_l estimates layer l's diagonal block
    trace without bias (the cross-layer terms have mean zero). Returns the mean over
    `num_probes` probes (float64 on the host).
    """
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes={num_probes!r} must be an integer >= 1.")
    kernels = {k: jnp.asarray(v, jnp.float32) for k, v in kernels.items()}

    @jax.jit
    def probe(k: jax.Array, ks: dict, rest: tuple) -> dict[str, jax.Array]:
        v = rademacher_like(k, ks)
        _, hv = jax.jvp(jax.grad(lambda w: loss_fn(w, *rest)), (ks,), (v,))
        return {name: jnp.vdot(v[name], hv[name]) for name in ks}

    total = {name: 0.0 for name in kernels}
    for k in jax.random.split(key, num_probes):
        for name, value in jax.device_get(probe(k, kernels, tuple(args))).items():
            total[name] += float(value)
    return {name: t / num_probes for name, t in total.items()}


def quantization_errors(kernels: Mapping[str, jax.Array], bits: Sequence[int] = CANDIDATE_BITS,
                        granularity: str = "per_layer",
                        lloyd_iters: int = 200) -> dict[str, dict[int, float]]:
    """||W - Q_b(W)||^2 per layer and width: Q_b = Lloyd levels + nearest codes (`lloyd_init`,
    the fit a float -> DQ conversion starts from), compiled, one loop per level count. A width
    a layer cannot take (per-channel levels: more levels than a channel's weights) is left out
    of its candidates."""
    names = list(kernels)
    pairs = []
    for n in names:
        for b in bits:
            try:
                wq.check_kernel_shape(jnp.shape(kernels[n]), granularity, 2 ** b)
            except ValueError:
                continue
            pairs.append((n, b))
    jobs = [(jnp.asarray(kernels[n], jnp.float32), 2 ** b, granularity, lloyd_iters)
            for n, b in pairs]
    fitted = jax.jit(lambda ws: wq.lloyd_init_many(
        [(w, *job[1:]) for w, job in zip(ws, jobs)]))([j[0] for j in jobs])
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    for (w, *_), (levels, codes), (n, b) in zip(jobs, fitted, pairs):
        w_q = wq.gather_levels(levels, codes)
        out[n][b] = float(jnp.sum(jnp.square(w - w_q)))
    return out


def sensitivities(traces: Mapping[str, float], sizes: Mapping[str, int],
                  errors: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    """(tr(H_l) / n_l) * ||W_l - Q_b(W_l)||^2 per layer and width."""
    return {n: {b: traces[n] / sizes[n] * e for b, e in errors[n].items()} for n in errors}


# --------------------------------------------------------------------------- the programme

def budget_in_bits(average_bits: float, sizes: Mapping[str, int],
                   bits: Sequence[int] = CANDIDATE_BITS) -> int:
    """The budget `average_bits` per weight as a whole number of bits over the layers
    (floor of the exact decimal product), checked against the feasible range."""
    lo, hi = min(bits), max(bits)
    if (isinstance(average_bits, bool) or not isinstance(average_bits, (int, float))
            or not math.isfinite(average_bits) or not lo <= average_bits <= hi):
        raise ValueError(f"bit budget {average_bits!r} average bits per weight is outside the "
                         f"feasible range [{lo}, {hi}] (all layers at {lo} bits .. all at {hi} "
                         f"bits with widths {tuple(bits)}); pick a budget in that range.")
    total = sum(sizes.values())
    return int(math.floor(fractions.Fraction(str(float(average_bits))) * total))


def allocate(costs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
             budget_bits: int) -> dict[str, int]:
    """Widths minimising sum_l costs[l][b_l] subject to sum_l sizes[l] * b_l <= budget_bits.

    Exact: a DP over layers keeping every Pareto-optimal (bits used, cost) state (no state
    that another beats on both); bits are integers, so no rounding. Among optimal allocations
    the one found first in layer order with the smaller width tried first wins (deterministic).
    Raises ValueError when even the smallest widths exceed the budget.
    """
    names = list(costs)
    smallest = sum(sizes[n] * min(costs[n]) for n in names)
    if smallest > budget_bits:
        raise ValueError(f"budget of {budget_bits} bits is below the {smallest} bits of every "
                         "layer at its smallest width; raise the budget.")
    # state: bits used -> (cost, widths chosen so far); pruned to the Pareto front.
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for n in names:
        best: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, cost, chosen in front:
            for b in sorted(costs[n]):
                u = used + sizes[n] * b
                if u > budget_bits:
                    continue
                c = cost + costs[n][b]
                if u not in best or c < best[u][0]:
                    best[u] = (c, chosen + (b,))
        front, lowest = [], math.inf
        for u in sorted(best):
            c, chosen = best[u]
            if c < lowest:  # else a state using fewer bits costs no more: dominated
                front.append((u, c, chosen))
                lowest = c
    _, _, chosen = min(front, key=lambda s: (s[1], s[0]))
    return dict(zip(names, chosen))


def random_allocation(sizes: Mapping[str, int], budget_bits: int, seed: int,
                      bits: Sequence[int] | Mapping[str, Sequence[int]] = CANDIDATE_BITS
                      ) -> dict[str, int]:
    """A seeded random allocation that fills the same budget: start every layer at its
    smallest width, then raise random layers by one candidate step while it fits (the
    control for item 6: does sensitivity beat chance at equal size?). `bits`: the widths, or
    layer -> the widths that layer can take (`quantization_errors` leaves out the others)."""
    rng = random.Random(seed)
    ladders = {n: sorted(bits[n] if isinstance(bits, Mapping) else bits) for n in sizes}
    widths = {n: ladders[n][0] for n in sizes}
    used = sum(sizes[n] * widths[n] for n in sizes)

    def up(n: str) -> int:
        return ladders[n][ladders[n].index(widths[n]) + 1]

    while True:
        options = [n for n in sizes if widths[n] != ladders[n][-1]
                   and used + sizes[n] * (up(n) - widths[n]) <= budget_bits]
        if not options:
            return widths
        n = rng.choice(options)
        step = up(n)
        used += sizes[n] * (step - widths[n])
        widths[n] = step


def total_cost(costs: Mapping[str, Mapping[int, float]], widths: Mapping[str, int]) -> float:
    return sum(costs[n][widths[n]] for n in widths)


def weight_bytes(widths: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    """Bytes of the bit-packed codes at these widths (the `.dqz` codes tensors, uncompressed)."""
    return sum(-(-sizes[n] * widths[n] // 8) for n in widths)


# --------------------------------------------------------------------------- the program

def _allocatable(config, layer_quant: Mapping[tuple, QuantConfig],
                 quant: QuantConfig) -> list[tuple[str, ...]]:
    """Layers config.rules / first_last_bits leave at config.quant (its sign aside)."""
    base = quant.replace(act_signed=None)
    return [p for p, q in layer_quant.items()
            if q.weights in ("dq", "latent_ste", "lsq") and q.replace(act_signed=None) == base]


def compute(config, float_model, float_variables: Mapping, quant: QuantConfig,
            paths: Sequence[tuple[str, ...]], batches: Sequence[dict]) -> dict:
    """The allocation for `paths` of `float_model` at `config.bit_budget` on `batches`
    (eval-mode forwards: BatchNorm running statistics, so the loss is deterministic)."""
    import flax
    params = flax.traverse_util.flatten_dict(float_variables["params"])
    names = ["/".join(p) for p in paths]
    kernels = {n: jnp.asarray(params[p + ("kernel",)], jnp.float32) for n, p in zip(names, paths)}
    images = jnp.concatenate([jnp.asarray(b["image"]) for b in batches])
    labels = jnp.concatenate([jnp.asarray(b["label"]) for b in batches])
    import optax

    def loss_fn(ks: dict, rest: dict, batch_stats: dict, x: jax.Array,
                y: jax.Array) -> jax.Array:
        p = dict(rest)
        for n, path in zip(names, paths):
            p[path + ("kernel",)] = ks[n]
        variables = {"params": flax.traverse_util.unflatten_dict(p), "batch_stats": batch_stats}
        logits = float_model.apply(variables, x, train=False).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    sizes = {n: int(np.prod(k.shape)) for n, k in kernels.items()}
    rest = {k: jnp.asarray(v) for k, v in params.items()
            if k not in {p + ("kernel",) for p in paths}}
    batch_stats = jax.tree.map(jnp.asarray, dict(float_variables.get("batch_stats", {})))
    traces = hutchinson_traces(loss_fn, kernels, jax.random.PRNGKey(int(config.seed)),
                               int(config.allocation_probes),
                               args=(rest, batch_stats, images, labels))
    errors = quantization_errors(kernels, CANDIDATE_BITS, quant.granularity, quant.lloyd_iters)
    costs = sensitivities(traces, sizes, errors)
    capacity = budget_in_bits(float(config.bit_budget), sizes)
    method = config.get("allocation_method", "hessian")
    widths = (allocate(costs, sizes, capacity) if method == "hessian"
              else random_allocation(sizes, capacity, seed=int(config.seed),
                                     bits={n: sorted(c) for n, c in costs.items()}))
    used = sum(sizes[n] * widths[n] for n in widths)
    return {"bit_budget": float(config.bit_budget), "method": method, "widths": widths,
            "average_bits": used / sum(sizes.values()),
            "weight_bytes": weight_bytes(widths, sizes),
            "weight_bytes_uniform": {b: weight_bytes({n: b for n in sizes}, sizes)
                                     for b in CANDIDATE_BITS},
            "total_sensitivity": total_cost(costs, widths),
            "trace_per_weight": {n: traces[n] / sizes[n] for n in names},
            "sensitivity": costs, "num_weights": sizes,
            "probes": int(config.allocation_probes),
            "calibration_images": int(images.shape[0])}


def format_allocation(record: Mapping) -> str:
    """The start-up table: layer, weights, trace per weight, chosen width; then the size."""
    lines = [f"  {'layer':<36}{'weights':>10}{'tr(H)/n':>12}  bits"]
    for n, b in record["widths"].items():
        lines.append(f"  {n:<36}{record['num_weights'][n]:>10,}"
                     f"{record['trace_per_weight'][n]:>12.3g}  {b}")
    uniform = record["weight_bytes_uniform"]
    lines.append(f"  budget {record['bit_budget']} average bits: {record['average_bits']:.4f} "
                 f"used, predicted weight size {record['weight_bytes']:,} bytes (uniform "
                 + ", ".join(f"W{b} {v:,}" for b, v in sorted(uniform.items(), key=lambda x:
                                                            int(x[0]))) + ")")
    return "\n".join(lines)


def _inputs(config) -> dict:
    """What an allocation depends on (a recorded one with other inputs is recomputed)."""
    def plain(v):
        return v.to_dict() if hasattr(v, "to_dict") else v
    return json.loads(json.dumps({k: plain(config.get(k)) for k in (
        "bit_budget", "allocation_method", "init_from", "seed", "allocation_probes", "allocation_batches", "model",
        "dataset", "batch_size", "quant", "rules", "first_last_bits", "quantize_first_last")},
        default=str))


def resolve_config(config, workdir, ds, num_classes: int):
    """`config` with `config.allocation` filled when `config.bit_budget` asks for one: read
    back from the workdir's allocation.json (a resume: the same widths, nothing recomputed),
    else computed on the float weights of `config.init_from` and written there. A config
    without a budget is returned as it is."""
    if not config.get("bit_budget", 0.0) or config.get("allocation"):
        return config
    from absl import logging as absl_logging
    from dq_jax import checkpoints, configlib, mixed, models
    path = workdir / ALLOCATION_FILE
    record = None
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("inputs") != _inputs(config):
            record = None  # another experiment's: recomputed (config.json refuses a resume)
    if record is None:
        quant = QuantConfig.from_mapping(config.quant)
        shape = tuple(ds.image_shape)
        kwargs = config.model_kwargs.to_dict()
        unallocated = copy.deepcopy(config)
        unallocated.bit_budget = 0.0
        layer_quant = mixed.quant_by_layer(
            mixed.create_model(unallocated, quant, num_classes, shape, **kwargs), shape)
        paths = _allocatable(config, layer_quant, quant)
        float_model = models.create(config.model, num_classes, quant=QuantConfig.float(),
                                    **kwargs)
        float_variables = checkpoints.load_float_variables(config.init_from)
        batches, it = [], ds.train_batches(0)
        for _ in range(int(config.allocation_batches)):
            batches.append(next(it))
        record = compute(config, float_model, float_variables, quant, paths, batches)
        record["inputs"] = _inputs(config)
        checkpoints.write_text_atomic(path, json.dumps(record, indent=1))
    absl_logging.info("Bit allocation (config.bit_budget=%s, %s; Hutchinson traces, %d probes "
                      "on %d images):\n%s", config.bit_budget, record["method"], record["probes"],
                      record["calibration_images"], format_allocation(record))
    config = copy.deepcopy(config)
    config.allocation = tuple((n, int(b)) for n, b in record["widths"].items())
    configlib.validate_allocation(config)
    return config


def results_entries(config, workdir) -> dict:
    """results.json's `bit_allocation` (widths, predicted size, sensitivities) for a budgeted
    run; nothing otherwise."""
    path = workdir / ALLOCATION_FILE
    if not config.get("bit_budget", 0.0) or not path.exists():
        return {}
    record = json.loads(path.read_text())
    return {"bit_allocation": {k: record[k] for k in (
        "bit_budget", "method", "widths", "average_bits", "weight_bytes", "weight_bytes_uniform",
        "total_sensitivity", "trace_per_weight", "probes", "calibration_images")}}
