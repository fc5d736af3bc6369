"""Orbax checkpoints: save/resume the whole TrainState, and float -> quantized init.

A checkpoint holds params, integer codes, levels, activation and BN statistics,
optimizer state (incl. the code-update PRNG key) and the step. The data
position is the step itself: input pipelines are a pure function of
(seed, step), so resuming at step k replays exactly the batches an
uninterrupted run would see.
"""
from __future__ import annotations

import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dq_jax.optim import LEVELS, QuantOptimizer
from dq_jax.quant import weights as wq
from dq_jax.quant.config import QuantConfig

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
# Keys that define what a checkpoint *is*; resuming under different values
# would silently mix two experiments.
IDENTITY_KEYS = ("model", "model_kwargs", "dataset", "quant", "quantize_first_last",
                 "num_classes", "seed")


def create_manager(workdir: epath.Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=True,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    return manager.latest_step()


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, step: int, template: Any, sharding) -> Any:
    """Restores `step` into the structure/dtypes of `template`, placed with `sharding`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding),
        template)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises several types for structure/shape mismatch
        raise ValueError(
            f"Checkpoint step {step} in {manager.directory} does not match this config's "
            f"model/optimizer state ({type(e).__name__}: {e}). Use a new --workdir, or "
            "--config.force_new=True to start over in this one.") from e


def _identity(config: ml_collections.ConfigDict) -> dict:
    d = config.to_dict()
    return {k: d.get(k) for k in IDENTITY_KEYS}


def check_compatible(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir written by a different experiment; records the config."""
    path = workdir / CONFIG_FILE
    mine = json.loads(json.dumps(_identity(config), default=str))
    if path.exists() and not config.force_new:
        theirs = json.loads(path.read_text()).get("identity", {})
        diff = sorted(k for k in IDENTITY_KEYS if theirs.get(k) != mine.get(k))
        if diff:
            details = "; ".join(f"{k}: workdir has {theirs.get(k)!r}, config has {mine.get(k)!r}"
                                for k in diff)
            raise ValueError(
                f"Workdir {workdir} was written by a different config ({details}). Use a new "
                "--workdir, or pass --config.force_new=True to discard its checkpoints.")
    if config.force_new and (workdir / CHECKPOINT_DIR).exists():
        (workdir / CHECKPOINT_DIR).rmtree()
    path.write_text(json.dumps({"identity": mine, "config": json.loads(config.to_json_best_effort())},
                               indent=2))


def _find_checkpoint(path: str) -> tuple[epath.Path, int]:
    """Accepts a workdir, its checkpoints/ dir, or one step directory."""
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"config.init_from={path!r} does not exist; give a float run's workdir "
            "(containing checkpoints/) or one of its checkpoint step directories.")
    for root in (p / CHECKPOINT_DIR, p):
        if root.is_dir():
            steps = [int(c.name) for c in root.iterdir() if c.name.isdigit()]
            if steps:
                return root, max(steps)
    if p.name.isdigit():
        return p.parent, int(p.name)
    raise FileNotFoundError(
        f"config.init_from={path!r} holds no orbax checkpoint (no numeric step directory "
        f"in it or in {path}/{CHECKPOINT_DIR}).")


def load_float_variables(path: str) -> dict:
    """The `params` and `batch_stats` of a checkpoint, as a nested dict of numpy arrays."""
    root, step = _find_checkpoint(path)
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}


def init_from_float(path: str, state: Any, quant: QuantConfig, optimizer: QuantOptimizer) -> Any:
    """Quantized state initialised from a float checkpoint (DESIGN §1.1 "Initialisation").

    Float kernels become: DQ-W levels by Lloyd + nearest codes; latent-STE the
    same kernel plus Lloyd levels; LSQ the same kernel plus LSQ's initial step.
    Every other leaf (biases, BN, float first/last layers) is copied; shapes
    must match exactly.
    """
    src = load_float_variables(path)
    float_params = flax.traverse_util.flatten_dict(src["params"])
    target = flax.traverse_util.flatten_dict(state.params)
    codes = flax.traverse_util.flatten_dict(state.codes)
    num_levels = quant.num_weight_levels

    def source(path_: tuple) -> np.ndarray:
        if path_ not in float_params:
            raise ValueError(
                f"config.init_from={path!r} has no parameter {'/'.join(path_)}; it must be a "
                "float checkpoint of the same model architecture (config.model).")
        return np.asarray(float_params[path_])

    new_params, new_codes = {}, {}
    for p, leaf in target.items():
        module = p[:-1]
        if p[-1] == LEVELS:
            kernel = source(module + ("kernel",))
            levels, c = wq.lloyd_init(jnp.asarray(kernel), num_levels, quant.granularity,
                                      quant.lloyd_iters)
            new_params[p] = levels
            if module + ("kernel",) in codes:
                new_codes[module + ("kernel",)] = c
        elif p[-1] == "kernel_step":
            new_params[p] = wq.lsq_init_step(jnp.asarray(source(module + ("kernel",))),
                                             quant.weight_bits, quant.granularity)
        else:
            value = source(p)
            if value.shape != np.shape(leaf):
                raise ValueError(
                    f"config.init_from={path!r}: {'/'.join(p)} has shape {value.shape}, this "
                    f"model expects {np.shape(leaf)}; the architectures differ.")
            new_params[p] = jnp.asarray(value, jnp.asarray(leaf).dtype)
    params = flax.traverse_util.unflatten_dict(new_params)
    codes_tree = flax.traverse_util.unflatten_dict(new_codes) if new_codes else state.codes
    batch_stats = jax.tree.map(jnp.asarray, src["batch_stats"]) or state.batch_stats
    return state.replace(params=params, codes=codes_tree, batch_stats=batch_stats,
                         opt_state=optimizer.init(params, codes_tree, state.opt_state.key))
