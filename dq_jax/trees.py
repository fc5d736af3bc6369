"""Path-keyed views of the nested variable dicts every module walks (one home for them)."""
from __future__ import annotations

from typing import Any

import flax


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """A nested dict or FrozenDict as {path tuple: leaf}; {} for an empty or None tree."""
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}
