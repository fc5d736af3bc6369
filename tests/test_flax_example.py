"""The Flax ImageNet example's script turns into DQ training by the complete diff that
docs/quantize_any_model.md gives (issue 28, item 7): applied here to the example-style script
`tests/flax_example_train.py`, its changed lines counted against what the doc states, and both
the float and the converted script trained on digits."""
from __future__ import annotations

import importlib.util
import re
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.helpers import REPO
from tests.test_flax_dropin import digits_16x16

DOC = REPO / "docs" / "quantize_any_model.md"
SCRIPT = REPO / "tests" / "flax_example_train.py"


def _diff() -> str:
    (diff,) = re.findall(r"```diff\n(.*?)```", DOC.read_text(), flags=re.S)
    return diff


def apply_hunks(text: str, diff: str) -> tuple[str, list[str]]:
    """`text` with each hunk (`@@ where` then ' ', '-', '+' lines) applied in order: its
    context and '-' lines must occur, in order, after the previous hunk. Returns the new text
    and the hunks' `where` names."""
    hunks, wheres = [], []
    for line in diff.splitlines():
        if line.startswith("@@"):
            wheres.append(line[2:].strip().split(":")[0])
            hunks.append([])
        else:
            hunks[-1].append(line)
    pos = 0
    for where, hunk in zip(wheres, hunks):
        assert all(l[:1] in (" ", "-", "+") for l in hunk if l), hunk
        before = "\n".join(l[1:] for l in hunk if not l.startswith("+")) + "\n"
        after = "\n".join(l[1:] for l in hunk if not l.startswith("-")) + "\n"
        at = text.find(before, pos)
        assert at >= 0, f"hunk '{where}' does not apply:\n{before}"
        text = text[:at] + after + text[at + len(before):]
        pos = at + len(after)
    return text, wheres


def _load(text: str, name: str, tmp_path):
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _config():
    return ml_collections.ConfigDict(dict(
        model="ResNetTiny", half_precision=False, learning_rate=0.4, batch_size=64,
        warmup_epochs=1, num_epochs=3, steps_per_epoch=10, momentum=0.9, image_size=16))


@pytest.fixture(scope="module")
def batches():
    (x, y), (x_test, y_test) = digits_16x16()
    rng = np.random.default_rng(0)
    train = [{"image": jnp.asarray(x[i]), "label": jnp.asarray(y[i])}
             for i in (rng.choice(len(x), 64, replace=False) for _ in range(30))]
    return train, {"image": jnp.asarray(x_test), "label": jnp.asarray(y_test)}


def test_the_doc_states_the_true_size_of_the_complete_diff():
    diff = _diff()
    lines = diff.splitlines()
    removed = sum(l.startswith("-") for l in lines)
    added = sum(l.startswith("+") for l in lines)
    _, wheres = apply_hunks(SCRIPT.read_text(), diff)
    places = len(dict.fromkeys(wheres))
    assert (removed, added, places) == (12, 16, 7)
    assert f"**{removed} lines removed and {added} added**, in {places} places" in DOC.read_text()
    # the README no longer claims the whole conversion is three lines, and points here
    readme = (REPO / "README.md").read_text()
    assert "docs/quantize_any_model.md" in readme


def test_example_script_trains_float_and_after_the_diff_dq(batches, tmp_path):
    train, test = batches
    float_script = _load(SCRIPT.read_text(), "flax_example_train_float", tmp_path)
    state, _, metrics = float_script.train_and_evaluate(_config(), train[:5], test)
    assert np.isfinite(float(metrics["loss"]))

    dq_text, _ = apply_hunks(SCRIPT.read_text(), _diff())
    dq = _load(dq_text, "flax_example_train_dq", tmp_path)
    config = _config()
    model = dq.create_model(model_cls=dq.models.ResNetTiny, half_precision=False)
    initial = dq.create_train_state(jax.random.key(0), config, model, 16, lambda s: 0.1)
    state, last, metrics = dq.train_and_evaluate(config, train, test)
    levels = {"/".join(k[:-1]): v.shape
              for k, v in flax.traverse_util.flatten_dict(state.params).items()
              if k[-1] == "kernel_levels"}
    assert levels["conv_init"] == levels["Dense_0"] == (1, 256)  # the 8-bit rule
    assert {v for k, v in levels.items() if k not in ("conv_init", "Dense_0")} == {(1, 4)}
    assert len(levels) == 7  # stem, 5 block convs, head: every layer of the model
    for path, c in flax.traverse_util.flatten_dict(state.codes).items():
        c0 = flax.traverse_util.flatten_dict(initial.codes)[path]
        assert np.mean(np.asarray(c) != np.asarray(c0)) > 0, path  # the codes move
    stats = flax.traverse_util.flatten_dict(state.quant_stats)
    assert stats and all(bool(v) for k, v in stats.items() if k[-1] == "initialized")
    assert float(metrics["accuracy"]) > 0.3, metrics  # chance is 0.1 (30 steps)
