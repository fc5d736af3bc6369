"""What the compiler gets (issue 12, items 3-4): the DQ hot path has no gather and no scatter.

Up to 16 levels (2-4 bits) the level lookup `W_q = levels[g, codes]` is a chain of selects and
the level gradient L masked reductions; on TPU a scatter is serialised and on GPU millions of
atomic adds contend for G*L addresses, so the point is the program XLA receives, checked here
on the lowered StableHLO of the program's own jitted train step (`train.Steps(...).train`) of a
DQ W2A2 ResNet-20 (8x8 inputs, batch 4: the op set does not depend on the sizes, and lowering
takes seconds; nothing is compiled or run). Above 16 levels the gather / segment-sum path is
kept, and a test checks that it is still used, so these tests can fail.

Also: `fit_learned_levels` (the learned activation levels' Lloyd step) never builds a
`[N, H, W, C, L]` one-hot: no tensor in its HLO is larger than its input.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import source_info_util
from jax.extend.core import jaxprs_in_params

from dq_jax import configlib, models, train
from dq_jax.quant import activations as qa
from dq_jax.quant import weights as wq
from tests.helpers import explicit_mesh

MODEL, HW, BATCH = "resnet20", 8, 4

# Gather/scatter sites outside the quantizers that the whole-step test may accept (none: the
# optimizer uses wq.code_counts / wq.sort_levels(return_perm=True) / wq.permute_levels).
OPTIM_LEFTOVERS: dict = {}


# --------------------------------------------------------------------------- helpers

def _config(weight_bits: int, act_bits: int, act_levels: str = "uniform", **overrides):
    c = configlib.base_config()
    c.update(overrides)
    c.model, c.batch_size = MODEL, BATCH
    c.quant.weights, c.quant.weight_bits = "dq", weight_bits
    c.quant.acts, c.quant.act_bits, c.quant.act_levels = "dq", act_bits, act_levels
    return c


def _user_mesh() -> jax.sharding.Mesh:
    return explicit_mesh(train.create_mesh(_config(2, 2)))


def _train_step_and_args(weight_bits: int, act_bits: int = 2, act_levels: str = "uniform",
                         mesh: jax.sharding.Mesh | None = None, **overrides):
    """(jitted train step, abstract state, abstract batch) of the training program (on
    `mesh` instead of the program's own when given)."""
    c = _config(weight_bits, act_bits, act_levels, **overrides)
    quant = configlib.validate(c, device_count=jax.device_count())
    model = train.create_model(c, quant, 10)
    optimizer = train.create_optimizer(c, 1000, 100)
    steps = train.Steps(model, optimizer, mesh or train.create_mesh(c))
    shape = (HW, HW, models.INPUT_SHAPES[MODEL][-1])
    # Abstract values placed as the program places them (replicated state, batch split over
    # the mesh's data axis): under a user's Explicit-typed mesh some ops only trace when told
    # how, so tests that check that pass `_user_mesh()`.
    state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=steps.replicated),
        jax.eval_shape(lambda: train.init_state(model, optimizer, shape, 0)))
    batch = {"image": jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32, sharding=steps.batch),
             "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=steps.batch)}
    return steps.train, state, batch


_TYPE = re.compile(r"tensor<((?:\d+x)*)([a-z]+\d*)>")


def _types(signature: str) -> list[tuple[int, str]]:
    """(element count, dtype) of every tensor type in an op's signature."""
    return [(int(np.prod([int(d) for d in dims.split("x") if d])), dtype)
            for dims, dtype in _TYPE.findall(signature)]


def hlo_gathers_scatters(text: str) -> list[tuple[str, str]]:
    """(op, type signature) of every gather / scatter in StableHLO text.

    `select_and_scatter` (max-pool backward) is neither and is not matched.
    """
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"\bstablehlo\.(dynamic_gather|gather|scatter)\b", line)
        if not m or "select_and_scatter" in line:
            continue
        if m.group(1) == "scatter":  # its update region follows; the signature closes it
            sig = next(l for l in lines[i + 1:] if re.match(r"\s*\}\) : \(", l))
        else:
            sig = line
        out.append((m.group(1), sig[sig.rindex(" : ("):]))
    return out


def jaxpr_gather_scatter_sites(fn, *args) -> list[tuple[str, str, str]]:
    """(primitive, file name, function) of every gather/scatter in fn's jaxpr.

    Each is attributed to the innermost frame of user code (outside jax) that traced it (the
    outer function for a nested one);
    inside jax's own jitted helpers (e.g. take_along_axis) the caller's frame is used.
    """
    sites = []

    def frame_of(eqn, parent):
        f = source_info_util.user_frame(eqn.source_info.traceback)
        return (f.file_name.rsplit("/", 1)[-1], f.function_name.split(".")[0]) if f else parent

    def walk(jaxpr, parent):
        for eqn in jaxpr.eqns:
            where = frame_of(eqn, parent)
            if "gather" in eqn.primitive.name or "scatter" in eqn.primitive.name:
                sites.append((eqn.primitive.name, *where))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub, where)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, ("?", "?"))
    return sites


# --------------------------------------------------------------------------- train step

@pytest.fixture(scope="module", params=["uniform", "learned"])
def w2a2_step(request):
    step, state, batch = _train_step_and_args(2, 2, request.param)
    return step, state, batch, step.lower(state, batch).as_text()


def test_dq_w2a2_train_step_weight_path_has_no_gather_or_scatter(w2a2_step):
    """Levels lookup and gradient, code re-assignment, level sort + code remap, activation
    quantizers: none of it lowers to a gather or a scatter. What is left in the whole step is
    only OPTIM_LEFTOVERS, identified twice: by the source of each jaxpr op (gather/scatter
    primitives lower one to one to StableHLO gather/scatter) and by its HLO signature."""
    step, state, batch, text = w2a2_step
    sites = jaxpr_gather_scatter_sites(step, state, batch)
    unexplained = sorted({s for s in sites if s not in OPTIM_LEFTOVERS})
    assert not unexplained, unexplained
    # In the HLO: no gather/scatter touches a kernel-sized float tensor, the only scatters are
    # L-bin int32 histograms, the only gathers read a [G, L] level table.
    kernels = [int(np.prod(c.shape)) for c in jax.tree.leaves(state.codes)]
    assert len(kernels) == 18  # ResNet-20's inner convs (first conv and last dense are float)
    table = max(int(np.prod(l.shape)) for p, l in
                jax.tree_util.tree_flatten_with_path(state.params)[0]
                if "kernel_levels" in jax.tree_util.keystr(p))
    ops = hlo_gathers_scatters(text)
    for op, sig in ops:
        types = _types(sig)
        if op == "scatter":
            assert types[0] == (4, "i32") and types[-1] == (4, "i32"), sig  # bincount, L = 4
        else:
            assert types[0][1] == "f32" and types[0][0] <= table, sig    # level table
            assert types[-1][0] <= table, sig
    assert sum(op == "scatter" for op, _ in ops) <= len(kernels)


def test_whole_dq_train_step_has_no_gather_or_scatter(w2a2_step):
    _, _, _, text = w2a2_step
    assert hlo_gathers_scatters(text) == []


def test_finiteness_guard_is_not_fused_into_every_leaf():
    """The skip-if-non-finite guard computes its predicate once per step, in the compiled HLO.

    With a per-leaf `where(ok, new, old)`, XLA fused the whole finiteness reduction (one
    `and` per state leaf) into each leaf's select: ~leaves^2 `and` ops (73,693 for these 254
    leaves) and most of the step's compile time. `lax.cond` on one predicate keeps it linear
    (1,082 measured with the per-layer `finite_by_layer` metrics, which have left the step
    since issue 27, and the reductions' own bodies).
    """
    step, state, batch = _train_step_and_args(2, 2)
    compiled = step.lower(state, batch).compile().as_text()
    leaves = len(jax.tree.leaves(state))
    assert leaves > 200
    assert compiled.count(" and(") <= 8 * leaves, (compiled.count(" and("), leaves)


def test_finiteness_check_is_one_reduction_per_leaf_size(w2a2_step):
    """Issue 27: the guard reduces the gradients', loss's and updated state's finiteness once
    per distinct leaf size (leaves of one size and-ed elementwise first), not once per leaf:
    one reduction kernel per leaf was ~400 kernels that XLA:CPU compiles one at a time."""
    _, state, _, text = w2a2_step
    sizes = {int(np.prod(x.shape)) for x in train._float_leaves(state)}
    per_leaf = len(train._float_leaves(state))
    assert per_leaf > 150 and len(sizes) < 20
    assert text.count("applies stablehlo.and") <= len(sizes) + 1, (
        text.count("applies stablehlo.and"), len(sizes))


# Call sites of jax.random's lowered helpers (threefry hashes, key split/fold_in, uniform draws).
RANDOM_CALLS = re.compile(r"call @\w*(?:threefry|_uniform)\w*")


def test_random_draws_are_one_hash_not_a_key_per_layer(w2a2_step):
    """Issue 27 (b): the stochastic re-assignment of all 18 DQ layers draws from one counter
    hash (elementwise ops): the step's only random calls are the update key's split (its
    wrapper and the threefry it calls), and there is no rng_bit_generator. The per-layer
    stream (kept for old workdirs) has a fold_in and a draw per layer (44 call sites
    measured), so this test can fail."""
    step, state, batch, text = w2a2_step
    assert len(jax.tree.leaves(state.codes)) == 18
    assert len(RANDOM_CALLS.findall(text)) <= 2 and "rng_bit_generator" not in text
    old, state, batch = _train_step_and_args(2, 2, rounding_stream="per_layer")
    assert len(RANDOM_CALLS.findall(old.lower(state, batch).as_text())) >= 2 * 18


def test_train_step_outputs_no_per_layer_values(w2a2_step):
    """Issue 27 (a): the step returns the state and four scalar metrics; per-layer code
    diagnostics and finiteness flags are computed outside it (log steps, skipped steps)."""
    step, state, batch, _ = w2a2_step
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert set(metrics) == {"loss", "accuracy", "learning_rate", "nonfinite"}
    assert all(m.shape == () for m in metrics.values())


def test_more_than_16_levels_keep_the_gather_and_segment_sum():
    """W5 (32 levels): the general path is still used, so the assertions above can fail."""
    step, state, batch = _train_step_and_args(5, 2)
    sites = jaxpr_gather_scatter_sites(step, state, batch)
    # the backward of gather_levels (a custom_vjp) is attributed to its call site, the layer
    assert ("gather", "weights.py", "_lookup") in sites, set(sites)
    assert ("scatter-add", "layers.py", "_QuantizedKernelMixin") in sites, set(sites)
    ops = hlo_gathers_scatters(step.lower(state, batch).as_text())
    kernels = {int(np.prod(c.shape)) for c in jax.tree.leaves(state.codes)}
    float_scatters = [s for op, s in ops if op == "scatter" and _types(s)[-1][1] == "f32"]
    kernel_gathers = [s for op, s in ops if op == "gather" and _types(s)[-1][0] in kernels]
    assert float_scatters and kernel_gathers


@pytest.mark.parametrize("explicit", [False, True], ids=["program_mesh", "explicit_mesh"])
def test_learned_activations_above_16_levels_trace_in_the_program(explicit):
    """A5 learned levels (32): the general path (gather, segment sum) of the activation
    quantizer traces with a batch-sharded input on the program's (Auto) mesh and on a user's
    Explicit one (where a plain `levels[idx]` does not: its output sharding is ambiguous)."""
    step, state, batch = _train_step_and_args(2, 5, "learned",
                                              mesh=_user_mesh() if explicit else None)
    sites = set(jaxpr_gather_scatter_sites(step, state, batch))
    assert {("gather", "activations.py", "_level_of_index"),
            ("scatter-add", "activations.py", "fit_learned_levels")} <= sites, sites
    assert hlo_gathers_scatters(step.lower(state, batch).as_text())


@pytest.mark.parametrize("granularity", ["per_layer", "per_channel"])
@pytest.mark.parametrize("num_levels", [4, 16, 32])
def test_compiled_lookup_and_level_gradient(np_rng, granularity, num_levels):
    """After XLA's own passes too (compiled HLO, this backend): none up to 16 levels."""
    shape = (3, 3, 32, 16)
    ng = wq.num_groups(shape, granularity)
    levels = jnp.asarray(np.sort(np_rng.normal(size=(ng, num_levels)), -1).astype(np.float32))
    codes = jnp.asarray(np_rng.integers(0, num_levels, shape).astype(np.uint8))
    cot = jnp.asarray(np_rng.normal(size=shape).astype(np.float32))

    def fwd_bwd(lv, c, g):
        w_q, vjp = jax.vjp(wq.gather_levels, lv, c)
        return w_q, vjp(g)[0]

    hlo = jax.jit(fwd_bwd).lower(levels, codes, cot).compile().as_text()
    found = set(re.findall(r"\b(gather|scatter)\(", hlo))
    assert found == (set() if num_levels <= 16 else {"gather", "scatter"}), found


# --------------------------------------------------------------------------- fit_learned_levels

@pytest.mark.parametrize("num_levels", [4, 16])
def test_fit_learned_levels_builds_no_one_hot(num_levels):
    """No tensor in the lowered HLO of the Lloyd step is larger than its [N, H, W, C] input
    (the dense one-hot formulation had N*H*W*C*L floats, L x the activation memory)."""
    n, h, w, c = 8, 6, 6, 16
    x = jax.ShapeDtypeStruct((n, h, w, c), jnp.float32)
    lv = jax.ShapeDtypeStruct((num_levels,), jnp.float32)
    wc = jax.ShapeDtypeStruct((c,), jnp.float32)
    text = jax.jit(qa.fit_learned_levels, static_argnums=3).lower(x, lv, wc, True).as_text()
    sizes = [size for size, _ in _types(text)]
    assert max(sizes) == n * h * w * c, sorted(set(sizes))[-4:]
    assert not [s for s in sizes if s >= n * h * w * c * 2]
    assert "gather" not in text and "scatter" not in text


def test_calibrated_train_step_has_no_calibration_branches():
    """Issue 27: the step the program runs once every activation quantizer is calibrated
    (`Steps.train_calibrated`) carries none of their first-batch calibrations. The general
    step has one `case` (the EMA-or-calibrate branch) and one `while` (the calibration's
    Lloyd/closed-form loops) per activation quantizer (18 in this ResNet-20); the calibrated
    one keeps the finiteness guard's `case` and no per-quantizer loop."""
    c = _config(2, 2)
    quant = configlib.validate(c, device_count=jax.device_count())
    model = train.create_model(c, quant, 10)
    optimizer = train.create_optimizer(c, 1000, 100)
    steps = train.Steps(model, optimizer, train.create_mesh(c))
    _, state, batch = _train_step_and_args(2, 2)
    general = steps.train_general.lower(state, batch).as_text()
    lean = steps.train_calibrated.lower(state, batch).as_text()
    quantizers = sum(getattr(path[-1], "key", "") == "initialized"
                     for path, _ in jax.tree_util.tree_leaves_with_path(state.quant_stats))
    assert quantizers == 18  # the inner convs; the stem reads the float image
    assert general.count("stablehlo.case") == quantizers + 1
    assert general.count("stablehlo.while") >= quantizers
    assert lean.count("stablehlo.case") == 1
    assert lean.count("stablehlo.while") <= 1


def _sharding_annotations(hlo_text: str) -> int:
    return hlo_text.count('custom_call_target="Sharding"')


def test_program_step_carries_no_per_op_sharding_annotations():
    """The program's mesh has Auto axes (`train.create_mesh`): its lowered step gives XLA the
    state's and batch's shardings at the boundary only. On an Explicit-typed mesh every op
    derived from the sharded batch carries its own annotation (thousands here: more than the
    ops of the quantizers themselves), which cost compile time and change nothing on one
    device. The same step on an Explicit mesh is the counter-check that this test can fail."""
    assert set(train.create_mesh(_config(2, 2)).axis_types) == {jax.sharding.AxisType.Auto}
    step, state, batch = _train_step_and_args(2, 2)
    assert _sharding_annotations(step.lower(state, batch).as_text(dialect="hlo")) == 0
    step, state, batch = _train_step_and_args(2, 2, mesh=_user_mesh())
    assert _sharding_annotations(step.lower(state, batch).as_text(dialect="hlo")) > 1000
