"""Model init time: float vs DQ W2A2 `train.init_state` (trace + compile + run), in one run.

  python bench/init_time.py --model=resnet18
  python bench/init_time.py --model=resnet20 --rounds=3

`train.init_state` is what the training program runs before the first step: one jitted
`model.init` + optimizer init. For DQ it also fits every layer's levels by Lloyd (1-D k-means)
and assigns the codes, so its cost is mostly the compile of those per-layer fits. The
variants are interleaved over --rounds (load from other processes hits both alike; the
compilation cache is off so every round really compiles); the minimum is reported.
Last line: `dq_init_over_float=<ratio>` (issue 12's target: <= 1.5 on ResNet-18).
"""
from __future__ import annotations

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)

METHODS = ("float", "dq_w2a2")


def main(argv=None) -> dict:
    p = bench.arg_parser(__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; minimum kept")
    args = p.parse_args(argv)
    import jax
    from dq_jax import configlib, models, train
    from bench import step_time
    jax.config.update("jax_enable_compilation_cache", False)

    shape = models.INPUT_SHAPES[args.model]
    seconds: dict[str, float] = {}
    for rnd in range(args.rounds):
        for method in METHODS:
            cfg = step_time.variant_config(step_time.base_config(args.model, 8), method)
            quant = configlib.validate(cfg, device_count=jax.device_count())
            model = train.create_model(cfg, quant, 10)
            opt = train.create_optimizer(cfg, 1000, 100)
            t0 = time.perf_counter()
            state = train.init_state(model, opt, shape, cfg.seed)
            jax.block_until_ready(state)
            s = time.perf_counter() - t0
            seconds[method] = min(seconds.get(method, s), s)
            print(f"# {method}: init in {s:.1f} s (round {rnd + 1})", flush=True)
    print(f"# model={args.model} input={shape} backend={jax.default_backend()} jax={jax.__version__}")
    for method in METHODS:
        print(f"{method:<12}{seconds[method]:>8.1f} s init")
    print(f"dq_init_over_float={seconds['dq_w2a2'] / seconds['float']:.2f}")
    return seconds


if __name__ == "__main__":
    main()
