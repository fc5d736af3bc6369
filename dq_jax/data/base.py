"""The `Dataset` interface shared by every source, plus the helpers they share.

Every source (in-memory arrays, TFDS) exposes the same small interface so the
training program never branches on where the data came from. Batches are
deterministic functions of ``(config.seed, step, process_index,
process_count)``: a run resumed at step ``k`` sees exactly the batches an
uninterrupted run sees from its ``k``-th batch on.
"""
from __future__ import annotations

import abc
from typing import Any, Iterator

import numpy as np

Batch = dict[str, np.ndarray]

# Tags that keep the random streams of different purposes independent.
SHUFFLE_TAG = 0
AUGMENT_TAG = 1


def derive_seed(seed: int, tag: int, index: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, tag, index)``.

    Uses numpy's SeedSequence (a hash), so nearby inputs give unrelated seeds
    and the result is identical on every host and every run.
    """
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(tag), int(index)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def rng_for(seed: int, tag: int, index: int) -> np.random.Generator:
    """A numpy Generator seeded by ``(seed, tag, index)`` (see derive_seed)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(tag), int(index)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def positive_int(field: str, value: Any) -> int:
    """Validates ``config.<field>`` as a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(
            f"config.{field}={value!r} must be a positive integer.")
    return int(value)


def resolve_process(process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
    """Defaults to JAX's view of the host; explicit values win (for tests)."""
    if process_index is None or process_count is None:
        import jax  # Imported lazily: only needed when not given explicitly.
        if process_index is None:
            process_index = jax.process_index()
        if process_count is None:
            process_count = jax.process_count()
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} / process_count={process_count} "
            "is invalid; need 0 <= process_index < process_count.")
    return int(process_index), int(process_count)


def batch_sizes(config: Any, process_count: int) -> tuple[int, int]:
    """Validated global (train, eval) batch sizes, divisible by process_count."""
    batch_size = positive_int("batch_size", config.get("batch_size", None))
    eval_batch_size = config.get("eval_batch_size", None)
    eval_batch_size = batch_size if eval_batch_size is None else positive_int(
        "eval_batch_size", eval_batch_size)
    if batch_size % process_count:
        raise ValueError(
            f"config.batch_size={batch_size} is not divisible by the process "
            f"count {process_count}; the global batch is split evenly across "
            "processes, so choose a multiple of it.")
    if eval_batch_size % process_count:
        raise ValueError(
            f"config.eval_batch_size={eval_batch_size} is not divisible by the "
            f"process count {process_count}; choose a multiple of it.")
    return batch_size, eval_batch_size


class Dataset(abc.ABC):
    """One dataset, as seen by one process.

    Attributes:
      name: ``config.dataset``.
      num_classes: number of labels.
      image_shape: ``(H, W, C)`` of the images in a batch.
      train_size / eval_size: examples in the (global) train / eval split.
      batch_size / eval_batch_size: global batch sizes (all processes).
      local_batch_size / local_eval_batch_size: this process's share.
      steps_per_epoch: ``train_size // batch_size`` (the remainder of each
        epoch's permutation is dropped; it differs from epoch to epoch).
      eval_steps: number of batches ``eval_batches()`` yields; the same on
        every process, so a collective eval step never deadlocks.
      process_index / process_count: which share this object produces.
      mean / std: the per-channel normalisation constants (raw pixel scale).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_size: int
    eval_size: int
    batch_size: int
    eval_batch_size: int
    steps_per_epoch: int
    eval_steps: int
    process_index: int
    process_count: int
    mean: np.ndarray
    std: np.ndarray

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    @property
    def local_eval_batch_size(self) -> int:
        return self.eval_batch_size // self.process_count

    @abc.abstractmethod
    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """Infinite iterator of this process's share of global batches.

        Yields ``{'image': float32 [B_local, H, W, C], 'label': int32
        [B_local]}`` for global steps ``start_step, start_step + 1, ...``.
        Epoch ``e = step // steps_per_epoch`` uses a permutation seeded by
        ``(seed, e)``; augmentation is seeded by ``(seed, step)`` (per
        example), so ``train_batches(k)`` equals ``train_batches(0)``
        advanced by ``k``.
        """

    @abc.abstractmethod
    def eval_batches(self) -> Iterator[Batch]:
        """One in-order pass over the eval split, padded to full batches.

        Yields ``eval_steps`` dicts with ``image``, ``label`` and ``mask``
        (float32 [B_local], 1 for a real example, 0 for padding), so metrics
        weighted by ``mask`` count every eval example exactly once.
        """

    def _check_start_step(self, start_step: int) -> int:
        if isinstance(start_step, bool) or not isinstance(
                start_step, (int, np.integer)) or start_step < 0:
            raise ValueError(
                f"start_step={start_step!r} must be a non-negative integer.")
        return int(start_step)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, "
                f"num_classes={self.num_classes}, image_shape={self.image_shape}, "
                f"train_size={self.train_size}, eval_size={self.eval_size}, "
                f"batch_size={self.batch_size}, steps_per_epoch={self.steps_per_epoch}, "
                f"process={self.process_index}/{self.process_count})")


def steps_per_epoch_for(name: str, train_size: int, batch_size: int) -> int:
    steps = train_size // batch_size
    if steps < 1:
        raise ValueError(
            f"config.batch_size={batch_size} is larger than the {name} train "
            f"split ({train_size} examples); no full batch fits in an epoch.")
    return steps


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
