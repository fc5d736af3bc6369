"""Entry point: `python -m dq_jax.main --config=configs/X.py --workdir=DIR [--config.key=value]`.

`--variants=float,w2a2,w4a4` runs the config once per variant (in
`DIR/<variant>`) and prints a top-1 table; variant names: `float`, `wNaM`
(DQ-W N-bit weights, DQ-A M-bit activations), optionally prefixed by a weight
method: `latent_ste_w2a2`, `lsq_w2a2`.
"""
from __future__ import annotations

import logging as logging_lib
import os
import re
import sys


def _sigterm_outside_training(signum, frame):
    del signum, frame
    print("dq_jax: SIGTERM while no training step was running: exiting with nothing unsaved. "
          "Rerun the same command to resume.", file=sys.stderr, flush=True)
    sys.exit(0)


def install_sigterm_exit() -> None:
    """Until training installs its own handler (which checkpoints the current step), a
    SIGTERM (preemption notice) exits 0 with a message: nothing is lost before a run starts."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_outside_training)


def quiet_native_logs() -> None:
    """Defaults that silence TensorFlow/oneDNN/libtpu start-up INFO chatter (a user's own
    setting wins). Must run before TensorFlow or libtpu is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")      # TF C++ INFO + oneDNN notice
    os.environ.setdefault("TPU_MIN_LOG_LEVEL", "2")         # libtpu INFO/WARNING
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


if __name__ == "__main__":  # before the heavier imports below
    install_sigterm_exit()
    quiet_native_logs()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and "
                    "results.json go (local path or gs://).")
flags.DEFINE_list("variants", [], "Optional: run these quantization variants side by side "
                  "and print a table, e.g. float,w2a2,w4a4.")
flags.mark_flags_as_required(["config", "workdir"])

_VARIANT = re.compile(r"^(?:(dq|latent_ste|lsq)_)?w([1-8])a([1-8])$")


def apply_variant(config, variant: str):
    """A copy of `config` with the quantization of `variant` (see module docstring)."""
    config = config.copy_and_resolve_references()
    if variant == "float":
        config.quant.weights, config.quant.acts = "float", "float"
        return config
    m = _VARIANT.match(variant)
    if not m:
        raise ValueError(f"--variants entry {variant!r} is not 'float' or like 'w2a2', "
                         "'latent_ste_w2a2', 'lsq_w4a4' (bits 1..8).")
    config.quant.weights = m.group(1) or "dq"
    config.quant.weight_bits = int(m.group(2))
    config.quant.acts = "dq"
    config.quant.act_bits = int(m.group(3))
    return config


def format_table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'variant':<16}{'top-1':>8}{'top-5':>8}{'steps':>8}{'seconds':>9}"]
    for name, r in rows:
        seconds = "n/a" if r.get("train_seconds") is None else f"{r['train_seconds']:.1f}"
        lines.append(f"{name:<16}{r['eval_top1']:>8.4f}{r['eval_top5']:>8.4f}"
                     f"{r['steps']:>8d}{seconds:>9}")
    return "\n".join(lines)


class _QuietLibraries(logging_lib.Filter):
    """Drops INFO chatter of orbax/tensorstore (one line per array per save)."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return record.levelno > logging_lib.INFO or not any(
            f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "etils"))


def result_line(workdir: str, result: dict) -> str:
    """The one stdout line a finished run ends with (also without --variants)."""
    seconds = result.get("train_seconds")
    timing = "" if seconds is None else f", {seconds:.1f} s training"
    return (f"dq_jax: {workdir}: top-1 {result['eval_top1']:.4f}, top-5 "
            f"{result['eval_top5']:.4f} after {result['steps']} steps{timing} "
            f"(results.json)")


def check_overrides(argv: list[str], config) -> None:
    """Command-line overrides that the config would silently ignore are errors."""
    given = {a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")}
    if "num_epochs" in given and config.num_train_steps > 0 and "num_train_steps" not in given:
        raise ValueError(
            f"--config.num_epochs is ignored because the config fixes config.num_train_steps="
            f"{config.num_train_steps}; set --config.num_train_steps=-1 with it (or override "
            "num_train_steps instead).")


def _ignore_sigterm_from_now() -> None:
    """Once the result is printed (and saved) nothing is left to save. Interpreter shutdown
    resets Python's signal handlers to the default, so a preemption notice arriving while
    JAX/orbax shut down would kill the process with -15: from here on it is ignored, and the
    exit status stays the run's."""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _report_preempted(result: dict) -> bool:
    if result.get("preempted"):
        print(f"dq_jax: {result.get('message', 'preempted')}", file=sys.stderr, flush=True)
        return True
    return False


def main(argv):
    install_sigterm_exit()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from dq_jax import extras
    extras.exit_unless_installed("train", "the training program (python -m dq_jax.main)")
    import jax
    from dq_jax import train
    from dq_jax.distributed import maybe_initialize
    try:
        maybe_initialize()
        logging.info("JAX process %d/%d, %d local / %d global devices.", jax.process_index(),
                     jax.process_count(), jax.local_device_count(), jax.device_count())
        check_overrides(sys.argv, FLAGS.config)
        if not FLAGS.variants:
            result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
            if not _report_preempted(result):
                print(result_line(FLAGS.workdir, result), flush=True)
            _ignore_sigterm_from_now()
            return
        configs = [(v, apply_variant(FLAGS.config, v)) for v in FLAGS.variants]
        rows = []
        for name, cfg in configs:
            logging.info("=== variant %s ===", name)
            result = train.train_and_evaluate(cfg, os.path.join(FLAGS.workdir, name))
            if _report_preempted(result):
                _ignore_sigterm_from_now()
                return  # the remaining variants run when the command is rerun
            rows.append((name, result))
        print(format_table(rows), flush=True)
        _ignore_sigterm_from_now()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Config/data/numerics problems: one clear line, no traceback.
        print(f"dq_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001  (a full disk reaches us through many types)
        from dq_jax import checkpoints
        if not checkpoints.is_disk_full(e):
            raise
        print(f"dq_jax: error: {checkpoints.disk_full_line(e, FLAGS.workdir)}", file=sys.stderr)
        sys.exit(2)


def _one_line(error: BaseException) -> str:
    if isinstance(error, SyntaxError):
        return (f"config file {error.filename}, line {error.lineno}: {error.msg}: "
                f"{(error.text or '').strip()}")
    text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
    return text.strip("'\"") or type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config-file and override errors as one clear line."""
    try:
        rest = FLAGS(argv)
        _ = FLAGS.config.keys()  # config_flags loads lazily: surface a bad file now
        return rest
    except flags.Error as e:
        print(f"dq_jax: error: {_one_line(e)}\nUsage: python -m dq_jax.main "
              "--config=configs/FILE.py --workdir=DIR [--config.key=value ...]", file=sys.stderr)
    except (SyntaxError, AttributeError, KeyError, TypeError, ValueError, ImportError,
            OSError) as e:
        from dq_jax.configlib import unknown_override
        unknown = (unknown_override(argv) if isinstance(e, (KeyError, AttributeError))
                   else None)
        print(f"dq_jax: error: bad --config: {unknown or _one_line(e)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
