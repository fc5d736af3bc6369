"""Benchmarks (step time, input pipeline, accuracy); see RESULTS.md."""
from __future__ import annotations

import sys
from typing import Sequence


def parse_methods(text: str, known: Sequence[str]) -> list[str]:
    """`--methods=a,b` -> ['a', 'b']; exits with the known names on an unknown one."""
    methods = [m for m in text.split(",") if m]
    bad = [m for m in methods if m not in known]
    if bad:
        sys.exit(f"unknown method(s) {bad}; known: {', '.join(known)}")
    return methods
