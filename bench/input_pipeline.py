"""Input-pipeline throughput vs the train step's consumption rate (images/s), in one run.

  python bench/input_pipeline.py            # uses results/step_time_*.json when present

Pipelines timed (compile/warm-up batches excluded):
  * cifar10_npz: `dq_jax.data.create_dataset(...).train_batches()` of the shared CIFAR-10 copy
    (pad-4 crop + flip + normalise, numpy), batch 128 - what configs/cifar10_resnet20.py reads.
  * imagenet_jpeg: the TFDS ImageNet train map of `dq_jax/data/tfds_source.py` - the module's
    own `TfdsDataset._train_map` (JPEG decode-and-crop with Inception random-resized crop,
    bicubic resize to 224, flip, normalise) via tf.data with AUTOTUNE parallelism and
    batching - on synthetic 256x256 JPEGs held in memory (no TFDS build: the record reading
    is left out, only what the module does after reading).
The consumer: the jitted DQ W2A2 train step's images/s from bench/step_time.py's JSON
(`--step_json`, default results/step_time_<model>.json), else measured here.
Prints `<pipeline>_pipeline_over_step=<x>` and, last, `pipeline_over_step=<min over pipelines
with a measured consumer>`; > 1 means the pipeline is not the bottleneck.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=30, help="timed cifar batches")
    p.add_argument("--jpeg_batches", type=int, default=6, help="timed ImageNet-style batches")
    p.add_argument("--num_jpegs", type=int, default=320, help="synthetic JPEGs (cycled)")
    p.add_argument("--cifar_step_json", default=str(ROOT / "results" / "step_time_resnet20.json"))
    p.add_argument("--imagenet_step_json",
                   default=str(ROOT / "results" / "step_time_resnet18.json"))
    p.add_argument("--json", default="", help="also write the numbers here")
    return p.parse_args(argv)


def time_iter(it, n: int, warm: int = 2) -> tuple[float, int]:
    for _ in range(warm):
        next(it)
    t0 = time.perf_counter()
    images = 0
    for _ in range(n):
        b = next(it)
        images += len(b["image"])
    return images / (time.perf_counter() - t0), images


def cifar_pipeline(args) -> float:
    import ml_collections
    from dq_jax import data
    cfg = ml_collections.ConfigDict(dict(dataset="cifar10_npz", batch_size=args.batch,
                                         eval_batch_size=500, seed=0, augment=True,
                                         data_dir=""))
    ds = data.create_dataset(cfg, process_index=0, process_count=1)
    rate, _ = time_iter(ds.train_batches(0), args.batches)
    return rate


def synthetic_jpegs(tf, n: int, size: int = 256, seed: int = 0):
    """Photo-like JPEGs (smooth colour fields + texture noise), quality 90."""
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        base = np.stack([np.sin(6.28 * (rng.random() * 3 * xx + rng.random() * 3 * yy) + c)
                         for c in rng.random(3) * 6.28], -1)
        img = 127.5 + 80 * base + rng.normal(0, 20, (size, size, 3))
        out.append(tf.io.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90).numpy())
    return out


def imagenet_pipeline(args) -> tuple[float, float]:
    import numpy as np
    from dq_jax.data import base, tfds_source
    tf, _ = tfds_source._import_tf()  # pylint: disable=protected-access
    # The module's own map functions, on an object configured as the imagenet2012 source
    # would be (no TFDS builder: the records come from memory).
    src = object.__new__(tfds_source.TfdsDataset)
    src._tf, src._kind = tf, "imagenet"
    src.image_shape = (224, 224, 3)
    src.mean = np.asarray(tfds_source.IMAGENET_MEAN, np.float32)
    src.std = np.asarray(tfds_source.IMAGENET_STD, np.float32)
    src.process_index, src.process_count, src.augment = 0, 1, True
    src._aug_seed = base.derive_seed(0, base.AUGMENT_TAG, 0)
    jpegs = synthetic_jpegs(tf, args.num_jpegs)
    mean_kb = float(np.mean([len(j) for j in jpegs])) / 1024
    ds = tf.data.Dataset.from_tensor_slices(
        {"image": tf.constant(jpegs), "label": tf.constant(np.arange(len(jpegs)) % 1000)})
    ds = ds.repeat().enumerate().map(src._train_map, num_parallel_calls=tf.data.AUTOTUNE,
                                     deterministic=True)
    ds = ds.batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    rate, _ = time_iter(ds.as_numpy_iterator(), args.jpeg_batches, warm=1)
    return rate, mean_kb


def step_rate(path: str, method: str = "dq_w2a2") -> tuple[float | None, str]:
    p = pathlib.Path(path)
    if not p.exists():
        return None, f"{p} missing (run bench/step_time.py --json={p})"
    d = json.loads(p.read_text())
    row = d["rows"].get(method)
    if row is None:
        return None, f"{p} has no {method}"
    return d["args"]["batch"] / row["seconds"], \
        f"{d['args']['model']} {method} batch {d['args']['batch']} from {p.name}"


def main(argv=None):
    args = parse_args(argv)
    out = {}
    cifar = cifar_pipeline(args)
    print(f"cifar10_npz pipeline: {cifar:,.0f} images/s (batch {args.batch}, 1 thread, numpy)",
          flush=True)
    out["cifar10_npz_images_per_s"] = cifar
    try:
        jpeg, kb = imagenet_pipeline(args)
        print(f"imagenet_jpeg pipeline: {jpeg:,.0f} images/s (synthetic 256x256 JPEGs, "
              f"{kb:.0f} KB mean; inception crop 224 + flip, tf.data AUTOTUNE)", flush=True)
        out["imagenet_jpeg_images_per_s"] = jpeg
    except ImportError as e:
        jpeg = None
        print(f"imagenet_jpeg pipeline: skipped (TensorFlow missing: {e})")
    ratios = []
    for name, rate, path in (("cifar10_npz", cifar, args.cifar_step_json),
                             ("imagenet_jpeg", jpeg, args.imagenet_step_json)):
        consumer, how = step_rate(path)
        if rate is None or consumer is None:
            print(f"# {name}: no consumer rate ({how})")
            continue
        r = rate / consumer
        ratios.append(r)
        out[f"{name}_consumer_images_per_s"] = consumer
        out[f"{name}_pipeline_over_step"] = r
        print(f"{name}: train step consumes {consumer:,.0f} images/s ({how})")
        print(f"{name}_pipeline_over_step={r:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    if ratios:
        print(f"pipeline_over_step={min(ratios):.2f}")


if __name__ == "__main__":
    main()
