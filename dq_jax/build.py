"""What a run is built from: its model, optimizer (with the learning-rate schedules injected)
and initial state, given a config - apart from the training loop (`train.py`), so that
`checkpoints` can rebuild a run's state (to verify a float start) without importing the loop.
`train` re-exports every name here."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dq_jax import layers, mixed, optim
from dq_jax.quant.config import QuantConfig
from dq_jax.train_state import TrainState

PyTree = Any
# dq_optimizer's arguments that are not learning rates: fixed, not injected hyperparameters.
STATIC_ARGS = ("momentum", "nesterov", "weight_decay", "rounding", "code_momentum_dtype",
               "code_momentum", "feedback_residual_bits", "inertia_threshold",
               "inertia_after_move", "rounding_stream", "key")


# --------------------------------------------------------------------------- setup

def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Training steps (micro-batches), a multiple of `config.grad_accum_steps`."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    k = int(config.grad_accum_steps)
    return k * max(1, int(math.ceil(config.num_epochs * steps_per_epoch / k)))


def make_schedule_shape(config: ml_collections.ConfigDict, total_steps: int,
                        steps_per_epoch: int, warmup_from: float = 0.0) -> optax.Schedule:
    """Step -> LR multiplier with peak 1.0 (shared by params, levels and codes); the warm-up
    (if any) rises linearly from `warmup_from`."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    decay_steps = max(1, total_steps - warmup)
    if config.schedule == "cosine":
        main = optax.cosine_decay_schedule(1.0, decay_steps)
    elif config.schedule == "step":
        main = optax.piecewise_constant_schedule(
            1.0, {int(b * decay_steps): config.step_decay for b in config.step_boundaries})
    else:
        main = optax.constant_schedule(1.0)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(warmup_from, 1.0, warmup), main],
                                [warmup])


def learning_rate_schedules(config: ml_collections.ConfigDict, total_steps: int,
                            steps_per_epoch: int) -> dict[str, optax.Schedule | None]:
    """Peak * the shared shape, per group: `learning_rate`, `levels_learning_rate` and
    `code_learning_rate` (None = the float params' schedule)."""
    shape = make_schedule_shape(config, total_steps, steps_per_epoch)

    def peak_times_shape(peak: float) -> optax.Schedule:
        return lambda step: peak * shape(step)

    return {"learning_rate": peak_times_shape(config.learning_rate),
            "levels_learning_rate": peak_times_shape(config.levels_learning_rate),
            "code_learning_rate": peak_times_shape(config.code_learning_rate)
            if config.code_learning_rate > 0 else None}


def rounding_temperature_schedule(config: ml_collections.ConfigDict, total_steps: int,
                                  steps_per_epoch: int) -> optax.Schedule | None:
    """With `config.rounding_anneal`: the stochastic re-assignment's temperature (see
    `quant.weights.stochastic_codes`), the LR schedule's shape but 1 through the warm-up: the
    unbiased rule at the peak, sharpening toward nearest as the LR decays (0 at the end of a
    cosine). None without the anneal (the plain unbiased rule, no temperature computed)."""
    if not config.rounding_anneal:
        return None
    return make_schedule_shape(config, total_steps, steps_per_epoch, warmup_from=1.0)


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                     steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
    """`dq_optimizer` with its learning-rate schedules injected (read back from
    `opt_state.hyperparams`); its code-update key is `PRNGKey(config.seed + 1)`.

    With `config.grad_accum_steps = k > 1` it is wrapped in `optax.MultiSteps(k)`: k micro-batch
    gradients (dL/dW_q included) are averaged and the codes, levels and params update once;
    the schedules count updates (total_steps / k), so the LR curve is the same as at k = 1.
    """
    k = int(config.grad_accum_steps)
    updates, updates_per_epoch = total_steps // k, max(1, steps_per_epoch // k)
    temperature = rounding_temperature_schedule(config, updates, updates_per_epoch)
    tx = optax.inject_hyperparams(optim.dq_optimizer, static_args=STATIC_ARGS)(
        **learning_rate_schedules(config, updates, updates_per_epoch),
        **({"rounding_temperature": temperature} if temperature is not None else {}),
        momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay, rounding=config.rounding,
        code_momentum_dtype=config.code_momentum_dtype,
        code_momentum=config.code_momentum if config.code_momentum >= 0 else None,
        feedback_residual_bits=int(config.feedback_residual_bits),
        rounding_stream=config.rounding_stream,
        **({"inertia_threshold": float(config.inertia_threshold),
            "inertia_after_move": config.inertia_after_move}
           if config.rounding == "inertia" else {}),
        key=int(config.seed) + 1)
    return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def _injected(opt_state: PyTree) -> PyTree:
    """The `inject_hyperparams` state inside a (possibly MultiSteps-wrapped) state."""
    return getattr(opt_state, "inner_opt_state", opt_state)


def applied_updates(opt_state: PyTree) -> jax.Array:
    """How many updates an `inject_hyperparams` state has applied: the step its schedules
    are at. A skipped (non-finite) step keeps the old state, so it does not advance; with
    gradient accumulation it advances once per k micro-steps."""
    return _injected(opt_state).count


def _learning_rate(opt_state: PyTree) -> jax.Array:
    """The float params' learning rate of the update that produced `opt_state` (NaN for a
    transformation without injected hyperparameters)."""
    hyperparams = getattr(_injected(opt_state), "hyperparams", None)
    if not hyperparams or "learning_rate" not in hyperparams:
        return jnp.array(jnp.nan, jnp.float32)
    return jnp.asarray(hyperparams["learning_rate"], jnp.float32)


def _code_rate(opt_state: PyTree) -> float:
    """The code learning rate an injected `dq_optimizer` state will apply next (its
    `code_learning_rate`, or the float params' rate when that is None)."""
    hyperparams = getattr(_injected(opt_state), "hyperparams", None) or {}
    rate = hyperparams.get("code_learning_rate")
    return float(hyperparams["learning_rate"] if rate is None else rate)


def _inertia_seed_rate(config: ml_collections.ConfigDict, opt_state: PyTree) -> float:
    """The code LR that `optim.with_inertia_residual` expresses the float residual in: the first
    update's, or after a warm-up from 0 the peak's (the residual then takes effect as the
    warm-up raises the rate, as every gradient's step does)."""
    rate = _code_rate(opt_state)
    if rate > 0:
        return rate
    return float(config.code_learning_rate if config.code_learning_rate > 0
                 else config.learning_rate)


def create_model(config: ml_collections.ConfigDict, quant: QuantConfig, num_classes: int,
                 image_shape: tuple[int, ...] | None = None):
    """The zoo model, with the per-layer widths of `config.first_last_bits` / `config.rules`
    (`dq_jax.mixed`; without them exactly `models.create`)."""
    return mixed.create_model(config, quant, num_classes, image_shape,
                              dtype=jnp.bfloat16 if config.half_precision else jnp.float32,
                              **config.model_kwargs.to_dict())


def init_jits(model, optimizer: optax.GradientTransformation,
              image_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """`init_state`'s two jitted halves, `draw(rng) -> variables` then
    `finish(variables) -> TrainState` (apart so `bench/init_time.py` times the same two).

    `draw` is `model.init` with the DQ layers' level fits deferred (each layer stores its
    initializer draw); `finish` fits every layer (one Lloyd loop) and inits the optimizer.
    Call `draw` first: tracing it records the layers `finish` fits.
    """
    fits: dict = {}

    def draw(rng: jax.Array) -> dict:
        with layers.deferred_level_fits() as traced:
            variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        fits.clear()
        fits.update(traced)
        return variables

    def finish(variables: dict) -> TrainState:
        variables = layers.fit_deferred_levels(variables, fits)
        state = TrainState.create(apply_fn=model.apply, tx=optimizer, variables=variables)
        return state.replace(step=jnp.zeros((), jnp.int32))

    return jax.jit(draw), jax.jit(finish)


def init_state(model, optimizer: optax.GradientTransformation, image_shape: tuple[int, ...],
               seed: int) -> TrainState:
    """Random init (levels/codes from the kernel initializer via Lloyd), compiled.

    Two jits (`init_jits`): `model.init` with the level fits deferred, then the fits and the
    optimizer init. The variables are a plain `model.init`'s (tests/test_train.py compares
    them bitwise); compiled apart, the two take XLA:CPU less time than one graph holding
    both (docs/notebook.md §2.2). Under `jit` at all because eager init of a quantized net (Lloyd
    iterations per layer, op by op) takes tens of seconds.
    """
    draw, finish = init_jits(model, optimizer, image_shape)
    return finish(draw(jax.random.PRNGKey(seed)))
