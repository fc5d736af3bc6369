"""Shared test utilities: load configs, run the real CLI in a subprocess, meshes."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax

from dq_jax.configlib import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    """`configs/<name>.py`'s get_config(), as the CLI would load it."""
    return load_config_file(REPO / "configs" / f"{name}.py")


def run_python(args: list[str], *, devices: int | None = None, timeout: int = 600,
               env: dict | None = None,
               unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Runs `python ARGS` from the repo root with `devices` fake CPU devices, the caller's
    environment plus `env`, minus the variables named in `unset`."""
    full_env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k not in unset}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    if devices:
        # Keep the caller's XLA flags (e.g. --xla_cpu_enable_fast_math=false); replace only the
        # device count.
        kept = [f for f in full_env.get("XLA_FLAGS", "").split()
                if not f.startswith("--xla_force_host_platform_device_count")]
        full_env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
    return subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def read_scalar_series(workdir, tag: str) -> dict[int, float]:
    """step -> value of a scalar the training program wrote to TensorBoard in `workdir`."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    out = {}
    for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("tensors", []):
            for e in acc.Tensors(tag):
                out[e.step] = float(np.asarray(tensor_util.make_ndarray(e.tensor_proto)))
        if tag in acc.Tags().get("scalars", []):
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def explicit_mesh(like: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """`like` with Explicit-typed axes (jax.make_mesh's default): a user's mesh, where the
    program's own (`train.create_mesh`) has Auto axes."""
    return jax.make_mesh(like.devices.shape, like.axis_names,
                         axis_types=(jax.sharding.AxisType.Explicit,) * len(like.axis_names))
