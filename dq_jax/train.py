"""`train_and_evaluate(config, workdir)`: sharded, resumable quantization-aware training.

The shape follows the Flax ImageNet example (state creation, one jitted train
step over a device mesh, eval, orbax checkpoints, automatic resume), made
quantization-aware: the state carries integer codes and activation statistics,
and the step runs the direct code update and level re-sorting in-graph.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging as logging_lib
import math
import signal
import sys
import threading
import time
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from dq_jax import (adaround, allocation, checkpoints, configlib, data, jit_cache, layers,
                    mixed, optim)
from dq_jax.layers import QUANT_STATS
from dq_jax.optim import CODES, LEVELS, PARAMS
from dq_jax.quant.activations import all_calibrated, assume_calibrated, skip_calibration_check
from dq_jax.quant.config import QuantConfig
from dq_jax.train_state import TrainState  # everything a step reads and writes; checkpointed

PyTree = Any
from dq_jax.build import (  # noqa: F401  (re-exported: train.create_model etc.)
    STATIC_ARGS,
    total_train_steps,
    make_schedule_shape,
    learning_rate_schedules,
    rounding_temperature_schedule,
    create_optimizer,
    _injected,
    applied_updates,
    _learning_rate,
    _code_rate,
    _inertia_seed_rate,
    create_model,
    init_jits,
    init_state)


# --------------------------------------------------------------------------- steps

def _float_leaves(tree: PyTree) -> list[jax.Array]:
    """Inexact (float) leaves only: integer codes and PRNG keys are always finite."""
    return [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


def _all_finite(*trees: PyTree) -> jax.Array:
    """Whether every float element of `trees` is finite, as one reduction per leaf *size*.

    Leaves of one size are flattened, `isfinite`-and-ed elementwise and reduced once: a
    per-leaf `all(isfinite(x))` is one reduction kernel per leaf (~360 in a DQ ResNet-20
    step, plus a chain of scalar `and`s; one launch each on an accelerator), grouped it is
    about a dozen (issue 27). The same boolean, the same bytes read. (XLA:CPU's compile time
    did not move measurably with it: docs/notebook.md §2.2.)
    """
    groups: dict[int, list[jax.Array]] = {}
    for x in _float_leaves(list(trees)):
        groups.setdefault(int(x.size), []).append(jnp.isfinite(x.reshape(-1)))
    flags = [jnp.all(functools.reduce(jnp.logical_and, g)) for g in groups.values()]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _finite_by_layer(*trees: PyTree) -> dict[str, jax.Array]:
    """Module path -> all leaves finite, over several trees (grads, stats, ...)."""
    out: dict[str, list] = {}
    for tree in trees:
        for path, leaf in flax.traverse_util.flatten_dict(tree).items():
            out.setdefault("/".join(path[:-1]) or path[-1], []).append(jnp.all(jnp.isfinite(leaf)))
    return {k: jnp.all(jnp.stack(v)) for k, v in out.items()}


def _forward_backward_update(state: TrainState, batch: dict, model, label_smoothing: float,
                             calibrated: bool = False):
    """(loss, logits, new mutable vars, grads, updated state) of one train step, before the
    finiteness guard: shared by `train_step` and `nonfinite_layers_step`. `calibrated`: the
    activation quantizers are traced without their first-batch calibration branch
    (`assume_calibrated`; only for a state whose quantizers are all calibrated)."""
    images, labels = batch["image"], batch["label"]

    def loss_fn(differentiable):  # {'params', 'perturbations'}: d/dperturbations = dL/dW_q
        with assume_calibrated() if calibrated else contextlib.nullcontext():
            logits, new_vars = model.apply(
                state.variables(differentiable), images, train=True,
                mutable=["batch_stats", QUANT_STATS])
        one_hot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing) \
            if label_smoothing else jax.nn.one_hot(labels, logits.shape[-1])
        loss = jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), one_hot))
        return loss, (logits, new_vars)

    (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.differentiable())
    updated = state.apply_gradients(grads=grads, batch_stats=new_vars.get("batch_stats", {}),
                                    quant_stats=new_vars.get(QUANT_STATS, {}))
    return loss, logits, new_vars, grads, updated


def train_step(state: TrainState, batch: dict, *, model, label_smoothing: float,
               calibrated: bool = False) -> tuple[TrainState, dict]:
    """Forward/backward, direct code update, level sort; non-finite steps are skipped.

    A step whose loss or gradients are not finite leaves the state untouched
    (except `step`, so the data position still advances) and is counted in
    `metrics['nonfinite']`: no NaN ever reaches the state or a checkpoint. The metrics are
    scalars only: per-layer numbers (codes changed, code entropy, which layers blew up) are
    computed outside this program, at log steps and for skipped steps
    (`nonfinite_layers_step`), since each per-layer output adds per-layer code that XLA
    compiles one fusion at a time (issue 27: compile time). `calibrated=True` (for states whose
    activation quantizers are all calibrated, `Steps.for_state`) leaves their first-batch
    calibration out of the program.
    """
    loss, logits, new_vars, grads, updated = _forward_backward_update(
        state, batch, model, label_smoothing, calibrated)
    labels = batch["label"]
    grads, w_grads = grads["params"], grads.get(optim.PERTURBATIONS, {})
    # The *updated* state must be finite too: finite gradients times an infinite learning rate,
    # or a BatchNorm variance that overflows, would otherwise reach a checkpoint.
    with jax.named_scope("finite_guard"):  # a name for profiles and HLO metadata
        ok = _all_finite(loss, grads, w_grads, updated)
        kept = state.replace(step=state.step + 1)
        # One predicate for the whole state. A per-leaf `where(ok, new, old)` let XLA fuse the
        # whole finiteness reduction (one `and` per leaf) into every leaf's select: quadratic
        # in the number of leaves, and most of the step's compile time (notebook §2.2).
        new_state = jax.lax.cond(ok, lambda: updated, lambda: kept)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        # The rate this step applied: the schedule follows the optimizer's own count of
        # applied updates, which a skipped (non-finite) step does not advance.
        "learning_rate": _learning_rate(updated.opt_state),
        "nonfinite": 1.0 - ok.astype(jnp.float32),
    }
    return new_state, metrics


def nonfinite_layers_step(state: TrainState, batch: dict, *, model, label_smoothing: float,
                          calibrated: bool = False) -> dict[str, jax.Array]:
    """Which layers' gradients / fitted activation statistics / new values are not finite
    (module path -> all finite; 'loss' -> the loss is) for the train step on these inputs:
    the same computation as `train_step` up to its guard. A separate program, compiled only
    when a step was skipped, so the train step carries no per-layer flags."""
    loss, _, new_vars, grads, updated = _forward_backward_update(
        state, batch, model, label_smoothing, calibrated)
    flags = _finite_by_layer(
        grads["params"], grads.get(optim.PERTURBATIONS, {}), new_vars.get(QUANT_STATS, {}),
        {"params": updated.params}, {"batch_stats": new_vars.get("batch_stats", {})})
    return {**flags, "loss": jnp.isfinite(loss)}


def eval_step(state: TrainState, batch: dict, *, model) -> dict:
    """Sums over the (masked) batch: loss, top-1 and top-5 hits, example count."""
    with skip_calibration_check():  # the program's states are calibrated; keeps it cacheable
        logits = model.apply(state.variables(), batch["image"], train=False).astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def calibrate_step(state: TrainState, batch: dict, *, model) -> TrainState:
    """Fits activation quantizers on a training batch; nothing else changes."""
    _, new_vars = model.apply(state.variables(), batch["image"], train=True,
                              mutable=["batch_stats", QUANT_STATS])
    return state.replace(quant_stats=new_vars.get(QUANT_STATS, {}))


def bn_moments_step(state: TrainState, batch: dict, fill: jax.Array, *, model) -> PyTree:
    """One train-mode forward from running statistics all equal to `fill`; returns them updated.

    Flax's BatchNorm updates `ra <- m * ra + (1 - m) * batch_moment`; starting from 0 gives
    `(1 - m) * moment` and from 1 gives `m + (1 - m) * moment`, so two calls recover each
    layer's momentum and one call per batch its batch moments, whatever momentum the model
    uses. Only `batch_stats` is mutable: activation quantizers and weights are untouched.
    """
    stats = jax.tree.map(lambda x: jnp.full_like(x, fill), state.batch_stats)
    with skip_calibration_check():
        _, new_vars = model.apply(state.variables(batch_stats=stats), batch["image"],
                                  train=True, mutable=["batch_stats"])
    return new_vars["batch_stats"]


def recalibrate_batch_stats(steps: "Steps", state: TrainState, batches: Iterator[dict],
                            num_batches: int) -> TrainState:
    """BatchNorm running statistics re-estimated as plain averages over `num_batches` batches.

    Weights that keep changing code during training leave the EMA statistics lagging behind
    the final weights; this replaces them by the average batch mean/variance of the final
    model (train-mode forwards, nothing else changes), as "precise BN" does.
    """
    if num_batches <= 0 or not jax.tree.leaves(state.batch_stats):
        return state
    total = None
    one_minus_m = None
    for i in range(num_batches):
        batch = to_global(next(batches), steps.batch)
        zero = steps.bn_moments(state, batch, jnp.float32(0.0))
        if one_minus_m is None:
            one = steps.bn_moments(state, batch, jnp.float32(1.0))
            one_minus_m = jax.tree.map(lambda o, z: 1.0 - (o - z), one, zero)
        total = zero if total is None else jax.tree.map(jnp.add, total, zero)
    averaged = jax.tree.map(lambda t, k: t / (k * num_batches), total, one_minus_m)
    return state.replace(batch_stats=averaged)


# --------------------------------------------------------------------------- sharding

def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """Mesh from `config.mesh` (axis -> size, one -1 = the rest); data axis first.

    Its axes are Auto-typed: the steps' `jit` gives the state's and the batch's shardings and
    XLA propagates the rest. On an Explicit-typed mesh (`jax.make_mesh`'s default) every op of
    the step carries its sharding into the lowered program (41% of the DQ ResNet-20 step's
    HLO instructions), which the compiler then has to strip: one device computes bit for bit
    the same either way, and the Auto mesh compiles faster (docs/notebook.md §2.2).
    """
    axes = dict(config.mesh.to_dict())
    if "data" not in axes:
        raise ValueError("config.mesh must name a 'data' axis (the batch is split over it).")
    n = jax.device_count()
    fixed = math.prod(v for v in axes.values() if v != -1)
    sizes = {k: (n // fixed if v == -1 else v) for k, v in axes.items()}
    if math.prod(sizes.values()) != n:
        raise ValueError(f"config.mesh={axes} does not cover the {n} devices; "
                         "use sizes whose product is the device count (or -1 for one axis).")
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes.keys()),
                         axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """Per-process numpy batch -> global jax.Array sharded over the data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


class Steps:
    """The jitted train/eval/calibration steps bound to a model, optimizer and mesh."""

    def __init__(self, model, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 label_smoothing: float = 0.0):
        # The train step applies the state's own `tx`; `optimizer` is the one `init_state`
        # gave it, kept here for callers that build states.
        self.optimizer = optimizer
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.batch = NamedSharding(mesh, P("data"))
        # Two train steps, each compiled on first use: the general one (an uncalibrated
        # activation quantizer calibrates on its first batch) and, for a state whose
        # quantizers are all calibrated, one without that branch (`for_state` chooses).
        self.train_general, self.train_calibrated = (jax.jit(
            functools.partial(train_step, model=model, label_smoothing=label_smoothing,
                              calibrated=calibrated),
            in_shardings=(self.replicated, self.batch),
            out_shardings=(self.replicated, self.replicated), donate_argnums=0)
            for calibrated in (False, True))
        # Compiled on first use: only after a skipped (non-finite) step.
        self._nonfinite_layers = {calibrated: jax.jit(
            functools.partial(nonfinite_layers_step, model=model,
                              label_smoothing=label_smoothing, calibrated=calibrated),
            in_shardings=(self.replicated, self.batch), out_shardings=self.replicated)
            for calibrated in (False, True)}
        self.train, self.nonfinite_layers = self.train_general, self._nonfinite_layers[False]
        self.eval = jax.jit(functools.partial(eval_step, model=model),
                            in_shardings=(self.replicated, self.batch),
                            out_shardings=self.replicated)
        self.calibrate = jax.jit(functools.partial(calibrate_step, model=model),
                                 in_shardings=(self.replicated, self.batch),
                                 out_shardings=self.replicated)
        self.bn_moments = jax.jit(functools.partial(bn_moments_step, model=model),
                                  in_shardings=(self.replicated, self.batch, self.replicated),
                                  out_shardings=self.replicated)

    def place(self, state: TrainState) -> TrainState:
        return jax.device_put(state, self.replicated)

    def for_state(self, state: TrainState) -> bool:
        """Points `train` (and `nonfinite_layers`) at the step without the activation
        quantizers' first-batch calibration when every quantizer of `state` is calibrated
        (checked on the host), else at the general step; returns which. Call it again after
        changing to a state that may not be calibrated."""
        calibrated = all_calibrated(state.quant_stats)
        self.train = self.train_calibrated if calibrated else self.train_general
        self.nonfinite_layers = self._nonfinite_layers[calibrated]
        return calibrated


def evaluate(steps: Steps, state: TrainState, batches: Iterator[dict],
             should_stop=None) -> dict:
    """Eval metrics over all batches; raises `Interrupted` between batches once
    `should_stop()` says so (a preemption notice during a long eval)."""
    totals = None
    for batch in batches:
        if should_stop is not None and should_stop():
            raise Interrupted("evaluation")
        out = steps.eval(state, to_global(batch, steps.batch))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"eval_loss": float(totals["loss"]) / count, "eval_top1": float(totals["top1"]) / count,
            "eval_top5": float(totals["top5"]) / count, "eval_count": int(totals["count"])}


# --------------------------------------------------------------------------- logging

def _code_entropies(codes: PyTree, params: PyTree) -> dict[str, float]:
    """Per DQ-W layer, the entropy (bits) of its code histogram, from host copies (a log
    step's): `optim.code_histogram_entropy` in numpy, nothing compiled."""
    levels = flax.traverse_util.flatten_dict(params)
    out = {}
    for path, c in flax.traverse_util.flatten_dict(codes).items():
        table = levels.get(path[:-1] + (LEVELS,))
        if table is None:
            continue
        p = np.bincount(np.asarray(c).ravel(), minlength=table.shape[-1]) / max(np.size(c), 1)
        p = p[p > 0]
        out[f"layers/{'/'.join(path[:-1])}/code_entropy"] = float(-np.sum(p * np.log2(p)))
    return out


def _level_histograms(params: PyTree) -> dict[str, np.ndarray]:
    """Each quantized layer's levels (all groups) as one histogram, not a scalar per level.

    In float64: levels near the float32 limit (a far too large levels_learning_rate) have a
    range that overflows float32, and the histogram writer would end the run; such a run is
    the non-finite guard's to stop, with its report."""
    return {f"levels/{'/'.join(path[:-1])}": np.asarray(levels, np.float64).ravel()
            for path, levels in flax.traverse_util.flatten_dict(params).items()
            if path[-1] == LEVELS}


class _NoHistogramLines(logging_lib.Filter):
    """Keeps the levels' histograms in TensorBoard only: clu's logging writer would print each
    one as a long INFO line per layer every `log_every_steps`."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return not (record.pathname.endswith("logging_writer.py")
                    and "Histogram for" in record.getMessage())


_NO_HISTOGRAM_LINES = _NoHistogramLines()


class _AboveTheBar:
    """A stream for log records while a progress bar is drawn: `tqdm.write` prints each record
    above the bar instead of breaking it."""

    def write(self, text: str) -> None:
        from tqdm import tqdm
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


@contextlib.contextmanager
def _progress(total: int, initial: int):
    """A tqdm bar on an interactive stderr (process 0), else None; absl log records go above
    it while it is shown."""
    if not (sys.stderr.isatty() and jax.process_index() == 0):
        yield None
        return
    from tqdm import tqdm
    handler = logging.get_absl_handler().python_handler
    stream = handler.stream
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    handler.stream = _AboveTheBar()
    try:
        yield bar
    finally:
        handler.stream = stream
        bar.close()


# --------------------------------------------------------------------------- main loop

class PreemptionWatcher:
    """Turns SIGTERM (a preemption notice) into "checkpoint at this step and exit".

    Multi-host: also asks orbax whether JAX's preemption service reached a
    sync point, so every process saves the same step.
    """

    def __init__(self):
        self._requested = False
        self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def requested(self) -> bool:
        return self._requested

    def should_stop(self, manager, step: int) -> bool:
        if jax.process_count() > 1 and manager.reached_preemption(step):
            return True
        return self._requested


class Interrupted(Exception):
    """SIGTERM arrived outside the training loop (start-up, compilation, final eval)."""

    def __init__(self, phase: str):
        super().__init__(phase)
        self.phase = phase


# Skipped steps whose per-layer finiteness a report re-computes (each one forward/backward).
MAX_REPLAYED_STEPS = 8


def _replay_nonfinite(steps: Steps, state: TrainState, ds, step: int,
                      got: list[dict]) -> dict:
    """Re-runs the per-layer finiteness check (`Steps.nonfinite_layers`) on the inputs of the
    skipped steps of the log window `got` (ending at `step`).

    A skipped step leaves the state as it found it (only `step` advances), so `state` is
    bitwise the input of every skipped step after the window's last finite one; their batches
    are re-read from the data (a batch is a function of its step). When the window ends with
    a finite step, the skipped steps' input states are gone: their batches are replayed on
    `state`, and the report says the replay is not exact. At most MAX_REPLAYED_STEPS (the
    first ones). Returns {'layers', 'replayed_steps', 'exact'}."""
    first = step - len(got) + 1
    bad = [first + i for i, m in enumerate(got) if m["nonfinite"]]
    finite = [first + i for i, m in enumerate(got) if not m["nonfinite"]]
    trailing = [s for s in bad if not finite or s > finite[-1]]
    replay = (trailing or bad)[:MAX_REPLAYED_STEPS]
    layers: set[str] = set()
    if replay:
        batches = ds.train_batches(replay[0] - 1)  # step s trained on data step s - 1
        for s in range(replay[0], replay[-1] + 1):
            batch = next(batches)
            if s in replay:
                flags = jax.device_get(steps.nonfinite_layers(state,
                                                              to_global(batch, steps.batch)))
                layers.update(k for k, ok in flags.items() if not ok and k != "loss")
    return {"layers": sorted(layers), "replayed_steps": replay, "exact": bool(trailing)}


def _write_nonfinite_report(workdir: epath.Path, step: int, got: list[dict],
                            replayed: dict) -> str:
    """Saves which steps were skipped and which layers had non-finite gradients/statistics/
    new values (`replayed`: from `_replay_nonfinite`); returns a summary."""
    first = step - len(got) + 1
    bad_steps = [first + i for i, m in enumerate(got) if m["nonfinite"]]
    report = {"steps": bad_steps, "layers": replayed["layers"],
              "loss": [float(got[s - first]["loss"]) for s in bad_steps],
              # the steps whose inputs the per-layer check re-ran on; exact: their own inputs
              "layers_checked_at_steps": replayed["replayed_steps"],
              "layers_check_exact": replayed["exact"]}
    if jax.process_index() == 0:
        (workdir / "nonfinite_report.json").write_text(json.dumps(report, indent=2))
    layers = ", ".join(report["layers"][:8]) or "(loss only)"
    return f"steps {bad_steps[:5]}{'...' if len(bad_steps) > 5 else ''}; layers: {layers}"


def _codes_changed(before: PyTree, after: PyTree) -> dict[str, float]:
    """Per DQ-W layer, the fraction of codes that differ between two host copies of the
    codes (e.g. at consecutive log steps): the net movement, where the per-step flip rates
    count every flip, also the ones undone within the window (their ratio is the noise share)."""
    old = flax.traverse_util.flatten_dict(before)
    return {f"layers/{'/'.join(path[:-1])}/codes_changed": float(np.mean(new != old[path]))
            for path, new in flax.traverse_util.flatten_dict(after).items() if path in old}


def _log_scalars(writer, step: int, got: list[dict], params: PyTree, seconds: float,
                 codes_changed: dict[str, float], codes: PyTree) -> None:
    """The log step's scalars: the window's mean loss/accuracy/LR, and per DQ-W layer the
    fraction of codes changed since the previous log step (the flip-rate diagnostic) and the
    code entropy now, both from host copies of the codes (not computed in the train step)."""
    scalars = {k: float(np.mean([m[k] for m in got])) for k in ("loss", "accuracy", "learning_rate")}
    scalars.update(codes_changed)
    scalars.update(_code_entropies(codes, params))
    scalars["steps_per_sec"] = len(got) / max(seconds, 1e-9)
    scalars["nonfinite_steps"] = int(sum(m["nonfinite"] for m in got))
    writer.write_scalars(step, scalars)
    histograms = _level_histograms(params)
    if histograms:
        writer.write_histograms(step, histograms)


def _initial_state(config, manager, model, optimizer, quant, steps, ds) -> TrainState:
    """Resume from the latest checkpoint, else init (from float if asked) + calibrate."""
    state = init_state(model, optimizer, ds.image_shape, config.seed)
    start = checkpoints.latest_step(manager)
    if start is not None:
        logging.info("Resuming from %s at step %d.", manager.directory, start)
        return checkpoints.restore(manager, start, state, steps.replicated)
    if config.init_from:
        float_residual = config.feedback_residual == "float" and quant.weights == "dq"
        state = checkpoints.init_from_float(
            config.init_from, state, mixed.widths_by_layer(config, model, ds.image_shape) or quant,
            optimizer, float_residual=float_residual,
            inertia_code_rate=_inertia_seed_rate(config, state.opt_state)
            if float_residual and config.rounding == "inertia" else None)
        logging.info("Initialised quantized model from float checkpoint %s.", config.init_from)
        if config.conversion_rounding == "adaround":
            state = adaround_conversion(config, state, optimizer, ds)
    state = steps.place(state)
    calib = ds.train_batches(0)
    for _ in range(config.calibration_batches if quant.acts != "float" else 0):
        state = steps.calibrate(state, to_global(next(calib), steps.batch))
    return state


def adaround_conversion(config, state: TrainState, optimizer, ds) -> TrainState:
    """`state` with its DQ codes re-chosen by `adaround.round_from_float` on the first
    `config.adaround_images` training images (float-model inputs per layer)."""
    images, batches = [], ds.train_batches(0)
    while sum(len(b) for b in images) < config.adaround_images:
        images.append(np.asarray(next(batches)["image"]))
    images = np.concatenate(images)[:config.adaround_images]
    float_model = create_model(config, QuantConfig.float(), ds.num_classes)
    float_variables = checkpoints.load_float_variables(config.init_from)
    t0 = time.perf_counter()
    codes = adaround.round_from_float(float_model, float_variables, state.params, state.codes,
                                      images, steps=config.adaround_steps, seed=config.seed)
    changed = [float(np.mean(np.asarray(a) != np.asarray(b)))
               for a, b in zip(jax.tree.leaves(codes), jax.tree.leaves(state.codes))]
    logging.info("adaround: codes re-chosen in %.1f s; %.2f%% differ from nearest.",
                 time.perf_counter() - t0, 100 * float(np.mean(changed)))
    return state.replace(codes=codes, opt_state=optimizer.init(
        {PARAMS: state.params, CODES: codes}))


def _training_record(workdir: epath.Path, end_step: int) -> dict | None:
    """How the finished training of this workdir went (timings, pre-recalibration eval): the
    last 'trained' event of run_history.jsonl since its last fresh start; for a workdir from
    before the history existed, its results.json."""
    events = checkpoints.read_history(workdir)
    starts = [i for i, e in enumerate(events) if e.get("event") == "start"]
    for e in reversed(events[starts[-1] if starts else 0:]):
        if e.get("event") == "trained" and e.get("step") == end_step:
            return e
    if starts:
        return None
    try:
        old = json.loads((workdir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("steps") != end_step or not old.get("train_seconds"):
        return None
    return {k: v for k, v in old.items()
            if k in ("train_seconds", "steps_per_sec", "resumed_from_step")
            or k.endswith("_before_bn_recalibration")}


def _preempted(workdir: epath.Path, phase: str, step: int | None, state, message: str) -> dict:
    logging.warning(message)
    checkpoints.append_history(workdir, "preempted", step=step, during=phase)
    return {"steps": step if step is not None else 0, "state": state, "preempted": True,
            "preempted_during": phase, "message": message}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, stop_after: int | None = None) -> dict:
    """Trains, evaluates, checkpoints and resumes; returns (and writes) results.json's dict.

    `stop_after` ends the run after that many total steps (checkpointed, no
    final eval), as a preemption would; used to test resume == uninterrupted.
    A SIGTERM does the same at the current step and returns `preempted=True`; during start-up
    (before the first step) it exits without training, and during the final evaluation after
    the final checkpoint, skipping the evaluation (rerunning evaluates). One run per workdir:
    a second one is refused while the first holds `workdir/workdir.lock`. Compiled programs
    go to JAX's persistent cache in `config.compilation_cache_dir` (`jit_cache`; a setting
    of this process, kept after the call).
    """
    with PreemptionWatcher() as watcher:  # from the very start: start-up/compile too
        quant = configlib.validate(config, device_count=jax.device_count())
        workdir = epath.Path(workdir)
        checkpoints.prepare_workdir(workdir)
        with checkpoints.lock_workdir(workdir):
            cache_dir = jit_cache.enable(
                jit_cache.resolve_dir(config.compilation_cache_dir, workdir))
            with jit_cache.counting() as cache_stats:
                result = _train_and_evaluate(config, quant, workdir, watcher, stop_after,
                                             (cache_dir, cache_stats))
            jit_cache.log_summary(cache_dir, cache_stats)
            return result


def _record_model_and_data(workdir: epath.Path, config, quant: QuantConfig, ds,
                           state: TrainState, layer_quant: dict | None = None) -> None:
    """Logs the per-layer summary (shapes, bits, bytes, total size at the bit widths) and
    records the dataset facts an export needs (`dataset.json`) in the workdir."""
    from dq_jax import export
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.variables())
    report = export.size_report_for_variables(shapes, layer_quant or quant)
    logging.info("Model %s (%s):\n%s", config.model,
                 "float" if quant.weights == "float" else
                 f"{quant.weights} W{quant.weight_bits} A{quant.act_bits}"
                 + (", per-layer widths below" if layer_quant else ""),
                 export.format_model_summary(report))
    if layer_quant:
        logging.info("Per-layer widths (config.first_last_bits / rules):\n%s",
                     mixed.format_widths(layer_quant))
    facts = export.dataset_facts(config, ds)
    checkpoints.write_text_atomic(workdir / export.DATASET_FILE, json.dumps(facts, indent=1))


def _train_and_evaluate(config, quant, workdir: epath.Path, watcher: PreemptionWatcher,
                        stop_after: int | None,
                        cache: tuple[str, jit_cache.CacheStats]) -> dict:
    from clu import metric_writers

    start_step, state = None, None

    def check_startup():
        if watcher.requested:
            raise Interrupted("start-up")

    try:
        check_startup()
        ds = data.create_dataset(config, process_index=jax.process_index(),
                                 process_count=jax.process_count())
        num_classes = ds.num_classes if config.num_classes <= 0 else config.num_classes
        if num_classes < ds.num_classes:
            raise ValueError(
                f"config.num_classes={config.num_classes} is below the {ds.num_classes} classes "
                f"of dataset {config.dataset!r} (labels would fall outside the logits); use "
                "--config.num_classes=-1 for the dataset's own count.")
        # config.bit_budget: the widths, from the float weights (config.allocation filled)
        config = allocation.resolve_config(config, workdir, ds, num_classes)
        total_steps = total_train_steps(config, ds.steps_per_epoch)
        model = create_model(config, quant, num_classes, ds.image_shape)
        optimizer = create_optimizer(config, total_steps, ds.steps_per_epoch)
        steps = Steps(model, optimizer, create_mesh(config), config.label_smoothing)
        changes = checkpoints.check_compatible(workdir, config)  # before the manager lists steps
        manager = checkpoints.create_manager(workdir, config)
        check_startup()
        state = _initial_state(config, manager, model, optimizer, quant, steps, ds)  # placed
        start_step = int(jax.device_get(state.step))
        if start_step > total_steps:
            raise ValueError(
                f"The latest checkpoint in {workdir} is at step {start_step}, beyond this "
                f"config's {total_steps} training steps; raise config.num_train_steps / "
                "config.num_epochs, or use a new --workdir.")
        checkpoints.record_start(workdir, config, start_step, changes)
        if jax.process_index() == 0:
            _record_model_and_data(workdir, config, quant, ds, state,
                                   mixed.widths_by_layer(config, model, ds.image_shape))
        check_startup()
    except Interrupted:
        where = (f"the latest checkpoint (step {start_step})" if start_step
                 else "the latest checkpoint, if any")
        return _preempted(workdir, "start-up", start_step, state,
                          "Preemption requested during start-up: exiting before training, "
                          f"nothing new to save. Rerun the same command to resume from {where}.")

    logging.get_absl_handler().addFilter(_NO_HISTOGRAM_LINES)  # idempotent
    writer = metric_writers.create_default_writer(
        str(workdir), just_logging=jax.process_index() > 0, asynchronous=True)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else ds.steps_per_epoch
    end_step = total_steps if stop_after is None else min(total_steps, stop_after)
    # A long eval is cut short by a preemption notice (single process: on several, every
    # process must run the same eval steps).
    eval_stop = (lambda: watcher.requested) if jax.process_count() == 1 else None
    pending, t_start, t_log = [], time.time(), time.time()
    if not steps.for_state(state) and jax.tree.leaves(state.quant_stats):
        logging.info("Activation quantizers not calibrated yet (config.calibration_batches=0): "
                     "the first training batch calibrates them (a larger train step to "
                     "compile).")
    codes_at_log = jax.device_get(state.codes)  # a host copy: the train step donates `state`
    # Host batches become sharded device arrays in the prefetch thread, off the step's path.
    train_iter = data.prefetch(to_global(b, steps.batch) for b in ds.train_batches(start_step))
    step, preempted = start_step, False
    before_recalibration: dict = {}
    with contextlib.closing(train_iter), _progress(total_steps, start_step) as bar:
        while step < end_step:
            state, metrics = steps.train(state, next(train_iter))
            step += 1
            pending.append(metrics)
            if bar is not None:
                bar.update(1)
            if step % config.log_every_steps == 0 or step == end_step:
                got, codes_now = jax.device_get((pending, state.codes))
                _log_scalars(writer, step, got, jax.device_get(state.params), time.time() - t_log,
                             _codes_changed(codes_at_log, codes_now), codes_now)
                codes_at_log = codes_now
                pending, t_log = [], time.time()
                if any(m["nonfinite"] for m in got) and config.nonfinite_policy == "stop":
                    summary = _write_nonfinite_report(
                        workdir, step, got, _replay_nonfinite(steps, state, ds, step, got))
                    checkpoints.save(manager, step, state, force=True)
                    checkpoints.finish_saves(manager)
                    writer.flush()
                    checkpoints.append_history(workdir, "stopped_nonfinite", step=step)
                    raise FloatingPointError(
                        f"Non-finite loss/gradients at {summary}. Those updates were skipped; the "
                        f"last finite state is checkpointed in {workdir} (report: "
                        "nonfinite_report.json). Lower config.learning_rate or "
                        "config.levels_learning_rate, or set config.nonfinite_policy='skip'.")
            if step % eval_every == 0 and step != end_step:
                try:
                    writer.write_scalars(step, evaluate(steps, state, ds.eval_batches(),
                                                        should_stop=eval_stop))
                except Interrupted:
                    pass  # the preemption check below checkpoints this step
            if watcher.should_stop(manager, step) and step != end_step:
                logging.warning("Preemption requested: checkpointing step %d and exiting.", step)
                checkpoints.save(manager, step, state, force=True)
                preempted = True
                break
            if step == total_steps and config.bn_recalibration_batches > 0:
                # Before the final checkpoint, so the saved (and exported) model is this one.
                before_recalibration = {
                    f"{k}_before_bn_recalibration": v
                    for k, v in evaluate(steps, state, ds.eval_batches()).items()
                    if k != "eval_count"}
                state = recalibrate_batch_stats(steps, state, ds.train_batches(step),
                                                config.bn_recalibration_batches)
            if step % config.checkpoint_every_steps == 0 or step == end_step:
                checkpoints.save(manager, step, state, force=step == end_step)
    checkpoints.finish_saves(manager)
    train_seconds = time.time() - t_start
    if preempted:
        writer.flush()
        return _preempted(workdir, "training", step, state,
                          f"Preemption requested: step {step} is checkpointed in {workdir}. "
                          "Rerun the same command to resume.")
    if end_step < total_steps:
        writer.flush()
        checkpoints.append_history(workdir, "stopped", step=step)
        return {"steps": step, "state": state, "preempted": False}

    trained_here = end_step > start_step
    if trained_here:
        record = {"train_seconds": train_seconds,
                  "steps_per_sec": (end_step - start_step) / max(train_seconds, 1e-9),
                  "resumed_from_step": start_step, **before_recalibration}
        checkpoints.append_history(workdir, "trained", step=end_step, **record)
    else:  # a finished workdir run again: evaluate; the timings are those of its training
        record = _training_record(workdir, end_step)
    try:
        eval_metrics = evaluate(steps, state, ds.eval_batches(), should_stop=eval_stop)
    except Interrupted:
        writer.flush()
        return _preempted(workdir, "final evaluation", end_step, state,
                          "Preemption requested during the final evaluation: training is "
                          f"finished and step {end_step} is checkpointed in {workdir}; rerun "
                          "the same command to evaluate it (results.json).")
    if record:
        eval_metrics.update({k: v for k, v in record.items()
                             if k.endswith("_before_bn_recalibration")})
    skipped = (end_step // int(config.grad_accum_steps)
               - int(jax.device_get(applied_updates(state.opt_state))))
    writer.write_scalars(end_step, eval_metrics)
    writer.flush()
    results = {
        "config": configlib.applicable(config),
        **eval_metrics,
        "steps": end_step,
        # Of the training (for a finished workdir run again: of the run that trained it).
        "train_seconds": record.get("train_seconds") if record else None,
        "steps_per_sec": record.get("steps_per_sec") if record else None,
        "resumed_from_step": start_step,
        "devices": jax.device_count(),
        # Steps whose update was skipped as non-finite (nonfinite_policy='skip'), whole run.
        "skipped_steps": skipped,
        # This process's programs: loaded from the persistent cache (hits) or compiled.
        "compilation_cache": {"dir": cache[0], **cache[1].as_dict()},
        **mixed.results_entries(config, model, ds.image_shape),
        **allocation.results_entries(config, workdir),
    }
    if not trained_here:
        results["reevaluated_at"] = checkpoints._now()
        results["trained_from_step"] = record.get("resumed_from_step") if record else None
        if record is None:
            results["timings_note"] = ("training finished in an earlier run whose timings "
                                       "were not recorded")
    if jax.process_index() == 0:
        checkpoints.write_text_atomic(workdir / "results.json",
                                      json.dumps(results, indent=2, default=str))
    checkpoints.append_history(workdir, "evaluated" if trained_here else "re-evaluated",
                               step=end_step, eval_top1=results["eval_top1"],
                               eval_top5=results["eval_top5"])
    logging.info("Final eval: top-1 %.4f, top-5 %.4f after %d steps (%s).",
                 results["eval_top1"], results["eval_top5"], end_step,
                 f"{train_seconds:.1f}s" if trained_here else "re-evaluated")
    if skipped:
        message = (f"{skipped} of {end_step} steps ({100 * skipped / end_step:.1f}%) were "
                   "skipped as non-finite (config.nonfinite_policy='skip'); see "
                   "nonfinite_steps in the logs. Lower config.learning_rate or "
                   "config.levels_learning_rate.")
        if jax.process_index() == 0:
            print(f"dq_jax: warning: {message}", file=sys.stderr, flush=True)
        if skipped > end_step // 2:
            raise FloatingPointError(f"training mostly did not happen: {message} "
                                     f"(results.json in {workdir} records it)")
    return {**results, "state": state}
