"""`python -m dq_jax.export`: write a `.dqz` file and print its size table.

    python -m dq_jax.export --workdir=DIR --out=model.dqz [--step=N]
        a training workdir (config.json + checkpoints/; latest or --step checkpoint)
    python -m dq_jax.export --model=package.module:attr [--model_kwargs='{"num_classes": 10}'] \
        --variables=vars.msgpack --num_classes=10 --image_shape=32,32,3 --out=model.dqz \
        [--normalization='{"mean": [...], "std": [...], "pixel_max": 255}']
        a user's own Flax module (class or factory) and its variables saved by
        flax.serialization.to_bytes (or an orbax checkpoint directory)
"""
from __future__ import annotations

import json
import sys
from typing import Sequence

from absl import app, flags

from dq_jax.export.sizes import format_size_report
from dq_jax.export.workdir import export_variables, export_workdir

FLAGS = flags.FLAGS


def _json_flag(name: str) -> dict | None:
    text = getattr(FLAGS, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--{name}={text!r} is not JSON ({e}); e.g. --{name}='{{\"key\": 1}}'.")
    if not isinstance(value, dict):
        raise ValueError(f"--{name} must be a JSON object, got {text!r}.")
    return value


def _export() -> dict:
    user = FLAGS.model is not None or FLAGS.variables is not None
    if user == (FLAGS.workdir is not None):
        raise ValueError("pass either --workdir (a training run) or --model and --variables "
                         "(your own module), not both and not neither.")
    if FLAGS.workdir is not None:
        return export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step)
    missing = [n for n in ("model", "variables", "num_classes", "image_shape")
               if getattr(FLAGS, n) is None]
    if missing:
        raise ValueError(f"exporting your own module needs --{', --'.join(missing)}.")
    try:
        shape = tuple(int(v) for v in FLAGS.image_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"--image_shape={FLAGS.image_shape!r} must be H,W,C, e.g. 32,32,3.")
    return export_variables(FLAGS.out, model=FLAGS.model, variables=FLAGS.variables,
                            num_classes=FLAGS.num_classes, image_shape=shape,
                            model_kwargs=_json_flag("model_kwargs"),
                            apply_kwargs=_json_flag("apply_kwargs"),
                            normalization=_json_flag("normalization"))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments: {argv[1:]}")
    try:
        report = _export()
    except (ValueError, FileNotFoundError) as e:
        print(f"dq_jax.export: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_size_report(report))
    print(f"wrote {FLAGS.out}: {report['export_bytes']:,} bytes, "
          f"{report['ratio']:.2f}x smaller than float32 ({report['float32_bytes']:,} bytes)")


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir (with config.json and checkpoints/).")
    flags.DEFINE_string("out", None, "Output .dqz file.")
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string("model", None, "Your module: 'package.module:attr' (class or factory).")
    flags.DEFINE_string("model_kwargs", None, "JSON keyword arguments of --model.")
    flags.DEFINE_string("apply_kwargs", None,
                        "JSON keyword arguments of module.apply at inference (default "
                        "'{\"train\": false}').")
    flags.DEFINE_string("variables", None, "Variables of --model: a flax.serialization .msgpack "
                        "file or an orbax checkpoint directory.")
    flags.DEFINE_integer("num_classes", None, "Classes of --model.")
    flags.DEFINE_string("image_shape", None, "Input H,W,C of --model, e.g. 32,32,3.")
    flags.DEFINE_string("normalization", None, "JSON {'mean': [...], 'std': [...], "
                        "'pixel_max': 255} of the raw pixels (lets predict take raw images).")
    flags.mark_flags_as_required(["out"])


if __name__ == "__main__":
    _define_flags()
    app.run(main)
