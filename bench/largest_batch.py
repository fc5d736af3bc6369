"""The largest batch whose train step fits in device memory, per method, from XLA's own plan.

  python bench/largest_batch.py --model=resnet50 --methods=float_bf16,dq_w2a2_bf16,latent_ste_w2a2_bf16
  python bench/largest_batch.py --model=digits_cnn --batches=8,16 --memory_gb=1   # CPU smoke

Issue 27 item 3: a DQ train state is ~0.38x latent-STE's (uint8 codes, bfloat16 code momentum,
no float shadow weights), so the same device should hold a larger DQ batch. Nothing is run or
allocated: each method's jitted train step (`train.Steps(...).train`, the program's) is lowered
from abstract shapes and compiled at two batch sizes, and XLA's memory analysis gives the
step's planned peak (arguments + outputs + temporaries - donated buffers). The peak is affine
in the batch (state fixed, activations per image), so the two points give `fixed + per_image *
batch`, and the largest batch is `(memory - fixed) / per_image`, rounded down to a multiple of
--multiple. `memory` is the device's `bytes_limit` (GPU/TPU) or --memory_gb. An estimate: it
ignores fragmentation and the input pipeline's buffers; check it with one real step.
Last line: `dq_w2a2_batch_over_latent_ste=<ratio>` when both ran (any suffix, e.g. _bf16).
"""
from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)
from bench import step_time  # noqa: E402


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--methods", default="float_bf16,dq_w2a2_bf16,latent_ste_w2a2_bf16,"
                                        "lsq_w2a2_bf16")
    p.add_argument("--batches", default="64,128",
                   help="two batch sizes to compile at (the affine fit's points)")
    p.add_argument("--memory_gb", type=float, default=0.0,
                   help="device memory to fit in (GiB); 0 = the device's bytes_limit")
    p.add_argument("--multiple", type=int, default=8, help="round the batch down to this")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches={args.batches!r}: two integers, e.g. 64,128")
    if len(args.batches) != 2 or not 0 < args.batches[0] < args.batches[1]:
        p.error(f"--batches={args.batches}: two increasing batch sizes > 0, e.g. 64,128")
    if args.memory_gb < 0 or args.multiple < 1:
        p.error("--memory_gb must be >= 0 and --multiple >= 1")
    return args


def planned_peak(model_name: str, method: str, batch: int) -> int:
    """XLA's planned peak bytes of `method`'s train step at `batch` (abstract inputs)."""
    import jax
    import jax.numpy as jnp
    from dq_jax import configlib, models, train
    cfg = step_time.variant_config(step_time.base_config(model_name, batch), method)
    quant = configlib.validate(cfg, device_count=jax.device_count())
    model = train.create_model(cfg, quant, 1000 if model_name.startswith("resnet50") else 10)
    optimizer = train.create_optimizer(cfg, 1000, 100)
    steps = train.Steps(model, optimizer, train.create_mesh(cfg))
    shape = models.INPUT_SHAPES[model_name]
    state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=steps.replicated),
        jax.eval_shape(lambda: train.init_state(model, optimizer, shape, 0)))
    images = {"image": jax.ShapeDtypeStruct((batch, *shape), jnp.float32, sharding=steps.batch),
              "label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=steps.batch)}
    planned = step_time.planned_memory(steps.train.lower(state, images).compile())
    if planned is None:
        raise RuntimeError(f"backend {jax.default_backend()} gives no memory analysis")
    return planned["step_peak"]


def main(argv=None):
    args = parse_args(argv)
    methods = bench.parse_methods(args.methods, step_time.METHODS)
    import jax
    limit = int(args.memory_gb * 2 ** 30) or (jax.devices()[0].memory_stats() or {}).get(
        "bytes_limit")
    if not limit:
        sys.exit("largest_batch: this device reports no memory limit (CPU); pass --memory_gb")
    b1, b2 = args.batches
    print(f"# model={args.model} batches={b1},{b2} memory={limit / 2**30:.2f} GiB "
          f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}", flush=True)
    rows = {}
    print(f"{'method':<24}{'MB @' + str(b1):>12}{'MB @' + str(b2):>12}{'fixed MB':>10}"
          f"{'MB/image':>10}{'largest batch':>15}")
    for m in methods:
        p1, p2 = planned_peak(args.model, m, b1), planned_peak(args.model, m, b2)
        per_image = (p2 - p1) / (b2 - b1)
        fixed = p1 - per_image * b1
        largest = int((limit - fixed) // per_image) if per_image > 0 else None
        if largest is not None:
            largest = max(largest // args.multiple * args.multiple, 0)
        rows[m] = {"peak_bytes": {str(b1): p1, str(b2): p2}, "fixed_bytes": fixed,
                   "bytes_per_image": per_image, "largest_batch": largest}
        print(f"{m:<24}{p1 / 2**20:>12.1f}{p2 / 2**20:>12.1f}{fixed / 2**20:>10.1f}"
              f"{per_image / 2**20:>10.2f}{largest if largest is not None else '-':>15}",
              flush=True)
    out = {"args": vars(args), "memory_bytes": limit, "rows": rows, "jax": jax.__version__,
           "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
    for suffix in ("", "_bf16"):
        dq, ste = rows.get(f"dq_w2a2{suffix}"), rows.get(f"latent_ste_w2a2{suffix}")
        if dq and ste and dq["largest_batch"] and ste["largest_batch"]:
            print(f"dq_w2a2_batch_over_latent_ste={dq['largest_batch'] / ste['largest_batch']:.4f}")


if __name__ == "__main__":
    main()
