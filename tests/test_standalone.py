"""The repository stands alone and installs for what you use (issue 13, items 4 and 5).

- nothing in README, configs or the package points outside the repository;
- README's relative links resolve; the method and format docs are linked;
- `pip install dq_jax` (core) holds what the layers, optimizer, models and export import, and
  importing them never imports TensorFlow (nor clu, scikit-learn, ...);
- the training program's extras live in `dq_jax[train]`, and a missing one is named in a
  one-line error.
"""
from __future__ import annotations

import json
import re
import runpy
import sys
from unittest import mock

import pytest

from dq_jax import extras
from tests.helpers import REPO, run_python
from tests.test_readme import BLOCK_TRAIN_EXTRAS, TRAIN_EXTRA_MODULES

CORE_MODULES = ("dq_jax", "dq_jax.layers", "dq_jax.optim", "dq_jax.models", "dq_jax.export",
                "dq_jax.predict", "dq_jax.checkpoints", "dq_jax.configlib", "dq_jax.intpath",
                "dq_jax.data")
CORE_REQUIREMENTS = {"jax", "flax", "optax", "orbax-checkpoint", "chex", "ml-collections",
                     "absl-py", "numpy", "etils"}
TRAIN_REQUIREMENTS = {"tensorflow-cpu", "tensorflow-datasets", "clu", "tensorboard",
                      "scikit-learn", "tqdm", "pillow"}


def _text_files():
    yield REPO / "README.md"
    for folder, suffixes in (("configs", {".py"}), ("dq_jax", {".py", ".md", ".json", ".txt"}),
                             ("docs", {".md"})):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in suffixes:
                yield path


def test_nothing_points_outside_the_repository():
    """`grep -rn shared/ README.md configs dq_jax docs` finds nothing; no `../` paths either."""
    offenders = []
    for path in _text_files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            # a Markdown link from docs/ up to a file of this repository is inside it
            inside = re.sub(r"\]\((\.\./[^)\s#]+)[^)]*\)",
                            lambda m: "]()" if _inside(path.parent / m[1]) else m[0], line)
            if "shared/" in line or re.search(r"(?<!\.)\.\./", inside) or "DESIGN.md" in line:
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _inside(target) -> bool:
    target = target.resolve()
    return target.exists() and REPO.resolve() in target.parents


def test_readme_links_resolve_and_docs_are_linked():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [l.split("#")[0] for l in links if not re.match(r"[a-z]+://", l) and l[0] != "#"]
    assert "docs/method.md" in local and "docs/format.md" in local, local
    missing = [l for l in local if not (REPO / l).exists()]
    assert not missing, missing
    assert "docs/notebook.md" in local, local
    for doc in ("docs/method.md", "docs/format.md", "docs/notebook.md"):
        text = (REPO / doc).read_text()
        for link in re.findall(r"\]\(([^)\s#]+)", text):
            if not re.match(r"[a-z]+://", link):
                assert ((REPO / doc).parent / link).exists(), (doc, link)


def test_core_modules_do_not_import_tensorflow():
    code = (f"import sys, json\nfor m in {list(CORE_MODULES)!r}: __import__(m)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = run_python(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "jax" in loaded and "flax" in loaded
    assert not loaded & set(TRAIN_EXTRA_MODULES), sorted(loaded & set(TRAIN_EXTRA_MODULES))


def test_core_modules_import_without_the_train_extra():
    """Stronger: with every train-extra module unimportable, the core modules still import."""
    code = BLOCK_TRAIN_EXTRAS + (
        f"for m in {list(CORE_MODULES)!r}: __import__(m)\n"
        "from dq_jax import extras\n"
        "print('missing', ','.join(extras.missing('train')))")
    proc = run_python(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = proc.stdout.strip().splitlines()[-1].split(" ", 1)[1].split(",")
    assert set(missing) == TRAIN_REQUIREMENTS


def _setup_kwargs() -> dict:
    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
        runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return captured


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_setup_core_and_extras():
    kw = _setup_kwargs()
    core = {_name(r) for r in kw["install_requires"]}
    assert core == CORE_REQUIREMENTS, core
    ex = kw["extras_require"]
    assert {_name(r) for r in ex["train"]} == TRAIN_REQUIREMENTS
    assert {_name(r) for r in ex["test"]} >= TRAIN_REQUIREMENTS | {"pytest", "pytest-xdist"}
    assert {_name(r) for r in ex["bench"]} >= TRAIN_REQUIREMENTS | {"matplotlib", "qwix"}
    # dq_jax.extras names the same distributions the train extra installs.
    assert set(extras.EXTRAS["train"].values()) == TRAIN_REQUIREMENTS
    assert set(extras.EXTRAS["train"]) == set(TRAIN_EXTRA_MODULES)
    # Every requirement is a tested range: a lower and an upper bound (or one pinned version).
    for req in kw["install_requires"] + [r for rs in ex.values() for r in rs]:
        assert ("==" in req) or (">=" in req and "<" in req.replace("<=", "")), req


def test_installed_versions_lie_in_the_setup_ranges():
    specifiers = pytest.importorskip("packaging.specifiers")
    from importlib import metadata
    kw = _setup_kwargs()
    reqs = kw["install_requires"] + kw["extras_require"]["test"]
    for req in reqs:
        name = _name(req)
        spec = specifiers.SpecifierSet(req[len(re.split(r"[<>=!~ ;]", req)[0]):].strip())
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = metadata.version(name.replace("-", "_"))
        assert spec.contains(version, prereleases=True), (name, version, str(spec))


def test_missing_extra_is_one_line_naming_the_extra(capsys):
    with mock.patch.object(extras, "_importable", lambda m: m not in ("clu", "sklearn")):
        assert extras.missing("train") == ["clu", "scikit-learn"]
        with pytest.raises(extras.MissingExtraError) as info:
            extras.require("train", "the training program")
        msg = str(info.value)
        assert "\n" not in msg and "pip install 'dq_jax[train]'" in msg
        assert "clu, scikit-learn" in msg and msg.startswith("the training program needs")
        assert isinstance(info.value, ImportError)
        with pytest.raises(SystemExit) as exit_info:
            extras.exit_unless_installed("train")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("dq_jax: error: the training program needs")
        # The data sources that need the extra say so too.
        from dq_jax.data import arrays
        with pytest.raises(extras.MissingExtraError, match=r"digits.*scikit-learn.*dq_jax\[train\]"):
            arrays.load_digits_split()
    extras.require("train")  # Installed here: no error.


def test_tfds_without_tensorflow_names_the_extra(tmp_path):
    from dq_jax.data import tfds_source
    with mock.patch.object(extras, "_importable", lambda m: m != "tensorflow"):
        with pytest.raises(extras.MissingExtraError, match=r"tensorflow-cpu.*dq_jax\[train\]"):
            tfds_source._import_tf()


@pytest.mark.parametrize("module", ["dq_jax.data.folder_to_npz"])
def test_entry_points_that_need_the_train_extra_fail_in_one_line(module, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not really a png")
    code = BLOCK_TRAIN_EXTRAS + (
        f"import runpy, sys\nsys.argv = ['{module}', '--src={tmp_path}', "
        f"'--out={tmp_path / 'o.npz'}']\nrunpy.run_module('{module}', run_name='__main__')")
    proc = run_python(["-c", code], timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'dq_jax[train]'" in lines[0], proc.stderr


def test_training_program_without_the_train_extra_fails_in_one_line(tmp_path):
    code = BLOCK_TRAIN_EXTRAS + (
        "import runpy, sys\nsys.argv = ['dq_jax.main', '--config=configs/digits.py', "
        f"'--workdir={tmp_path}']\nrunpy.run_module('dq_jax.main', run_name='__main__')")
    proc = run_python(["-c", code], timeout=300)
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("dq_jax: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and "pip install 'dq_jax[train]'" in lines[0], proc.stderr[-2000:]


def test_lower_modules_never_import_the_training_loop_or_each_other_back():
    """The import graph has no circles: `checkpoints` rebuilds a run's state through `build`
    (not `train`), configuration does not import what it configures, and the .dqz prefix
    lives below both the file format and the size accounting (lazy imports included)."""
    import ast
    forbidden = {"checkpoints.py": {"dq_jax.train"}, "build.py": {"dq_jax.train",
                                                                  "dq_jax.checkpoints"},
                 "configlib.py": {"dq_jax.allocation", "dq_jax.mixed", "dq_jax.train"},
                 "mixed.py": {"dq_jax.allocation"},
                 "export/sizes.py": {"dq_jax.export.fileformat"}}
    for name, bad in forbidden.items():
        tree = ast.parse((REPO / "dq_jax" / name).read_text())
        seen = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                seen.add(node.module)
                seen |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                seen |= {a.name for a in node.names}
        assert not (seen & bad), (name, sorted(seen & bad))
