"""Compile time of the jitted train step, per method, over float's of the same round.

  python bench/compile_time.py --model=resnet20 --batch=128
  python bench/compile_time.py --model=resnet20 --batch=32 --rounds=5 \\
      --methods=float,dq_w2a2,dq_weights_only,dq_acts_only,lsq_w2a2,latent_ste_w2a2

Times are `jit(train_step).lower(...).compile()` only (no persistent cache). Methods: those
of `bench/step_time.py` (float, dq_w2a2, dq_w4a4, latent_ste_w2a2, lsq_w2a2), plus
`dq_weights_only` (DQ W2 weights, float activations) and `dq_acts_only` (float weights, DQ A2
activations), which split DQ's compile between its two quantizers. Rounds interleave the
methods; on a loaded machine one compile moves by tens of percent, so each round's ratio is
taken against float's compile of the same round and all rounds are printed with the minimum.
For where the time goes inside XLA, run it with
`TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=cpu_compiler=1,hlo_pass_pipeline=1` (docs/notebook.md §2.2).
With `--counts`, also a table of op counts per method (issue 27's CPU proxy for what each
quantizer adds): from the compiled HLO (after XLA's passes, this backend) the instructions
outside fusions, fusions, `while` loops, `conditional`s, reductions, and from the lowered
StableHLO the call sites of jax.random's helpers (threefry, split/fold_in, uniform) and the
step's outputs. `--json=PATH`
writes the times (and counts) to PATH.
Last line (when dq_w2a2 runs): `dq_compile_over_float=<ratio of the minima>`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import step_time  # noqa: E402  (after the path set-up)

SIDES = {"dq_weights_only": ("dq", "float"), "dq_acts_only": ("float", "dq")}
# step_time's methods that the training program builds (Qwix's step is another program)
METHODS = (*(m for m in step_time.METHODS if not m.startswith("qwix_")), *SIDES)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--methods", default="float,dq_w2a2",
                   help=f"comma-separated subset of {','.join(METHODS)} (float is always run)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--counts", action="store_true",
                   help="also count ops in each method's compiled step (first round)")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {','.join(unknown)}; choose from {','.join(METHODS)}")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} must be >= 1")
    args.methods = ["float"] + [m for m in dict.fromkeys(methods) if m != "float"]
    return args


def op_counts(lowered_text: str, compiled_text: str) -> dict[str, int]:
    """Op counts of one step: instructions of the entry and control-flow computations (not
    inside fusions), fusions, while loops, conditionals and reductions in the compiled HLO;
    jax.random call sites and the entry function's results in the lowered StableHLO."""
    top, inside_fusion = 0, False
    for line in compiled_text.splitlines():
        if re.match(r"^\S.*\{\s*$", line):  # a computation's header
            inside_fusion = "fused_computation" in line or line.startswith("%fused")
        elif " = " in line and not inside_fusion:
            top += 1
    main = re.search(r"func\.func public @main\((.*?)\) -> \((.*?)\) \{", lowered_text,
                     re.S)
    return {"instructions_outside_fusions": top,
            "fusions": len(re.findall(r" fusion\(", compiled_text)),
            "while": len(re.findall(r" while\(", compiled_text)),
            "conditional": len(re.findall(r" conditional\(", compiled_text)),
            "reduce": len(re.findall(r" reduce\(", compiled_text)),
            "random_calls": len(re.findall(r"call @\w*(?:threefry|_uniform)\w*", lowered_text)),
            "rng_bit_generator": len(re.findall(r"rng_bit_generator", lowered_text)),
            "outputs": main.group(2).count("tensor<") if main else -1}


def main(argv=None):
    args = parse_args(argv)
    import jax

    jax.config.update("jax_enable_compilation_cache", False)  # every round really compiles
    bench = step_time.Bench(step_time.parse_args([f"--model={args.model}",
                                                  f"--batch={args.batch}"]))

    def compile_seconds(method: str) -> float:
        if method in SIDES:
            cfg = step_time.variant_config(step_time.base_config(args.model, args.batch),
                                           "dq_w2a2")
            cfg.quant.weights, cfg.quant.acts = SIDES[method]
            _, _, steps, state, batch = bench.build("dq_w2a2", cfg)
        else:
            _, _, steps, state, batch = bench.build(method)
        lowered = steps.train.lower(state, batch)
        t0 = time.perf_counter()
        compiled = lowered.compile()
        seconds = time.perf_counter() - t0
        if args.counts and method not in counts:
            counts[method] = op_counts(lowered.as_text(), compiled.as_text())
        return seconds

    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    counts: dict[str, dict] = {}
    for r in range(args.rounds):
        for m in args.methods:
            seconds[m].append(compile_seconds(m))
            print(f"# round {r + 1} {m}: {seconds[m][-1]:.1f} s", flush=True)
    if counts:
        names = list(next(iter(counts.values())))
        print("| method | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for m, c in counts.items():
            print(f"| {m} | " + " | ".join(str(c[k]) for k in names) + " |")
    floor = min(seconds["float"])
    for m, s in seconds.items():
        per_round = " ".join(f"{x / f:.2f}" for x, f in zip(s, seconds["float"]))
        print(f"{m:<20}{min(s):>7.1f} s compile (min)  x{min(s) / floor:.2f}  "
              f"per round: {per_round}")
    if args.json:
        import jax
        pathlib.Path(args.json).write_text(json.dumps({
            "command": " ".join(["python", "bench/compile_time.py", *(argv or sys.argv[1:])]),
            "model": args.model, "batch": args.batch, "rounds": args.rounds,
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "seconds": seconds, "min_over_float": {m: min(s) / floor for m, s in seconds.items()},
            "per_round_over_float": {m: [x / f for x, f in zip(s, seconds["float"])]
                                     for m, s in seconds.items()},
            "op_counts": counts}, indent=1))
    if "dq_w2a2" in seconds:
        print(f"dq_compile_over_float={min(seconds['dq_w2a2']) / floor:.2f}")


if __name__ == "__main__":
    main()
