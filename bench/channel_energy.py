"""Input channel-energy spread of every quantized layer of a float model (docs/notebook.md §1).

Channel-aware activation quantization (DQ-A) should matter most where a few input channels
carry most of a layer's energy: a plain squared error then fits those and crushes the rest.
For each layer that the W2A2 model quantizes, this feeds training images through the *float*
checkpoint (eval mode) and reports, over the layer's input channels c,
  E_c = mean_{n,h,w} x^2,  max/median E_c,  share of sum E_c held by the top 5% of channels,
  and the fraction of channels with E_c < 1% of the median (near-dead channels).

  python bench/channel_energy.py --init_from=/path/to/float_workdir [--images=2000]
      [--model=mobilenetv2_cifar --out=results/channel_energy_mbv2_cifar10.json]
Writes results/channel_energy_cifar10.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def channel_stats(energy) -> dict:
    """Spread statistics of per-channel mean squares (1-D)."""
    import numpy as np
    e = np.sort(np.asarray(energy, np.float64))[::-1]
    k = max(1, int(np.ceil(0.05 * e.size)))
    med = float(np.median(e))
    return {"channels": int(e.size), "max_over_median": float(e[0] / med) if med > 0 else float("inf"),
            "top5pct_share": float(e[:k].sum() / e.sum()) if e.sum() > 0 else 0.0,
            "near_dead_frac": float(np.mean(e < 0.01 * med)) if med > 0 else 1.0}


def measure(config, init_from: str, num_images: int) -> dict:
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    from dq_jax import checkpoints, configlib, data, train
    from dq_jax.layers import QUANT_STATS
    from dq_jax.main import apply_variant

    q_config = apply_variant(config, "w2a2")
    quant = configlib.validate(q_config, device_count=jax.device_count())
    ds = data.create_dataset(q_config)
    q_model = train.create_model(q_config, quant, ds.num_classes)
    shapes = jax.eval_shape(lambda: q_model.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, *ds.image_shape)), train=False))
    quantized = {path[:-2] for path in flax.traverse_util.flatten_dict(
        shapes.get(QUANT_STATS, {}))}  # module paths owning an act_quant

    f_config = apply_variant(config, "float")
    f_quant = configlib.validate(f_config, device_count=jax.device_count())
    model = train.create_model(f_config, f_quant, ds.num_classes)
    variables = checkpoints.load_float_variables(init_from)
    sums: dict[tuple, np.ndarray] = {}
    seen = 0

    def interceptor(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if path in quantized and context.method_name == "__call__":
            x = jnp.asarray(args[0], jnp.float32)
            e = jnp.sum(jnp.square(x).reshape(-1, x.shape[-1]), axis=0) / (x.size // x.shape[-1])
            sums[path] = sums.get(path, 0) + np.asarray(e, np.float64) * x.shape[0]
        return next_fun(*args, **kwargs)

    forward = lambda x: model.apply(variables, x, train=False)  # noqa: E731
    for batch in ds.train_batches(0):
        with flax.linen.intercept_methods(interceptor):
            forward(jnp.asarray(batch["image"]))
        seen += batch["image"].shape[0]
        if seen >= num_images:
            break
    missing = quantized - set(sums)
    if missing:
        raise RuntimeError(f"no inputs captured for quantized layers {sorted(missing)}")
    return {"/".join(p): channel_stats(s / seen) for p, s in sorted(sums.items())} | {
        "_images": seen}


def table(stats: dict) -> str:
    lines = ["| layer | input channels | max/median channel energy | top-5% share | near-dead |",
             "|---|---|---|---|---|"]
    for layer, s in stats.items():
        if layer.startswith("_"):
            continue
        lines.append(f"| {layer} | {s['channels']} | {s['max_over_median']:.1f} | "
                     f"{100 * s['top5pct_share']:.1f}% | {100 * s['near_dead_frac']:.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init_from", required=True, help="float workdir (with checkpoints/)")
    p.add_argument("--config", default=str(ROOT / "configs" / "cifar10_resnet20.py"))
    p.add_argument("--model", default="",
                   help="another model of the zoo on the same data (default: the config's), e.g. "
                        "mobilenetv2_cifar (per-layer levels: its depthwise kernels have 9 "
                        "weights per channel)")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "results" / "channel_energy_cifar10.json"))
    args = p.parse_args(argv)
    from dq_jax.configlib import load_config_file
    config = load_config_file(args.config)
    config.init_from = args.init_from  # the recipes' inertia start needs it to validate
    if args.model:
        config.model = args.model
        if "mobilenet" in args.model:
            config.quant.granularity = "per_layer"
    config.augment = False
    from bench import use_cifar10_npz
    use_cifar10_npz(config)
    stats = measure(config, args.init_from, args.images)
    pathlib.Path(args.out).write_text(json.dumps(stats, indent=1))
    print(table(stats))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
