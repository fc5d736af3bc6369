"""Orbax checkpoints: save/resume the whole TrainState, and float -> quantized init.

A checkpoint holds params, integer codes, levels, activation and BN statistics,
optimizer state (incl. the code-update PRNG key) and the step. The data
position is the step itself: input pipelines are a pure function of
(seed, step), so resuming at step k replays exactly the batches an
uninterrupted run would see.
"""
from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
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


DIGEST_DIR = "checkpoint_digests"   # beside checkpoints/, so orbax never lists or rotates it
DAMAGED_DIR = "damaged_checkpoints"  # damaged steps are moved here, never deleted


def _host_array(x: Any) -> np.ndarray:
    """The full value of a (replicated) leaf on this host, also on multi-host meshes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_shards[0].data
    return np.asarray(jax.device_get(x))


def state_digest(state: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: equal iff the content is equal."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        a = np.ascontiguousarray(_host_array(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _digest_path(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory).parent / DIGEST_DIR / f"{step}.sha256"


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Write-then-rename: a crash or a full disk leaves the old file or the new, never half."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def save(manager: ocp.CheckpointManager, step: int, state: Any, force: bool = False) -> None:
    """Saves `state` at `step` (asynchronously) with a checksum of its content.

    The checksum is written before the save starts: a committed checkpoint always has one (an
    interrupted save leaves a checksum without a checkpoint, which nothing reads).
    """
    if not force and not manager.should_save(step):
        return
    digest = state_digest(state)
    if jax.process_index() == 0:
        path = _digest_path(manager, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, digest + "\n")
    manager.save(step, args=ocp.args.StandardSave(state), force=force)


class DamagedCheckpoint(Exception):
    """A checkpoint whose structure matches but whose content cannot be read or verified."""


def _structure_matches(manager: ocp.CheckpointManager, step: int, template: Any) -> bool | None:
    """Whether the saved arrays have the template's shapes and dtypes (as a multiset, so key
    naming conventions do not matter); None when the metadata itself cannot be read."""
    try:
        meta = ocp.StandardCheckpointHandler().metadata(
            epath.Path(manager.directory) / str(step) / "default")
        meta = getattr(meta, "tree", meta)
        saved = sorted((tuple(m.shape), str(np.dtype(m.dtype))) for m in jax.tree.leaves(meta))
    except Exception:  # noqa: BLE001  (damaged _METADATA / manifest: many exception types)
        return None
    if not saved:
        return None
    mine = sorted((tuple(np.shape(x)), str(jnp.asarray(x).dtype)) for x in jax.tree.leaves(template))
    return saved == mine


def _restore_verified(manager, step: int, abstract: Any) -> Any:
    try:
        state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # noqa: BLE001  (tensorstore/orbax raise many types on bad bytes)
        raise DamagedCheckpoint(f"unreadable ({type(e).__name__})") from e
    path = _digest_path(manager, step)
    if path.exists():
        expected = path.read_text().strip()
        if state_digest(state) != expected:
            raise DamagedCheckpoint("its content does not match the checksum recorded at save")
    else:
        logging.warning("Checkpoint step %d in %s has no recorded checksum (written by an older "
                        "version?): restored without verification.", step, manager.directory)
    return state


def restore(manager: ocp.CheckpointManager, step: int, template: Any, sharding) -> Any:
    """Restores `step` into the structure/dtypes of `template`, placed with `sharding`,
    verifying its checksum.

    A checkpoint of another model/optimizer structure is refused (ValueError). A damaged one
    (unreadable, or content differing from its checksum) is moved to `damaged_checkpoints/`
    with a warning naming it, and the previous step is tried; nothing is deleted.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=sharding),
        template)
    damaged = []
    while step is not None:
        if _structure_matches(manager, step, template) is False:
            raise ValueError(
                f"Checkpoint step {step} in {manager.directory} does not match this config's "
                "model/optimizer state (its saved arrays differ in names or shapes). Use a new "
                "--workdir, or --config.force_new=True to start over in this one.")
        try:
            state = _restore_verified(manager, step, abstract)
            if damaged:
                logging.warning("Resumed from step %d, the newest undamaged checkpoint.", step)
            return state
        except DamagedCheckpoint as e:
            where = epath.Path(manager.directory).parent / DAMAGED_DIR / str(step)
            message = (f"Checkpoint step {step} in {manager.directory} is damaged ({e}); "
                       f"moved to {where} and trying the previous checkpoint.")
            logging.warning(message)
            print(f"dq_jax: warning: {message}", file=sys.stderr, flush=True)
            damaged.append(step)
            if jax.process_index() == 0:
                where.parent.mkdir(parents=True, exist_ok=True)
                if where.exists():
                    where.rmtree()
                (epath.Path(manager.directory) / str(step)).rename(where)
            manager.reload()
            older = [s for s in manager.all_steps() if s < step]
            step = max(older) if older else None
    raise ValueError(
        f"Every checkpoint in {manager.directory} is damaged (steps {damaged}, moved to "
        f"{epath.Path(manager.directory).parent / DAMAGED_DIR}); nothing to resume from. "
        "Start over with --config.force_new=True, or restore a backup of the workdir.")


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
