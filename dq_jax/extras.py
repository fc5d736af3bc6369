"""Optional dependencies: which `pip install 'dq_jax[EXTRA]'` provides what.

`pip install dq_jax` gives the layers, optimizer, models, checkpoints and
export/predict (jax, flax, optax, chex, numpy, orbax-checkpoint, ml-collections,
absl-py, etils). The training program (`python -m dq_jax.main`) and its input
pipelines need the `train` extra. Nothing here imports an optional module: the
checks only ask importlib whether it could be imported.
"""
from __future__ import annotations

import importlib.util

# Import name -> pip distribution, per extra (keep in step with setup.py).
EXTRAS: dict[str, dict[str, str]] = {
    "train": {
        "tensorflow": "tensorflow-cpu",
        "tensorflow_datasets": "tensorflow-datasets",
        "clu": "clu",
        "tensorboard": "tensorboard",
        "sklearn": "scikit-learn",
        "tqdm": "tqdm",
        "PIL": "pillow",
    },
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing(extra: str = "train", modules: list[str] | None = None) -> list[str]:
    """pip names of the `extra`'s packages (or just `modules`) that cannot be imported."""
    table = EXTRAS[extra]
    names = table if modules is None else modules
    return [table.get(m, m) for m in names if not _importable(m)]


def message(extra: str, what: str, absent: list[str]) -> str:
    """The one-line error for `what` lacking the `extra`'s packages `absent`."""
    return (f"{what} needs the '{extra}' extra (missing: {', '.join(absent)}); "
            f"install it with: pip install 'dq_jax[{extra}]' (from a checkout: "
            f"pip install -e '.[{extra}]').")


def require(extra: str = "train", what: str = "the training program",
            modules: list[str] | None = None) -> None:
    """Raises MissingExtraError (one line, naming the extra) unless all are importable.

    Args:
      extra: the setup.py extra that provides them.
      what: what needs them, for the message.
      modules: only these import names of the extra (default: all of them).
    """
    absent = missing(extra, modules)
    if absent:
        raise MissingExtraError(message(extra, what, absent))


def exit_unless_installed(extra: str = "train", what: str = "the training program") -> None:
    """For entry points: print the one-line error (`dq_jax: error: ...`) and exit 2."""
    try:
        require(extra, what)
    except MissingExtraError as e:
        import sys
        print(f"dq_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
