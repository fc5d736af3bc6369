"""The README's promises: its layer example runs, its commands match CI."""
from __future__ import annotations

import re

from tests.helpers import REPO, run_python


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_layer_example_runs():
    readme = (REPO / "README.md").read_text()
    blocks = [b for b in _python_blocks(readme) if "QuantConv" in b]
    assert blocks, "README lost its 'use our layers' example"
    proc = run_python(["-c", blocks[0]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "codes dtype uint8" in proc.stdout


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    test_cmds = [b.strip() for b in _bash_blocks(readme) if "pytest" in b]
    assert len(test_cmds) >= 1
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmds[0] in ci_lines, (test_cmds[0], ci_lines)


def test_readme_main_command_uses_embedded_default():
    readme = (REPO / "README.md").read_text()
    setup = _bash_blocks(readme)[0]
    assert "pip install -e '.[test]'" in setup and "configs/digits.py" in setup
