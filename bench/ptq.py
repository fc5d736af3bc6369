"""Post-training quantization from a float checkpoint: top-1 with no training at all.

The starting point every quantized fine-tune begins from (docs/notebook.md §1): Lloyd levels and
nearest codes (DQ, latent-STE) or LSQ's initial step, one calibration batch for the activation
quantizers, evaluated as is and after re-estimating BatchNorm statistics on 50 batches.

  python bench/ptq.py --init_from=/path/to/float_workdir --methods=w2a2,lsq_w2a2
  python bench/ptq.py --init_from=... --methods=w2a2,adaround_w2a2   # nearest vs AdaRound codes
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init_from", required=True)
    p.add_argument("--methods", default="w2a2,w3a3,w4a4,lsq_w2a2,latent_ste_w2a2")
    p.add_argument("--bn_batches", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "results" / "ptq_cifar10.json"))
    args = p.parse_args(argv)
    import jax
    from dq_jax import checkpoints, configlib, data, train
    from dq_jax.configlib import load_config_file
    from dq_jax.main import apply_variant
    # post-training: no code update runs, so the rounding is moot; the stochastic settings need
    # no init_from in the config (the float model comes in through --init_from below)
    base = configlib.apply_dq_findings(
        load_config_file(ROOT / "configs" / "cifar10_resnet20.py"), "stochastic")
    from bench import use_cifar10_npz
    use_cifar10_npz(base)
    out = {"init_from": args.init_from, "bn_batches": args.bn_batches, "runs": {}}
    for method in args.methods.split(","):
        # 'adaround_<variant>': the same start with output-aware instead of nearest codes
        c = apply_variant(base, method.removeprefix("adaround_"))
        if method.startswith("adaround_"):
            c.init_from, c.conversion_rounding = args.init_from, "adaround"

        quant = configlib.validate(c, device_count=jax.device_count())
        ds = data.create_dataset(c)
        model = train.create_model(c, quant, ds.num_classes)
        opt = train.create_optimizer(c, 1, ds.steps_per_epoch)
        steps = train.Steps(model, opt, train.create_mesh(c))
        state = train.init_state(model, opt, ds.image_shape, c.seed)
        state = checkpoints.init_from_float(args.init_from, state, quant, opt)
        if method.startswith("adaround_"):
            state = train.adaround_conversion(c, state, opt, ds)
        state = steps.place(state)
        batches = ds.train_batches(0)
        state = steps.calibrate(state, train.to_global(next(batches), steps.batch))
        plain = train.evaluate(steps, state, ds.eval_batches())["eval_top1"]
        state = train.recalibrate_batch_stats(steps, state, batches, args.bn_batches)
        bn = train.evaluate(steps, state, ds.eval_batches())["eval_top1"]
        out["runs"][method] = {"top1": plain, "top1_bn_recalibrated": bn}
        print(f"{method:<18} PTQ top-1 {plain:.4f}   + BN re-estimation {bn:.4f}", flush=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
