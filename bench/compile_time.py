"""Compile time of the jitted train step: float vs DQ W2A2 vs DQ W2A2 without the in-step
calibration branch (a proposal, measured by monkeypatching inside this process only).

  python bench/compile_time.py --model=digits_cnn --batch=64
  python bench/compile_time.py --model=resnet20 --batch=128

`ActQuantizer` traces `lax.cond(initialized, ema_step, calibrate)` in every train step; the
calibrate branch (a grid search over clipping points + `act_calib_iters` unrolled closed-form
steps, per quantizer) never runs after `train._initial_state`'s calibration pass, but is
compiled into the step. The 'no_calib_branch' variant replaces `calibrate_uniform` by a
single closed-form step while tracing, to show what removing the branch from the train step
(calibrating only in `Steps.calibrate`) would save. Times are `jit(...).lower(...).compile()`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits_cnn")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    import jax
    from dq_jax.quant import activations
    from bench import step_time

    bench = step_time.Bench(step_time.parse_args([f"--model={args.model}",
                                                  f"--batch={args.batch}"]))

    def compile_seconds(method):
        _, _, steps, state, batch = bench.build(method)
        t0 = time.perf_counter()
        steps.train.lower(state, batch).compile()
        return time.perf_counter() - t0

    out = {"float": compile_seconds("float"), "dq_w2a2": compile_seconds("dq_w2a2")}
    original = activations.calibrate_uniform

    def one_step(x, w_c, num_levels, signed, iters):
        del iters
        return activations.fit_uniform_step(x, jax.numpy.ones(()), w_c, num_levels, signed)

    activations.calibrate_uniform = one_step
    try:
        out["dq_w2a2_no_calib_branch"] = compile_seconds("dq_w2a2")
    finally:
        activations.calibrate_uniform = original
    for k, v in out.items():
        print(f"{k:<28}{v:>8.1f} s compile")
    print(f"dq_compile_over_float={out['dq_w2a2'] / out['float']:.2f}")
    print(f"no_calib_branch_over_dq={out['dq_w2a2_no_calib_branch'] / out['dq_w2a2']:.2f}")


if __name__ == "__main__":
    main()
