"""Bit allocation (issue 28 item 5): Hutchinson traces, the exact DP, budgets, the program."""
from __future__ import annotations

import itertools
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dq_jax import allocation, configlib, export, predict, train
from tests.test_train import small_digits


def _tiny_loss():
    """Cross-entropy of a 2-layer tanh net on fixed data, as a function of both kernels."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 32))
    kernels = {"a": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
               "b": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}

    def loss(ks):   # the data closed over: a tiny model, nothing to constant-fold
        logits = jnp.tanh(x @ ks["a"]) @ ks["b"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(32), y])
    return loss, kernels


def test_hutchinson_matches_the_exact_hessian_trace_within_its_statistical_error():
    """Per layer, over N probes: |estimate - tr(H_ll)| <= 6 standard errors, the standard error
    computed exactly from the Hessian (the estimator v^T A v, A = sym(E_l H), has variance
    2 * sum_{i != j} A_ij^2 for Rademacher v: cross-layer terms included)."""
    loss, kernels = _tiny_loss()
    flat, unravel = jax.flatten_util.ravel_pytree(kernels)
    hessian = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
    num_probes = 400
    got = allocation.hutchinson_traces(loss, kernels, jax.random.PRNGKey(0), num_probes)
    offset = {"a": (0, 20), "b": (20, 32)}
    for name, (lo, hi) in offset.items():
        exact = np.trace(hessian[lo:hi, lo:hi])
        select = np.zeros(len(flat))
        select[lo:hi] = 1.0
        a = 0.5 * (select[:, None] * hessian + hessian * select[None, :])
        var = 2.0 * (np.sum(a ** 2) - np.sum(np.diag(a) ** 2))
        stderr = np.sqrt(var / num_probes)
        assert abs(got[name] - exact) <= 6 * stderr + 1e-5, (name, got[name], exact, stderr)
        assert stderr < 0.25 * abs(exact)   # the bound is informative, not vacuous


def test_hutchinson_probe_count_is_checked():
    loss, kernels = _tiny_loss()
    with pytest.raises(ValueError, match=r"num_probes=0 must be an integer >= 1"):
        allocation.hutchinson_traces(loss, kernels, jax.random.PRNGKey(0), 0)


def _brute_force(costs, sizes, capacity):
    names = list(costs)
    best = None
    for choice in itertools.product(*[sorted(costs[n]) for n in names]):
        if sum(sizes[n] * b for n, b in zip(names, choice)) <= capacity:
            total = sum(costs[n][b] for n, b in zip(names, choice))
            best = total if best is None else min(best, total)
    return best


def test_dp_equals_brute_force_on_random_integer_instances():
    rng = np.random.default_rng(1)
    for _ in range(300):
        layers = int(rng.integers(1, 6))
        names = [f"l{i}" for i in range(layers)]
        sizes = {n: int(rng.integers(1, 30)) for n in names}
        costs = {n: {b: int(rng.integers(0, 100)) for b in allocation.CANDIDATE_BITS}
                 for n in names}
        lo = sum(sizes.values()) * 2
        capacity = int(rng.integers(lo, sum(sizes.values()) * 8 + 5))
        widths = allocation.allocate(costs, sizes, capacity)
        assert set(widths) == set(names)
        assert sum(sizes[n] * widths[n] for n in names) <= capacity          # budget respected
        assert allocation.total_cost(costs, widths) == _brute_force(costs, sizes, capacity)


def test_more_budget_never_increases_the_total_sensitivity():
    rng = np.random.default_rng(2)
    for _ in range(20):
        names = [f"l{i}" for i in range(6)]
        sizes = {n: int(rng.integers(10, 500)) for n in names}
        # sensitivity-like: decreasing in bits (Lloyd errors fall with more levels)
        costs = {n: dict(zip(allocation.CANDIDATE_BITS,
                             sorted(rng.integers(0, 10_000, 4).tolist(), reverse=True)))
                 for n in names}
        previous = None
        for budget in np.arange(2.0, 8.01, 0.25):
            capacity = allocation.budget_in_bits(float(budget), sizes)
            total = allocation.total_cost(costs, allocation.allocate(costs, sizes, capacity))
            assert previous is None or total <= previous
            previous = total
        assert previous == sum(costs[n][8] for n in names)  # all 8-bit at 8 average bits


def test_budget_in_bits_is_exact_and_bad_budgets_name_the_feasible_range():
    sizes = {"a": 3, "b": 7}
    assert allocation.budget_in_bits(2.5, sizes) == 25 and allocation.budget_in_bits(2.55, sizes) == 25
    assert allocation.budget_in_bits(2.6, sizes) == 26 and allocation.budget_in_bits(8, sizes) == 80
    for bad in (1.99, 8.01, float("nan"), True, "3"):
        with pytest.raises(ValueError, match=r"outside the feasible range \[2, 8\]") as e:
            allocation.budget_in_bits(bad, sizes)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"budget of 19 bits is below the 20 bits"):
        allocation.allocate({"a": {2: 1.0}, "b": {2: 1.0}}, {"a": 3, "b": 7}, 19)


@pytest.mark.parametrize("overrides, match", [
    ({"bit_budget": 1.5, "init_from": "/x"}, r"bit_budget=1\.5 is outside the feasible range "
                                             r"\[2, 8\].*or 0 for off"),
    ({"bit_budget": 9.0, "init_from": "/x"}, r"bit_budget=9\.0 is outside the feasible range"),
    ({"bit_budget": 2.5}, r"bit_budget=2\.5 allocates .* set config\.init_from"),
    ({"allocation_probes": 0}, r"allocation_probes=0 must be an integer >= 1"),
    ({"allocation_method": "greedy"}, r"allocation_method='greedy'; allowed: 'hessian'"),
    ({"allocation": (("conv2", 9),)}, r"config\.allocation must be .*entry 0 is \('conv2', 9\)"),
])
def test_bad_allocation_keys_fail_with_one_line(overrides, match):
    with pytest.raises(ValueError, match=match) as e:
        configlib.validate(small_digits(**overrides), device_count=1)
    assert "\n" not in str(e.value)


def test_quantization_error_falls_with_width():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 32))
    errors = allocation.quantization_errors({"w": w})["w"]
    assert errors[2] > errors[3] > errors[4] > errors[8] > 0


def test_random_allocation_is_seeded_and_fills_the_budget():
    sizes = {f"l{i}": 100 * (i + 1) for i in range(8)}
    capacity = allocation.budget_in_bits(2.5, sizes)
    a = allocation.random_allocation(sizes, capacity, seed=0)
    assert a == allocation.random_allocation(sizes, capacity, seed=0)
    assert a != allocation.random_allocation(sizes, capacity, seed=1)
    used = sum(sizes[n] * b for n, b in a.items())
    assert used <= capacity
    # no single step up still fits: the budget is filled as far as the ladder allows
    ladder = sorted(allocation.CANDIDATE_BITS)
    assert all(b == 8 or used + sizes[n] * (ladder[ladder.index(b) + 1] - b) > capacity
               for n, b in a.items())


@pytest.fixture(scope="module")
def float_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("float")
    config = small_digits(**{"quant.weights": "float", "quant.acts": "float"})
    train.train_and_evaluate(config, str(workdir))
    return workdir


def test_program_allocates_from_float_weights_records_it_and_resumes_with_it(
        float_workdir, tmp_path):
    config = small_digits(bit_budget=2.5, init_from=str(float_workdir), allocation_probes=4)
    workdir = tmp_path / "alloc"
    part = train.train_and_evaluate(config, str(workdir), stop_after=8)
    assert part["steps"] == 8
    record = json.loads((workdir / allocation.ALLOCATION_FILE).read_text())
    widths = record["widths"]
    assert set(widths) == {"conv2", "conv3"}   # first/last stay float (digits config)
    assert set(widths.values()) <= set(allocation.CANDIDATE_BITS)
    assert record["average_bits"] <= 2.5 and record["probes"] == 4
    resumed = train.train_and_evaluate(config, str(workdir))   # reuses allocation.json
    assert resumed["resumed_from_step"] == 8
    results = json.loads((workdir / "results.json").read_text())
    assert results["bit_allocation"]["widths"] == widths
    assert results["bit_allocation"]["weight_bytes"] == sum(
        -(-n * widths[k] // 8) for k, n in record["num_weights"].items())
    assert [list(e) for e in results["config"]["allocation"]] == [[k, b] for k, b in widths.items()]
    params = flax.traverse_util.flatten_dict(resumed["state"].params)
    assert {"/".join(k[:-1]): int(np.log2(v.shape[-1])) for k, v in params.items()
            if k[-1] == "kernel_levels"} == widths
    path = tmp_path / "alloc.dqz"
    export.export_workdir(str(workdir), str(path))
    assert {l["module"]: l["bits"] for l in export.load(str(path)).layers} == widths
    predict.load_model(str(path))   # rebuilt from the header's config (its allocation)


def test_the_start_up_table_names_each_width_and_the_predicted_size():
    record = {"bit_budget": 2.75, "method": "hessian", "widths": {"a": 2, "b": 4},
              "num_weights": {"a": 100, "b": 60}, "trace_per_weight": {"a": 0.5, "b": 2.0},
              "average_bits": 2.75, "weight_bytes": 55,
              "weight_bytes_uniform": {"2": 40, "3": 60, "4": 80, "8": 160}}
    text = allocation.format_allocation(record)
    assert "a" in text and text.splitlines()[1].rstrip().endswith("2")
    assert text.splitlines()[2].rstrip().endswith("4")
    assert "predicted weight size 55 bytes (uniform W2 40, W3 60, W4 80, W8 160)" in text


def test_widths_a_layer_cannot_take_are_left_out():
    """Per-channel levels: 8 bits (256 levels) needs 256 weights per output channel."""
    errors = allocation.quantization_errors(
        {"small": jnp.ones((3, 3, 16, 16)) * jnp.arange(16.0),
         "big": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 32, 8))},
        granularity="per_channel")
    assert sorted(errors["small"]) == [2, 3, 4] and sorted(errors["big"]) == [2, 3, 4, 8]
    widths = allocation.allocate(errors, {"small": 2304, "big": 2304}, 8 * 4608)
    assert widths["big"] == 8 and widths["small"] in (2, 3, 4)  # small: exact at every width
    candidates = {n: sorted(e) for n, e in errors.items()}
    for seed in range(20):   # the random control keeps to each layer's widths too
        r = allocation.random_allocation({"small": 2304, "big": 2304}, 8 * 4608, seed,
                                         bits=candidates)
        assert r == {"small": 4, "big": 8}


def test_program_random_allocation_is_the_seeded_control_of_the_same_budget(float_workdir,
                                                                           tmp_path):
    config = small_digits(bit_budget=3.0, allocation_method="random",
                          init_from=str(float_workdir), allocation_probes=2)
    out = train.train_and_evaluate(config, str(tmp_path / "r"), stop_after=4)
    assert out["steps"] == 4
    record = json.loads((tmp_path / "r" / allocation.ALLOCATION_FILE).read_text())
    sizes, widths = record["num_weights"], record["widths"]
    assert record["method"] == "random" and set(widths) == {"conv2", "conv3"}
    assert widths == allocation.random_allocation(
        sizes, allocation.budget_in_bits(3.0, sizes), seed=config.seed)
    assert sum(sizes[n] * b for n, b in widths.items()) <= 3.0 * sum(sizes.values())


def test_bench_run_one_takes_a_budget_and_8bit_first_last(float_workdir, tmp_path):
    """bench/accuracy.run_one (what every gpu_grid row runs) on a budgeted run with 8-bit
    first/last: its start-state diagnostics see the program's per-layer widths (it stopped at
    "config.bit_budget needs the allocation" before, and converted every layer at
    config.quant's width), and the row reports the change from that start."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from bench import accuracy
    config = small_digits(bit_budget=2.5, first_last_bits=8, init_from=str(float_workdir),
                          allocation_probes=2, num_train_steps=8)
    workdir = tmp_path / "row"
    row = accuracy.run_one(config, str(workdir))
    record = json.loads((workdir / allocation.ALLOCATION_FILE).read_text())
    assert set(record["widths"]) == {"conv2", "conv3"} and row["steps"] == 8
    params0, _ = accuracy.initial_state(config, str(workdir))   # reads allocation.json back
    bits = {"/".join(k[:-1]): int(np.log2(v.shape[-1]))
            for k, v in flax.traverse_util.flatten_dict(params0).items()
            if k[-1] == "kernel_levels"}
    assert bits == {"conv1": 8, "head": 8, **record["widths"]}
    assert 0.0 <= row["codes_changed_by_end"] <= 1.0
