"""Select path vs gather/scatter path of the DQ quantizers: train-step time and compile time, in one run.

  python bench/select_path.py                                  # ResNet-20, batch 128
  python bench/select_path.py --model=digits_cnn --batch=16 --repeats=3
  python bench/select_path.py --act_levels=learned             # + the learned-levels fit

Variants, each the program's own jitted train step (`train.Steps(...).train`, as
bench/step_time.py builds it) on the same random batch:
  float          the float model
  dq_select      DQ W{bits}A{bits} as shipped: <= 16 levels use selects and masked reductions
  dq_gather      the same model traced with the general path for every level count
                 (weights.SELECT_MAX_LEVELS = activations._SELECT_MAX_LEVELS = 0: gather for
                 the lookups, segment-sum scatter for the level gradient) and, for learned
                 activation levels, the former dense one-hot fit; i.e. the code before the
                 select path (up to the exact-zero pin of unsigned learned levels; and the
                 former `levels[idx]` of learned levels did not lower under the program's
                 Explicit mesh at all, so that lookup is the sharding-aware gather of > 16
                 levels)
The switch is a trace-time monkeypatch inside this process only. Compile time is
`lower(...).compile()`; step time is the median of --repeats steps, the variants interleaved
step by step so that load from other processes hits them alike (compiles too, over
--compile_rounds rounds; the minimum is kept). Last lines print ratios.
"""
from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bits", type=int, default=2, help="weight and activation bits")
    p.add_argument("--act_levels", default="uniform", choices=("uniform", "learned"))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile_rounds", type=int, default=2,
                   help="builds+compiles per variant, interleaved; the minimum is reported")
    return p.parse_args(argv)


def _one_hot_fit_learned_levels(x, levels, w_c, nonnegative):
    """The former fit_learned_levels (dense float32 one-hot [..., C, L]), for dq_gather."""
    import jax
    import jax.numpy as jnp
    from dq_jax.quant import activations as qa
    num_levels = levels.shape[0]
    idx = qa.nearest_level_index(x, levels)
    onehot = jax.nn.one_hot(idx, num_levels, dtype=jnp.float32)
    weighted = onehot * w_c[:, None]
    sums = jnp.sum((weighted * x[..., None]).reshape(-1, num_levels), axis=0)
    mass = jnp.sum(weighted.reshape(-1, num_levels), axis=0)
    new = jnp.where(mass > 0, sums / jnp.where(mass > 0, mass, 1.0), levels)
    if nonnegative:
        new = jnp.maximum(new, 0.0)
    return jnp.sort(new)


@contextlib.contextmanager
def gather_path():
    from dq_jax.quant import activations as qa
    from dq_jax.quant import weights as wq
    saved = wq.SELECT_MAX_LEVELS, qa._SELECT_MAX_LEVELS, qa.fit_learned_levels
    wq.SELECT_MAX_LEVELS, qa._SELECT_MAX_LEVELS = 0, 0
    qa.fit_learned_levels = _one_hot_fit_learned_levels
    try:
        yield
    finally:
        wq.SELECT_MAX_LEVELS, qa._SELECT_MAX_LEVELS, qa.fit_learned_levels = saved


def main(argv=None):
    args = parse_args(argv)
    import jax
    from bench import step_time

    jax.config.update("jax_enable_compilation_cache", False)  # every round really compiles

    bench = step_time.Bench(step_time.parse_args([f"--model={args.model}",
                                                  f"--batch={args.batch}"]))
    quantized = f"w{args.bits}a{args.bits}"
    runs = {}
    for rnd in range(args.compile_rounds):  # interleaved: load drift hits every variant alike
        for name in ("float", "dq_select", "dq_gather"):
            cfg = step_time.variant_config(step_time.base_config(args.model, args.batch),
                                           "float" if name == "float" else quantized)
            if name != "float":
                cfg.quant.act_levels = args.act_levels
            with (gather_path() if name == "dq_gather" else contextlib.nullcontext()):
                _, _, steps, state, batch = bench.build(name, cfg=cfg)
                t0 = time.perf_counter()
                compiled = steps.train.lower(state, batch).compile()
                compile_s = time.perf_counter() - t0
            print(f"# {name}: compiled in {compile_s:.1f} s (round {rnd + 1})", flush=True)
            if name in runs:
                runs[name]["compile_s"] = min(runs[name]["compile_s"], compile_s)
                continue
            for _ in range(1 + args.warmup):  # the first step calibrates
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            runs[name] = {"step": compiled, "state": state, "batch": batch,
                          "compile_s": compile_s, "times": []}

    for _ in range(args.repeats):
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], m = r["step"](r["state"], r["batch"])
            jax.block_until_ready((r["state"], m))
            r["times"].append(time.perf_counter() - t0)

    print(f"model={args.model} batch={args.batch} {quantized} act_levels={args.act_levels} "
          f"backend={jax.default_backend()} repeats={args.repeats}")
    print(f"{'variant':<12}{'step ms':>10}{'compile s':>11}")
    for name, r in runs.items():
        r["step_s"] = statistics.median(r["times"])
        print(f"{name:<12}{1e3 * r['step_s']:>10.1f}{r['compile_s']:>11.1f}")
    sel, gat, flt = runs["dq_select"], runs["dq_gather"], runs["float"]
    print(f"select_over_gather_step={sel['step_s'] / gat['step_s']:.3f}")
    print(f"select_over_gather_compile={sel['compile_s'] / gat['compile_s']:.3f}")
    print(f"select_over_float_step={sel['step_s'] / flt['step_s']:.3f}")
    print(f"gather_over_float_step={gat['step_s'] / flt['step_s']:.3f}")
    print(f"select_over_float_compile={sel['compile_s'] / flt['compile_s']:.3f}")
    print(f"gather_over_float_compile={gat['compile_s'] / flt['compile_s']:.3f}")


if __name__ == "__main__":
    main()
