"""The README's promises: its layer example runs on the core install, its commands match CI."""
from __future__ import annotations

import re

from tests.helpers import REPO, run_python

# Import names of the `train` extra (setup.py): a core install (`pip install dq_jax`) has none.
TRAIN_EXTRA_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "tensorboard", "sklearn",
                       "tqdm", "PIL")

# Prepended to a script: any import of a train-extra module fails as if it were not installed.
BLOCK_TRAIN_EXTRAS = f"""
import importlib.abc, sys
_BLOCKED = {set(TRAIN_EXTRA_MODULES)!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_layer_example_runs_on_the_core_install():
    """The 'use our layers' example trains with TF, clu, scikit-learn, ... unimportable."""
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in _python_blocks(readme) if "QuantConv" in b]
    assert blocks, "README lost its 'use our layers' example"
    proc = run_python(["-c", BLOCK_TRAIN_EXTRAS + blocks[0]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "codes dtype uint8" in proc.stdout


def test_readme_rules_example_runs_on_the_core_install():
    """The rules + float -> DQ example: 8-bit first/last, W2A2 inside, paths kept."""
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in _python_blocks(readme) if "quantize_model" in b]
    assert len(blocks) == 1, "README lost its rules example"
    proc = run_python(["-c", BLOCK_TRAIN_EXTRAS + blocks[0]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'kernel_levels': (1, 4)" in proc.stdout, proc.stdout


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    test_cmds = [b.strip() for b in _bash_blocks(readme) if "pytest" in b]
    assert len(test_cmds) == 1, test_cmds
    assert "pip install -e '.[test]'" in test_cmds[0]  # the test extra: pytest + train
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmds[0] in ci_lines, (test_cmds[0], ci_lines)


def test_readme_main_command_uses_embedded_default_and_the_train_extra():
    readme = (REPO / "README.md").read_text()
    setup = _bash_blocks(readme)[0]
    assert "pip install -e '.[train]'" in setup and "configs/digits.py" in setup
    assert "python -m dq_jax.main" in setup
