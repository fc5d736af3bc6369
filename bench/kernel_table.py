"""Per-kernel table of the train step: which kernels each method adds, their time and bytes.

  python bench/kernel_table.py --model=resnet20 --batch=128 --methods=float,dq_w2a2,lsq_w2a2,latent_ste_w2a2
  python bench/kernel_table.py --model=digits_cnn --batch=16 --steps=2 --methods=float,dq_w2a2

Issue 27 item 1. Each method's step (the program's own `train.Steps(...).train`) runs --steps
times under `jax.profiler.trace`; every device event whose name is an instruction of the
compiled step (an XLA:GPU kernel, an XLA:CPU thunk) is charged to that instruction. Each
instruction is put in a part of the step by its HLO metadata (the name scopes the library
sets): `finite_guard`, `dq_update` (the optimizer: codes, levels and float params), activation statistics (`_ema`), the
activation quantizer (`act_quant`), the weight lookup (`dq_weight`), else the model's forward
or backward. Bytes are each instruction's operands + result as the compiled HLO declares them
(what a kernel reads and writes at most; a fusion that reads a broadcast reads less).
Per part and per method: kernels, ms per step, MB per step; then the costliest kernels.
`--json=PATH` writes it all. On the CPU the "kernels" are XLA:CPU's thunks and fusions (the
proxy the issue names); on a GPU they are the CUDA kernels XLA launches.
"""
from __future__ import annotations

import collections
import glob
import json
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench  # noqa: E402  (after the path set-up)
from bench import step_time  # noqa: E402

# (substring of an instruction's op_name, part of the step): the first that matches wins.
PARTS = (("finite_guard", "guard"), ("dq_update", "optimizer update"), ("_ema", "act. statistics"),
         ("act_quant", "act. quantizer"), ("dq_weight", "weight lookup"),
         ("transpose(", "model backward"), ("jvp(", "model forward"))
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*?)\)(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (`f32[128,16]{1,0}`, or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def part_of(op_name: str) -> str:
    for key, part in PARTS:
        if key in op_name:
            return part
    return "other"


def instructions(hlo_text: str) -> dict[str, dict]:
    """name -> {part, bytes, op} of every instruction outside fused computations."""
    shapes, lines = {}, []
    in_fusion = False
    for line in hlo_text.splitlines():
        if re.match(r"^\S.*\{\s*$", line):  # a computation's header
            in_fusion = "fused_computation" in line or line.lstrip("%").startswith("fused")
            continue
        m = _INSTR.match(line)
        if m:
            shapes[m.group(1)] = m.group(2)
            if not in_fusion:
                lines.append(m)
    out = {}
    for m in lines:
        name, shape, op, operands, rest = m.groups()
        meta = re.search(r'op_name="([^"]*)"', rest)
        read = sum(shape_bytes(shapes.get(o.strip().lstrip("%"), ""))
                   for o in operands.split(","))
        out[name] = {"op": op, "part": part_of(meta.group(1) if meta else ""),
                     "bytes": shape_bytes(shape) + read}
    return out


def _key(name: str) -> str:
    return re.sub(r"[._\-]", "", name)


def device_time(trace_dir: str, names: dict[str, dict]) -> dict[str, list[float]]:
    """instruction name -> durations (ns) of its events in the trace under `trace_dir`."""
    from jax.profiler import ProfileData
    by_key = {_key(n): n for n in names}
    out: dict[str, list[float]] = collections.defaultdict(list)
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for ev in line.events:
                    stats = dict(ev.stats)
                    name = str(stats.get("hlo_op", ev.name))
                    hit = by_key.get(_key(name))
                    if hit is not None:
                        out[hit].append(ev.duration_ns)
    return out


def table(bench_: step_time.Bench, method: str, steps_n: int) -> dict:
    import jax
    _, _, steps, state, batch = bench_.build(method)
    for _ in range(2):  # compile + calibrated steps, untraced
        state, m = steps.train(state, batch)
    jax.block_until_ready(state)
    names = instructions(steps.train.lower(state, batch).compile().as_text())
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps_n):
                state, m = steps.train(state, batch)
            jax.block_until_ready((state, m))
        times = device_time(tmp, names)
    parts: dict[str, dict] = {}
    for name, info in names.items():
        if name not in times:
            continue
        p = parts.setdefault(info["part"], {"kernels": 0, "ms_per_step": 0.0,
                                            "mb_per_step": 0.0})
        p["kernels"] += 1
        p["ms_per_step"] += sum(times[name]) / 1e6 / steps_n
        p["mb_per_step"] += info["bytes"] * len(times[name]) / steps_n / 2 ** 20
    top = sorted(((sum(t) / 1e6 / steps_n, n) for n, t in times.items()), reverse=True)[:12]
    return {"parts": parts, "instructions": len(names), "kernels_run": len(times),
            "top": [{"kernel": n, "ms_per_step": ms, "part": names[n]["part"],
                     "mb": names[n]["bytes"] / 2 ** 20} for ms, n in top]}


def parse_args(argv=None):
    p = bench.arg_parser(__doc__)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--methods", default="float,dq_w2a2,lsq_w2a2,latent_ste_w2a2")
    p.add_argument("--steps", type=int, default=5, help="traced steps per method")
    p.add_argument("--json", default="", help="also write the tables to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps={args.steps} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    methods = bench.parse_methods(args.methods, [m for m in step_time.METHODS
                                                 if not m.startswith("qwix_")])
    import jax
    # The persistent cache keys a program without its op names: a cached executable would
    # carry the metadata (name scopes) of whichever code compiled it first.
    jax.config.update("jax_enable_compilation_cache", False)
    b = step_time.Bench(step_time.parse_args([f"--model={args.model}", f"--batch={args.batch}"]))
    print(f"# model={args.model} batch={args.batch} steps={args.steps} "
          f"backend={jax.default_backend()} device={jax.devices()[0].device_kind}", flush=True)
    rows = {m: table(b, m, args.steps) for m in methods}
    order = [p for _, p in PARTS] + ["other"]
    print(f"{'part':<18}" + "".join(f"{m:>28}" for m in methods))
    print(f"{'':<18}" + "".join(f"{'kernels   ms/step  MB/step':>28}" for _ in methods))
    for part in order:
        if not any(part in r["parts"] for r in rows.values()):
            continue
        cells = []
        for m in methods:
            c = rows[m]["parts"].get(part, {"kernels": 0, "ms_per_step": 0.0,
                                             "mb_per_step": 0.0})
            cells.append(f"{c['kernels']:>9d}{c['ms_per_step']:>9.2f}{c['mb_per_step']:>8.1f}")
        print(f"{part:<18}" + "".join(f"{c:>28}" for c in cells))
    totals = {m: sum(c["ms_per_step"] for c in r["parts"].values()) for m, r in rows.items()}
    print(f"{'total ms/step':<18}" + "".join(f"{totals[m]:>28.2f}" for m in methods))
    for m in methods:
        print(f"# costliest kernels, {m}: " + ", ".join(
            f"{t['kernel']} ({t['part']}) {t['ms_per_step']:.2f} ms" for t in rows[m]["top"][:6]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"args": vars(args), "rows": rows, "backend": jax.default_backend(),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__}, indent=1))


if __name__ == "__main__":
    main()
