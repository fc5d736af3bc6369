"""In-memory array sources: scikit-learn digits and .npz files (e.g. CIFAR-10).

These run on any CPU without TensorFlow or a download, which is what the
tests and the CPU-scale experiments need. Batching and augmentation are plain
vectorised numpy; everything random is drawn for the *global* batch from
generators seeded by ``(seed, epoch)`` / ``(seed, step)`` and then sliced per
process, so process ``i`` of ``P`` gets exactly rows ``[i*B/P, (i+1)*B/P)`` of
the batch a single process would see.
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator

import numpy as np

from dq_jax.data import base

# Per-channel statistics on the 0..255 scale (official CIFAR-10 train split).
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)

DIGITS_TEST_SIZE = 0.25  # -> 1347 train / 450 eval examples, stratified.
DIGITS_SPLIT_SEED = 0
# Where test and benchmark machines keep their data copies: `cifar10_npz` without a
# config.data_dir reads $DQ_JAX_SHARED_DATA/cifar10.npz.
SHARED_DATA_ENV = "DQ_JAX_SHARED_DATA"
CIFAR10_NPZ_NAME = "cifar10.npz"
REQUIRED_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def cifar10_npz_candidates(data_dir: str | os.PathLike | None = None
                           ) -> list[pathlib.Path]:
    """Where ``cifar10_npz`` looks for its file.

    ``data_dir`` (a file, or a directory holding ``cifar10.npz``) when given;
    otherwise ``$DQ_JAX_SHARED_DATA/cifar10.npz`` if that variable is set;
    otherwise nowhere (the library has no built-in data location).
    """
    if data_dir is not None:
        path = pathlib.Path(data_dir).expanduser()
        if path.suffix == ".npz":
            return [path]
        return [path / CIFAR10_NPZ_NAME]
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return [pathlib.Path(env).expanduser() / CIFAR10_NPZ_NAME]
    return []


def find_cifar10_npz(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The first existing candidate, or FileNotFoundError saying where it looked."""
    candidates = cifar10_npz_candidates(data_dir)
    for path in candidates:
        if path.is_file():
            return path
    looked = (f"looked at: {', '.join(str(p) for p in candidates)}" if candidates else
              f"config.data_dir is not set and neither is {SHARED_DATA_ENV}")
    raise FileNotFoundError(
        f"cifar10_npz: no {CIFAR10_NPZ_NAME} found ({looked}). "
        "Point at it with config.data_dir (the .npz file or its directory) or "
        f"set the environment variable {SHARED_DATA_ENV} to the directory that "
        f"holds {CIFAR10_NPZ_NAME}; or read TFDS instead: config.dataset='cifar10' "
        "after `tfds build cifar10`.")


def npz_array(npz: Any, key: str, path: str | os.PathLike) -> np.ndarray:
    """`npz[key]`, or a ValueError naming the file when the array is pickled (an object
    array, which is never loaded: unpickling can run code)."""
    try:
        return npz[key]
    except ValueError as e:
        raise ValueError(f"{path}: {key} is a pickled (object) array, which is not loaded; "
                         "save plain numeric arrays (e.g. np.asarray(labels, np.int64)).") from e


def _check_labels(path: pathlib.Path, arrays: dict[str, np.ndarray], num_classes: int,
                  inferred: bool) -> None:
    """Labels must lie in [0, num_classes); a count inferred from the largest label must
    also have an example of every class in each split (else a stray label made it up)."""
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        outside = (y < 0) | (y >= num_classes)
        if outside.any():
            raise ValueError(
                f"{path}: {int(outside.sum())} of {len(y)} y_{split} labels lie outside "
                f"[0, {num_classes - 1}] (values {sorted(set(y[outside].tolist()))[:5]}) for "
                f"{num_classes} classes; fix those labels, or set config.num_classes.")
    if not inferred:
        return
    top = sum(int(np.sum(arrays[f"y_{s}"] == num_classes - 1)) for s in ("train", "test"))
    for split in ("train", "test"):
        missing = np.setdiff1d(np.arange(num_classes), arrays[f"y_{split}"])
        if missing.size:
            raise ValueError(
                f"{path}: the labels imply {num_classes} classes (the largest label, "
                f"{num_classes - 1}, is on {top} example(s)), but y_{split} has no example of "
                f"{missing.size} of them ({missing[:5].tolist()}"
                f"{'...' if missing.size > 5 else ''}): labels must be the contiguous set "
                f"0..{num_classes - 1}. A stray label? Fix the labels, or state the class "
                "count with config.num_classes or a label_names array.")


def load_npz(path: str | os.PathLike, num_classes: int | None = None
             ) -> tuple[dict[str, np.ndarray], int]:
    """Loads and validates an image-classification .npz.

    Required keys: ``x_train``/``x_test`` uint8 ``(N, H, W, C)`` and
    ``y_train``/``y_test`` integer ``(N,)``; optional ``label_names``.
    ``num_classes`` defaults to ``len(label_names)`` if present, else
    ``max(label) + 1``, and then every class must have examples in both splits (one stray
    label 255 would otherwise make a 256-class model). Everything is checked up front so a
    bad file fails with its name and the problem, not with a shape error deep in training.

    Returns:
      The four arrays and the number of classes.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"npz dataset file {str(path)!r} does not exist; set config.data_dir "
            "to the path of a .npz with x_train, y_train, x_test, y_test.")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # Corrupt or not an npz.
        raise ValueError(f"{path}: cannot be read as a .npz file ({e}).") from e
    with npz:
        missing = [k for k in REQUIRED_NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path}: missing key(s) {missing}; an image .npz needs "
                f"{list(REQUIRED_NPZ_KEYS)} (found {sorted(npz.files)}).")
        arrays = {k: npz_array(npz, k, path) for k in REQUIRED_NPZ_KEYS}
        label_names = npz_array(npz, "label_names", path) if "label_names" in npz.files \
            else None

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 4:
            raise ValueError(
                f"{path}: x_{split} has shape {x.shape}; expected 4-D (N, H, W, C).")
        if x.dtype != np.uint8:
            raise ValueError(
                f"{path}: x_{split} has dtype {x.dtype}; expected uint8 pixels 0..255.")
        if y.ndim != 1:
            raise ValueError(
                f"{path}: y_{split} has shape {y.shape}; expected 1-D (N,).")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"{path}: y_{split} has dtype {y.dtype}; expected integer labels.")
        if len(x) != len(y):
            raise ValueError(
                f"{path}: x_{split} has {len(x)} examples but y_{split} has {len(y)}.")
        if len(x) == 0:
            raise ValueError(f"{path}: the {split} split is empty.")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"{path}: x_train images {arrays['x_train'].shape[1:]} and x_test images "
            f"{arrays['x_test'].shape[1:]} differ in shape.")

    inferred = num_classes is None and not (
        label_names is not None and label_names.ndim == 1 and len(label_names))
    if num_classes is None:
        num_classes = len(label_names) if not inferred else \
            max(int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1, 1)
    _check_labels(path, arrays, num_classes, inferred)
    arrays["y_train"] = arrays["y_train"].astype(np.int32)
    arrays["y_test"] = arrays["y_test"].astype(np.int32)
    return arrays, int(num_classes)


def load_digits_split() -> dict[str, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download), stratified 75/25 split.

    ``train_test_split(test_size=0.25, random_state=0, stratify=y)`` gives 1347
    train and 450 eval images. Pixels stay on their native 0..16 integer
    scale (stored as uint8) so the batching code is shared with .npz sources.
    """
    from dq_jax import extras
    extras.require("train", "the digits dataset", modules=["sklearn"])
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), 0..16
    labels = digits.target.astype(np.int32)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_TEST_SIZE,
        random_state=DIGITS_SPLIT_SEED, stratify=labels)
    return {"x_train": images[idx_train], "y_train": labels[idx_train],
            "x_test": images[idx_test], "y_test": labels[idx_test]}


def channel_stats(x: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of uint8 images, in float64, chunked to bound memory."""
    c = x.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for i in range(0, len(x), chunk):
        part = x[i:i + chunk].reshape(-1, c).astype(np.float64)
        total += part.sum(0)
        total_sq += (part * part).sum(0)
    n = x.size // c
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return mean, np.maximum(std, 1e-6)


def random_crop_flip(images: np.ndarray, pad: int, offsets: np.ndarray,
                     flips: np.ndarray) -> np.ndarray:
    """Zero-pad by ``pad``, crop back to size at ``offsets``, mirror where ``flips``.

    One vectorised gather for the whole batch (no per-image Python loop).

    Args:
      images: ``[N, H, W, C]`` (any dtype).
      pad: padding on each side; offsets lie in ``[0, 2*pad]``.
      offsets: int ``[N, 2]``, the (row, col) of each crop in the padded image.
      flips: bool ``[N]``, mirror left-right after cropping.
    """
    n, h, w, _ = images.shape
    assert offsets.shape == (n, 2) and flips.shape == (n,), (offsets.shape, flips.shape)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    cols = np.where(flips[:, None], np.arange(w)[::-1][None], np.arange(w)[None])
    rows = offsets[:, 0, None] + np.arange(h)[None]            # [N, H]
    cols = offsets[:, 1, None] + cols                          # [N, W]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ArrayDataset(base.Dataset):
    """A dataset held in memory as uint8 arrays; see the module docstring.

    Augmentation (train only, when ``augment``): zero-pad by ``pad`` pixels and
    take a random crop of the original size, then (if ``flip``) a random
    horizontal mirror with probability 1/2. CIFAR-style sources use pad 4 +
    flip. Digits is never augmented (8x8 digits fill the frame, a mirrored
    digit is another symbol, and the small CNN fits the 1347 images fast).
    """

    def __init__(self, *, name: str, arrays: dict[str, np.ndarray], num_classes: int,
                 mean: Any, std: Any, batch_size: int, eval_batch_size: int,
                 seed: int, augment: bool, pad: int, flip: bool,
                 process_index: int, process_count: int):
        self.name = name
        self._x_train, self._y_train = arrays["x_train"], arrays["y_train"]
        self._x_eval, self._y_eval = arrays["x_test"], arrays["y_test"]
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(d) for d in self._x_train.shape[1:])
        channels = self.image_shape[-1]
        self.mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,)).copy()
        self.std = np.broadcast_to(np.asarray(std, np.float32), (channels,)).copy()
        self.train_size = len(self._x_train)
        self.eval_size = len(self._x_eval)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.seed = int(seed)
        self.augment, self.pad, self.flip = bool(augment), int(pad), bool(flip)
        self.steps_per_epoch = base.steps_per_epoch_for(name, self.train_size, batch_size)
        self.eval_steps = base.ceil_div(self.eval_size, eval_batch_size)

    # -- helpers -----------------------------------------------------------
    def _normalize(self, x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) - self.mean) / self.std).astype(np.float32)

    def _local(self, global_rows: np.ndarray, local: int) -> np.ndarray:
        start = self.process_index * local
        return global_rows[start:start + local]

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The train-order permutation of ``epoch``, a function of (seed, epoch)."""
        rng = base.rng_for(self.seed, base.SHUFFLE_TAG, epoch)
        return rng.permutation(self.train_size)

    def train_batch(self, step: int, perm: np.ndarray | None = None) -> base.Batch:
        """This process's share of global batch ``step`` (random access)."""
        spe = self.steps_per_epoch
        epoch, i = divmod(step, spe)
        if perm is None:
            perm = self.epoch_permutation(epoch)
        b, bl = self.batch_size, self.local_batch_size
        idx = self._local(perm[i * b:(i + 1) * b], bl)
        images = self._x_train[idx]
        if self.augment:
            # Draw for the whole global batch, then slice: the per-process
            # shares then concatenate to exactly the 1-process batch.
            rng = base.rng_for(self.seed, base.AUGMENT_TAG, step)
            offsets = rng.integers(0, 2 * self.pad + 1, size=(b, 2))
            flips = rng.random(b) < 0.5 if self.flip else np.zeros(b, bool)
            images = random_crop_flip(images, self.pad, self._local(offsets, bl),
                                      self._local(flips, bl))
        batch = {"image": self._normalize(images),
                 "label": self._y_train[idx].astype(np.int32)}
        assert batch["image"].shape == (bl, *self.image_shape), batch["image"].shape
        return batch

    # -- public API --------------------------------------------------------
    def train_batches(self, start_step: int = 0) -> Iterator[base.Batch]:
        step = self._check_start_step(start_step)
        epoch, perm = -1, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self.epoch_permutation(epoch)
            yield self.train_batch(step, perm)
            step += 1

    def eval_batches(self) -> Iterator[base.Batch]:
        b, bl = self.eval_batch_size, self.local_eval_batch_size
        for j in range(self.eval_steps):
            rows = self._local(np.arange(j * b, (j + 1) * b), bl)
            real = rows < self.eval_size
            rows = np.where(real, rows, 0)
            images = self._normalize(self._x_eval[rows])
            images[~real] = 0.0
            labels = np.where(real, self._y_eval[rows], 0).astype(np.int32)
            yield {"image": images, "label": labels, "mask": real.astype(np.float32)}


def make_digits(config: Any, *, batch_size: int, eval_batch_size: int,
                process_index: int, process_count: int) -> ArrayDataset:
    """digits: no augmentation whatever ``config.augment`` says (see ArrayDataset)."""
    arrays = load_digits_split()
    # Normalise as x/16 then standardise with the train mean/std; the same
    # affine map expressed on the raw 0..16 scale.
    x = arrays["x_train"].astype(np.float64)
    return ArrayDataset(
        name="digits", arrays=arrays, num_classes=10, mean=x.mean(), std=x.std(),
        batch_size=batch_size, eval_batch_size=eval_batch_size,
        seed=config.get("seed", 0), augment=False, pad=0, flip=False,
        process_index=process_index, process_count=process_count)


def make_npz(config: Any, *, cifar10: bool, batch_size: int, eval_batch_size: int,
             process_index: int, process_count: int) -> ArrayDataset:
    data_dir = config.get("data_dir", None) or None  # '' also means "default"
    if cifar10:
        path = find_cifar10_npz(data_dir)
        arrays, num_classes = load_npz(path, num_classes=10)
        mean, std, name = CIFAR10_MEAN, CIFAR10_STD, "cifar10_npz"
        if arrays["x_train"].shape[1:] != (32, 32, 3):
            raise ValueError(f"{path}: cifar10_npz images must be 32x32x3, got "
                             f"{arrays['x_train'].shape[1:]}.")
    else:
        if data_dir is None:
            raise ValueError(
                "config.data_dir is not set; for config.dataset='npz' set it to the "
                "path of a .npz file with x_train, y_train, x_test, y_test.")
        num_classes = config.get("num_classes", None)  # <= 0 means "from the file"
        num_classes = num_classes if num_classes and num_classes > 0 else None
        arrays, num_classes = load_npz(data_dir, num_classes=num_classes)
        mean, std = channel_stats(arrays["x_train"])
        name = "npz"
    height = arrays["x_train"].shape[1]
    # CIFAR-style pad-4 crop for 32x32 images, scaled with the image otherwise.
    pad = 4 if height == 32 else max(1, height // 8)
    return ArrayDataset(
        name=name, arrays=arrays, num_classes=num_classes, mean=mean, std=std,
        batch_size=batch_size, eval_batch_size=eval_batch_size,
        seed=config.get("seed", 0), augment=config.get("augment", True), pad=pad,
        flip=True, process_index=process_index, process_count=process_count)
