"""The CIFAR-10 ResNet-20 accuracy protocol (docs/notebook.md §1.1), every row, resumable.

  python bench/protocol.py --float_workdir=FLOAT                 # the whole grid, CPU-sized
  python bench/protocol.py --float_workdir=FLOAT --dry_run       # the commands, nothing run
  python bench/protocol.py --float_workdir=FLOAT --only=w2a2,lsq_w2a2 --max_seeds=1
  python bench/protocol.py --full                                # paper scale (GPU/TPU)

Each row is one `bench/accuracy.py --resume` invocation with its own JSON in --out_dir
(`<method>.json`), so a finished run is kept (commit it as it lands) and an interrupted one
continues from its last checkpoint. Order: the first seed of every row (W2A2 first), then the
extra seeds of the rows that take 3, so a partial study is the most informative one. After
every invocation the rows are merged (`accuracy.py --merge`) into --merged (table + plots).

Rows (the issue-15 grid): W2A2 `dq`, `latent_ste`, `lsq` with 3 seeds; `nearest` and `global`
DQ ablations, W3A3 and W4A4 `dq` and `lsq` with 1. Every row runs `configs/cifar10_resnet20.py`
(DQ: per-channel levels, code momentum 0.99 at code LR 1e-4) from the same float model for
the same --finetune_steps; latent-STE and LSQ use per-layer levels/steps, their better setting
in the 1-epoch screen (81.61 vs 81.24, 80.77 vs 80.61).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)

COMMON = ("levels_learning_rate=1e-3", "bn_recalibration_batches=50")
PER_LAYER = ("quant.granularity=per_layer",)
# method -> (seeds, extra --set overrides)
GRID: dict[str, tuple[int, tuple[str, ...]]] = {
    "w2a2": (3, ()),
    "lsq_w2a2": (3, PER_LAYER),
    "latent_ste_w2a2": (3, PER_LAYER),
    "nearest_w2a2": (1, ()),
    "global_w2a2": (1, ()),
    "w3a3": (1, ()),
    "lsq_w3a3": (1, PER_LAYER),
    "w4a4": (1, ()),
    "lsq_w4a4": (1, PER_LAYER),
}


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--float_workdir", default="",
                   help="the finished float run every row starts from (not with --full)")
    p.add_argument("--full", action="store_true",
                   help="paper scale: accuracy.py --full (200 float epochs, 60 fine-tune epochs)")
    p.add_argument("--finetune_steps", type=int, default=1955, help="per run (5 epochs)")
    p.add_argument("--only", default="", help=f"comma-separated rows of {','.join(GRID)}")
    p.add_argument("--max_seeds", type=int, default=3, help="cap on seeds per row")
    p.add_argument("--workdir", default="/tmp/dq_protocol",
                   help="the runs' work directories (and --full's float pre-training)")
    p.add_argument("--out_dir", default=str(ROOT / "results" / "protocol"),
                   help="one <row>.json per row")
    p.add_argument("--merged", default=str(ROOT / "results" / "accuracy_cifar10.json"),
                   help="the merged table's JSON (plots beside it)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    if not args.full and not args.float_workdir:
        p.error("--float_workdir=FLOAT is required (the float model every row starts from; "
                "docs/notebook.md §1.1 gives its command), or --full to train one at paper scale")
    if args.full and args.float_workdir:
        p.error("--full trains its own 200-epoch float model; drop --float_workdir")
    if args.max_seeds < 1:
        p.error(f"--max_seeds={args.max_seeds} must be >= 1")
    return args


def row_command(args, method: str, seeds: int) -> list[str]:
    """The `bench/accuracy.py` invocation of one row, up to `seeds` seeds."""
    cmd = [sys.executable, str(ROOT / "bench" / "accuracy.py"), "--dataset=cifar10", "--resume",
           f"--methods={method}", f"--seeds={seeds}",
           # one workdir for all rows: runs are <method>_seed<k> inside it, and with --full
           # every row reuses the one float pre-training there
           f"--workdir={args.workdir}",
           f"--out={os.path.join(args.out_dir, method + '.json')}"]
    if args.full:
        cmd.append("--full")
    else:
        cmd += [f"--float_workdir={args.float_workdir}",
                f"--finetune_steps={args.finetune_steps}"]
    for item in COMMON + GRID[method][1]:
        cmd.append(f"--set={item}")
    return cmd


def plan(args) -> list[tuple[str, list[str]]]:
    """(row, command) in run order: every row's first seed, then the extra seeds."""
    rows = [m for m in (args.only.split(",") if args.only else GRID) if m]
    unknown = [m for m in rows if m not in GRID]
    if unknown:
        sys.exit(f"--only: unknown row(s) {unknown}; known: {', '.join(GRID)}")
    out = [(m, row_command(args, m, 1)) for m in rows]
    out += [(m, row_command(args, m, min(GRID[m][0], args.max_seeds))) for m in rows
            if min(GRID[m][0], args.max_seeds) > 1]
    return out


def merge_existing(args) -> None:
    from bench import accuracy
    files = [os.path.join(args.out_dir, m + ".json") for m in GRID]
    files = [f for f in files if os.path.exists(f)]
    if files:
        accuracy.merge(files, args.merged)


def main(argv=None) -> None:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for _, cmd in steps:
            print(" ".join(cmd[1:]).replace(str(ROOT) + os.sep, ""))
        return
    os.makedirs(args.out_dir, exist_ok=True)
    for row, cmd in steps:
        print(f"== {row}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"row {row} failed (exit {proc.returncode}); rerun the same command to "
                     "resume it")
        merge_existing(args)


if __name__ == "__main__":
    main()
