"""Tests for dq_jax.data: formats, determinism/resume, per-process split, eval
padding, .npz validation, the CI's CIFAR-10 copy (found through DQ_JAX_SHARED_DATA),
the image-folder converter, and TFDS (mock data only; nothing is downloaded)."""
from __future__ import annotations

import itertools
import os
import pathlib
import time

import ml_collections
import numpy as np
import pytest

from dq_jax.data import DATASETS, Dataset, create_dataset, prefetch
from dq_jax.data import arrays as arrays_lib
from dq_jax.data import folder_to_npz

REPO = pathlib.Path(__file__).resolve().parents[1]
# The CI machines' data copy, next to the checkout. Only the tests look there (the library
# reads config.data_dir or $DQ_JAX_SHARED_DATA); absent in a plain clone: those tests skip.
CI_DATA_DIR = REPO.parent / "shared" / "data"


def make_config(**kwargs) -> ml_collections.ConfigDict:
    base = dict(dataset="digits", batch_size=64, eval_batch_size=64, seed=0,
                data_dir=None, augment=True)
    base.update(kwargs)
    return ml_collections.ConfigDict(base)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def digits_split():
    return arrays_lib.load_digits_split()


@pytest.fixture(scope="module")
def npz32(tmp_path_factory):
    """A tiny CIFAR-shaped .npz of random pixels (300 train / 70 eval, 10 classes)."""
    rng = np.random.default_rng(42)
    path = tmp_path_factory.mktemp("npz32") / "tiny32.npz"
    np.savez(path, x_train=rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 300), label_names=np.array(list("abcdefghij")),
             x_test=rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 70))
    return str(path)


# --------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------
def test_unknown_dataset_names_field_and_choices():
    with pytest.raises(ValueError, match=r"config\.dataset='mnist'.*'digits'.*'imagenet2012'"):
        create_dataset(make_config(dataset="mnist"), process_index=0, process_count=1)
    assert set(DATASETS) == {"digits", "cifar10_npz", "npz", "cifar10", "cifar100",
                             "imagenet2012"}


def test_batch_not_divisible_by_process_count():
    with pytest.raises(ValueError, match=r"config\.batch_size=64"):
        create_dataset(make_config(batch_size=64), process_index=0, process_count=3)
    with pytest.raises(ValueError, match=r"config\.eval_batch_size=10"):
        create_dataset(make_config(batch_size=64, eval_batch_size=10),
                       process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"config\.batch_size"):
        create_dataset(make_config(batch_size=0), process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"larger than the digits train split"):
        create_dataset(make_config(batch_size=4096), process_index=0, process_count=1)


def test_default_process_from_jax():
    ds = create_dataset(make_config())
    assert (ds.process_index, ds.process_count) == (0, 1)


# --------------------------------------------------------------------------
# digits: shapes, dtypes, ranges, epoch contents
# --------------------------------------------------------------------------
def test_digits_shapes_dtypes_ranges(digits_split):
    ds = create_dataset(make_config(batch_size=32, eval_batch_size=50),
                        process_index=0, process_count=1)
    assert isinstance(ds, Dataset)
    assert (ds.name, ds.num_classes, ds.image_shape) == ("digits", 10, (8, 8, 1))
    assert (ds.train_size, ds.eval_size) == (1347, 450)
    assert ds.steps_per_epoch == 1347 // 32
    assert ds.eval_steps == 9
    for batch in take(ds.train_batches(), 3):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (32, 8, 8, 1) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
        assert np.isfinite(batch["image"]).all()
        assert batch["label"].min() >= 0 and batch["label"].max() < 10
    # Normalised with the train mean/std of x/16: over the whole (unaugmented)
    # train split the images have mean 0 and std 1.
    plain = create_dataset(make_config(batch_size=1347, augment=False),
                           process_index=0, process_count=1)
    images = next(plain.train_batches())["image"]
    assert abs(images.mean()) < 1e-4 and abs(images.std() - 1) < 1e-4
    np.testing.assert_allclose(ds.mean, digits_split["x_train"].mean(), rtol=1e-5)


def test_digits_epoch_visits_distinct_examples_with_right_labels(digits_split):
    ds = create_dataset(make_config(batch_size=128, augment=False, seed=7),
                        process_index=0, process_count=1)
    table = (digits_split["x_train"].astype(np.float32) - ds.mean) / ds.std
    table = table.reshape(len(table), -1)  # (the 1347 train images are all distinct)

    def epoch_rows(start):
        rows = []
        for batch in take(ds.train_batches(start), ds.steps_per_epoch):
            flat = batch["image"].reshape(len(batch["image"]), -1)
            dist = ((flat[:, None, :] - table[None]) ** 2).sum(-1)
            idx = dist.argmin(1)
            np.testing.assert_allclose(dist[np.arange(len(idx)), idx], 0, atol=1e-8)
            np.testing.assert_array_equal(batch["label"], digits_split["y_train"][idx])
            rows.extend(idx)
        return np.asarray(rows)

    e0 = epoch_rows(0)
    assert len(e0) == len(np.unique(e0)) == ds.steps_per_epoch * 128
    e1 = epoch_rows(ds.steps_per_epoch)
    assert len(np.unique(e1)) == len(e1)
    assert not np.array_equal(e0, e1)            # reshuffled every epoch
    assert not np.array_equal(e0, np.sort(e0))   # actually shuffled


# --------------------------------------------------------------------------
# Determinism and resume
# --------------------------------------------------------------------------
@pytest.mark.parametrize("source, augment", [("digits", False), ("npz32", True),
                                             ("npz32", False)])
def test_resume_equals_uninterrupted_across_epoch_boundary(request, source, augment):
    if source == "digits":
        cfg = make_config(batch_size=256, seed=11)                   # 5 steps/epoch
    else:
        cfg = make_config(dataset="npz", data_dir=request.getfixturevalue("npz32"),
                          batch_size=60, augment=augment, seed=11)  # 5 steps/epoch
    ds = create_dataset(cfg, process_index=0, process_count=1)
    assert ds.steps_per_epoch == 5
    full = take(ds.train_batches(0), 13)
    for k in (3, 4, 5, 7):
        resumed = take(create_dataset(cfg, process_index=0, process_count=1)
                       .train_batches(k), 13 - k)
        assert_batches_equal(resumed, full[k:])
    # The data really changes from step to step and from seed to seed.
    assert not np.array_equal(full[0]["image"], full[5]["image"])
    cfg.seed = 12
    other = next(create_dataset(cfg, process_index=0, process_count=1).train_batches())
    assert not np.array_equal(other["image"], full[0]["image"])


def test_digits_is_not_augmented():
    aug = take(create_dataset(make_config(augment=True), process_index=0,
                              process_count=1).train_batches(), 2)
    plain = take(create_dataset(make_config(augment=False), process_index=0,
                                process_count=1).train_batches(), 2)
    assert_batches_equal(aug, plain)


def test_cifar_style_augmentation_is_pad4_crop_and_flip(npz32):
    cfg = dict(dataset="npz", data_dir=npz32, batch_size=100, seed=3)
    aug_ds = create_dataset(make_config(augment=True, **cfg), process_index=0, process_count=1)
    plain_ds = create_dataset(make_config(augment=False, **cfg), process_index=0,
                              process_count=1)

    def raw(batch):  # Back to the 0..255 pixel scale.
        return np.rint(batch["image"] * aug_ds.std + aug_ds.mean).astype(int)

    found = []
    for a, p in zip(take(aug_ds.train_batches(), 2), take(plain_ds.train_batches(), 2)):
        np.testing.assert_array_equal(a["label"], p["label"])  # same permutation
        for x, y in zip(raw(a), raw(p)):
            padded = np.pad(y, ((4, 4), (4, 4), (0, 0)))  # zero padding
            match = [(oy, ox, flip) for oy in range(9) for ox in range(9)
                     for flip in (False, True)
                     if np.array_equal(padded[oy:oy + 32, ox:ox + 32][:, ::-1 if flip else 1], x)]
            assert len(match) == 1, "not a pad-4 crop (+ optional flip) of the image"
            found.append(match[0])
    found = np.array(found)
    assert 0.3 < found[:, 2].mean() < 0.7                 # about half are flipped
    assert len(np.unique(found[:, 0])) == len(np.unique(found[:, 1])) == 9  # all offsets


def test_random_crop_flip_matches_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 5, 7, 3), dtype=np.uint8)
    pad = 2
    offsets = rng.integers(0, 2 * pad + 1, size=(6, 2))
    flips = np.array([True, False, True, True, False, False])
    out = arrays_lib.random_crop_flip(images, pad, offsets, flips)
    for i in range(6):
        padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
        ref = padded[offsets[i, 0]:offsets[i, 0] + 5, offsets[i, 1]:offsets[i, 1] + 7]
        if flips[i]:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(out[i], ref)


# --------------------------------------------------------------------------
# Per-process split
# --------------------------------------------------------------------------
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_concatenate_to_global_batch(npz32, process_count):
    # Augmented CIFAR-style data: random crops/flips must also line up.
    cfg = make_config(dataset="npz", data_dir=npz32, batch_size=60, eval_batch_size=32,
                      seed=5)
    single = create_dataset(cfg, process_index=0, process_count=1)
    shards = [create_dataset(cfg, process_index=i, process_count=process_count)
              for i in range(process_count)]
    assert all(s.local_batch_size == 60 // process_count for s in shards)
    assert all(s.steps_per_epoch == single.steps_per_epoch for s in shards)
    assert single.steps_per_epoch == 5 and single.eval_steps == 3
    start = 3  # crosses the epoch boundary at step 5
    glob_train = take(single.train_batches(start), 4)
    local_train = [take(s.train_batches(start), 4) for s in shards]
    for step, g in enumerate(glob_train):
        for key in g:
            cat = np.concatenate([local[step][key] for local in local_train])
            np.testing.assert_array_equal(cat, g[key])
    glob_eval = list(single.eval_batches())
    local_eval = [list(s.eval_batches()) for s in shards]
    assert all(len(le) == len(glob_eval) == s.eval_steps for le, s in zip(local_eval, shards))
    for j, g in enumerate(glob_eval):
        for key in g:
            np.testing.assert_array_equal(
                np.concatenate([le[j][key] for le in local_eval]), g[key])


# --------------------------------------------------------------------------
# Eval: every example exactly once
# --------------------------------------------------------------------------
@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(digits_split, process_count):
    cfg = make_config(batch_size=64, eval_batch_size=64)  # 450 = 7*64 + 2
    table = None
    total_mask = 0.0
    label_hist = np.zeros(10, np.int64)
    seen_images = []
    for p in range(process_count):
        ds = create_dataset(cfg, process_index=p, process_count=process_count)
        if table is None:
            table = (digits_split["x_test"].astype(np.float32) - ds.mean) / ds.std
        batches = list(ds.eval_batches())
        assert len(batches) == ds.eval_steps == 8
        bl = 64 // process_count
        for j, b in enumerate(batches):
            assert set(b) == {"image", "label", "mask"}
            assert b["image"].shape == (bl, 8, 8, 1) and b["image"].dtype == np.float32
            assert b["label"].dtype == np.int32
            assert b["mask"].shape == (bl,) and b["mask"].dtype == np.float32
            assert set(np.unique(b["mask"])) <= {0.0, 1.0}
            total_mask += b["mask"].sum()
            real = b["mask"] == 1
            label_hist += np.bincount(b["label"][real], minlength=10)
            # Real rows are the eval split, in order, and rows of the global batch.
            rows = j * 64 + p * bl + np.arange(bl)
            np.testing.assert_array_equal(real, rows < 450)
            np.testing.assert_allclose(b["image"][real], table[rows[real]], rtol=1e-6)
            np.testing.assert_array_equal(b["label"][real], digits_split["y_test"][rows[real]])
            seen_images.append(rows[real])
    assert total_mask == 450
    np.testing.assert_array_equal(label_hist, np.bincount(digits_split["y_test"], minlength=10))
    seen = np.concatenate(seen_images)
    assert len(seen) == len(np.unique(seen)) == 450


# --------------------------------------------------------------------------
# .npz sources
# --------------------------------------------------------------------------
def write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    data = dict(x_train=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
                y_train=np.arange(40) % 3,
                x_test=rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8),
                y_test=np.arange(10) % 3,
                label_names=np.array(["a", "b", "c"]))
    for k, v in overrides.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    np.savez(path, **data)
    return str(path)


def test_npz_valid_file(tmp_path):
    path = write_npz(tmp_path / "ok.npz")
    ds = create_dataset(make_config(dataset="npz", data_dir=path, batch_size=8,
                                    eval_batch_size=4, num_classes=-1),
                        process_index=0, process_count=1)
    assert (ds.num_classes, ds.image_shape, ds.train_size, ds.eval_size) == (3, (16, 16, 3), 40, 10)
    assert ds.steps_per_epoch == 5 and ds.eval_steps == 3
    b = next(ds.train_batches())
    assert b["image"].shape == (8, 16, 16, 3) and b["label"].dtype == np.int32
    plain = create_dataset(make_config(dataset="npz", data_dir=path, batch_size=40,
                                       augment=False), process_index=0, process_count=1)
    x = next(plain.train_batches())["image"]
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-4)
    assert sum(e["mask"].sum() for e in ds.eval_batches()) == 10


@pytest.mark.parametrize("overrides, pattern", [
    (dict(y_test=None), r"missing key\(s\) \['y_test'\]"),
    (dict(y_train=np.arange(40) % 3 + 2), r"26 of 40 y_train labels lie outside \[0, 2\] "
                                          r"\(values \[3, 4\]\) for 3 classes"),
    (dict(y_test=-(np.arange(10) % 3)), r"6 of 10 y_test labels lie outside \[0, 2\] "
                                        r"\(values \[-2, -1\]\)"),
    # Without label_names the count comes from the largest label: one stray label must not
    # make up classes (an 11- or 256-class model).
    (dict(label_names=None, y_train=np.r_[np.arange(39) % 3, 10]),
     r"the labels imply 11 classes \(the largest label, 10, is on 1 example\(s\)\), but "
     r"y_train has no example of 7 of them \(\[3, 4, 5, 6, 7\]\.\.\.\): .*0..10"),
    (dict(label_names=None, y_test=np.r_[np.arange(9) % 3, 255]),
     r"imply 256 classes \(the largest label, 255, is on 1 example\(s\)\), but y_train "
     r"has no example of 253 of them"),
    (dict(label_names=None, y_train=np.r_[np.arange(39) % 4, 3]),
     r"imply 4 classes \(the largest label, 3, is on 10 example\(s\)\), but y_test has "
     r"no example of 1 of them \(\[3\]\)"),
    (dict(y_train=np.array([{"label": 1}] * 40, dtype=object)),
     r"y_train is a pickled \(object\) array, which is not loaded"),
    (dict(x_train=np.zeros((40, 16, 16, 3), np.float32)), r"x_train has dtype float32"),
    (dict(x_test=np.zeros((10, 16, 16), np.uint8)), r"x_test has shape \(10, 16, 16\)"),
    (dict(y_train=np.zeros(39, np.int64)), r"x_train has 40 examples but y_train has 39"),
    (dict(y_train=np.zeros(40, np.float32)), r"y_train has dtype float32"),
    (dict(x_test=np.zeros((10, 8, 8, 3), np.uint8)), r"differ in shape"),
])
def test_npz_validation_errors(tmp_path, overrides, pattern):
    path = write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=pattern) as info:
        create_dataset(make_config(dataset="npz", data_dir=path, batch_size=8),
                       process_index=0, process_count=1)
    assert "bad.npz" in str(info.value)


def test_npz_missing_file_and_missing_data_dir(tmp_path):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        create_dataset(make_config(dataset="npz", data_dir=missing),
                       process_index=0, process_count=1)
    for data_dir in (None, ""):
        with pytest.raises(ValueError, match=r"config\.data_dir"):
            create_dataset(make_config(dataset="npz", data_dir=data_dir),
                           process_index=0, process_count=1)


def test_cifar10_npz_lookup_and_missing_message(tmp_path, monkeypatch):
    monkeypatch.setenv(arrays_lib.SHARED_DATA_ENV, str(tmp_path / "env"))
    assert arrays_lib.cifar10_npz_candidates(None) == [tmp_path / "env" / "cifar10.npz"]
    # Without the variable the library has no default location (nothing outside the repo).
    monkeypatch.delenv(arrays_lib.SHARED_DATA_ENV)
    assert arrays_lib.cifar10_npz_candidates(None) == []
    with pytest.raises(FileNotFoundError, match=r"config\.data_dir is not set and neither is "
                       r"DQ_JAX_SHARED_DATA.*tfds build cifar10"):
        create_dataset(make_config(dataset="cifar10_npz"), process_index=0, process_count=1)
    monkeypatch.setenv(arrays_lib.SHARED_DATA_ENV, str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as info:
        create_dataset(make_config(dataset="cifar10_npz", data_dir=str(tmp_path)),
                       process_index=0, process_count=1)
    msg = str(info.value)
    assert str(tmp_path / "cifar10.npz") in msg
    assert "config.data_dir" in msg and "DQ_JAX_SHARED_DATA" in msg
    # The environment variable is honoured.
    (tmp_path / "env").mkdir()
    write_npz(tmp_path / "env" / "cifar10.npz",
              x_train=np.zeros((40, 32, 32, 3), np.uint8),
              x_test=np.zeros((10, 32, 32, 3), np.uint8), label_names=None)
    for data_dir in (None, ""):  # '' (the base config's value) means the default too
        ds = create_dataset(make_config(dataset="cifar10_npz", batch_size=8, data_dir=data_dir),
                            process_index=0, process_count=1)
        assert (ds.train_size, ds.num_classes, ds.image_shape) == (40, 10, (32, 32, 3))


@pytest.fixture
def ci_cifar10_env(monkeypatch):
    """DQ_JAX_SHARED_DATA pointing at the CI copy of cifar10.npz, or a skip saying why."""
    if not os.environ.get(arrays_lib.SHARED_DATA_ENV) and CI_DATA_DIR.is_dir():
        monkeypatch.setenv(arrays_lib.SHARED_DATA_ENV, str(CI_DATA_DIR))
    if not any(p.is_file() for p in arrays_lib.cifar10_npz_candidates(None)):
        pytest.skip(f"no CI copy of cifar10.npz (set {arrays_lib.SHARED_DATA_ENV} to the "
                    f"directory holding it; looked at: "
                    f"{[str(p) for p in arrays_lib.cifar10_npz_candidates(None)]})")


def test_cifar10_npz_real_shared_file(ci_cifar10_env):
    cfg = make_config(dataset="cifar10_npz", batch_size=500, eval_batch_size=1000,
                      augment=False)
    ds = create_dataset(cfg, process_index=0, process_count=1)
    assert (ds.train_size, ds.eval_size, ds.num_classes) == (50000, 10000, 10)
    assert ds.image_shape == (32, 32, 3) and ds.steps_per_epoch == 100
    batches = take(ds.train_batches(), 4)
    x = np.concatenate([b["image"] for b in batches])
    # The file is sorted by class: the shuffled batches must mix classes.
    assert len(np.unique(batches[0]["label"])) == 10
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=0.05)
    np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=0.05)
    first_eval = next(ds.eval_batches())
    assert first_eval["image"].shape == (1000, 32, 32, 3)
    assert (first_eval["label"] == 0).all() and first_eval["mask"].sum() == 1000
    aug = next(create_dataset(make_config(dataset="cifar10_npz", batch_size=500),
                              process_index=0, process_count=1).train_batches())
    np.testing.assert_array_equal(aug["label"], batches[0]["label"])
    assert not np.array_equal(aug["image"], batches[0]["image"])


# --------------------------------------------------------------------------
# prefetch
# --------------------------------------------------------------------------
def test_prefetch_preserves_order_and_errors():
    assert list(prefetch(iter(range(20)), size=3)) == list(range(20))

    def failing():
        yield 1
        raise RuntimeError("boom")

    it = prefetch(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)
    ds = create_dataset(make_config(), process_index=0, process_count=1)
    assert_batches_equal(take(prefetch(ds.train_batches(2)), 3), take(ds.train_batches(2), 3))
    it = prefetch(itertools.count())
    next(it)
    it.close()  # Must not hang.
    with pytest.raises(ValueError):
        prefetch(iter([]), size=0)


# --------------------------------------------------------------------------
# TFDS (mock data; no network)
# --------------------------------------------------------------------------
MOCK_EXAMPLES = 48


@pytest.fixture(scope="module")
def tfds_mock_dir(tmp_path_factory):
    """A data_dir holding only TFDS metadata (dataset_info.json) for the mocks.

    It makes the datasets look prepared on disk with small split sizes, so the
    real on-disk check passes and tfds.testing.mock_data serves random examples.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    data_dir = tmp_path_factory.mktemp("tfds")
    for name, splits in (("cifar10", ("train", "test")),
                         ("imagenet2012", ("train", "validation"))):
        builder = tfds.builder(name, data_dir=str(data_dir))
        builder.info.set_splits(tfds.core.SplitDict([
            tfds.core.SplitInfo(
                name=split, shard_lengths=[MOCK_EXAMPLES], num_bytes=0,
                filename_template=tfds.core.ShardedFileTemplate(
                    data_dir=builder.data_dir, dataset_name=name, split=split,
                    template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                    filetype_suffix="tfrecord"))
            for split in splits]))
        os.makedirs(builder.data_dir, exist_ok=True)
        builder.info.write_to_directory(builder.data_dir)
    return str(data_dir)


def test_tfds_cifar10_mock_batches_resume_and_eval(tfds_mock_dir):
    import tensorflow_datasets as tfds
    cfg = make_config(dataset="cifar10", data_dir=tfds_mock_dir, batch_size=16,
                      eval_batch_size=20, seed=3)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=tfds_mock_dir):
        ds = create_dataset(cfg, process_index=0, process_count=1)
        assert (ds.num_classes, ds.image_shape, ds.train_size) == (10, (32, 32, 3), 48)
        assert ds.steps_per_epoch == 3
        full = take(ds.train_batches(), 7)
        b = full[0]
        assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (16,) and b["label"].dtype == np.int32
        assert np.isfinite(b["image"]).all() and 0 <= b["label"].min() <= b["label"].max() < 10
        # Resume (crossing the epoch boundary at 3 and 6) sees the same data.
        assert_batches_equal(take(ds.train_batches(4), 3), full[4:])
        assert not np.array_equal(full[0]["image"], full[3]["image"])
        evals = list(ds.eval_batches())
        assert len(evals) == ds.eval_steps == 3
        assert sum(e["mask"].sum() for e in evals) == 48
        assert evals[-1]["mask"].tolist() == [1.0] * 8 + [0.0] * 12
        # Two processes: each reads its own half of the eval split, padded to
        # the same number of batches; together they count every example once.
        shards = [create_dataset(cfg, process_index=i, process_count=2) for i in range(2)]
        per_process = [list(s.eval_batches()) for s in shards]
        assert [len(e) for e in per_process] == [shards[0].eval_steps] * 2 == [3, 3]
        assert [sum(b["mask"].sum() for b in e) for e in per_process] == [24, 24]
        assert per_process[0][0]["image"].shape == (10, 32, 32, 3)


def test_tfds_imagenet2012_mock_batches(tfds_mock_dir):
    import tensorflow_datasets as tfds
    cfg = make_config(dataset="imagenet2012", data_dir=tfds_mock_dir, batch_size=8,
                      eval_batch_size=8, image_size=32, seed=1)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=tfds_mock_dir):
        ds = create_dataset(cfg, process_index=1, process_count=2)
        assert (ds.num_classes, ds.image_shape) == (1000, (32, 32, 3))
        assert ds.steps_per_epoch == 6 and ds.local_batch_size == 4
        first = take(ds.train_batches(), 2)
        b = first[0]
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        assert np.isfinite(b["image"]).all() and b["label"].max() < 1000
        assert_batches_equal(take(ds.train_batches(1), 1), first[1:])
        e = next(ds.eval_batches())
        assert e["image"].shape == (4, 32, 32, 3) and e["mask"].tolist() == [1.0] * 4


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet2012"])
def test_tfds_missing_dataset_fails_fast(tmp_path, name):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        create_dataset(make_config(dataset=name, data_dir=str(tmp_path)),
                       process_index=0, process_count=1)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert name in msg and str(tmp_path) in msg
    assert f"tfds build {name}" in msg and "download_and_prepare" in msg
    if name == "imagenet2012":
        assert "manual_dir" in msg and "ILSVRC2012_img_train.tar" in msg


# --------------------------------------------------------------------------
# Image folder -> .npz converter (dq_jax.data.folder_to_npz)
# --------------------------------------------------------------------------
CLASS_COLOURS = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}


def _save_image(path: pathlib.Path, array: np.ndarray, fmt: str = "PNG") -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def _class_image(name: str, i: int, shape=(6, 5)) -> np.ndarray:
    """A distinct, exactly recoverable RGB image per (class, i)."""
    a = np.zeros((*shape, 3), np.uint8)
    a[...] = CLASS_COLOURS[name]
    a[0, 0] = (i, i, i)
    return a


@pytest.fixture
def image_tree(tmp_path):
    """IMAGES/train/<class>/ (4 per class) and IMAGES/test/<class>/ (2 per class), PNG."""
    pytest.importorskip("PIL")
    root = tmp_path / "images"
    for split, n in (("train", 4), ("test", 2)):
        for name in CLASS_COLOURS:
            for i in range(n):
                _save_image(root / split / name / f"{i:03d}.png", _class_image(name, i))
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"ignored")
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    return root


def test_folder_to_npz_train_test_layout_roundtrips_pixels(image_tree, tmp_path, capsys):
    out = tmp_path / "data.npz"
    assert folder_to_npz.main([f"--src={image_tree}", f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "12 train / 6 test images of 6x5x3, 3 classes (cat, dog, emu)" in printed
    assert f"--config.dataset=npz --config.data_dir={out}" in printed
    with np.load(out) as f:
        data = {k: f[k] for k in f.files}
    assert sorted(data) == ["label_names", "x_test", "x_train", "y_test", "y_train"]
    assert data["label_names"].tolist() == ["cat", "dog", "emu"]
    assert data["x_train"].dtype == np.uint8 and data["x_train"].shape == (12, 6, 5, 3)
    assert data["y_train"].dtype == np.int32 and data["y_train"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data["y_test"].tolist() == [0, 0, 1, 1, 2, 2]
    for x, y, n in ((data["x_train"], data["y_train"], 4), (data["x_test"], data["y_test"], 2)):
        for row, (img, label) in enumerate(zip(x, y)):
            name = data["label_names"][label]
            np.testing.assert_array_equal(img, _class_image(name, row % n))
    # The training program reads it as config.dataset='npz'.
    ds = create_dataset(make_config(dataset="npz", data_dir=str(out), batch_size=4,
                                    eval_batch_size=4), process_index=0, process_count=1)
    assert (ds.train_size, ds.eval_size, ds.num_classes, ds.image_shape) == (12, 6, 3, (6, 5, 3))
    assert next(ds.train_batches())["image"].shape == (4, 6, 5, 3)


def test_folder_to_npz_cli_as_a_module(image_tree, tmp_path):
    from tests.helpers import run_python
    out = tmp_path / "cli"  # .npz is appended
    proc = run_python(["-m", "dq_jax.data.folder_to_npz", f"--src={image_tree}",
                       f"--out={out}", "--image_size=4", "--compress"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    arrays, classes = arrays_lib.load_npz(tmp_path / "cli.npz")
    assert classes == 3 and arrays["x_train"].shape == (12, 4, 4, 3)


def test_folder_to_npz_class_folders_split_stratified_and_seeded(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "flat"
    counts = {"cat": 10, "dog": 5, "emu": 2}
    for name, n in counts.items():
        for i in range(n):
            _save_image(root / name / f"{i}.png", _class_image(name, i))
    a = folder_to_npz.folder_to_arrays(root, test_fraction=0.2, seed=0)
    test_counts = np.bincount(a["y_test"], minlength=3).tolist()
    assert test_counts == [2, 1, 1]  # 20% of each class, at least one
    assert np.bincount(a["y_train"], minlength=3).tolist() == [8, 4, 1]
    assert a["label_names"].tolist() == ["cat", "dog", "emu"]
    again = folder_to_npz.folder_to_arrays(root, test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(a["x_test"], again["x_test"])
    other = folder_to_npz.folder_to_arrays(root, test_fraction=0.2, seed=1)
    assert not np.array_equal(a["x_test"], other["x_test"])
    # Every image lands in exactly one split.
    pixels = sorted(int(v) for v in np.concatenate([a["x_train"], a["x_test"]])[:, 0, 0, 0])
    assert len(pixels) == sum(counts.values())
    default = folder_to_npz.folder_to_arrays(root)  # 10% default
    assert np.bincount(default["y_test"], minlength=3).tolist() == [1, 1, 1]


def test_folder_to_npz_sizes_channels_and_formats(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "mixed"
    _save_image(root / "train" / "a" / "big.png", np.full((20, 10, 3), 50, np.uint8))
    _save_image(root / "train" / "a" / "small.jpg", np.full((8, 8, 3), 60, np.uint8), "JPEG")
    _save_image(root / "test" / "a" / "t.bmp", np.full((8, 8, 3), 70, np.uint8), "BMP")
    with pytest.raises(ValueError, match=r"differ in size.*--image_size"):
        folder_to_npz.folder_to_arrays(root)
    a = folder_to_npz.folder_to_arrays(root, image_size="6x4")
    assert a["x_train"].shape == (2, 6, 4, 3) and a["x_test"].shape == (1, 6, 4, 3)
    assert abs(int(a["x_test"][0].mean()) - 70) <= 1
    gray = tmp_path / "gray"
    for split in ("train", "val"):
        for name in ("x", "y"):
            _save_image(gray / split / name / "0.png", np.full((5, 5), 9, np.uint8))
    g = folder_to_npz.folder_to_arrays(gray)
    assert g["x_train"].shape == (2, 5, 5, 1) and (g["x_train"] == 9).all()
    assert folder_to_npz.folder_to_arrays(gray, channels=3)["x_test"].shape == (2, 5, 5, 3)


def test_folder_to_npz_errors_name_the_problem(tmp_path, capsys):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        folder_to_npz.folder_to_arrays(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        folder_to_npz.folder_to_arrays(tmp_path / "empty")
    only_train = tmp_path / "only_train"
    _save_image(only_train / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"train/ but no test/"):
        folder_to_npz.folder_to_arrays(only_train)
    bad = tmp_path / "bad"
    _save_image(bad / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _save_image(bad / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    (bad / "b").mkdir()
    with pytest.raises(ValueError, match=r"b: class folder holds no images"):
        folder_to_npz.folder_to_arrays(bad)
    (bad / "b" / "broken.png").write_bytes(b"not a png")
    assert folder_to_npz.main([f"--src={bad}", f"--out={tmp_path / 'o.npz'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0] and "cannot be read as an image" in err[0]
    with pytest.raises(ValueError, match="expected N or HxW"):
        folder_to_npz.folder_to_arrays(only_train, image_size="big")
    extra = tmp_path / "extra_test_class"
    _save_image(extra / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    _save_image(extra / "test" / "z" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"classes \['z'\] have no train/ folder"):
        folder_to_npz.folder_to_arrays(extra)


def test_predict_refuses_pickled_npz_arrays_naming_the_file(tmp_path):
    """predict's --images .npz: a pickled (object) labels or images array is an error naming
    the file, not numpy's bare 'Object arrays cannot be loaded'."""
    from dq_jax import predict
    path = str(tmp_path / "pickled.npz")
    np.savez(path, x_test=np.zeros((2, 8, 8), np.uint8),
             y_test=np.array([{"label": 1}, {"label": 2}], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz: y_test is a pickled \(object\) array"):
        predict.load_labels(path, 2)
    np.savez(path, images=np.array([None, None], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz: images is a pickled \(object\) array"):
        predict.load_images(path, (8, 8, 1))
