"""TFDS + tf.data pipelines for cifar10, cifar100 and imagenet2012.

Design points (why):
- Fail fast: the prepared dataset directory is checked on disk *before*
  TensorFlow is imported or a builder is made, and GCS lookups are disabled, so
  a missing dataset raises FileNotFoundError with preparation instructions
  instead of hanging on (or trying) the network.
- Per-host input: each process reads only its own contiguous shard of a split
  (``tfds.split_for_jax_process``), as the Flax ImageNet example does. Unlike
  the in-memory sources, the per-process batches are therefore disjoint shards
  rather than row-slices of one global permutation (reading and decoding the
  whole of ImageNet on every host would not scale).
- Deterministic and resumable: epoch ``e`` reads the shard with file order and
  a shuffle buffer both seeded by ``(seed, e)`` (``reshuffle_each_iteration=
  False``), keeps the first ``steps_per_epoch * B_local`` examples, and skips
  ``(step % steps_per_epoch) * B_local`` of them to resume. Augmentation uses
  stateless ops keyed by ``(seed, process_index, stream position)``, where the
  stream position is ``step * B_local + row``. Images are decoded after the
  shuffle and skip, so skipping costs reads, not decodes. (tf.data's seeded
  shuffle also depends on TF's global seed: do not call tf.random.set_seed
  differently between a run and its resumption.)
"""
from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import numpy as np

from dq_jax.data import base
from dq_jax.data.arrays import CIFAR10_MEAN, CIFAR10_STD

CIFAR100_MEAN = (129.3, 124.1, 112.4)
CIFAR100_STD = (68.2, 65.4, 70.4)
IMAGENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
IMAGENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))
EVAL_CROP_RATIO = 0.875  # ImageNet eval: center crop of 0.875 * shorter side.
CIFAR_PAD = 4
# In-memory shuffle buffer: a whole shard for small datasets (an exact
# permutation), bounded for ImageNet (encoded JPEGs are ~110 KB each).
SMALL_DATASET = 100_000
LARGE_SHUFFLE_BUFFER = 10_000

SPECS: dict[str, dict[str, Any]] = {
    "cifar10": dict(train="train", eval="test", mean=CIFAR10_MEAN, std=CIFAR10_STD,
                    kind="cifar"),
    "cifar100": dict(train="train", eval="test", mean=CIFAR100_MEAN, std=CIFAR100_STD,
                     kind="cifar"),
    "imagenet2012": dict(train="train", eval="validation", mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, kind="imagenet"),
}


def default_data_dir() -> str:
    """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR")
                              or os.path.join("~", "tensorflow_datasets"))


def prepared_versions(name: str, data_dir: str) -> list[str]:
    """Versions of ``name`` prepared under ``data_dir`` (dirs with dataset_info.json)."""
    pattern = os.path.join(data_dir, name, "*", "dataset_info.json")
    if "://" in data_dir:  # gs://... : only then is TensorFlow's gfile needed.
        from dq_jax import extras
        extras.require("train", "reading TFDS datasets", modules=["tensorflow"])
        import tensorflow as tf
        found = tf.io.gfile.glob(pattern)
    else:
        found = glob.glob(pattern)
    return sorted(os.path.basename(os.path.dirname(p)) for p in found)


def prepare_instructions(name: str, data_dir: str) -> str:
    """How to prepare ``name`` into ``data_dir`` (included in every error)."""
    if name == "imagenet2012":
        return (
            "ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar "
            "and ILSVRC2012_img_val.tar in a manual_dir, then run "
            f"`tfds build imagenet2012 --data_dir={data_dir} --manual_dir=MANUAL_DIR` "
            f"or, in Python, `tfds.builder('imagenet2012', data_dir={data_dir!r})"
            ".download_and_prepare(download_config=tfds.download.DownloadConfig("
            "manual_dir=MANUAL_DIR))`. Then set config.data_dir (or TFDS_DATA_DIR) "
            "to that data_dir.")
    return (
        f"Prepare it once on a machine with network access: `tfds build {name} "
        f"--data_dir={data_dir}` or, in Python, `tfds.builder({name!r}, "
        f"data_dir={data_dir!r}).download_and_prepare()`; then set config.data_dir "
        "(or TFDS_DATA_DIR) to that data_dir.")


def check_prepared(name: str, data_dir: str) -> list[str]:
    """Raises FileNotFoundError unless ``name`` is prepared under ``data_dir``."""
    versions = prepared_versions(name, data_dir)
    if not versions:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} (looked "
            f"for {os.path.join(data_dir, name, '<version>', 'dataset_info.json')}). "
            + prepare_instructions(name, data_dir))
    return versions


def _import_tf():
    """Imports TF + TFDS with TF kept off accelerators and GCS lookups disabled."""
    from dq_jax import extras
    extras.require("train", "reading TFDS datasets",
                   modules=["tensorflow", "tensorflow_datasets"])
    import tensorflow as tf
    try:  # The accelerators belong to JAX; TF only runs the input pipeline.
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # Already initialised / no such type.
        pass
    import tensorflow_datasets as tfds
    try:
        from tensorflow_datasets.core.utils import gcs_utils
        gcs_utils._is_gcs_disabled = True  # pylint: disable=protected-access
    except (ImportError, AttributeError):
        pass
    return tf, tfds


class TfdsDataset(base.Dataset):
    """A TFDS image-classification dataset; see the module docstring."""

    def __init__(self, name: str, config: Any, *, batch_size: int,
                 eval_batch_size: int, process_index: int, process_count: int):
        spec = SPECS[name]
        data_dir = config.get("data_dir", None) or default_data_dir()
        data_dir = os.path.expanduser(str(data_dir))
        versions = check_prepared(name, data_dir)  # Before any TF import.

        tf, tfds = _import_tf()
        self._tf, self._tfds = tf, tfds
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r}: data_dir={data_dir!r} holds version(s) "
                f"{versions}, but this TFDS reads version {builder.version}. "
                + prepare_instructions(name, data_dir))
        self._builder = builder
        info = builder.info

        self.name, self._kind = name, spec["kind"]
        self.num_classes = int(info.features["label"].num_classes)
        if self._kind == "imagenet":
            size = base.positive_int("image_size", config.get("image_size", 224))
        else:
            size = 32
        self.image_shape = (size, size, 3)
        self.mean = np.asarray(spec["mean"], np.float32)
        self.std = np.asarray(spec["std"], np.float32)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.process_index, self.process_count = process_index, process_count
        self.seed = int(config.get("seed", 0))
        self.augment = bool(config.get("augment", True))

        self.train_size = int(info.splits[spec["train"]].num_examples)
        self.eval_size = int(info.splits[spec["eval"]].num_examples)
        self.steps_per_epoch = base.steps_per_epoch_for(name, self.train_size, batch_size)
        self._train_split = tfds.split_for_jax_process(
            spec["train"], process_index=process_index, process_count=process_count)
        self._eval_split = tfds.split_for_jax_process(
            spec["eval"], process_index=process_index, process_count=process_count)
        self._train_shard = int(info.splits[self._train_split].num_examples)
        self._eval_shard = int(info.splits[self._eval_split].num_examples)
        # Shards differ by at most one example, so this fits every process.
        assert self.steps_per_epoch * self.local_batch_size <= self._train_shard
        # The largest shard decides; every process yields the same count.
        self.eval_steps = base.ceil_div(
            base.ceil_div(self.eval_size, process_count), self.local_eval_batch_size)
        buffer = config.get("shuffle_buffer_size", None)
        if buffer is None:
            buffer = (self._train_shard if self.train_size <= SMALL_DATASET
                      else LARGE_SHUFFLE_BUFFER)
        self.shuffle_buffer_size = base.positive_int("shuffle_buffer_size", buffer)
        self._aug_seed = base.derive_seed(self.seed, base.AUGMENT_TAG, 0)

    # -- tf.data pieces ----------------------------------------------------
    def _read(self, split, *, shuffle_seed: int | None):
        tf, tfds = self._tf, self._tfds
        options = tf.data.Options()
        options.deterministic = True
        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
            options=options)
        return self._builder.as_dataset(
            split=split, shuffle_files=shuffle_seed is not None,
            decoders={"image": tfds.decode.SkipDecoding()}, read_config=read_config)

    def _normalize(self, image):
        tf = self._tf
        image = (tf.cast(image, tf.float32) - self.mean) / self.std
        image.set_shape(self.image_shape)
        return image

    def _resize(self, image):
        tf = self._tf
        size = self.image_shape[0]
        return tf.image.resize(image, [size, size], method="bicubic")

    def _center_crop(self, encoded):
        tf = self._tf
        shape = tf.io.extract_jpeg_shape(encoded)
        h, w = shape[0], shape[1]
        crop = tf.maximum(tf.cast(EVAL_CROP_RATIO * tf.cast(tf.minimum(h, w), tf.float32),
                                  tf.int32), 1)
        window = tf.stack([(h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop])
        return self._resize(tf.io.decode_and_crop_jpeg(encoded, window, channels=3))

    def _inception_crop(self, encoded, key):
        """Random-resized crop (area 8-100%, aspect 3/4-4/3), as in Inception."""
        tf = self._tf
        shape = tf.io.extract_jpeg_shape(encoded)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=key, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        # The op returns the whole image when no box was found in max_attempts;
        # then use the eval center crop instead (as the Flax example does).
        failed = tf.logical_and(tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1]))
        return tf.cond(
            failed, lambda: self._center_crop(encoded),
            lambda: self._resize(tf.io.decode_and_crop_jpeg(encoded, window, channels=3)))

    def _train_map(self, pos, example):
        tf = self._tf
        key = tf.stack([tf.constant(self._aug_seed, tf.int64),
                        pos * self.process_count + self.process_index])
        crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        encoded = example["image"]
        if self._kind == "imagenet":
            if self.augment:
                image = self._inception_crop(encoded, crop_key)
                image = tf.image.stateless_random_flip_left_right(image, flip_key)
            else:
                image = self._center_crop(encoded)
        else:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            image.set_shape(self.image_shape)
            if self.augment:
                image = tf.pad(image, [[CIFAR_PAD, CIFAR_PAD], [CIFAR_PAD, CIFAR_PAD], [0, 0]])
                image = tf.image.stateless_random_crop(image, self.image_shape, crop_key)
                image = tf.image.stateless_random_flip_left_right(image, flip_key)
        return {"image": self._normalize(image),
                "label": tf.cast(example["label"], tf.int32)}

    def _eval_map(self, example):
        tf = self._tf
        encoded = example["image"]
        if self._kind == "imagenet":
            image = self._center_crop(encoded)
        else:
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        return {"image": self._normalize(image),
                "label": tf.cast(example["label"], tf.int32),
                "mask": tf.constant(1.0, tf.float32)}

    def train_epoch(self, epoch: int, offset: int = 0):
        """tf.data pipeline of epoch ``epoch`` from its ``offset``-th batch on."""
        tf = self._tf
        bl, spe = self.local_batch_size, self.steps_per_epoch
        seed_e = base.derive_seed(self.seed, base.SHUFFLE_TAG, epoch)
        ds = self._read(self._train_split, shuffle_seed=seed_e)
        ds = ds.shuffle(self.shuffle_buffer_size, seed=seed_e, reshuffle_each_iteration=False)
        ds = ds.take(spe * bl).skip(offset * bl)
        ds = ds.enumerate(start=(epoch * spe + offset) * bl)
        ds = ds.map(self._train_map, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        return ds.batch(bl, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    # -- public API --------------------------------------------------------
    def train_batches(self, start_step: int = 0) -> Iterator[base.Batch]:
        step = self._check_start_step(start_step)
        epoch, offset = divmod(step, self.steps_per_epoch)
        while True:
            yield from self.train_epoch(epoch, offset).as_numpy_iterator()
            epoch, offset = epoch + 1, 0

    def eval_batches(self) -> Iterator[base.Batch]:
        tf = self._tf
        bl = self.local_eval_batch_size
        ds = self._read(self._eval_split, shuffle_seed=None).take(self._eval_shard)
        ds = ds.map(self._eval_map, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        padding = tf.data.Dataset.from_tensors({
            "image": tf.zeros(self.image_shape, tf.float32),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0, tf.float32)}).repeat()
        ds = ds.concatenate(padding).take(self.eval_steps * bl)
        ds = ds.batch(bl, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        yield from ds.as_numpy_iterator()
