"""Exports from a training workdir (`export_workdir`) or from a user's saved variables
(`export_variables`), and the dataset facts a file records."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dq_jax.export.convert import COLLECTIONS, flat, quant_of
from dq_jax.export.fileformat import DEFAULT_APPLY_KWARGS, save

# Raw pixel scale of the bundled datasets (digits pixels are 0..16).
_PIXEL_MAX = {"digits": 16.0}


DATASET_FILE = "dataset.json"


def dataset_facts(config, ds) -> dict:
    """What an export needs to know of the training data: classes, [H, W, C], normalisation.

    The training program writes it to `<workdir>/dataset.json`, so an export never rebuilds
    the dataset to learn it.
    """
    return {"dataset": str(config.dataset), "num_classes": int(ds.num_classes),
            "image_shape": [int(d) for d in ds.image_shape],
            "normalization": {"mean": [float(v) for v in np.ravel(ds.mean)],
                              "std": [float(v) for v in np.ravel(ds.std)],
                              "pixel_max": _PIXEL_MAX.get(str(config.dataset), 255.0)}}


def read_dataset_facts(workdir: str) -> dict | None:
    """The facts a training run recorded, or None for workdirs written before it did."""
    from etils import epath
    path = epath.Path(workdir) / DATASET_FILE
    if not path.exists():
        return None
    try:
        facts = json.loads(path.read_text())
        facts["image_shape"] = tuple(int(d) for d in facts["image_shape"])
        int(facts["num_classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}); delete it to fall back "
                         "to rebuilding the dataset from config.json.") from None
    return facts


def _dataset_facts(config) -> dict:
    """num_classes, image_shape and normalization rebuilt from the config (workdirs from
    before training recorded `dataset.json`; best effort)."""
    from dq_jax import data, models
    name = config.dataset
    facts: dict[str, Any] = {}
    if name in ("digits", "npz", "cifar10_npz"):
        try:
            ds = data.create_dataset(config, process_index=0, process_count=1)
            facts = {"num_classes": ds.num_classes, "image_shape": tuple(ds.image_shape),
                     "normalization": {"mean": ds.mean, "std": ds.std,
                                       "pixel_max": _PIXEL_MAX.get(name, 255.0)}}
        except (FileNotFoundError, ValueError) as e:
            print(f"dq_jax.export: warning: dataset {name!r} unavailable ({e}); the export "
                  "will have no normalisation constants.", file=sys.stderr)
    if name == "cifar10_npz" and "normalization" not in facts:
        from dq_jax.data.arrays import CIFAR10_MEAN, CIFAR10_STD
        facts["normalization"] = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, "pixel_max": 255.0}
    if name in ("cifar10", "cifar100", "imagenet2012"):
        from dq_jax.data.tfds_source import SPECS
        spec = SPECS[name]
        facts["normalization"] = {"mean": spec["mean"], "std": spec["std"], "pixel_max": 255.0}
        facts["num_classes"] = {"cifar10": 10, "cifar100": 100, "imagenet2012": 1000}[name]
        facts["image_shape"] = ((config.image_size, config.image_size, 3)
                                if name == "imagenet2012" else (32, 32, 3))
    if name == "cifar10_npz":
        facts.setdefault("num_classes", 10)
        facts.setdefault("image_shape", (32, 32, 3))
    facts.setdefault("image_shape", tuple(models.INPUT_SHAPES.get(config.model, ())))
    if config.num_classes > 0:
        facts["num_classes"] = int(config.num_classes)
    return facts


def _check_structure(model, variables: Mapping, image_shape, where: str) -> None:
    """The checkpoint's variables must have exactly the shapes of the rebuilt model."""
    expected = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32),
                           **DEFAULT_APPLY_KWARGS))
    for c in COLLECTIONS:
        want = {k: tuple(v.shape) for k, v in flat(expected.get(c, {})).items()}
        have = {k: tuple(np.shape(v)) for k, v in flat(variables.get(c, {})).items()}
        if want != have:
            diff = sorted(set(want.items()) ^ set(have.items()))[:4]
            raise ValueError(
                f"{where}: the checkpoint's {c} do not match the model rebuilt from its "
                f"config.json (first differences: {diff}); the workdir's config and "
                "checkpoint disagree.")


def export_workdir(workdir: str, out: str, step: int | None = None) -> dict:
    """Exports a training workdir's checkpoint (latest, or `step`) to `out`; returns sizes."""
    import orbax.checkpoint as ocp
    from etils import epath
    from dq_jax import checkpoints, configlib, models

    wd = epath.Path(workdir)
    cfg_path = wd / checkpoints.CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist; --workdir must be a directory "
                                "written by dq_jax training (python -m dq_jax.main).")
    try:
        config = configlib.complete(json.loads(cfg_path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is damaged ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); the export needs the training "
                         "config it records: restore it from a backup.") from e
    configlib.validate(config, device_count=1)
    root = wd / checkpoints.CHECKPOINT_DIR
    steps = sorted(int(c.name) for c in root.iterdir() if c.name.isdigit()) \
        if root.is_dir() else []
    if not steps:
        raise FileNotFoundError(f"{root} holds no checkpoint; train first.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"{workdir}: no checkpoint at step {step}; available: {steps}.")
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(step, args=ocp.args.StandardRestore())
    variables = {c: jax.tree.map(np.asarray, restored.get(c) or {}) for c in COLLECTIONS}
    facts = read_dataset_facts(str(workdir)) or _dataset_facts(config)
    if config.num_classes > 0:
        facts["num_classes"] = int(config.num_classes)
    if "num_classes" not in facts:
        raise ValueError(f"{workdir}: cannot tell the number of classes of dataset "
                         f"{config.dataset!r}; set config.num_classes in its config.")
    quant = quant_of(json.loads(config.to_json_best_effort()))
    from dq_jax import mixed
    model = mixed.create_model(config, quant, facts["num_classes"], facts["image_shape"],
                               **config.model_kwargs.to_dict())
    _check_structure(model, variables, facts["image_shape"], str(workdir))
    return save(out, model=config.model, config=config, variables=variables,
                num_classes=facts["num_classes"], image_shape=facts["image_shape"],
                normalization=facts.get("normalization"),
                source={"workdir": str(workdir), "step": int(step)})


def load_variables(path: str) -> dict:
    """Model variables saved by a user's own loop: a `flax.serialization` msgpack file
    (`to_bytes` / `msgpack_serialize` of {'params', 'codes', 'batch_stats', 'quant_stats'}) or an
    orbax checkpoint directory of that tree."""
    if os.path.isdir(path):
        import orbax.checkpoint as ocp
        restored = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    elif os.path.isfile(path):
        with open(path, "rb") as f:
            try:
                restored = flax.serialization.msgpack_restore(f.read())
            except Exception as e:  # noqa: BLE001  (any decoding failure)
                raise ValueError(f"{path}: not a flax.serialization msgpack file ({type(e).__name__}); "
                                 "save with flax.serialization.to_bytes(variables).") from None
    else:
        raise FileNotFoundError(f"{path} does not exist; pass --variables=a .msgpack file or an "
                                "orbax checkpoint directory.")
    if not isinstance(restored, Mapping) or "params" not in restored:
        raise ValueError(f"{path}: expected a dict with 'params' (and 'codes', 'batch_stats', "
                         f"'quant_stats'); found keys {sorted(restored) if isinstance(restored, Mapping) else type(restored).__name__}.")
    return {c: jax.tree.map(np.asarray, dict(restored.get(c) or {})) for c in COLLECTIONS}


def export_variables(out: str, *, model: str, variables: str | Mapping, num_classes: int,
                     image_shape: Sequence[int], model_kwargs: Mapping | None = None,
                     apply_kwargs: Mapping | None = None,
                     normalization: Mapping | None = None) -> dict:
    """Exports a user module (`"package.module:attr"`) from variables (a dict, or a path for
    `load_variables`); `save` refuses variables that are not exactly the rebuilt module's."""
    source = {"variables": variables} if isinstance(variables, str) else {}
    if isinstance(variables, str):
        variables = load_variables(variables)
    return save(out, model=model, model_kwargs=model_kwargs, variables=variables,
                num_classes=num_classes, image_shape=image_shape, apply_kwargs=apply_kwargs,
                normalization=normalization, source=source)
