"""Ships a file larger than one device call's tree (64 MiB) in parts, and joins them there.

The CIFAR-10 copy the protocol reads (`cifar10.npz`, 163 MB) cannot travel in one call of the
device tool: split it here into parts under a git-ignored folder, carry one part per call
(back to back, so the machine stays warm and keeps the parts already sent), then join:

  python bench/ship.py split $DQ_JAX_SHARED_DATA/cifar10.npz .gpudata --max_mib=56
  # call k (k = 1..n) carries .gpudata/cifar10.npz.part<k> (and the first one manifest.json)
  python bench/ship.py join .gpudata /tmp/data/cifar10.npz     # on the device, then
  export DQ_JAX_SHARED_DATA=/tmp/data

`join` checks every part's and the whole file's sha256 against the manifest and names any
part that is missing or damaged, so a part lost with a cold machine is never read as data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(src: str | pathlib.Path, out_dir: str | pathlib.Path, max_mib: float = 56) -> dict:
    """Writes `out_dir/<name>.part<k>` (k from 1, each at most `max_mib` MiB) and a manifest."""
    src, out_dir = pathlib.Path(src), pathlib.Path(out_dir)
    if not src.is_file():
        sys.exit(f"ship split: {src} is not a file")
    if not max_mib > 0:
        sys.exit(f"ship split: --max_mib={max_mib} must be > 0")
    data = src.read_bytes()
    size = max(1, int(max_mib * 2 ** 20))
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, start in enumerate(range(0, max(len(data), 1), size), 1):
        chunk = data[start:start + size]
        path = out_dir / f"{src.name}.part{k}"
        path.write_bytes(chunk)
        parts.append({"file": path.name, "bytes": len(chunk), "sha256": _sha256(chunk)})
    manifest = {"name": src.name, "bytes": len(data), "sha256": _sha256(data), "parts": parts}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def join(parts_dir: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """Joins the parts listed in `parts_dir/manifest.json` into `out`, verified."""
    parts_dir, out = pathlib.Path(parts_dir), pathlib.Path(out)
    try:
        manifest = json.loads((parts_dir / MANIFEST).read_text())
    except FileNotFoundError:
        sys.exit(f"ship join: no {MANIFEST} in {parts_dir}; carry it with the first part")
    chunks = []
    for p in manifest["parts"]:
        path = parts_dir / p["file"]
        if not path.exists():
            sys.exit(f"ship join: part {p['file']} is missing from {parts_dir} (a machine that "
                     "went cold loses the parts sent before); carry it and join again")
        chunk = path.read_bytes()
        if _sha256(chunk) != p["sha256"]:
            sys.exit(f"ship join: part {p['file']} is damaged (sha256 differs); carry it again")
        chunks.append(chunk)
    data = b"".join(chunks)
    if _sha256(data) != manifest["sha256"]:
        sys.exit(f"ship join: the joined {manifest['name']} does not match its sha256")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("src")
    s.add_argument("out_dir")
    s.add_argument("--max_mib", type=float, default=56)
    j = sub.add_parser("join")
    j.add_argument("parts_dir")
    j.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "split":
        m = split(a.src, a.out_dir, a.max_mib)
        print(f"{m['name']}: {len(m['parts'])} parts in {a.out_dir} "
              f"({', '.join(x['file'] for x in m['parts'])})")
    else:
        print(f"joined {join(a.parts_dir, a.out)}")


if __name__ == "__main__":
    main()
