"""The regimes the paper claims (issue 26 item 3), one `bench/gpu_grid.py`-style call each.

  python bench/gpu_regimes.py list
  python bench/gpu_regimes.py run REGIME --rows=ROWS [--float_workdir=FLOAT] [--seeds=0,1,2] \
      [--bundle=$OUT/rows.tar.gz]
  python bench/gpu_regimes.py collect REGIME --rows=ROWS [--out=results/regimes/REGIME.json]

Every (row, seed) of a regime is its own `gpu_grid.py one` process on the one accelerator
(same configs, diagnostics and --set overrides as the 5-epoch protocol; a row's JSON lands in
ROWS as it finishes). The regimes:

  long20      fine-tune 20 epochs from the ResNet-20 float model (FLOAT): DQ stochastic (the
              paper's rule), DQ inertia (the recipes' default), LSQ, latent-STE
  long60      the same at 60 epochs (23,460 steps: more than one 10-minute call on an H200
              holds; run it where a longer lease is available)
  scratch30   from scratch, W2A2, 30 epochs (the float stage's LR 0.1 and wd 5e-4 for every
              row): DQ stochastic, DQ inertia (zero start: no float model to seed), LSQ,
              latent-STE, and float for reference
  mbv2_float  the float MobileNetV2 (CIFAR stem) for `mbv2_w4a4`, 20 epochs like ResNet-20's;
              then `python bench/channel_energy.py --init_from=WORK/mbv2_float_s0
              --model=mobilenetv2_cifar --out=results/channel_energy_mbv2_cifar10.json`
  mbv2_w4a4   fine-tune MobileNetV2 W4A4 5 epochs from that float model (FLOAT =
              WORK/mbv2_float_s0): DQ channel-aware vs global activation error (both the
              recipes' inertia rounding), LSQ; per-layer levels (a depthwise 3x3 kernel has 9
              weights per channel, fewer than 16 levels)

Sizes: on the H200, ~20 processes of the 5-epoch protocol (1,955 steps) took 210-330 s each,
i.e. 6-12 steps/s per process; `--seeds` picks the seeds of one call so it stays under the
device's 10-minute call limit (e.g. long20 --seeds=0 is 4 processes of 7,820 steps).
Data: `$DQ_JAX_SHARED_DATA/cifar10.npz` (see bench/__init__.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_grid, protocol  # noqa: E402  (after the path set-up)

STEPS_PER_EPOCH = -(-50000 // 128)  # 391, as the protocol counts (1,955 steps = 5 epochs)
PER_LAYER = protocol.PER_LAYER
# DQ with the recipes' default rounding, spelled out (the protocol's base is the stochastic rule)
INERTIA = gpu_grid.INERTIA_RULE
FINETUNE_INERTIA = gpu_grid.INERTIA
# from scratch: the float stage's optimiser for every row; code steps in the same ratios to
# LR 0.1 as the recipes' to 0.01 (stochastic 0.01x, inertia 10x), inertia from zero
SCRATCH = ("learning_rate=0.1", "weight_decay=5e-4")
SCRATCH_STOCHASTIC = ("code_learning_rate=1e-3",)
SCRATCH_INERTIA = INERTIA + ("code_learning_rate=1.0",)
MBV2 = ("model=mobilenetv2_cifar", "quant.granularity=per_layer")


@dataclasses.dataclass(frozen=True)
class Regime:
    epochs: int
    needs_float: bool                              # rows start from --float_workdir
    rows: dict[str, tuple[str, tuple[str, ...]]]   # row -> (accuracy.py method, --set items)
    seeds: tuple[int, ...] = (0, 1, 2)

    @property
    def steps(self) -> int:
        return self.epochs * STEPS_PER_EPOCH


def _finetune_rows() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {"dq": ("w2a2", ()), "dq_inertia": ("w2a2", FINETUNE_INERTIA),
            "lsq": ("lsq_w2a2", PER_LAYER), "latent_ste": ("latent_ste_w2a2", PER_LAYER)}


REGIMES: dict[str, Regime] = {
    "long20": Regime(20, True, _finetune_rows()),
    "long60": Regime(60, True, _finetune_rows()),
    "scratch30": Regime(30, False, {
        "dq": ("w2a2", SCRATCH + SCRATCH_STOCHASTIC),
        "dq_inertia": ("w2a2", SCRATCH + SCRATCH_INERTIA),
        "lsq": ("lsq_w2a2", SCRATCH + PER_LAYER),
        "latent_ste": ("latent_ste_w2a2", SCRATCH + PER_LAYER),
        "float": ("float", SCRATCH)}),
    "mbv2_float": Regime(20, False, {"float": ("float", MBV2 + SCRATCH)}, seeds=(0,)),
    "mbv2_w4a4": Regime(5, True, {
        "dq": ("w4a4", MBV2 + FINETUNE_INERTIA),
        "dq_global": ("global_w4a4", MBV2 + FINETUNE_INERTIA),
        "lsq": ("lsq_w4a4", MBV2)}),
}


def jobs(regime: str, seeds: tuple[int, ...] | None = None):
    """(name, accuracy.py method, seed, --set items, steps) of `regime`, first seeds first."""
    r = REGIMES[regime]
    seeds = r.seeds if seeds is None else seeds
    bad = sorted(set(seeds) - set(r.seeds))
    if bad:
        sys.exit(f"--seeds: {bad} not among regime {regime!r}'s seeds {list(r.seeds)}")
    out = [(f"{regime}_{row}_s{s}", method, s, protocol.COMMON + sets, r.steps)
           for row, (method, sets) in r.rows.items() for s in seeds]
    return sorted(out, key=lambda j: j[2])


def run(a) -> None:
    r = REGIMES[a.regime]
    if r.needs_float and not (pathlib.Path(a.float_workdir) / "results.json").exists():
        sys.exit(f"regime {a.regime!r} fine-tunes a float model: --float_workdir="
                 f"{a.float_workdir!r} holds no finished float run (results.json)")
    if not r.needs_float and a.float_workdir:
        sys.exit(f"regime {a.regime!r} trains from scratch: drop --float_workdir")
    gpu_grid.launch(jobs(a.regime, a.seeds), a.float_workdir if r.needs_float else "",
                    a.rows, a.workdir, a.limit, a.bundle)


def collect(a) -> dict:
    """ROWS/<regime>_*.json -> one JSON of per-row seeds, mean and range, and a Markdown table."""
    r = REGIMES[a.regime]
    table = {}
    for row in r.rows:
        found = []
        for f in sorted(pathlib.Path(a.rows).glob(f"{a.regime}_{row}_s*.json")):
            d = json.loads(f.read_text())
            found.append({"seed": d["meta"]["seed"], **d["row"], "meta": d["meta"]})
        if found:
            table[row] = sorted(found, key=lambda x: x["seed"])
    if not table:
        sys.exit(f"--rows={a.rows}: no rows of regime {a.regime!r} "
                 f"(run `bench/gpu_regimes.py run {a.regime}` first)")
    lines = [f"| {a.regime} ({r.epochs} epochs, {r.steps} steps) | top-1 mean | min–max | seeds "
             "| codes changed by end |", "|---|---|---|---|---|"]
    for row, found in table.items():
        t = [x["top1"] * 100 for x in found]
        cc = [x["codes_changed_by_end"] for x in found if "codes_changed_by_end" in x]
        changed = f"{sum(cc) / len(cc):.3f}" if cc else "—"
        lines.append(f"| {row} | {sum(t) / len(t):.2f} | {min(t):.2f}–{max(t):.2f} | {len(t)} "
                     f"| {changed} |")
    out = {"regime": a.regime, **dataclasses.asdict(r), "steps": r.steps, "runs": table,
           "table_markdown": "\n".join(lines)}
    path = pathlib.Path(a.out or ROOT / "results" / "regimes" / f"{a.regime}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(out["table_markdown"])
    print(f"wrote {path}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the regimes, their rows and sizes")
    r = sub.add_parser("run", help="start every (row, seed) of a regime at once")
    c = sub.add_parser("collect", help="rows -> results/regimes/REGIME.json + a table")
    for q in (r, c):
        q.add_argument("regime", choices=sorted(REGIMES))
        q.add_argument("--rows", required=True, help="directory of the per-run row JSONs")
    r.add_argument("--float_workdir", default="")
    r.add_argument("--seeds", default=None, type=lambda t: tuple(int(x) for x in t.split(",")),
                   help="comma-separated seeds for this call (default: the regime's)")
    r.add_argument("--workdir", default="/tmp/dq_gpu_grid")
    r.add_argument("--limit", type=int, default=10 ** 6, help="seconds per run, then killed")
    r.add_argument("--bundle", default="", help="a .tar.gz of --rows, rewritten as runs end "
                   "(on the device: under $OUT, which brings back at most 8 files)")
    c.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.cmd == "list":
        for name, r in REGIMES.items():
            print(f"{name}: {r.epochs} epochs ({r.steps} steps), "
                  f"{'from --float_workdir' if r.needs_float else 'from scratch'}, seeds "
                  f"{list(r.seeds)}, rows {list(r.rows)}")
        return
    {"run": run, "collect": collect}[a.cmd](a)


if __name__ == "__main__":
    main()
