"""Train-step time and train-state memory of DQ vs float / latent-STE / LSQ / Qwix QAT, in one run.

  python bench/step_time.py                       # ResNet-20, batch 128, all methods (~6 min on 2 busy cores)
  python bench/step_time.py --model=digits_cnn --batch=16 --repeats=2 --methods=float,dq_w2a2
  python bench/step_time.py --profile             # + pieces of the DQ W2A2 step (see --help)

Every method is timed through the program's own jitted step (`dq_jax.train.Steps(...).train`,
i.e. `train.train_step`: forward/backward, direct code update, level sort, finiteness guard)
on the same random batch; compile and the first (calibrating) steps are excluded; the reported
time is the median of --repeats single steps (each blocked on). Memory is the exact byte count
of the train state's leaves (params + optimizer state + codes + BN/activation statistics).

The peer, Qwix (`pip install qwix`) quantized training (QtProvider, QtRule on the same inner
conv/dense layers DQ quantizes; first conv and last dense float in both), is trained by the
same `train.train_step` and optimizer. Qwix's int4/int2 storage does not run on XLA:CPU
(custom element sizes); there the script falls back to int8 storage with the same number of
levels (`absmax,<s>` calibration so the step is absmax/(2**(b-1)-1)): the same fake-quant
values, and it says so in its output.

Last lines: `dq_w2a2_over_float=<ratio>` and `dq_w2a2_over_qwix=<ratio>` (when Qwix ran).
"""
from __future__ import annotations

import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)

from bench import parse_methods  # noqa: E402  (after the path set-up)

# `<method>_bf16`: the same method with `half_precision` (bfloat16 activations), issue 27's
# accelerator rows.
BF16_METHODS = tuple(f"{m}_bf16" for m in ("float", "dq_w2a2", "dq_w2a2_inertia",
                                            "latent_ste_w2a2", "lsq_w2a2"))
METHODS = ("float", "dq_w2a2", "dq_w2a2_inertia", "dq_w4a4", "latent_ste_w2a2", "lsq_w2a2",
           "qwix_w4a4", "qwix_w2a2", *BF16_METHODS)


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per method (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--profile", action="store_true",
                   help="also time the pieces of the DQ W2A2 step (fwd/bwd, optimizer update, "
                        "activation-stat fit, stochastic vs nearest rounding)")
    p.add_argument("--json", default="", help="also write the numbers to this JSON file")
    p.add_argument("--trace_dir", default="",
                   help="also write a jax.profiler trace of each method's timed steps to "
                        "TRACE_DIR/<method> (TensorBoard / Perfetto: the kernels each adds)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers

def tree_bytes(tree) -> int:
    import jax
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def planned_memory(compiled) -> dict | None:
    """XLA's memory analysis of a compiled program (bytes): arguments, outputs, temporaries,
    donated (alias) and `step_peak` = their sum less the donated buffers; None where the
    backend gives no analysis."""
    a = compiled.memory_analysis()
    if a is None:
        return None
    out = {k: int(getattr(a, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
    out["step_peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def step_memory(steps, state, batch) -> dict | None:
    """What XLA plans for one compiled train step (bytes): arguments, outputs, temporaries,
    and their sum less the donated (aliased) buffers, i.e. the step's peak device memory
    without fragmentation; plus the device's own `peak_bytes_in_use` where it reports one
    (GPU/TPU; over the whole process, so one method per process for a per-method peak).
    None where the backend gives no analysis."""
    import jax
    try:
        out = planned_memory(steps.train.lower(state, batch).compile())
    except Exception:  # noqa: BLE001 - an optional column
        return None
    if out is None:
        return None
    stats = jax.devices()[0].memory_stats() or {}
    out["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    return out


def state_memory(state) -> dict:
    return {"params": tree_bytes(state.params), "codes": tree_bytes(state.codes),
            "opt_state": tree_bytes(state.opt_state),
            "stats": tree_bytes(state.batch_stats) + tree_bytes(state.quant_stats),
            "total": tree_bytes(state)}


def time_fn(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def base_config(model: str, batch: int):
    from dq_jax import configlib
    c = configlib.base_config()
    c.model = model
    c.batch_size = batch
    c.learning_rate, c.levels_learning_rate, c.weight_decay = 0.01, 1e-4, 1e-4
    c.nesterov = True
    return c


def variant_config(c, method: str):
    """`dq_w2a2_inertia`: DQ W2A2 with rounding='inertia' (no random draws in the step);
    `<method>_bf16`: `<method>` with `half_precision` (bfloat16 activations)."""
    from dq_jax.main import apply_variant
    if method.endswith("_bf16"):
        c = variant_config(c, method[:-len("_bf16")])
        c.half_precision = True
        return c
    if method.startswith("qwix_"):
        return apply_variant(c, "float")
    if method.endswith("_inertia"):
        c = variant_config(c, method[:-len("_inertia")])
        c.rounding = "inertia"
        return c
    return apply_variant(c, method[len("dq_"):] if method.startswith("dq_") else method)


def random_batch(model: str, batch: int, num_classes: int, seed: int = 0) -> dict:
    import numpy as np
    from dq_jax import models
    rng = np.random.default_rng(seed)
    h, w, ch = models.INPUT_SHAPES[model]
    return {"image": rng.standard_normal((batch, h, w, ch), dtype=np.float32),
            "label": rng.integers(0, num_classes, (batch,)).astype(np.int32)}


def dq_layer_regex(model: str, num_classes: int) -> str:
    """Module paths holding DQ codes (the inner layers): the same set Qwix quantizes."""
    import flax
    import jax
    import jax.numpy as jnp
    from dq_jax import models
    from dq_jax.quant.config import QuantConfig
    m = models.create(model, num_classes, quant=QuantConfig())
    shape = models.INPUT_SHAPES[model]
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                                      train=False))
    paths = sorted("/".join(k[:-1]) for k in flax.traverse_util.flatten_dict(v["codes"]))
    return "^(" + "|".join(paths) + ")$"


def qwix_model(float_model, regex: str, bits: int, int8_storage: bool):
    import jax.numpy as jnp
    import qwix
    if int8_storage:
        qmax = 2 ** (bits - 1) - 1
        calib = f"absmax,{127.0 / qmax:.6f}"  # step = absmax/qmax: 2**bits-1 int levels in int8
        rule = qwix.QtRule(module_path=regex, weight_qtype=jnp.int8, act_qtype=jnp.int8,
                           weight_calibration_method=calib, act_calibration_method=calib)
    else:
        qtype = {4: jnp.int4, 2: jnp.int2}[bits]
        rule = qwix.QtRule(module_path=regex, weight_qtype=qtype, act_qtype=qtype)
    return qwix.quantize_model(float_model, qwix.QtProvider([rule]))


class Bench:
    """Builds (model, optimizer, Steps, state, batch) for one method, the program's way."""

    def __init__(self, args):
        from dq_jax import train
        self.args = args
        self.num_classes = 10
        # The program's mesh (Auto axes), also Qwix's: its quantized conv backward does not
        # pass the out_sharding an Explicit-typed mesh would demand.
        self.mesh = train.create_mesh(base_config(args.model, args.batch))
        self.np_batch = random_batch(args.model, args.batch, self.num_classes)
        self.qwix_note = ""
        self.qwix_error = ""

    def build(self, method: str, cfg=None, model=None, mesh=None):
        import jax
        from dq_jax import configlib, train
        cfg = cfg or variant_config(base_config(self.args.model, self.args.batch), method)
        quant = configlib.validate(cfg, device_count=jax.device_count())
        model = model or train.create_model(cfg, quant, self.num_classes)
        opt = train.create_optimizer(cfg, 1000, 100)
        steps = train.Steps(model, opt, mesh or self.mesh)
        state = steps.place(train.init_state(
            model, opt, tuple(self.np_batch["image"].shape[1:]), cfg.seed))
        batch = train.to_global(self.np_batch, steps.batch)
        if jax.tree.leaves(state.quant_stats):  # as the program: calibrate, then its step
            state = steps.calibrate(state, batch)
        steps.for_state(state)
        return model, opt, steps, state, batch

    def time_train(self, steps, state, batch, trace: str = "") -> tuple[float, float, object]:
        """(median s/step, compile + first step s, state); `trace`: the name of this run's
        jax.profiler trace under --trace_dir (none when either is empty)."""
        import jax
        t0 = time.perf_counter()
        state, m = steps.train(state, batch)        # compile + first step
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(self.args.warmup):
            state, m = steps.train(state, batch)
        jax.block_until_ready(state)
        box = [state]

        def one():
            box[0], metrics = steps.train(box[0], batch)
            jax.block_until_ready((box[0], metrics))

        if not (self.args.trace_dir and trace):
            return time_fn(one, self.args.repeats), compile_s, box[0]
        with jax.profiler.trace(str(pathlib.Path(self.args.trace_dir) / trace)):
            seconds = time_fn(one, self.args.repeats)
        return seconds, compile_s, box[0]


def run_method(bench: Bench, method: str) -> dict:
    from dq_jax import train
    if method.startswith("qwix_"):
        bits = int(method[len("qwix_w")])
        cfg = variant_config(base_config(bench.args.model, bench.args.batch), method)
        from dq_jax import configlib
        quant = configlib.validate(cfg, device_count=__import__("jax").device_count())
        regex = dq_layer_regex(bench.args.model, bench.num_classes)
        float_model = train.create_model(cfg, quant, bench.num_classes)
        for int8_storage in (False, True):
            try:
                model = qwix_model(float_model, regex, bits, int8_storage)
                _, _, steps, state, batch = bench.build(method, cfg, model)
                sec, comp, state = bench.time_train(steps, state, batch)
                note = "int8 storage, %d-bit grid" % bits if int8_storage else \
                    f"int{bits} storage"
                if int8_storage:
                    bench.qwix_note = (f"qwix int4/int2 failed on this backend "
                                       f"({bench.qwix_error}); used int8 storage with the same "
                                       "bit-width grid (absmax, qmax = 2**(bits-1)-1)")
                return {"seconds": sec, "compile_s": comp, "memory": state_memory(state),
                        "note": note}
            except Exception as e:  # noqa: BLE001 - report, then fall back to int8 storage
                if int8_storage:
                    raise
                msg = " ".join(str(e).split())
                bench.qwix_error = msg[:160]
                print(f"# {method}: int{bits} path failed ({msg[:160]}); retrying with int8 "
                      "storage of the same grid", flush=True)
    _, _, steps, state, batch = bench.build(method)
    sec, comp, state = bench.time_train(steps, state, batch, trace=method)
    return {"seconds": sec, "compile_s": comp, "memory": state_memory(state),
            "step_memory": step_memory(steps, state, batch), "note": ""}


# --------------------------------------------------------------------------- profile

def profile_dq(bench: Bench) -> dict:
    """Times the pieces of the DQ W2A2 step (each jitted on its own, same inputs)."""
    import functools
    import jax
    import optax
    from dq_jax.layers import QUANT_STATS
    from dq_jax.optim import code_diagnostics, dq_grads

    reps = bench.args.repeats
    out = {}
    cfg = variant_config(base_config(bench.args.model, bench.args.batch), "dq_w2a2")
    model, opt, steps, state, batch = bench.build("dq_w2a2", cfg)
    out["full_step"], _, state = bench.time_train(steps, state, batch)
    images, labels = batch["image"], batch["label"]

    def loss_fn(differentiable, st, fit_stats: bool):
        mutable = ["batch_stats", QUANT_STATS] if fit_stats else ["batch_stats"]
        logits, new_vars = model.apply(st.variables(differentiable), images, train=True,
                                       mutable=mutable)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_vars

    def fwd_bwd(st, fit_stats):
        return jax.value_and_grad(loss_fn, has_aux=True)(st.differentiable(), st, fit_stats)

    fb_fit = jax.jit(functools.partial(fwd_bwd, fit_stats=True))
    fb_nofit = jax.jit(functools.partial(fwd_bwd, fit_stats=False))
    (_, _), grads = fb_fit(state)

    def update_alone(gr, st):
        """The optimizer update alone: dq_optimizer's step on {'params', 'codes'} and its
        application (codes, levels + sort, float params), plus the per-layer diagnostics."""
        trainable = {"params": st.params, "codes": st.codes}
        updates, opt_state = st.tx.update(dq_grads(gr), st.opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        return new, opt_state, code_diagnostics(st.codes, new["codes"], new["params"])

    upd = jax.jit(update_alone)

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        return time_fn(lambda: jax.block_until_ready(f(*a)), reps)

    out["fwd_bwd_with_act_fit"] = timed(fb_fit, state)
    out["fwd_bwd_no_act_fit"] = timed(fb_nofit, state)
    out["optimizer_update"] = timed(upd, grads, state)

    # float reference: fwd/bwd of the float model on the same batch
    fcfg = variant_config(base_config(bench.args.model, bench.args.batch), "float")
    fmodel, _, _, fstate, _ = bench.build("float", fcfg)

    def f_loss(params, st):
        logits, nv = fmodel.apply(st.variables(params=params), images, train=True,
                                  mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), nv
    f_fb = jax.jit(lambda st: jax.value_and_grad(f_loss, has_aux=True)(st.params, st))
    out["float_fwd_bwd"] = timed(f_fb, fstate)

    # rounding: nearest vs stochastic (whole step)
    ncfg = variant_config(base_config(bench.args.model, bench.args.batch), "dq_w2a2")
    ncfg.rounding = "nearest"
    _, _, nsteps, nstate, _ = bench.build("dq_w2a2", ncfg)
    out["full_step_nearest"], _, _ = bench.time_train(nsteps, nstate, batch)
    return out


# --------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    methods = parse_methods(args.methods, METHODS)
    import jax
    from absl import logging
    logging.set_verbosity(logging.ERROR)

    qwix_version = None
    if any(m.startswith("qwix_") for m in methods):
        try:
            import qwix
            qwix_version = getattr(qwix, "__version__", "?")
        except ImportError as e:
            print(f"# qwix is not installed ({e}); skipping the Qwix peer "
                  "(pip install qwix, or pip install -e '.[bench]')", flush=True)
            methods = [m for m in methods if not m.startswith("qwix_")]

    bench = Bench(args)
    print(f"# model={args.model} batch={args.batch} repeats={args.repeats} "
          f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__}"
          + (f" qwix={qwix_version}" if qwix_version else ""), flush=True)
    rows = {}

    def header() -> dict:
        return {"args": vars(args), "qwix_version": qwix_version, "rows": rows,
                "jax": jax.__version__, "backend": jax.default_backend(),
                "device": jax.devices()[0].device_kind}

    def write(out: dict, complete: bool) -> None:
        # After every method too: a run killed by a time limit (a GPU lent for minutes) keeps
        # the rows it finished, marked incomplete.
        if args.json:
            import json
            pathlib.Path(args.json).write_text(json.dumps({**out, "complete": complete},
                                                          indent=1))

    for m in methods:
        try:
            rows[m] = run_method(bench, m)
        except Exception as e:  # noqa: BLE001 - the peer must not take the run down
            if not m.startswith("qwix_"):
                raise
            print(f"# {m}: failed ({' '.join(str(e).split())[:200]}); skipped", flush=True)
            continue
        write(header(), complete=False)
        r = rows[m]
        print(f"# done {m}: {r['seconds'] * 1e3:.1f} ms/step (compile + first step "
              f"{r['compile_s']:.1f}s)",
              flush=True)

    ref = rows.get("float")
    print(f"{'method':<22}{'ms/step':>9}{'img/s':>9}{'x float':>9}{'state MB':>10}"
          f"{'params':>10}{'codes':>9}{'opt':>10}{'stats':>8}{'step MB':>9}  note")
    for m, r in rows.items():
        mem = r["memory"]
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "-"
        peak = (r.get("step_memory") or {}).get("step_peak")
        peak = f"{peak / 2**20:>9.1f}" if peak is not None else f"{'-':>9}"
        print(f"{m:<22}{r['seconds'] * 1e3:>9.1f}{args.batch / r['seconds']:>9.0f}{ratio:>9}"
              f"{mem['total'] / 2**20:>10.3f}{mem['params']:>10d}{mem['codes']:>9d}"
              f"{mem['opt_state']:>10d}{mem['stats']:>8d}{peak}  {r['note']}")
    if bench.qwix_note:
        print(f"# {bench.qwix_note}")
    out = header()
    if args.profile and "dq_w2a2" in rows:
        try:
            prof = profile_dq(bench)
        except Exception as e:  # noqa: BLE001 - keep the table and the ratios
            import traceback
            traceback.print_exc()
            prof = {"error": str(e)[:300]}
        out["profile"] = prof
        print("# profile of the DQ W2A2 step (median ms):")
        for k, v in prof.items():
            print(f"#   {k:<32}{v * 1e3:>9.1f}" if isinstance(v, float) else f"#   {k}: {v}")
    if "dq_w2a2" in rows and "latent_ste_w2a2" in rows:
        r = rows["dq_w2a2"]["memory"]["total"] / rows["latent_ste_w2a2"]["memory"]["total"]
        print(f"dq_w2a2_state_over_latent_ste={r:.4f}")
        out["dq_w2a2_state_over_latent_ste"] = r
    write(out, complete=True)
    if "dq_w2a2" in rows and any(m.startswith("qwix_w2a2") for m in rows):
        r = rows["dq_w2a2"]["seconds"] / rows["qwix_w2a2"]["seconds"]
        print(f"dq_w2a2_over_qwix={r:.4f}")
    if "dq_w2a2" in rows and ref:
        print(f"dq_w2a2_over_float={rows['dq_w2a2']['seconds'] / ref['seconds']:.4f}")


if __name__ == "__main__":
    main()
