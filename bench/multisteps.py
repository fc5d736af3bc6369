"""Gradient accumulation: DQ W2A2 on digits at batch 128 vs batch 32 with `grad_accum_steps=4`.

    python bench/multisteps.py [--seeds=3] [--updates=400] [--out=results/multisteps_digits.json]

Both arms take the same number of updates (`--updates`) on 128 images each, with the same
learning-rate schedule: arm A in one batch of 128, arm B as 4 micro-batches of 32 averaged by
`optax.MultiSteps` around `dq_optimizer` (codes re-assigned once per update, from the
accumulated dL/dW_q). Prints top-1 per seed, mean and min-max, and the difference B - A.
BatchNorm and activation statistics see batches of 32 in arm B (as they would on a small
slice), so the two arms are not the same computation; the claim checked is "same accuracy".
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402  (after the path set-up)
from dq_jax import train  # noqa: E402
from dq_jax.configlib import load_config_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(seed: int, batch: int, k: int, updates: int) -> dict:
    c = load_config_file(os.path.join(REPO, "configs", "digits.py"))
    c.seed, c.batch_size, c.grad_accum_steps = seed, batch, k
    c.num_train_steps = updates * k
    c.log_every_steps, c.eval_every_steps = 50 * k, 10 ** 9
    c.checkpoint_every_steps = updates * k
    with tempfile.TemporaryDirectory() as wd:
        t = time.time()
        out = train.train_and_evaluate(c, wd)
    return {"seed": seed, "batch": batch, "grad_accum_steps": k, "updates": updates,
            "micro_steps": updates * k, "top1": out["eval_top1"], "seconds": time.time() - t}


def main(argv=None) -> None:
    p = bench.arg_parser(__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--out", default=os.path.join(REPO, "results", "multisteps_digits.json"))
    args = p.parse_args(argv)
    arms = {"batch128": (128, 1), "batch32_x4": (32, 4)}
    runs = {name: [run(s, b, k, args.updates) for s in range(args.seeds)]
            for name, (b, k) in arms.items()}
    summary = {}
    for name, rs in runs.items():
        tops = [r["top1"] for r in rs]
        summary[name] = {"mean": sum(tops) / len(tops), "min": min(tops), "max": max(tops)}
        print(f"{name:<12} top-1 mean {summary[name]['mean']:.4f} (min {min(tops):.4f}, max "
              f"{max(tops):.4f}) per seed {[round(t, 4) for t in tops]}")
    diff = summary["batch32_x4"]["mean"] - summary["batch128"]["mean"]
    print(f"difference (batch32_x4 - batch128): {100 * diff:+.2f} points "
          f"(one held-out image = 0.22 points)")
    with open(args.out, "w") as f:
        json.dump({"command": "python bench/multisteps.py " + " ".join(argv or sys.argv[1:]),
                   "runs": runs, "summary": summary, "difference_points": 100 * diff}, f,
                  indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
