"""Where the DQ train step's compile time goes: the step compiled with one piece removed.

  python bench/compile_ablation.py --model=resnet20 --batch=128 --rounds=6 \\
      --variants=float,dq,no_guard,no_sort,no_ema,const_uniform,nearest

Each variant is the program's own calibrated train step (`bench/step_time.Bench.build`) of
DQ W2A2 (`dq`) or float, traced with one piece of the library replaced (monkeypatched while
tracing, so each removal is an upper bound for any rewrite of that piece; the stepped state
is not meant to train):
  no_guard       no finiteness check and no `lax.cond` (the updated state is returned)
  guard_cond     the `lax.cond` on the loss only (no reductions)
  guard_reduce   the reductions, their flag only reported (no `lax.cond`)
  float_no_guard float without the guard (the guard's share of float's compile)
  no_sort        the level sort is the identity
  no_ema         the activation quantizers keep their statistics (no EMA fit)
  const_uniform  stochastic rounding against 0.5 instead of the hash's uniforms
  nearest / inertia   other code roundings (config, not a patch)
Rounds run the variants in a shuffled order (fixed seed); a compile on this shared VM moves by
±10-30%, so medians over >= 5 rounds are the numbers to read, as ratios to float's median.
Wall and process CPU time are both printed (XLA:CPU compiles on more than one thread).
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import random
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import step_time  # noqa: E402  (after the path set-up)


def _patch(module, name: str, value):
    @contextlib.contextmanager
    def cm():
        old = getattr(module, name)
        setattr(module, name, value)
        try:
            yield
        finally:
            setattr(module, name, old)
    return cm


def _guarded_step(mode: str):
    """A train step with the finiteness guard cut down (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    from dq_jax import train

    def step(state, batch, *, model, label_smoothing, calibrated=False):
        loss, logits, _, grads, updated = train._forward_backward_update(
            state, batch, model, label_smoothing, calibrated)
        ok = jnp.isfinite(loss) if mode == "cond" else train._all_finite(loss, grads, updated)
        new_state = updated if mode in ("none", "reduce") else jax.lax.cond(
            ok, lambda: updated, lambda: state.replace(step=state.step + 1))
        return new_state, {"loss": loss,
                           "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                           "learning_rate": train._learning_rate(updated.opt_state),
                           "nonfinite": 1.0 - ok.astype(jnp.float32)}
    return _patch(train, "train_step", step)


def variants() -> dict:
    """name -> (method of step_time, rounding or None, context manager factory)."""
    import jax
    import jax.numpy as jnp
    from dq_jax import optim
    from dq_jax.quant import activations

    def identity_sort(levels, codes):
        return levels, codes, jax.lax.broadcasted_iota(jnp.int32, levels.shape, levels.ndim - 1)

    def half(seed, offset, shape):
        return jnp.full(shape, 0.5, jnp.float32) + seed[0].astype(jnp.float32) * 0

    null = contextlib.nullcontext
    return {
        "float": ("float", None, null), "dq": ("dq_w2a2", None, null),
        "nearest": ("dq_w2a2", "nearest", null), "inertia": ("dq_w2a2", "inertia", null),
        "no_guard": ("dq_w2a2", None, _guarded_step("none")),
        "guard_cond": ("dq_w2a2", None, _guarded_step("cond")),
        "guard_reduce": ("dq_w2a2", None, _guarded_step("reduce")),
        "float_no_guard": ("float", None, _guarded_step("none")),
        "no_sort": ("dq_w2a2", None, _patch(optim, "_sort", identity_sort)),
        "no_ema": ("dq_w2a2", None, _patch(activations.ActQuantizer, "_ema",
                                           lambda self, xs, cur, w_c, signed: cur)),
        "const_uniform": ("dq_w2a2", None, _patch(optim, "hash_uniform", half)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--variants", default="float,dq,no_guard,no_sort,no_ema,const_uniform,nearest")
    args = p.parse_args(argv)
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    table = variants()
    names = ["float"] + [n for n in dict.fromkeys(args.variants.split(",")) if n != "float"]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"--variants: unknown {','.join(unknown)}; choose from {','.join(table)}")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} must be >= 1")
    bench = step_time.Bench(step_time.parse_args([f"--model={args.model}",
                                                  f"--batch={args.batch}"]))
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    for r in range(args.rounds):
        shuffled = list(names)
        order.shuffle(shuffled)
        for n in shuffled:
            method, rounding, patch = table[n]
            cfg = step_time.variant_config(step_time.base_config(args.model, args.batch), method)
            if rounding:
                cfg.rounding = rounding
            with patch():
                _, _, steps, state, batch = bench.build(method, cfg)
                lowered = steps.train.lower(state, batch)
            c0, t0 = time.process_time(), time.perf_counter()
            lowered.compile()
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
            print(f"# round {r + 1} {n}: {wall[n][-1]:.2f} s", flush=True)
    med = {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}
    for n in names:
        print(f"{n:<15} wall median {med[n][0]:5.2f} s  x{med[n][0] / med['float'][0]:.2f}   "
              f"cpu median {med[n][1]:5.2f} s  x{med[n][1] / med['float'][1]:.2f}")


if __name__ == "__main__":
    main()
