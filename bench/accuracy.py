"""Top-1 of DQ vs the baselines, through the training program's own `train_and_evaluate`.

Methods (the same schedule for every one):
  float            no quantization
  w2a2/w3a3/w4a4   DQ weights (stochastic re-assignment) + channel-aware DQ activations
  nearest_w2a2     ablation: config.rounding='nearest'
  global_w2a2      ablation: config.quant.act_error='global'
  latent_ste_w2a2  baseline: float latent kernel + learned levels + STE
  lsq_w2a2         baseline: LSQ uniform weights (+ DQ activations, as apply_variant does)
  lsq_w3a3/w4a4    the same at 3 and 4 bits

  # digits (from scratch, configs/digits.py: 400 steps, 3 seeds; ~10 min on 2 CPU cores)
  python bench/accuracy.py --dataset=digits

  # CIFAR-10 ResNet-20, CPU-sized (what RESULTS.md reports; ~30 min on 2 busy CPU cores):
  # float pre-training for --float_steps (200 = 0.51 epoch), then --finetune_steps (25) of
  # quantized fine-tuning per method from it, 1 seed
  python bench/accuracy.py --dataset=cifar10 --float_steps=200 --finetune_steps=25
  # ... then 3 seeds for the W2A2 comparison, keeping the runs above
  python bench/accuracy.py --dataset=cifar10 --resume --seeds=3 \
      --methods=w2a2,latent_ste_w2a2,lsq_w2a2,nearest_w2a2

  # CIFAR-10 at full scale (GPU/TPU): 200 float epochs, 60 fine-tune epochs, 3 seeds
  python bench/accuracy.py --dataset=cifar10 --full

Writes results/accuracy_<dataset>[_full].json (every run's top-1, steps, wall time, flip
rates and level drift) and results/accuracy_<dataset>[_full].png (top-1 vs bits), and prints
a Markdown table (the one pasted into RESULTS.md).
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)

from bench import parse_methods, use_cifar10_npz  # noqa: E402  (after the path set-up)

METHODS = ("float", "w2a2", "w3a3", "w4a4", "nearest_w2a2", "global_w2a2",
           "latent_ste_w2a2", "lsq_w2a2", "lsq_w3a3", "lsq_w4a4")
BITS = {"float": 32, "w2a2": 2, "w3a3": 3, "w4a4": 4, "nearest_w2a2": 2, "global_w2a2": 2,
        "latent_ste_w2a2": 2, "lsq_w2a2": 2, "lsq_w3a3": 3, "lsq_w4a4": 4}


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--full", action="store_true",
                   help="cifar10 at paper scale: 200 float epochs, 60 fine-tune epochs, 3 seeds")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per method (default: digits 3, cifar10 1, --full 3)")
    p.add_argument("--float_steps", type=int, default=200,
                   help="cifar10 (not --full): float pre-training steps (391 = 1 epoch)")
    p.add_argument("--finetune_steps", type=int, default=25,
                   help="cifar10 (not --full): fine-tuning steps per method")
    p.add_argument("--steps", type=int, default=None,
                   help="digits: training steps per run (default: the config's 400)")
    p.add_argument("--float_workdir", default="",
                   help="cifar10: reuse this finished float pre-training run")
    p.add_argument("--workdir", default="/tmp/dq_bench_accuracy")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out (same schedule) and only add missing "
                        "ones, e.g. more seeds; without it the study starts from scratch "
                        "(its work directories under --workdir are deleted first)")
    p.add_argument("--out", default="", help="results JSON (default results/accuracy_<ds>.json)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="train nothing: combine finished runs of several invocations (e.g. "
                        "baselines run with their own --set) into --out, with the table and "
                        "plots; they must share the dataset, float start and fine-tuning steps")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the quantized runs' config (repeatable), e.g. "
                        "--set code_learning_rate=0.1 --set quant.lloyd_iters=50; recorded in "
                        "the schedule, so --resume only mixes runs with the same overrides")
    return p.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
    """['a.b=1', 'c=x'] -> {'a.b': 1, 'c': 'x'} (Python literals, else strings)."""
    import ast
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"--set {item!r}: expected KEY=VALUE, e.g. --set code_learning_rate=0.1")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def apply_overrides(config, overrides: dict):
    """Sets dotted keys on a ConfigDict; an unknown key exits naming it."""
    for key, value in overrides.items():
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in target:
                sys.exit(f"--set {key}: unknown config key {part!r}")
            target = target[part]
        name = parts[-1]
        if name not in target:
            sys.exit(f"--set {key}: unknown config key {name!r} (all keys: dq_jax/configlib.py)")
        target[name] = type(target[name])(value) if isinstance(target[name], float) else value
    return config


def method_config(base, method: str):
    """`base` with `method`'s quantization (via main.apply_variant + the ablation keys)."""
    from dq_jax.main import apply_variant
    if method.startswith("nearest_"):
        c = apply_variant(base, method[len("nearest_"):])
        c.rounding = "nearest"
    elif method.startswith("global_"):
        c = apply_variant(base, method[len("global_"):])
        c.quant.act_error = "global"
    else:
        c = apply_variant(base, method)
    return c


def read_layer_scalars(workdir: str) -> dict:
    """Per-layer scalars ('layers/...': codes_changed, code_entropy, and flip_rate in runs
    from before issue 27) as (step, value) lists, from TensorBoard events.

    Reads with TensorBoard's own event loader (no TensorFlow needed, e.g. on a JAX GPU image)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:
        return {}
    out: dict[str, list] = {}
    for ev_file in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        for ev in EventFileLoader(str(ev_file)).Load():
            for v in ev.summary.value:
                if v.tag.startswith("layers/"):
                    val = (float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor")
                           else v.simple_value)
                    out.setdefault(v.tag, []).append((ev.step, val))
    return out


def summarize_diagnostics(scalars: dict) -> dict:
    """Flip rate (first/last/mean log, over-training curve), integrated flips, final entropy.

    The program logs per layer `codes_changed` (the fraction of codes that differ from the
    previous log step) and `code_entropy` at each log step; runs from before issue 27 also
    logged `flip_rate` (the mean per-step fraction of codes that changed, over the window),
    summarised by `_summarize_flip_rates` as before."""
    flips = {k[len("layers/"):-len("/flip_rate")]: sorted(v) for k, v in scalars.items()
             if k.endswith("/flip_rate")}
    if flips:
        return _summarize_flip_rates(flips, scalars)
    return _summarize_codes_changed(scalars)


def _final_entropy(scalars: dict) -> dict:
    return {k[len("layers/"):-len("/code_entropy")]: sorted(v)[-1][1]
            for k, v in scalars.items() if k.endswith("/code_entropy")}


def _summarize_codes_changed(scalars: dict) -> dict:
    """From `codes_changed` alone: per log window the fraction of codes that changed (net: a
    flip undone within the window is not seen), its sum over training
    (`net_changes_per_weight`, a lower bound on the flips per weight) and the per-step net rate
    (that over the window's steps: `net_flip_rate_*`, comparable to the old per-step
    `flip_rate_*` only as a lower bound)."""
    import numpy as np
    net = {k[len("layers/"):-len("/codes_changed")]: sorted(v) for k, v in scalars.items()
           if k.endswith("/codes_changed")}
    if not net:
        return {}
    steps = [s for s, _ in next(iter(net.values()))]
    widths = np.diff([0] + steps)
    changed = [float(np.mean([v[i][1] for v in net.values()])) for i in range(len(steps))]
    rate = [c / w for c, w in zip(changed, widths)]
    return {"net_flip_rate_mean": float(np.mean(rate)), "net_flip_rate_first_log": rate[0],
            "net_flip_rate_last_log": rate[-1], "num_dq_layers": len(net),
            "codes_changed_curve": {"steps": steps, "mean_over_layers": changed},
            "net_changes_per_weight": float(np.mean([sum(x for _, x in v)
                                                     for v in net.values()])),
            "noise_window_steps": int(np.median(widths)),
            "code_entropy_final_by_layer": _final_entropy(scalars)}


def _summarize_flip_rates(flips: dict, scalars: dict) -> dict:
    """The summary of a run that logged the per-step `flip_rate` (before issue 27)."""
    import numpy as np
    steps = [s for s, _ in next(iter(flips.values()))]
    curve = [float(np.mean([v[i][1] for v in flips.values()])) for i in range(len(steps))]
    # Each log is the mean over the steps since the previous one: the integral over training
    # is the expected number of code changes per weight (an upper bound on the fraction of
    # weights that changed code at least once).
    widths = np.diff([0] + steps)
    integrated = {layer: float(np.sum(widths * np.array([x for _, x in v])))
                  for layer, v in flips.items()}
    entropy = _final_entropy(scalars)
    noise = noise_share(flips, scalars)
    return {**noise, "flip_rate_mean": float(np.mean(curve)), "flip_rate_first_log": curve[0],
            "flip_rate_last_log": curve[-1], "num_dq_layers": len(flips),
            "flip_rate_curve": {"steps": steps, "mean_over_layers": curve},
            "flips_per_weight": float(np.mean(list(integrated.values()))),
            "flips_per_weight_by_layer": integrated,
            "code_entropy_final_by_layer": entropy}


def noise_share(flips: dict, scalars: dict) -> dict:
    """The share of flips undone within a log window (the noise share): per window, the
    flips (steps x mean per-step flip rate) against the codes changed between its two ends
    (`codes_changed`, logged since this measurement existed); a flip and its undoing count 2
    flips and 0 net. Summed over windows, averaged over layers like `flips_per_weight`."""
    import numpy as np
    net = {k[len("layers/"):-len("/codes_changed")]: dict(v) for k, v in scalars.items()
           if k.endswith("/codes_changed")}
    if not net or set(net) != set(flips):
        return {}
    total_flips, total_net, window = [], [], None
    for layer, v in flips.items():
        steps = [s for s, _ in v]
        widths = np.diff([0] + steps)
        window = int(np.median(widths))
        total_flips.append(float(np.sum(widths * np.array([x for _, x in v]))))
        total_net.append(float(sum(net[layer].get(s, 0.0) for s in steps)))
    flips_mean, net_mean = float(np.mean(total_flips)), float(np.mean(total_net))
    return {"net_changes_per_weight": net_mean, "noise_window_steps": window,
            "noise_share": 1.0 - net_mean / flips_mean if flips_mean > 0 else None}


def level_drift(initial_params, final_params) -> dict:
    """Mean |levels_final - levels_init| relative to the initial level range, over layers."""
    import flax
    import numpy as np
    a = flax.traverse_util.flatten_dict(initial_params)
    b = flax.traverse_util.flatten_dict(final_params)
    rel = []
    for path, lv in a.items():
        if path[-1] != "kernel_levels":
            continue
        lv0, lv1 = np.asarray(lv), np.asarray(b[path])
        span = float(lv0.max() - lv0.min()) or 1.0
        rel.append(float(np.abs(lv1 - lv0).mean()) / span)
    return {"level_drift_rel": float(np.mean(rel))} if rel else {}


def weight_diagnostics(config, params0, codes0, params1, codes1, float_kernels) -> dict:
    """Per layer: relative quantization error of W_q against the float model's kernel at start
    and end (||W_q - W_float||^2 / ||W_float||^2), and (DQ) the fraction of weights whose code
    at the end differs from the start (a lower bound on 'changed at least once')."""
    import flax
    import jax.numpy as jnp
    import numpy as np
    from dq_jax.quant import weights as wq
    weights = config.quant.weights
    bits = config.quant.weight_bits

    def w_q(params, codes):
        p = flax.traverse_util.flatten_dict(params)
        c = flax.traverse_util.flatten_dict(codes) if codes else {}
        out = {}
        for path, leaf in p.items():
            m = path[:-1]
            if path[-1] == "kernel_levels" and weights == "dq":
                out[m] = np.asarray(wq.gather_levels(leaf, c[m + ("kernel",)]))
            elif path[-1] == "kernel_levels":
                k = p[m + ("kernel",)]
                out[m] = np.asarray(wq.gather_levels(leaf, wq.nearest_codes(leaf, k)))
            elif path[-1] == "kernel_step":
                out[m] = np.asarray(wq.lsq_kernel(jnp.asarray(p[m + ("kernel",)]), leaf, bits))
        return out

    q0, q1 = w_q(params0, codes0), w_q(params1, codes1)
    err0, err1 = {}, {}
    for m in q0:
        ref = np.asarray(float_kernels[m + ("kernel",)], np.float64)
        norm = float(np.sum(ref ** 2)) or 1.0
        err0["/".join(m)] = float(np.sum((q0[m] - ref) ** 2) / norm)
        err1["/".join(m)] = float(np.sum((q1[m] - ref) ** 2) / norm)
    out = {"weight_rel_error_start_by_layer": err0, "weight_rel_error_end_by_layer": err1,
           "weight_rel_error_start": float(np.mean(list(err0.values()))) if err0 else None,
           "weight_rel_error_end": float(np.mean(list(err1.values()))) if err1 else None}
    if weights == "dq" and codes0:
        c0 = flax.traverse_util.flatten_dict(codes0)
        c1 = flax.traverse_util.flatten_dict(codes1)
        changed = {"/".join(k[:-1]): float(np.mean(np.asarray(c0[k]) != np.asarray(c1[k])))
                   for k in c0}
        total = sum(np.asarray(c0[k]).size for k in c0)
        out["codes_changed_by_end_by_layer"] = changed
        out["codes_changed_by_end"] = float(sum(
            np.sum(np.asarray(c0[k]) != np.asarray(c1[k])) for k in c0) / total)
    return out


def initial_state(config, workdir: str):
    """The state the run starts from (after init_from): params and codes, with the per-layer
    widths the program gives it (first_last_bits, rules, and a bit_budget's allocation:
    computed here into the workdir's allocation.json, which the program then reads back)."""
    import jax
    from etils import epath
    from dq_jax import allocation, checkpoints, configlib, data, mixed, train
    quant = configlib.validate(config, device_count=jax.device_count())
    ds = data.create_dataset(config)
    config = allocation.resolve_config(config, epath.Path(workdir), ds, ds.num_classes)
    model = train.create_model(config, quant, ds.num_classes)
    opt = train.create_optimizer(config, 10, ds.steps_per_epoch)
    state = train.init_state(model, opt, ds.image_shape, config.seed)
    if config.init_from:
        state = checkpoints.init_from_float(
            config.init_from, state,
            mixed.widths_by_layer(config, model, ds.image_shape) or quant, opt)
    return jax.device_get(state.params), jax.device_get(state.codes)


def same_run_config(saved: dict, mine: dict) -> bool:
    """Whether a workdir's recorded run config is this run's: keys that cannot change results
    (force_new, allow_config_change) are ignored, and a key the saved config lacks (added to
    the schema since) matches when this run leaves it at its default (for a key in
    `checkpoints.LEGACY_VALUES`: at the value runs had before the key existed)."""
    from dq_jax.checkpoints import LEGACY_VALUES
    from dq_jax.configlib import base_config, random_rounding
    defaults = json.loads(base_config().to_json_best_effort())
    if mine.get("quant", {}).get("weights") == "dq" and random_rounding(mine):
        defaults.update(LEGACY_VALUES)  # e.g. a DQ run saved before the 'hash' random stream
    ignore = {"force_new", "allow_config_change"}
    for key in set(saved) | set(mine):
        if key in ignore:
            continue
        if key not in saved:
            if mine[key] != defaults.get(key, object()):
                return False
        elif key not in mine or saved[key] != mine[key]:
            return False
    return True


def run_one(config, workdir: str) -> dict:
    import flax
    import jax
    from dq_jax import train
    # Resumable: a run killed mid-way (the session ended) continues from its last checkpoint
    # when the same command is run again; a workdir left by a *different* run config is
    # cleared first, so no two configs (or their TensorBoard logs) ever mix.
    import shutil
    marker = pathlib.Path(workdir) / "bench_run_config.json"
    mine = config.to_json_best_effort(sort_keys=True)
    if marker.exists() and not same_run_config(json.loads(marker.read_text()),
                                               json.loads(mine)):
        shutil.rmtree(workdir)
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    marker.write_text(mine)
    quantized = config.quant.weights in ("dq", "latent_ste", "lsq")
    params0, codes0 = initial_state(config, workdir) if quantized else (None, None)
    t0 = time.time()
    out = train.train_and_evaluate(config, workdir)
    wall = time.time() - t0
    if out.get("preempted") or "eval_top1" not in out:
        sys.exit(f"run in {workdir} was interrupted at step {out.get('steps')} (checkpointed); "
                 "run the same command again to continue it")
    row = {"top1": out["eval_top1"], "top5": out["eval_top5"], "steps": out["steps"],
           "train_seconds": out["train_seconds"], "wall_seconds": wall,
           "steps_per_sec": out["steps_per_sec"]}
    if "eval_top1_before_bn_recalibration" in out:
        row["top1_before_bn_recalibration"] = out["eval_top1_before_bn_recalibration"]
    if quantized:
        final = jax.device_get(out["state"])
        row.update(level_drift(params0, final.params))
        if config.init_from:
            from dq_jax.checkpoints import load_float_variables
            float_kernels = flax.traverse_util.flatten_dict(
                load_float_variables(config.init_from)["params"])
            row.update(weight_diagnostics(config, params0, codes0, final.params, final.codes,
                                          float_kernels))
    row.update(summarize_diagnostics(read_layer_scalars(workdir)))
    results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
    for key in ("bit_allocation", "layer_widths"):  # per-layer widths, when the run has them
        if key in results:
            row[key] = results[key]
    return row


def fmt_table(results: dict, methods, epochs_note: str) -> str:
    import numpy as np
    lines = ["| method | W/A bits | top-1 mean | spread (min–max) | seeds | schedule | wall s / run "
             "| flip rate (mean) | level drift |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        runs = results["runs"].get(m, [])
        if not runs:
            continue
        t = np.array([r["top1"] for r in runs]) * 100
        bits = "32/32" if m == "float" else f"{BITS[m]}/{BITS[m]}"
        spread = f"{t.min():.2f}–{t.max():.2f}" if len(t) > 1 else "n/a (1 seed)"
        # the per-step flip rate (runs before issue 27), else its net lower bound (marked)
        net = not any("flip_rate_mean" in r for r in runs)
        flip = np.mean([r.get("net_flip_rate_mean" if net else "flip_rate_mean", np.nan)
                        for r in runs])
        drift = np.mean([r.get("level_drift_rel", np.nan) for r in runs])
        lines.append(
            f"| {m} | {bits} | {t.mean():.2f} | {spread} | {len(t)} | {epochs_note} "
            f"| {np.mean([r['wall_seconds'] for r in runs]):.0f} "
            f"| {'—' if np.isnan(flip) else f'{flip:.1e}' + (' (net)' if net else '')} "
            f"| {'—' if np.isnan(drift) else f'{drift:.3f}'} |")
    return "\n".join(lines)


GROUPS = {  # series of the top-1 vs bits plot: label -> methods (one per bit width)
    "DQ (stochastic)": ["w2a2", "w3a3", "w4a4"],
    "LSQ": ["lsq_w2a2", "lsq_w3a3", "lsq_w4a4"],
    "latent-STE": ["latent_ste_w2a2"],
    "DQ nearest": ["nearest_w2a2"],
    "DQ global act. error": ["global_w2a2"],
}


def plot(results: dict, methods, path: str, title: str) -> None:
    """Top-1 vs bits: mean per method with min-max over seeds as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (label, ms) in enumerate(GROUPS.items()):
        ms = [m for m in ms if results["runs"].get(m)]
        if not ms:
            continue
        tops = [np.array([r["top1"] for r in results["runs"][m]]) * 100 for m in ms]
        xs = np.array([BITS[m] for m in ms]) + 0.05 * (i - 2)
        ys = np.array([t.mean() for t in tops])
        err = np.array([[y - t.min() for y, t in zip(ys, tops)],
                        [t.max() - y for y, t in zip(ys, tops)]])
        ax.errorbar(xs, ys, yerr=err, marker="osDv^"[i], capsize=3,
                    linestyle="-" if len(ms) > 1 else "none", label=label)
    if "float" in results["runs"]:
        f = np.mean([r["top1"] for r in results["runs"]["float"]]) * 100
        ax.axhline(f, color="gray", linestyle="--", label=f"float ({f:.1f})")
    elif results.get("float_pretrain"):
        f = results["float_pretrain"]["top1"] * 100
        ax.axhline(f, color="gray", linestyle="--", label=f"float start ({f:.2f})")
    ax.set_xlabel("bits (weights = activations)")
    ax.set_ylabel("top-1 (%), mean; bars: min-max over seeds")
    ax.set_xticks([2, 3, 4])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_flips(results: dict, path: str, title: str) -> bool:
    """Flip rate (mean over DQ layers) over training, one line per DQ run."""
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    drawn = False
    for m, runs in results["runs"].items():
        for r in runs:
            curve, net = r.get("flip_rate_curve"), r.get("codes_changed_curve")
            if not curve and net:  # net changes per window -> a per-step (net) rate
                widths = np.diff([0] + net["steps"])
                curve = {"steps": net["steps"],
                         "mean_over_layers": [c / w for c, w in zip(net["mean_over_layers"],
                                                                    widths)]}
            if not curve:
                continue
            ys = [max(y, 1e-7) for y in curve["mean_over_layers"]]
            ax.plot(curve["steps"], ys, label=f"{m} seed {r.get('seed', 0)}",
                    linewidth=1.0 if r.get("seed", 0) else 1.6)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of weights changing code per step\n"
                  "(net of a log window since issue 27)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge(paths: list[str], out: str) -> dict:
    """One study from several invocations' JSONs (`--merge`), written to `out`.

    The protocol runs each method in its own invocation (its own --set overrides, resumable,
    committed as it lands); this puts them in one table and one pair of plots. Files must share
    the schedule apart from the overrides (dataset, float start, fine-tuning steps), and each
    method may come from one file only; the overrides are kept per method.
    """
    if not out:
        sys.exit("--merge needs --out=FILE for the combined JSON")
    merged: dict = {"runs": {}, "overrides_by_method": {}, "merged_from": [], "commands": []}
    origin: dict[str, str] = {}
    for path in paths:
        try:
            d = json.loads(pathlib.Path(path).read_text())
        except FileNotFoundError:
            sys.exit(f"--merge: {path}: no such file")
        except json.JSONDecodeError as e:
            sys.exit(f"--merge: {path}: not a JSON file of bench/accuracy.py ({e})")
        if "runs" not in d or "schedule" not in d:
            sys.exit(f"--merge: {path}: no 'runs'/'schedule' (not written by bench/accuracy.py)")
        schedule = {k: v for k, v in d["schedule"].items() if k != "overrides"}
        start = (d.get("float_pretrain") or {}).get("workdir")
        if not merged["merged_from"]:
            merged.update({k: d[k] for k in ("dataset", "full", "finetune_note") if k in d},
                          schedule=schedule, float_pretrain=d.get("float_pretrain"))
        elif schedule != merged["schedule"] or start != (merged["float_pretrain"] or {}).get(
                "workdir"):
            sys.exit(f"--merge: {path}: schedule {schedule} (float start {start}) differs from "
                     f"{merged['merged_from'][0]}'s {merged['schedule']}; merge only runs of "
                     "one protocol")
        for m, runs in d["runs"].items():
            if not runs:
                continue
            if m in origin:
                sys.exit(f"--merge: method {m} is in both {origin[m]} and {path}; pass one")
            origin[m] = path
            merged["runs"][m] = runs
            merged["overrides_by_method"][m] = d["schedule"].get("overrides", {})
        merged["merged_from"].append(path)
        merged["commands"] += d.get("commands") or [d.get("command")]
    shown = [m for m in METHODS if merged["runs"].get(m)]
    note = merged.get("finetune_note", "")
    merged["table_markdown"] = fmt_table(merged, shown, note) + "\n\nOverrides per method: " + \
        "; ".join(f"{m}: " + (", ".join(f"{k}={v}" for k, v in
                                        merged["overrides_by_method"][m].items()) or "none")
                  for m in shown) + "."
    out_json = pathlib.Path(out)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(merged, indent=1))
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra
        print("matplotlib is not installed (pip install 'dq_jax[bench]'): no plots")
    else:
        plot(merged, shown, str(out_json.with_suffix(".png")),
             f"{merged.get('dataset')}: top-1 vs bits ({note})")
        plot_flips(merged, str(out_json.with_name(out_json.stem + "_flips.png")),
                   f"{merged.get('dataset')}: DQ flip rate ({note})")
    print(merged["table_markdown"])
    print(f"wrote {out_json}")
    return merged


def cifar10_configs(args, overrides: dict):
    """(quantized runs' base config, float pre-training config) of the CIFAR-10 study.

    --set overrides go to the quantized runs only (as documented): the float pre-training
    stays one model whichever row's overrides trained it (bench/protocol.py --full shares it).
    """
    from dq_jax.configlib import apply_dq_findings, load_config_file
    # The protocol's DQ rows are the paper's stochastic rule at the settings the study chose for
    # it (what results/ holds); the recipe's default (rounding='inertia') is the `inertia`
    # variant of bench/gpu_grid.py, its settings spelled out as --set overrides.
    base = apply_dq_findings(load_config_file(ROOT / "configs" / "cifar10_resnet20.py"),
                             "stochastic")
    # ... drawn from the random stream they were measured with (issue 27 made one hash over all
    # layers the default; `--set rounding_stream=hash` runs a row on it)
    base.rounding_stream = "per_layer"
    use_cifar10_npz(base)  # the benchmark copy, not TFDS
    base.log_every_steps = 50
    fl = method_config(base, "float")
    apply_overrides(base, overrides)
    fl.learning_rate, fl.weight_decay, fl.levels_learning_rate = 0.1, 1e-4, 1e-4
    if args.full:
        fl.num_epochs = 200.0
        base.num_epochs = 60.0
    else:
        fl.num_train_steps = args.float_steps
        fl.eval_every_steps = 10 ** 9
        fl.checkpoint_every_steps = 10 ** 9
        base.num_train_steps = args.finetune_steps
        base.eval_every_steps = 10 ** 9
        base.checkpoint_every_steps = 200  # resumable if the session ends mid-run
    return base, fl


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        merge(args.merge, args.out)
        return
    methods = parse_methods(args.methods, METHODS)
    overrides = parse_overrides(args.set)
    if args.full and args.dataset != "cifar10":
        sys.exit("--full applies to --dataset=cifar10")
    seeds = args.seeds or (1 if args.dataset == "cifar10" and not args.full else 3)

    import jax
    from absl import logging
    from dq_jax.configlib import load_config_file
    logging.set_verbosity(logging.WARNING)

    def load(name):
        return load_config_file(ROOT / "configs" / f"{name}.py")

    suffix = f"{args.dataset}{'_full' if args.full else ''}"
    out_json = pathlib.Path(args.out or ROOT / "results" / f"accuracy_{suffix}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    results = {"dataset": args.dataset, "full": args.full, "seeds": seeds,
               "command": "python bench/accuracy.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
               "jax": jax.__version__, "devices": str(jax.devices()), "runs": {}}
    # Runs are kept (and not redone) across invocations with the same schedule, so a study
    # can be extended, e.g. more seeds for some methods (--seeds=3 --methods=w2a2,lsq_w2a2).
    results["schedule"] = {"dataset": args.dataset, "full": args.full, "steps": args.steps,
                           "float_steps": None if args.full or args.dataset == "digits"
                           else args.float_steps,
                           "finetune_steps": None if args.full or args.dataset == "digits"
                           else args.finetune_steps}
    if overrides:
        results["schedule"]["overrides"] = overrides
    if not args.resume:
        import shutil
        shutil.rmtree(os.path.join(args.workdir, suffix), ignore_errors=True)
        if not args.float_workdir:
            shutil.rmtree(os.path.join(args.workdir, f"{suffix}_float_pretrain"),
                          ignore_errors=True)
    if args.resume and out_json.exists():
        prev = json.loads(out_json.read_text())
        if prev.get("schedule") == results["schedule"]:
            results["runs"] = prev.get("runs", {})
            results["commands"] = prev.get("commands", [prev.get("command")])
            if "float_pretrain" in prev:
                results["float_pretrain"] = prev["float_pretrain"]
    results["commands"] = [c for c in results.get("commands", []) if c] + [results["command"]]

    def save():
        out_json.write_text(json.dumps(results, indent=1))

    if args.dataset == "digits":
        base = apply_overrides(load("digits"), overrides)
        if args.steps:
            base.num_train_steps = args.steps
        note = f"{base.num_train_steps} steps from scratch"
    else:
        base, fl = cifar10_configs(args, overrides)
        float_dir = args.float_workdir or os.path.join(args.workdir, f"{suffix}_float_pretrain")
        if args.float_workdir:
            prev = json.loads((pathlib.Path(float_dir) / "results.json").read_text())
            results["float_pretrain"] = {
                "top1": prev["eval_top1"], "top5": prev["eval_top5"], "steps": prev["steps"],
                "train_seconds": prev["train_seconds"], "workdir": float_dir,
                "learning_rate": prev["config"]["learning_rate"]}
            print("float pre-training (reused):", results["float_pretrain"], flush=True)
        else:
            pre = results.get("float_pretrain")
            if not pre or not (pathlib.Path(float_dir) / "results.json").exists():
                print(f"== float pre-training -> {float_dir}", flush=True)
                results["float_pretrain"] = {**run_one(fl, float_dir), "workdir": float_dir}
                save()
            print("float pre-training:", results["float_pretrain"], flush=True)
        base.init_from = float_dir
        spe = 50000 // base.batch_size
        steps = base.num_train_steps if base.num_train_steps > 0 else base.num_epochs * spe
        note = f"{steps / spe:.2f} ep ({steps} steps)"
        if not args.full:
            results["float_pretrain_epochs"] = results["float_pretrain"]["steps"] / spe
    results["finetune_note"] = note

    for m in methods:
        done = results["runs"].setdefault(m, [])
        for seed in range(len(done), seeds):
            cfg = method_config(base, m)
            cfg.seed = seed
            wd = os.path.join(args.workdir, suffix, f"{m}_seed{seed}")
            print(f"== {m} seed {seed} -> {wd}", flush=True)
            row = run_one(cfg, wd)
            row["seed"] = seed
            brief = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)
                     and k.startswith(("flip", "net_", "level", "top1_", "codes_changed"))}
            print(f"   top-1 {row['top1']:.4f}  wall {row['wall_seconds']:.1f}s  {brief}",
                  flush=True)
            done.append(row)
            save()

    shown = [m for m in METHODS if results["runs"].get(m)]
    table = fmt_table(results, shown, note)
    results["table_markdown"] = table
    save()
    png = out_json.with_suffix(".png")
    title = f"{args.dataset}: top-1 vs bits (mean ± std over seeds; {note})"
    plot(results, shown, str(png), title)
    flips_png = out_json.with_name(out_json.stem + "_flips.png")
    if plot_flips(results, str(flips_png), f"{args.dataset}: DQ flip rate ({note})"):
        print(f"wrote {flips_png}")
    print(table)
    print(f"wrote {out_json} and {png}")


if __name__ == "__main__":
    main()
