"""Model init time: float vs DQ (W2A2 by default) `train.init_state`, trace + compile + run.

  python bench/init_time.py --model=resnet18
  python bench/init_time.py --model=resnet20 --rounds=3
  python bench/init_time.py --model=resnet18 --dq=w4a4     # 16 levels: Lloyd runs longest

`train.init_state` is what the training program runs before the first step: a jitted
`model.init` (each DQ layer stores its float initializer draw), then a second jit that fits
every DQ layer's levels by Lloyd (1-D k-means on the sorted weights), assigns the codes and
inits the optimizer. The variants are interleaved over --rounds (load from other processes
hits both alike; the compilation cache is off so every round really compiles); the minimum
is reported.
Last line: `dq_init_over_float=<ratio>` (issue 12's target: <= 1.5 on ResNet-18).

`--phases` also splits those two jits into trace, compile and run seconds per method (one
extra round, printed as `# phases <method> <jit>: ...`), which is what says whether a faster
init needs fewer compiles or a cheaper Lloyd fit.
"""
from __future__ import annotations

import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)


def _phases(label: str, fn, *args):
    """Trace, compile and run seconds of one jitted function; returns its output."""
    import jax
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    t3 = time.perf_counter()
    print(f"# phases {label}: trace {t1 - t0:.1f} s, compile {t2 - t1:.1f} s, "
          f"run {t3 - t2:.1f} s", flush=True)
    return out


def main(argv=None) -> dict:
    p = bench.arg_parser(__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; minimum kept")
    p.add_argument("--dq", default="w2a2", help="the DQ variant (dq_jax.main's --variants names)")
    p.add_argument("--phases", action="store_true",
                   help="also time trace / compile / run of init_state's two jits")
    args = p.parse_args(argv)
    import jax
    from dq_jax import configlib, models, train
    from bench import step_time
    jax.config.update("jax_enable_compilation_cache", False)

    shape = models.INPUT_SHAPES[args.model]
    methods = ("float", f"dq_{args.dq}")
    seconds: dict[str, float] = {}
    for rnd in range(args.rounds):
        for method in methods:
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
    if args.phases:
        for method in methods:
            cfg = step_time.variant_config(step_time.base_config(args.model, 8), method)
            model = train.create_model(cfg, configlib.validate(cfg, device_count=1), 10)
            draw, finish = train.init_jits(model, train.create_optimizer(cfg, 1000, 100), shape)
            variables = _phases(f"{method} model.init", draw, jax.random.PRNGKey(cfg.seed))
            _phases(f"{method} level fits + optimizer init", finish, variables)
    print(f"# model={args.model} input={shape} backend={jax.default_backend()} jax={jax.__version__}")
    for method in methods:
        print(f"{method:<12}{seconds[method]:>8.1f} s init")
    print(f"dq_init_over_float={seconds[methods[1]] / seconds['float']:.2f}")
    return seconds


if __name__ == "__main__":
    main()
