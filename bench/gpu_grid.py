"""The CIFAR-10 protocol (bench/protocol.py's grid) as parallel processes on one accelerator.

  python bench/gpu_grid.py run --float_workdir=FLOAT --rows=ROWS [--variants] [--limit=540] \
      [--bundle=$OUT/rows.tar.gz]
  python bench/gpu_grid.py collect --rows=ROWS --float_workdir=FLOAT \
      [--out_dir=results/protocol_h200 --merged=results/accuracy_cifar10_h200.json]

ResNet-20 at batch 128 fills a fraction of a GPU, so `run` starts every (row, seed) of the
grid at once, each its own process (`one`, a single bench/accuracy.py run: same configs, same
diagnostics, same --set overrides as protocol.py's invocations) writing `ROWS/<row>_s<seed>.json`
as it finishes. `--variants` adds the DQ ablations of VARIANTS (seed 0 unless stated). On a
machine without TensorFlow (a JAX GPU image) clu's writer cannot import: the TF-free stand-in
in bench/no_tf/ is put on the path, so the per-layer TensorBoard diagnostics are still written.
`collect` groups the rows into one `accuracy.py`-format JSON per row of the grid (and per
variant) and merges the grid's rows into one table with plots (`accuracy.py --merge`).
Data: `$DQ_JAX_SHARED_DATA/cifar10.npz` (see bench/__init__.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import protocol  # noqa: E402  (after the path set-up)

# The shipped DQ update (configlib.apply_dq_findings, rounding='inertia') as overrides of the
# protocol's stochastic rows: the rule, then the fine-tuning step (code LR 10x the float LR,
# the momentum seeded with the float position).
INERTIA_RULE = ("rounding=inertia", "code_momentum=0.999", "inertia_threshold=0.5")
INERTIA = INERTIA_RULE + ("code_learning_rate=0.1", "feedback_residual=float")

# DQ W2A2 ablations: name -> (seeds, extra --set overrides on top of the `w2a2` row), or
# (seeds, overrides, accuracy.py method) for a row of another method.
VARIANTS: dict[str, tuple] = {
    "bf16mom": (3, ("code_momentum_dtype=bfloat16",)),
    "clr3e-5": (3, ("code_learning_rate=3e-5",)),
    "clr1e-5": (1, ("code_learning_rate=1e-5",)),
    "clr3e-4": (1, ("code_learning_rate=3e-4",)),
    "mom995": (1, ("code_momentum=0.995", "code_learning_rate=5e-5")),
    "wd0": (1, ("weight_decay=0.0",)),
    "lvl1e-2": (1, ("levels_learning_rate=1e-2",)),
    "perlayer": (1, ("quant.granularity=per_layer",)),
    "lr2e-2": (1, ("learning_rate=0.02",)),
    "lr5e-3": (1, ("learning_rate=0.005",)),
    # The accumulator ablation (a float residual per weight: not the method), at DQ's code step
    # and at latent-STE's (float LR 0.01, momentum 0.9).
    "ef": (1, ("rounding=error_feedback",)),
    "ef_floatlr": (1, ("rounding=error_feedback", "code_learning_rate=0.01", "code_momentum=0.9")),
    # The same residual held in weight space (the latent stays when levels move): latent-STE
    # re-expressed in DQ's state, at latent-STE's step.
    "lf_floatlr": (1, ("rounding=latent_feedback", "code_learning_rate=0.01",
                       "code_momentum=0.9")),
    # ... with the latent starting at the float kernel (residual = float kernel - W_q).
    "lf_floatres": (3, ("rounding=latent_feedback", "code_learning_rate=0.01",
                        "code_momentum=0.9", "feedback_residual=float")),
    # ... keeping only a 2- / 1-bit position of that residual inside its cell (how many bits
    # of position DQ's state would need).
    "lf_floatres_b2": (1, ("rounding=latent_feedback", "code_learning_rate=0.01",
                           "code_momentum=0.9", "feedback_residual=float",
                           "feedback_residual_bits=2")),
    "lf_floatres_b1": (1, ("rounding=latent_feedback", "code_learning_rate=0.01",
                           "code_momentum=0.9", "feedback_residual=float",
                           "feedback_residual_bits=1")),
    # The in-frame use of the float positions: output-aware rounding at conversion (AdaRound).
    "adaround": (3, ("conversion_rounding=adaround",)),
    # The latent-free update with inertia (issue 26): deterministic one-level moves when the
    # code momentum's step reaches half a gap, the momentum a leaky accumulator (0.999) seeded
    # with the float position (no state beyond DQ's bfloat16 momentum); the 1-epoch screen's
    # best row.
    "inertia": (3, INERTIA),
    # Issue 28 item 4: W2A2 with 8-bit first/last layers (weights and their inputs), the
    # LSQ/APoT convention, for DQ (the shipped inertia rule), LSQ and latent-STE (per-layer
    # steps/levels as their rows).
    "inertia_fl8": (3, INERTIA + ("first_last_bits=8",)),
    "lsq_fl8": (3, protocol.PER_LAYER + ("first_last_bits=8",), "lsq_w2a2"),
    "latent_ste_fl8": (3, protocol.PER_LAYER + ("first_last_bits=8",), "latent_ste_w2a2"),
    # Issue 28 item 6: accuracy vs weight size, DQ with the shipped inertia rule. The
    # allocator sets weight widths only, so the size axis is at A4: uniform W2A4 / W3A4 /
    # W4A4, Hessian-allocated budgets of 2.5 and 3.0 average bits over the 18 inner convs,
    # and a seeded random allocation of each budget (the control: same size, no sensitivity).
    "w2a4": (1, INERTIA, "w2a4"),
    "w3a4": (1, INERTIA, "w3a4"),
    "w4a4": (1, INERTIA, "w4a4"),
    "alloc2.5": (3, INERTIA + ("bit_budget=2.5",), "w4a4"),
    "alloc3.0": (1, INERTIA + ("bit_budget=3.0",), "w4a4"),
    "random2.5": (1, INERTIA + ("bit_budget=2.5", "allocation_method=random"), "w4a4"),
    "random3.0": (1, INERTIA + ("bit_budget=3.0", "allocation_method=random"), "w4a4"),
}
ROW_NAME = re.compile(r"^(?P<group>.+)_s(?P<seed>\d+)$")


def jobs(variants: bool, only: str = "") -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(row name, accuracy.py method, seed, --set overrides), first seeds first."""
    out = [(f"{m}_s{s}", m, s, protocol.COMMON + sets)
           for m, (n, sets) in protocol.GRID.items() for s in range(n)]
    if variants:
        out += [(f"v_{v}_s{s}", spec[2] if len(spec) > 2 else "w2a2", s,
                 protocol.COMMON + spec[1])
                for v, spec in VARIANTS.items() for s in range(spec[0])]
    if only:
        keep = set(only.split(","))
        unknown = keep - {ROW_NAME.match(name)["group"] for name, *_ in out}
        if unknown:
            sys.exit(f"--only: unknown rows {sorted(unknown)}; choose from "
                     f"{list(protocol.GRID)} (and v_<name> for {list(VARIANTS)} with --variants)")
        out = [j for j in out if ROW_NAME.match(j[0])["group"] in keep]
    return sorted(out, key=lambda j: j[2])


def accuracy_args(method: str, float_workdir: str, sets, steps: int, workdir: str):
    from bench import accuracy
    return accuracy.parse_args(
        ["--dataset=cifar10", "--resume", f"--methods={method}",
         f"--float_workdir={float_workdir}", f"--finetune_steps={steps}",
         f"--workdir={workdir}"] + [f"--set={s}" for s in sets])


def one(a) -> None:
    """One (row, seed): bench/accuracy.py's run, its row JSON written when it finishes."""
    import jax
    from bench import accuracy
    args = accuracy_args(a.method, a.float_workdir, a.set, a.steps, a.workdir)
    overrides = accuracy.parse_overrides(args.set)
    base, _ = accuracy.cifar10_configs(args, overrides)
    base.init_from = a.float_workdir  # '' = from scratch (bench/gpu_regimes.py)
    cfg = accuracy.method_config(base, a.method)
    cfg.seed = a.seed
    t0 = time.time()
    row = accuracy.run_one(cfg, os.path.join(a.workdir, a.name))
    row["seed"] = a.seed
    meta = {"name": a.name, "method": a.method, "seed": a.seed, "sets": list(a.set),
            "overrides": overrides, "finetune_steps": a.steps, "devices": str(jax.devices()),
            "jax": jax.__version__, "total_seconds": time.time() - t0}
    pathlib.Path(a.rows, f"{a.name}.json").write_text(json.dumps({"meta": meta, "row": row},
                                                                 indent=1))
    print("DONE", a.name, row["top1"], flush=True)


def run(a) -> None:
    if not (pathlib.Path(a.float_workdir) / "results.json").exists():
        sys.exit(f"--float_workdir={a.float_workdir!r} holds no finished float run "
                 "(results.json); pass the float model every row starts from")
    launch([(name, method, seed, sets, a.steps) for name, method, seed, sets
            in jobs(a.variants, a.only)], a.float_workdir, a.rows, a.workdir, a.limit,
           a.bundle)


def bundle_rows(rows: str | pathlib.Path, path: str | pathlib.Path) -> None:
    """`path` (.tar.gz) <- every row JSON and log in `rows`, written whole or not at all: the
    device tool brings back at most 8 files of its $OUT, and a grid writes two per run."""
    import tarfile
    rows, path = pathlib.Path(rows), pathlib.Path(path)
    tmp = path.with_name(path.name + ".partial")
    with tarfile.open(tmp, "w:gz") as t:
        for f in sorted(rows.glob("*.json")) + sorted(rows.glob("*.log")):
            t.add(f, arcname=f.name)
    tmp.replace(path)


def launch(todo, float_workdir: str, rows: str, workdir: str, limit: int,
           bundle: str = "") -> None:
    """Starts every (name, method, seed, sets, steps) of `todo` whose row JSON is not in `rows`
    as its own `one` process (at most `limit` seconds each), then waits for all of them;
    `bundle` (a .tar.gz path, e.g. under the device's $OUT) is rewritten with every row so far
    after each run ends, so a call cut off still brings back the runs that finished."""
    rows = pathlib.Path(rows)
    rows.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.04")  # ~20 processes share one GPU
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "bench" / "no_tf"), str(ROOT), env.get("PYTHONPATH", "")])
    procs = []
    for name, method, seed, sets, steps in todo:
        if (rows / f"{name}.json").exists():
            continue
        cmd = [sys.executable, __file__, "one", name, method, str(seed),
               f"--float_workdir={float_workdir}", f"--rows={rows}", f"--steps={steps}",
               f"--workdir={workdir}"] + [f"--set={s}" for s in sets]
        with open(rows / f"{name}.log", "w") as log:  # the child keeps its own descriptor
            procs.append((name, subprocess.Popen(["timeout", str(limit)] + cmd, stdout=log,
                                                 stderr=subprocess.STDOUT, env=env)))
    for name, p in procs:
        print(name, "ok" if p.wait() == 0 else f"FAILED (rc {p.returncode}; see its .log)",
              flush=True)
        if bundle:
            bundle_rows(rows, bundle)
    if bundle and not procs:
        bundle_rows(rows, bundle)


def collect(a) -> None:
    """ROWS/*.json -> one accuracy.py-format JSON per row (and variant) + the merged grid."""
    from bench import accuracy
    fl = json.loads((pathlib.Path(a.float_workdir) / "results.json").read_text())
    groups: dict[str, list[dict]] = {}
    for f in sorted(pathlib.Path(a.rows).glob("*.json")):
        d = json.loads(f.read_text())
        m = ROW_NAME.match(d["meta"]["name"])
        if m is None:
            sys.exit(f"{f}: row name {d['meta']['name']!r} is not <row>_s<seed>")
        groups.setdefault(m["group"], []).append(d)
    if not groups:
        sys.exit(f"--rows={a.rows}: no row JSONs (run `bench/gpu_grid.py run` first)")
    out_dir = pathlib.Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for group, ds in sorted(groups.items()):
        ds.sort(key=lambda d: d["meta"]["seed"])
        metas = [d["meta"] for d in ds]
        method = metas[0]["method"]
        if any(m["method"] != method or m["overrides"] != metas[0]["overrides"]
               or m["finetune_steps"] != metas[0]["finetune_steps"] for m in metas):
            sys.exit(f"row {group}: its seeds differ in method/overrides/steps; rerun them alike")
        seeds = [m["seed"] for m in metas]
        if seeds != list(range(len(seeds))):
            sys.exit(f"row {group}: seeds {seeds} are not 0..{len(seeds) - 1}")
        steps = metas[0]["finetune_steps"]
        args = accuracy_args(method, a.float_workdir, metas[0]["sets"], steps, "")
        base, _ = accuracy.cifar10_configs(args, metas[0]["overrides"])
        per_epoch = 50000 // base.batch_size  # as accuracy.py counts epochs
        res = {"dataset": "cifar10", "full": False, "seeds": len(ds),
               "command": f"python bench/gpu_grid.py run --float_workdir=FLOAT --rows=ROWS "
                          f"(row {group})",
               "jax": metas[0]["jax"], "devices": metas[0]["devices"],
               "schedule": {"dataset": "cifar10", "full": False, "steps": None,
                            "float_steps": args.float_steps, "finetune_steps": steps,
                            "overrides": metas[0]["overrides"]},
               "commands": [f"python bench/gpu_grid.py one {m['name']} {method} {m['seed']} "
                            + " ".join(f"--set={s}" for s in m["sets"]) for m in metas],
               "float_pretrain": {"top1": fl["eval_top1"], "top5": fl["eval_top5"],
                                  "steps": fl["steps"], "train_seconds": fl["train_seconds"],
                                  "workdir": a.float_label or a.float_workdir,
                                  "learning_rate": fl["config"]["learning_rate"]},
               "float_pretrain_epochs": fl["steps"] / per_epoch,
               "finetune_note": f"{steps / per_epoch:.2f} ep ({steps} steps)",
               "runs": {method: [d["row"] for d in ds]}}
        path = out_dir / f"{group}.json"
        path.write_text(json.dumps(res, indent=1))
        if group in protocol.GRID:
            written.append(str(path))
    if written and a.merged:
        accuracy.merge(written, a.merged)
    lines = ["| variant (DQ W2A2 unless named +) | overrides | top-1 per seed | mean | codes changed "
             "| W_q rel. error end |", "|---|---|---|---|---|---|"]
    for group, ds in sorted(groups.items()):
        if group in protocol.GRID:
            continue
        t = [d["row"]["top1"] * 100 for d in ds]
        extra = [s for s in ds[0]["meta"]["sets"] if s not in protocol.COMMON]
        method = ds[0]["meta"]["method"]
        extra = ([] if method == "w2a2" else [f"method {method}"]) + extra
        lines.append(f"| {group} | {', '.join(extra)} | {', '.join(f'{x:.2f}' for x in t)} "
                     f"| {sum(t) / len(t):.2f} "
                     f"| {sum(d['row'].get('codes_changed_by_end', 0) for d in ds) / len(ds):.4f} "
                     f"| {sum(d['row'].get('weight_rel_error_end', 0) for d in ds) / len(ds):.3f} |")
    if len(lines) > 2:
        (out_dir / "variants.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start every (row, seed) at once; rows -> --rows")
    r.add_argument("--variants", action="store_true", help="add the DQ ablations (VARIANTS)")
    r.add_argument("--only", default="", help="comma-separated row names")
    r.add_argument("--limit", type=int, default=10 ** 6, help="seconds per run, then killed")
    r.add_argument("--bundle", default="", help="a .tar.gz of --rows, rewritten as runs end "
                   "(on the device: under $OUT, which brings back at most 8 files)")
    o = sub.add_parser("one", help="one (row, seed); what `run` starts")
    o.add_argument("name")
    o.add_argument("method")
    o.add_argument("seed", type=int)
    o.add_argument("--set", action="append", default=[])
    for q in (r, o):
        q.add_argument("--float_workdir", required=True)
        q.add_argument("--rows", required=True)
        q.add_argument("--steps", type=int, default=1955, help="fine-tuning steps per run")
        q.add_argument("--workdir", default="/tmp/dq_gpu_grid")
    c = sub.add_parser("collect", help="rows -> accuracy.py JSONs + merged table/plots")
    c.add_argument("--rows", required=True)
    c.add_argument("--float_workdir", required=True)
    c.add_argument("--float_label", default="",
                   help="the float start's name in the JSONs (default: --float_workdir)")
    c.add_argument("--out_dir", default=str(ROOT / "results" / "protocol_h200"))
    c.add_argument("--merged", default=str(ROOT / "results" / "accuracy_cifar10_h200.json"))
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    {"run": run, "one": one, "collect": collect}[a.cmd](a)


if __name__ == "__main__":
    main()
