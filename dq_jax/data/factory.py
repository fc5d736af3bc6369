"""`create_dataset`: the one entry point the training program calls."""
from __future__ import annotations

from typing import Any

import numpy as np

from dq_jax.data import base

ARRAY_DATASETS = ("digits", "cifar10_npz", "npz")
TFDS_DATASETS = ("cifar10", "cifar100", "imagenet2012")
DATASETS = ARRAY_DATASETS + TFDS_DATASETS


def create_dataset(config: Any, *, process_index: int | None = None,
                   process_count: int | None = None) -> base.Dataset:
    """Builds this process's view of ``config.dataset``.

    Args:
      config: an ``ml_collections.ConfigDict`` (anything with ``.get``) with
        ``dataset``, ``batch_size`` (global) and optionally ``eval_batch_size``
        (global, default ``batch_size``), ``seed`` (0), ``augment`` (True),
        ``data_dir`` (None or '' = the default location), ``image_size`` (224,
        imagenet2012 only), ``shuffle_buffer_size`` (TFDS only) and
        ``num_classes`` (npz only; <= 0 or absent: from ``label_names`` or
        the largest label).
      process_index, process_count: default to ``jax.process_index()`` /
        ``jax.process_count()``; pass them explicitly to emulate other hosts.

    Train augmentation (when ``config.augment``): CIFAR-style zero-pad-4
    random crop + horizontal flip for cifar10/cifar100/cifar10_npz/npz (npz
    images that are not 32x32 pad ``max(1, H // 8)``); imagenet2012:
    Inception-style random-resized crop to ``image_size`` + flip (without
    augment: the eval crop); digits: none (``config.augment`` is ignored).
    Eval: none, except imagenet2012's center crop (0.875 of the shorter side)
    resized to ``image_size``.

    Splits: digits is scikit-learn's bundled set split 1347 train / 450 eval
    (stratified, ``random_state=0``); the others use their train/test (ImageNet:
    train/validation) splits.

    Raises:
      ValueError: unknown dataset, bad batch sizes or seed, invalid .npz.
      FileNotFoundError: the data is not where the config says (the message
        says where it looked and how to provide it).
    """
    name = config.get("dataset", None)
    if name not in DATASETS:
        raise ValueError(
            f"config.dataset={name!r} is not supported; allowed values: "
            f"{', '.join(repr(d) for d in DATASETS)}.")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"config.seed={seed!r} must be an integer.")
    process_index, process_count = base.resolve_process(process_index, process_count)
    batch_size, eval_batch_size = base.batch_sizes(config, process_count)
    kwargs = dict(batch_size=batch_size, eval_batch_size=eval_batch_size,
                  process_index=process_index, process_count=process_count)
    if name == "digits":
        from dq_jax.data import arrays
        return arrays.make_digits(config, **kwargs)
    if name in ("cifar10_npz", "npz"):
        from dq_jax.data import arrays
        return arrays.make_npz(config, cifar10=name == "cifar10_npz", **kwargs)
    from dq_jax.data import tfds_source  # Imports TensorFlow only when needed.
    return tfds_source.TfdsDataset(name, config, **kwargs)
