"""Benchmarks (step time, input pipeline, accuracy); see RESULTS.md."""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line as the description, the whole
    docstring (commands, what is measured) at the end of --help."""
    return argparse.ArgumentParser(description=doc.split("\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=doc)


def parse_methods(text: str, known: Sequence[str]) -> list[str]:
    """`--methods=a,b` -> ['a', 'b']; exits with the known names on an unknown one."""
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if m not in known]
    if bad:
        sys.exit(f"unknown method(s) {bad}; known: {', '.join(known)}")
    return methods


def use_cifar10_npz(config):
    """Points `config` at the benchmark's CIFAR-10 `.npz` copy: `$DQ_JAX_SHARED_DATA` when set
    (the data reader looks there), else `shared/data/cifar10.npz` beside the checkout."""
    config.dataset = "cifar10_npz"
    beside = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10.npz"
    if not os.environ.get("DQ_JAX_SHARED_DATA") and not config.data_dir and beside.exists():
        config.data_dir = str(beside)
    return config
