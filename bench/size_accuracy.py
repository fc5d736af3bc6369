"""Accuracy vs weight size (issue 28 item 6): uniform widths, allocated budgets, random controls.

  python bench/size_accuracy.py --rows=ROWS [--out=results/size_accuracy_cifar10.json]

Reads the row JSONs `bench/gpu_grid.py one` writes (`<row>_s<seed>.json`, with or without the
grid's `v_` prefix): uniform `w2a4` / `w3a4` / `w4a4`, Hessian-allocated `alloc<budget>` and
random `random<budget>` (their widths and predicted size come from the row's `bit_allocation`,
which `bench/accuracy.run_one` copies from the run's results.json). The size axis is the
average weight bits over the layers the allocator sets (ResNet-20: the 18 inner convs; first
and last stay float): a uniform Wb row is at b. Writes the table (mean top-1 over seeds), the
two targets of the issue read off it, and a plot beside the JSON.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys

ROW = re.compile(r"^(?:v_)?(?P<kind>w(?P<bits>\d)a\d|alloc|random)(?P<budget>[\d.]*)_s(?P<seed>\d+)$")
# Issue 28's targets: at uniform W3's size within 0.3 of uniform W4; at 2.5 bits >= 1 point
# above uniform W2 (top-1, percentage points).
TARGETS = (("alloc3.0", "w4a4", -0.3), ("alloc2.5", "w2a4", 1.0))


def read_rows(rows_dir: str) -> dict[str, dict]:
    """Row group -> {'top1': [per seed, %], 'bits': average weight bits, 'weight_bytes',
    'kind': uniform / hessian / random}."""
    groups: dict[str, dict] = {}
    uniform_bytes = None  # {'2': bytes, ...}: what a budgeted row records for uniform widths
    for f in sorted(pathlib.Path(rows_dir).glob("*.json")):
        d = json.loads(f.read_text())
        m = ROW.match(d["meta"]["name"])
        if m is None:
            continue
        row = d["row"]
        if m["kind"] in ("alloc", "random"):
            alloc = row.get("bit_allocation")
            if alloc is None:
                sys.exit(f"{f}: row {d['meta']['name']} has no bit_allocation (rerun it with "
                         "this tree's bench/accuracy.py, which records it)")
            name, bits = f"{m['kind']}{m['budget']}", float(alloc["average_bits"])
            kind, nbytes = ("hessian" if m["kind"] == "alloc" else "random"), alloc["weight_bytes"]
        else:
            name, bits, kind, nbytes = m["kind"], float(m["bits"]), "uniform", None
        g = groups.setdefault(name, {"top1": [], "bits": bits, "weight_bytes": nbytes,
                                     "kind": kind})
        g["top1"].append(round(100 * row["top1"], 2))
        if alloc_bytes := (row.get("bit_allocation") or {}).get("weight_bytes_uniform"):
            uniform_bytes = alloc_bytes
    for g in groups.values():
        g["mean"] = round(statistics.fmean(g["top1"]), 2)
        if g["kind"] == "uniform" and g["weight_bytes"] is None:  # same layers, from a budget row
            g["weight_bytes"] = (uniform_bytes or {}).get(str(int(g["bits"])))
    return groups


def targets(groups: dict) -> list[dict]:
    """Each target: its rows, the difference (points) and whether it holds; rows missing:
    `holds` None."""
    out = []
    for row, ref, want in TARGETS:
        if row in groups and ref in groups:
            diff = round(groups[row]["mean"] - groups[ref]["mean"], 2)
            out.append({"row": row, "reference": ref, "wanted": want, "difference": diff,
                        "holds": diff >= want})
        else:
            out.append({"row": row, "reference": ref, "wanted": want, "difference": None,
                        "holds": None})
    return out


def table(groups: dict) -> str:
    lines = ["| row | kind | avg weight bits | weight bytes (inner convs) | top-1 per seed | mean |",
             "|---|---|---|---|---|---|"]
    for name, g in sorted(groups.items(), key=lambda kv: (kv[1]["bits"], kv[0])):
        nbytes = "—" if g["weight_bytes"] is None else str(g["weight_bytes"])
        lines.append(f"| {name} | {g['kind']} | {g['bits']:.3f} | {nbytes} "
                     f"| {', '.join(f'{t:.2f}' for t in g['top1'])} | {g['mean']:.2f} |")
    return "\n".join(lines)


def plot(groups: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    style = {"uniform": ("o-", "uniform W2/W3/W4"), "hessian": ("s", "Hessian allocation"),
             "random": ("x", "random allocation (same budget)")}
    for kind, (fmt, label) in style.items():
        pts = sorted((g["bits"], g["mean"]) for g in groups.values() if g["kind"] == kind)
        if pts:
            ax.plot(*zip(*pts), fmt, label=label, markersize=7)
    ax.set_xlabel("average weight bits (inner convs)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, help="folder of gpu_grid row JSONs")
    p.add_argument("--out", default="results/size_accuracy_cifar10.json")
    p.add_argument("--title", default="CIFAR-10 ResNet-20, DQ W?A4: accuracy vs weight size")
    p.add_argument("--note", default="", help="what the rows are (schedule, device)")
    a = p.parse_args(argv)
    groups = read_rows(a.rows)
    if not groups:
        sys.exit(f"--rows={a.rows}: no w<b>a<b> / alloc<budget> / random<budget> rows")
    result = {"command": "python bench/size_accuracy.py " + " ".join(argv or sys.argv[1:]),
              "note": a.note, "rows": groups, "targets": targets(groups),
              "table_markdown": table(groups)}
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra
        print("matplotlib is not installed (pip install 'dq_jax[bench]'): no plot")
    else:
        plot(groups, str(out.with_suffix(".png")), a.title)
    print(result["table_markdown"])
    for t in result["targets"]:
        print(f"target {t['row']} - {t['reference']} >= {t['wanted']:+}: "
              + ("rows missing" if t["holds"] is None
                 else f"{t['difference']:+.2f} ({'holds' if t['holds'] else 'missed'})"))


if __name__ == "__main__":
    main()
