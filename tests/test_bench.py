"""Smoke tests of the benchmark scripts (bench/): they run and print what the report parses."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _last_value(text: str, key: str) -> float:
    found = re.findall(rf"^{re.escape(key)}=([-+0-9.eE]+)\s*$", text, flags=re.M)
    assert found, f"no '{key}=<float>' line in:\n{text[-2000:]}"
    return float(found[-1])


def test_step_time_tiny_prints_ratio():
    proc = _run("bench/step_time.py", "--model=digits_cnn", "--batch=16", "--repeats=2",
                "--warmup=1", "--methods=float,dq_w2a2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert lines[-1].startswith("dq_w2a2_over_float="), lines[-3:]
    ratio = _last_value(proc.stdout, "dq_w2a2_over_float")
    assert ratio > 0 and ratio == ratio
    for method in ("float", "dq_w2a2"):
        assert re.search(rf"^{method}\s+[0-9.]+\s+[0-9]+", proc.stdout, flags=re.M), method


def test_init_time_tiny_prints_ratio():
    proc = _run("bench/init_time.py", "--model=digits_cnn", "--rounds=1", "--phases")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("float", "dq_w2a2"):
        for jitted in ("model.init", "level fits \\+ optimizer init"):
            assert re.search(rf"^# phases {method} {jitted}: trace [0-9.]+ s, compile [0-9.]+ s, "
                             r"run [0-9.]+ s$", proc.stdout, flags=re.M), (method, jitted)
    assert [l for l in proc.stdout.splitlines() if l.strip()][-1].startswith(
        "dq_init_over_float=")
    assert _last_value(proc.stdout, "dq_init_over_float") > 0
    for method in ("float", "dq_w2a2"):
        assert re.search(rf"^{method}\s+[0-9.]+ s init$", proc.stdout, flags=re.M), method


def test_compile_time_tiny_prints_ratio_per_round():
    proc = _run("bench/compile_time.py", "--model=digits_cnn", "--batch=8", "--rounds=2",
                "--methods=dq_w2a2,dq_weights_only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("float", "dq_w2a2", "dq_weights_only"):  # float is always run, first
        assert re.search(rf"^{method}\s+[0-9.]+ s compile \(min\)  x[0-9.]+  per round: "
                         r"[0-9.]+ [0-9.]+$", proc.stdout, flags=re.M), method
    assert re.search(r"^float .* per round: 1\.00 1\.00$", proc.stdout, flags=re.M)
    assert [l for l in proc.stdout.splitlines() if l.strip()][-1].startswith(
        "dq_compile_over_float=")
    assert _last_value(proc.stdout, "dq_compile_over_float") > 0


@pytest.mark.parametrize("args, needle", [
    (["--methods=dq_w2a2,fp8"], "--methods: unknown fp8"),
    (["--rounds=0"], "--rounds=0 must be >= 1")])
def test_compile_time_bad_arguments_fail_clearly(args, needle):
    proc = _run("bench/compile_time.py", *args, timeout=60)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]


def test_compile_ablation_tiny_runs_every_variant():
    """The compile ablation harness (issue 27) compiles every variant and prints each one's
    median over float's; unknown variants fail in one line."""
    sys.path.insert(0, str(ROOT))
    from bench import compile_ablation
    names = list(compile_ablation.variants())
    proc = _run("bench/compile_ablation.py", "--model=digits_cnn", "--batch=8", "--rounds=1",
                f"--variants={','.join(names)}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in names:
        assert re.search(rf"^{name}\s+wall median\s+[0-9.]+ s  x[0-9.]+ ", proc.stdout,
                         flags=re.M), name
    assert re.search(r"^float\s+wall median\s+[0-9.]+ s  x1\.00 ", proc.stdout, flags=re.M)
    bad = _run("bench/compile_ablation.py", "--variants=dq,no_such", timeout=60)
    assert bad.returncode == 2 and "--variants: unknown no_such" in bad.stderr, bad.stderr[-2000:]


def test_state_memory_dq_below_latent_ste():
    """DQ stores uint8 codes instead of a float latent kernel: its state is smaller."""
    sys.path.insert(0, str(ROOT))
    from bench import step_time
    args = step_time.parse_args(["--model=digits_cnn", "--batch=8"])
    bench = step_time.Bench(args)
    mem = {}
    for method in ("dq_w2a2", "latent_ste_w2a2"):
        _, _, _, state, _ = bench.build(method)
        mem[method] = step_time.state_memory(state)
    dq, latent = mem["dq_w2a2"], mem["latent_ste_w2a2"]
    assert dq["codes"] > 0 and latent["codes"] == 0
    assert dq["params"] < latent["params"] / 10      # no float kernel among DQ params
    assert dq["total"] < latent["total"]
    assert dq["total"] == dq["params"] + dq["codes"] + dq["opt_state"] + dq["stats"] + 4


def test_step_time_rejects_unknown_method():
    proc = _run("bench/step_time.py", "--methods=float,nope", timeout=60)
    assert proc.returncode != 0
    assert "unknown method" in proc.stderr


def test_accuracy_help_and_methods():
    proc = _run("bench/accuracy.py", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--dataset", "--full", "--methods", "--seeds", "--finetune_steps"):
        assert flag in proc.stdout
    sys.path.insert(0, str(ROOT))
    from bench import accuracy
    from dq_jax import configlib
    base = configlib.base_config()
    assert accuracy.method_config(base, "nearest_w2a2").rounding == "nearest"
    g = accuracy.method_config(base, "global_w2a2")
    assert g.quant.act_error == "global" and g.quant.weights == "dq" and g.quant.weight_bits == 2
    assert accuracy.method_config(base, "lsq_w2a2").quant.weights == "lsq"
    assert accuracy.method_config(base, "float").quant.acts == "float"


def test_accuracy_overrides_and_diagnostics():
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from bench import accuracy
    from dq_jax import configlib
    o = accuracy.parse_overrides(["code_learning_rate=0.1", "quant.lloyd_iters=30",
                                  "rounding=nearest"])
    assert o == {"code_learning_rate": 0.1, "quant.lloyd_iters": 30, "rounding": "nearest"}
    c = accuracy.apply_overrides(configlib.base_config(), o)
    assert c.code_learning_rate == 0.1 and c.quant.lloyd_iters == 30 and c.rounding == "nearest"
    import pytest
    with pytest.raises(SystemExit, match="unknown config key 'code_lr'"):
        accuracy.apply_overrides(configlib.base_config(), {"code_lr": 1.0})
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        accuracy.parse_overrides(["oops"])
    # Flip logs are means since the previous log: 50 steps at 0.01 + 50 at 0.002 = 0.6 flips.
    d = accuracy.summarize_diagnostics({
        "layers/a/flip_rate": [(50, 0.01), (100, 0.002)],
        "layers/b/flip_rate": [(100, 0.0), (50, 0.0)],
        "layers/a/code_entropy": [(50, 1.5), (100, 1.9)]})
    assert d["flips_per_weight_by_layer"] == {"a": 0.6, "b": 0.0}
    assert d["flip_rate_curve"] == {"steps": [50, 100], "mean_over_layers": [0.005, 0.001]}
    assert d["code_entropy_final_by_layer"] == {"a": 1.9} and d["num_dq_layers"] == 2
    # Since issue 27 the program logs codes_changed (net, per window) instead of flip_rate.
    d = accuracy.summarize_diagnostics({
        "layers/a/codes_changed": [(100, 0.25), (50, 0.5)],
        "layers/b/codes_changed": [(50, 0.0), (100, 0.25)],
        "layers/a/code_entropy": [(50, 1.5), (100, 1.75)]})
    assert d["codes_changed_curve"] == {"steps": [50, 100], "mean_over_layers": [0.25, 0.25]}
    assert d["net_changes_per_weight"] == 0.5 and d["num_dq_layers"] == 2
    assert d["net_flip_rate_first_log"] == 0.005 and d["net_flip_rate_last_log"] == 0.005
    assert d["code_entropy_final_by_layer"] == {"a": 1.75} and "flip_rate_mean" not in d
    table = accuracy.fmt_table({"runs": {"w2a2": [{"top1": 0.5, "wall_seconds": 1.0, **d}]}},
                               ["w2a2"], "note")
    assert "5.0e-03 (net)" in table
    # Weight diagnostics against hand-computed values (exact in binary floating point).
    levels = np.array([[-1.0, 0.0, 1.0, 2.0]], np.float32)
    c0 = {"l": {"kernel": np.array([[0, 1], [2, 3]], np.uint8)}}
    c1 = {"l": {"kernel": np.array([[0, 1], [2, 2]], np.uint8)}}
    params = {"l": {"kernel_levels": levels}}
    float_kernel = {("l", "kernel"): np.array([[-1.0, 0.0], [1.0, 2.0]], np.float32)}
    cfg = configlib.base_config()
    cfg.quant.weights = "dq"
    w = accuracy.weight_diagnostics(cfg, params, c0, params, c1, float_kernel)
    assert w["weight_rel_error_start"] == 0.0
    assert w["weight_rel_error_end"] == 1.0 / 6.0  # (2-1)^2 / (1 + 0 + 1 + 4)
    assert w["codes_changed_by_end"] == 0.25


def test_accuracy_run_config_marker_tolerates_new_default_keys():
    sys.path.insert(0, str(ROOT))
    from bench import accuracy
    saved = {"learning_rate": 0.01, "seed": 0, "force_new": True}
    assert accuracy.same_run_config(saved, {"learning_rate": 0.01, "seed": 0,
                                            "allow_config_change": False, "force_new": False})
    # a schema key added since, left at its default, matches; set to another value it does not
    assert accuracy.same_run_config(saved, {**saved, "bn_recalibration_batches": 0})
    assert not accuracy.same_run_config(saved, {**saved, "bn_recalibration_batches": 50})
    # A DQ run with stochastic rounding saved before rounding_stream existed drew from the
    # per-layer stream: the 'hash' default is another run (its workdir is cleared)
    dq = {"quant": {"weights": "dq"}, "rounding": "stochastic", "seed": 0}
    assert not accuracy.same_run_config(dq, {**dq, "rounding_stream": "hash"})
    assert accuracy.same_run_config(dq, {**dq, "rounding_stream": "per_layer"})
    nearest = {"quant": {"weights": "dq"}, "rounding": "nearest", "seed": 0}
    assert accuracy.same_run_config(nearest, {**nearest, "rounding_stream": "hash"})
    assert not accuracy.same_run_config(saved, {**saved, "learning_rate": 0.1})
    assert not accuracy.same_run_config(saved, {"learning_rate": 0.01})


def test_use_cifar10_npz_keeps_an_explicit_data_dir(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from bench import use_cifar10_npz
    from dq_jax import configlib
    c = configlib.base_config()
    c.data_dir = "/elsewhere/cifar10.npz"
    assert use_cifar10_npz(c).dataset == "cifar10_npz" and c.data_dir == "/elsewhere/cifar10.npz"
    monkeypatch.setenv("DQ_JAX_SHARED_DATA", "/from/env")
    c = use_cifar10_npz(configlib.base_config())
    assert c.dataset == "cifar10_npz" and c.data_dir == ""  # the reader takes the variable


def _study(path, runs: dict, overrides: dict, finetune_steps: int = 1955,
           float_workdir: str = "/ckpt/float"):
    import json
    schedule = {"dataset": "cifar10", "full": False, "steps": None, "float_steps": 200,
                "finetune_steps": finetune_steps}
    if overrides:
        schedule["overrides"] = overrides
    path.write_text(json.dumps({
        "dataset": "cifar10", "full": False, "schedule": schedule, "runs": runs,
        "commands": [f"python bench/accuracy.py {path.name}"],
        "float_pretrain": {"top1": 0.8598, "workdir": float_workdir},
        "finetune_note": f"{finetune_steps / 390:.2f} ep ({finetune_steps} steps)"}))
    return str(path)


def _run_row(top1: float, seed: int) -> dict:
    return {"top1": top1, "wall_seconds": 100.0, "seed": seed}


def test_accuracy_merge_combines_invocations_and_refuses_mixed_protocols(tmp_path):
    """The protocol's methods run in separate invocations (own --set each); --merge makes one
    table: mean and min-max over seeds, overrides per method; mismatches are one-line errors."""
    from bench import accuracy
    dq = _study(tmp_path / "dq.json", {"w2a2": [_run_row(0.80, 0), _run_row(0.82, 1)]},
                {"code_momentum": 0.99})
    lsq = _study(tmp_path / "lsq.json", {"lsq_w2a2": [_run_row(0.81, 0)]},
                 {"quant.granularity": "per_layer"})
    out = tmp_path / "merged" / "study.json"
    merged = accuracy.merge([dq, lsq], str(out))
    assert out.exists() and merged["merged_from"] == [dq, lsq]
    rows = {line.split("|")[1].strip(): line for line in merged["table_markdown"].splitlines()
            if line.startswith("| ")}
    assert "| 81.00 | 80.00–82.00 | 2 |" in rows["w2a2"]
    assert "| 81.00 | n/a (1 seed) | 1 |" in rows["lsq_w2a2"]
    assert "w2a2: code_momentum=0.99" in merged["table_markdown"]
    assert "lsq_w2a2: quant.granularity=per_layer" in merged["table_markdown"]
    assert len(merged["commands"]) == 2

    other = _study(tmp_path / "short.json", {"latent_ste_w2a2": [_run_row(0.8, 0)]}, {},
                   finetune_steps=391)
    with pytest.raises(SystemExit, match="differs from"):
        accuracy.merge([dq, other], str(out))
    start = _study(tmp_path / "start.json", {"latent_ste_w2a2": [_run_row(0.8, 0)]}, {},
                   float_workdir="/elsewhere")
    with pytest.raises(SystemExit, match="differs from"):
        accuracy.merge([dq, start], str(out))
    with pytest.raises(SystemExit, match="w2a2 is in both"):
        accuracy.merge([dq, dq], str(out))
    with pytest.raises(SystemExit, match="no such file"):
        accuracy.merge([str(tmp_path / "missing.json")], str(out))
    with pytest.raises(SystemExit, match="needs --out"):
        accuracy.merge([dq], "")


def test_protocol_plans_every_row_first_seeds_first_and_resumes_into_one_json_per_row():
    from bench import protocol
    args = protocol.parse_args(["--float_workdir=/ckpt/float", "--dry_run"])
    steps = protocol.plan(args)
    rows = [r for r, _ in steps]
    assert rows[:len(protocol.GRID)] == list(protocol.GRID)  # every row's first seed first
    assert rows[len(protocol.GRID):] == ["w2a2", "lsq_w2a2", "latent_ste_w2a2"]  # then 3 seeds
    cmd = dict((r, c) for r, c in steps[:len(protocol.GRID)])
    for row, c in cmd.items():
        assert f"--methods={row}" in c and "--seeds=1" in c and "--resume" in c
        assert "--finetune_steps=1955" in c and "--float_workdir=/ckpt/float" in c
        assert "--workdir=/tmp/dq_protocol" in c  # shared: runs are named by method inside
        assert any(a.endswith(f"{row}.json") for a in c if a.startswith("--out="))
        assert ("--set=quant.granularity=per_layer" in c) == row.startswith(("lsq", "latent"))
    assert "--seeds=3" in steps[-1][1]
    full = protocol.plan(protocol.parse_args(["--full", "--only=w2a2"]))[0][1]
    assert "--full" in full and not any(a.startswith("--float_workdir") for a in full)
    with pytest.raises(SystemExit):  # --full trains its own float model
        protocol.parse_args(["--full", "--float_workdir=F"])
    capped = protocol.plan(protocol.parse_args(["--float_workdir=F", "--max_seeds=1",
                                                "--only=w2a2,lsq_w2a2"]))
    assert [r for r, _ in capped] == ["w2a2", "lsq_w2a2"]
    with pytest.raises(SystemExit, match="unknown row"):
        protocol.plan(protocol.parse_args(["--float_workdir=F", "--only=w9a9"]))
    proc = _run("bench/protocol.py", timeout=60)  # no float model named: a one-line error
    assert proc.returncode != 0 and "--float_workdir=FLOAT is required" in proc.stderr


def test_accuracy_overrides_reach_the_quantized_runs_not_the_float_pretraining():
    """--set is the quantized runs' (e.g. the baselines' per-layer levels): the float model all
    rows start from stays one config, so protocol rows can share its pre-training (--full)."""
    from bench import accuracy
    overrides = {"quant.granularity": "per_layer", "levels_learning_rate": 0.5}
    for full in (False, True):
        args = accuracy.parse_args(["--dataset=cifar10"] + (["--full"] if full else []))
        base, fl = accuracy.cifar10_configs(args, overrides)
        _, fl_plain = accuracy.cifar10_configs(args, {})
        assert base.quant.granularity == "per_layer" and base.levels_learning_rate == 0.5
        assert fl.to_dict() == fl_plain.to_dict()
        assert fl.quant.weights == "float" and fl.learning_rate == 0.1


def test_gpu_grid_runs_every_row_and_seed_once_and_collects_accuracy_format_rows(tmp_path):
    """bench/gpu_grid.py: one process per (row, seed) of protocol.GRID (+ VARIANTS); collect
    groups the rows back into accuracy.py JSONs that --merge accepts, and refuses seed gaps."""
    import json
    from bench import accuracy, gpu_grid, protocol
    jobs = gpu_grid.jobs(variants=False)
    assert len(jobs) == sum(n for n, _ in protocol.GRID.values()) == len({j[0] for j in jobs})
    assert [j[2] for j in jobs] == sorted(j[2] for j in jobs)  # first seeds first
    lsq = [j for j in jobs if j[0] == "lsq_w2a2_s2"][0]
    assert lsq[1] == "lsq_w2a2" and "quant.granularity=per_layer" in lsq[3]
    assert all(set(protocol.COMMON) <= set(j[3]) for j in jobs)
    with_v = gpu_grid.jobs(variants=True)
    assert len(with_v) == len(jobs) + sum(spec[0] for spec in gpu_grid.VARIANTS.values())
    assert [j[0] for j in gpu_grid.jobs(True, only="v_wd0,w4a4")] == ["w4a4_s0", "v_wd0_s0"]
    with pytest.raises(SystemExit, match="unknown rows"):
        gpu_grid.jobs(False, only="w9a9")

    float_dir = tmp_path / "float"
    float_dir.mkdir()
    (float_dir / "results.json").write_text(json.dumps({
        "eval_top1": 0.86, "eval_top5": 0.99, "steps": 7800, "train_seconds": 1.0,
        "config": {"learning_rate": 0.1}}))
    rows = tmp_path / "rows"
    rows.mkdir()

    def row(name, method, seed, top1, sets=()):
        sets = list(protocol.COMMON) + list(sets)
        (rows / f"{name}.json").write_text(json.dumps({
            "meta": {"name": name, "method": method, "seed": seed, "sets": sets,
                     "overrides": accuracy.parse_overrides(sets),
                     "finetune_steps": 1955, "devices": "gpu", "jax": "0"},
            "row": {"top1": top1, "wall_seconds": 10.0, "seed": seed,
                    "codes_changed_by_end": 0.05, "weight_rel_error_end": 0.2}}))

    row("w2a2_s0", "w2a2", 0, 0.80)
    row("w2a2_s1", "w2a2", 1, 0.82)
    row("lsq_w2a2_s0", "lsq_w2a2", 0, 0.83, ["quant.granularity=per_layer"])
    row("v_wd0_s0", "w2a2", 0, 0.81, ["weight_decay=0.0"])
    out_dir, merged = tmp_path / "out", tmp_path / "merged.json"
    args = ["collect", f"--rows={rows}", f"--float_workdir={float_dir}", f"--out_dir={out_dir}",
            f"--merged={merged}"]
    gpu_grid.main(args)
    w2a2 = json.loads((out_dir / "w2a2.json").read_text())
    assert [r["top1"] for r in w2a2["runs"]["w2a2"]] == [0.80, 0.82]
    assert w2a2["schedule"]["finetune_steps"] == 1955 and w2a2["float_pretrain"]["top1"] == 0.86
    table = json.loads(merged.read_text())["table_markdown"]
    assert "| 81.00 | 80.00–82.00 | 2 |" in table and "lsq_w2a2" in table
    assert "v_wd0" not in table  # variants are not rows of the grid
    assert "| v_wd0 | weight_decay=0.0 | 81.00 | 81.00 |" in (out_dir / "variants.md").read_text()
    (rows / "w2a2_s1.json").rename(rows / "w2a2_s2.json")
    txt = (rows / "w2a2_s2.json").read_text().replace('"w2a2_s1"', '"w2a2_s2"')
    (rows / "w2a2_s2.json").write_text(txt.replace('"seed": 1', '"seed": 2'))
    with pytest.raises(SystemExit, match=r"seeds \[0, 2\]"):
        gpu_grid.main(args)


def test_gpu_grid_bundles_its_rows_as_each_run_ends(tmp_path, monkeypatch):
    """`run --bundle`: the device brings back at most 8 files, a grid writes a JSON and a log
    per run; the archive holds every row so far after each run ends (and when all were done)."""
    import tarfile
    from bench import gpu_grid
    rows, bundle = tmp_path / "rows", tmp_path / "out" / "rows.tar.gz"
    bundle.parent.mkdir()
    seen = []

    real_popen = gpu_grid.subprocess.Popen

    class FakeRun:  # a `one` process that finishes at once, writing its row JSON
        def __new__(cls, cmd, **kw):
            if "one" not in cmd:  # anything else (e.g. `uname` from an import) runs for real
                return real_popen(cmd, **kw)
            return super().__new__(cls)

        def __init__(self, cmd, **kw):
            name = cmd[cmd.index("one") + 1]
            (rows / f"{name}.json").write_text(json.dumps({"meta": {"name": name}}))
            self.returncode = 0

        def wait(self):
            seen.append(sorted(tarfile.open(bundle).getnames()) if bundle.exists() else [])
            return 0

    monkeypatch.setattr(gpu_grid.subprocess, "Popen", FakeRun)
    todo = [(f"r{i}_s0", "w2a2", 0, (), 10) for i in range(12)]
    gpu_grid.launch(todo, "", str(rows), str(tmp_path / "w"), 60, bundle=str(bundle))
    names = sorted(tarfile.open(bundle).getnames())
    assert names == sorted([f"r{i}_s0.json" for i in range(12)] +
                           [f"r{i}_s0.log" for i in range(12)])
    assert [len(s) for s in seen] == [0] + [24] * 11  # rewritten after every run
    bundle.unlink()
    gpu_grid.launch(todo, "", str(rows), str(tmp_path / "w"), 60, bundle=str(bundle))
    assert sorted(tarfile.open(bundle).getnames()) == names  # nothing to run: still bundled
    assert not list(bundle.parent.glob("*.partial"))


def test_read_layer_scalars_without_tensorflow(tmp_path):
    """The per-layer diagnostics are read (and, via bench/no_tf, written) with TensorBoard's own
    event code, so a GPU image without TensorFlow still gets them."""
    import numpy as np
    real = {n: sys.modules.pop(n) for n in list(sys.modules) if n == "clu" or
            n.startswith("clu.")}  # the real clu, if a test imported it, comes back after
    sys.path.insert(0, str(ROOT / "bench" / "no_tf"))
    try:
        from clu import metric_writers as mw  # the stand-in
        assert "no_tf" in mw.__file__
    finally:
        sys.path.remove(str(ROOT / "bench" / "no_tf"))
        for name in [n for n in sys.modules if n == "clu" or n.startswith("clu.")]:
            del sys.modules[name]
        sys.modules.update(real)
    w = mw.create_default_writer(str(tmp_path), just_logging=False, asynchronous=True)
    w.write_scalars(50, {"layers/conv1/flip_rate": np.float32(0.25), "train_loss": 1.0})
    w.write_scalars(100, {"layers/conv1/flip_rate": 0.5})
    w.write_histograms(100, {"h": np.zeros(3)})
    w.flush()
    w.close()
    from bench import accuracy
    assert accuracy.read_layer_scalars(str(tmp_path)) == {
        "layers/conv1/flip_rate": [(50, 0.25), (100, 0.5)]}


def test_every_gpu_grid_row_and_variant_is_a_valid_config():
    """A typo in a grid row or variant would cost a lent GPU's few minutes: every job's
    overrides must name known keys and pass the program's own validation (fine-tuning from a
    float checkpoint, as the grid does)."""
    from dq_jax import configlib
    from bench import accuracy, gpu_grid
    jobs = gpu_grid.jobs(variants=True)
    assert {"v_lf_floatres_s0", "v_ef_floatlr_s0", "v_inertia_s2"} <= {j[0] for j in jobs}
    for name, method, _, sets in jobs:  # built as `gpu_grid.one` builds them
        args = gpu_grid.accuracy_args(method, "/float/workdir", sets, 1955, "/tmp/w")
        base, _ = accuracy.cifar10_configs(args, accuracy.parse_overrides(args.set))
        base.init_from = "/float/workdir"
        c = accuracy.method_config(base, method)
        configlib.validate(c, device_count=1)
        if name.startswith("w2a2_"):  # the protocol's DQ row: the paper's stochastic rule
            assert (c.rounding, c.code_learning_rate, c.code_momentum, c.rounding_stream) == (
                "stochastic", 1e-4, 0.99, "per_layer"), name


def test_every_gpu_regime_row_is_a_valid_config_and_sized_to_its_epochs():
    """The regimes waiting for a GPU (bench/gpu_regimes.py): each (row, seed) validates as
    `gpu_grid.one` builds it (fine-tunes from a float model, or from scratch with no init_from);
    the MobileNetV2 rows build (per-layer levels: 9 weights per depthwise channel); DQ rows
    carry the rounding they are named for; steps = epochs x 391."""
    import jax
    import jax.numpy as jnp
    from dq_jax import configlib, train
    from bench import accuracy, gpu_grid, gpu_regimes
    built = set()
    for regime, r in gpu_regimes.REGIMES.items():
        js = gpu_regimes.jobs(regime)
        assert len(js) == len(r.rows) * len(r.seeds) and {j[4] for j in js} == {r.epochs * 391}
        for name, method, seed, sets, steps in js:
            args = gpu_grid.accuracy_args(method, "", sets, steps, "/tmp/w")
            base, _ = accuracy.cifar10_configs(args, accuracy.parse_overrides(args.set))
            base.init_from = "/float/workdir" if r.needs_float else ""
            c = accuracy.method_config(base, method)
            quant = configlib.validate(c, device_count=1)
            assert c.num_train_steps == steps, name
            if c.quant.weights == "dq":
                assert c.rounding == ("inertia" if "inertia" in name or regime == "mbv2_w4a4"
                                      else "stochastic"), name
                assert (c.feedback_residual == "float") == r.needs_float or c.rounding != "inertia"
            if "global" in name:
                assert c.quant.act_error == "global"
            if c.model not in built and c.model != "resnet20":
                built.add(c.model)
                model = train.create_model(c, quant, 10)
                jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 32, 32, 3)), train=False))
    assert built == {"mobilenetv2_cifar"}
    with pytest.raises(SystemExit, match="not among regime 'long20'"):
        gpu_regimes.jobs("long20", (5,))
    with pytest.raises(SystemExit, match="trains from scratch: drop --float_workdir"):
        gpu_regimes.run(gpu_regimes.parse_args(["run", "scratch30", "--rows=/tmp/r",
                                                "--float_workdir=/f"]))
    with pytest.raises(SystemExit, match="holds no finished float run"):
        gpu_regimes.run(gpu_regimes.parse_args(["run", "long20", "--rows=/tmp/r",
                                                "--float_workdir=/nope"]))


def test_gpu_regimes_collect_groups_rows_by_regime(tmp_path):
    """`collect` reads ROWS/<regime>_<row>_s<seed>.json (as `gpu_grid.one` writes them) into
    one JSON with per-row seeds and a table of means and ranges."""
    from bench import gpu_regimes
    rows = tmp_path / "rows"
    rows.mkdir()
    for row, seed, top1 in [("dq", 0, 0.80), ("dq", 1, 0.82), ("lsq", 0, 0.81)]:
        (rows / f"long20_{row}_s{seed}.json").write_text(json.dumps(
            {"meta": {"seed": seed}, "row": {"top1": top1, "codes_changed_by_end": 0.1}}))
    (rows / "scratch30_dq_s0.json").write_text(json.dumps({"meta": {"seed": 0},
                                                            "row": {"top1": 0.5}}))
    out = gpu_regimes.collect(gpu_regimes.parse_args(
        ["collect", "long20", f"--rows={rows}", f"--out={tmp_path / 'long20.json'}"]))
    assert sorted(out["runs"]) == ["dq", "lsq"] and [x["seed"] for x in out["runs"]["dq"]] == [0, 1]
    assert "| dq | 81.00 | 80.00–82.00 | 2 | 0.100 |" in out["table_markdown"]
    assert json.loads((tmp_path / "long20.json").read_text())["steps"] == 7820
    with pytest.raises(SystemExit, match="no rows of regime 'mbv2_w4a4'"):
        gpu_regimes.collect(gpu_regimes.parse_args(["collect", "mbv2_w4a4", f"--rows={rows}"]))


def test_ship_splits_under_the_limit_and_joins_verified(tmp_path):
    """bench/ship.py: a file cut into parts of at most max_mib joins back byte-identical; a
    missing or damaged part is named, never read as data."""
    from bench import ship
    data = os.urandom(2 ** 20 * 2 + 12345)
    src = tmp_path / "big.npz"
    src.write_bytes(data)
    m = ship.split(src, tmp_path / "parts", max_mib=1)
    assert [p["bytes"] for p in m["parts"]] == [2 ** 20, 2 ** 20, 12345]
    assert ship.join(tmp_path / "parts", tmp_path / "out" / "big.npz").read_bytes() == data
    (tmp_path / "parts" / "big.npz.part2").write_bytes(b"x" * 2 ** 20)
    with pytest.raises(SystemExit, match="part big.npz.part2 is damaged"):
        ship.join(tmp_path / "parts", tmp_path / "o2")
    (tmp_path / "parts" / "big.npz.part3").unlink()
    with pytest.raises(SystemExit, match="part big.npz.part2 is damaged|part big.npz.part3 is missing"):
        ship.join(tmp_path / "parts", tmp_path / "o3")
    with pytest.raises(SystemExit, match="no manifest.json"):
        ship.join(tmp_path, tmp_path / "o4")


def test_gpu_grid_lists_the_issue_28_rows_with_their_methods():
    """Item 4 (8-bit first/last for DQ, LSQ, latent-STE, 3 seeds) and item 6 (uniform W2A4 /
    W3A4, allocated budgets 2.5 (3 seeds) and 3.0, random allocations of the same budgets);
    their configs validate (test_every_gpu_grid_row_and_variant_is_a_valid_config)."""
    from bench import gpu_grid
    jobs = {name: (method, sets) for name, method, _, sets in gpu_grid.jobs(variants=True)}
    want = {"v_inertia_fl8": "w2a2", "v_lsq_fl8": "lsq_w2a2",
            "v_latent_ste_fl8": "latent_ste_w2a2", "v_alloc2.5": "w4a4", "v_alloc3.0": "w4a4",
            "v_random2.5": "w4a4", "v_random3.0": "w4a4", "v_w2a4": "w2a4", "v_w3a4": "w3a4",
            "v_w4a4": "w4a4"}
    for row, method in want.items():
        seeds = 3 if row in ("v_inertia_fl8", "v_lsq_fl8", "v_latent_ste_fl8",
                             "v_alloc2.5") else 1
        names = [f"{row}_s{s}" for s in range(seeds)]
        assert all(jobs[n][0] == method for n in names) and f"{row}_s{seeds}" not in jobs
    assert "first_last_bits=8" in jobs["v_lsq_fl8_s0"][1]
    assert "quant.granularity=per_layer" in jobs["v_lsq_fl8_s0"][1]
    assert {"bit_budget=2.5", "allocation_method=random"} <= set(jobs["v_random2.5_s0"][1])
    for row in ("v_inertia_fl8", "v_w2a4", "v_w4a4", "v_alloc2.5", "v_random3.0"):
        assert set(gpu_grid.INERTIA) <= set(jobs[f"{row}_s0"][1]), row  # the shipped rule


def test_size_accuracy_reads_uniform_and_allocated_rows_and_checks_the_targets(tmp_path):
    """bench/size_accuracy.py: uniform rows sit at their width, allocated/random rows at their
    recorded average bits; the issue's two targets are computed from the seed means."""
    import json
    from bench import size_accuracy

    def row(name, top1, alloc=None):
        r = {"top1": top1}
        if alloc is not None:
            r["bit_allocation"] = {"average_bits": alloc, "weight_bytes": int(alloc * 1000),
                                   "weight_bytes_uniform": {"2": 2000, "3": 3000, "4": 4000}}
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"name": name}, "row": r}))

    row("w2a4_s0", 0.80)
    row("v_w4a4_s0", 0.86)
    row("alloc2.5_s0", 0.815, 2.49)
    row("alloc2.5_s1", 0.825, 2.49)
    row("random2.5_s0", 0.80, 2.5)
    row("alloc3.0_s0", 0.855, 2.98)
    groups = size_accuracy.read_rows(str(tmp_path))
    assert groups["w4a4"]["bits"] == 4.0 and groups["alloc2.5"]["bits"] == 2.49
    assert groups["w2a4"]["weight_bytes"] == 2000 and groups["w4a4"]["weight_bytes"] == 4000
    assert groups["alloc2.5"]["mean"] == 82.0 and groups["random2.5"]["kind"] == "random"
    got = {t["row"]: (t["difference"], t["holds"]) for t in size_accuracy.targets(groups)}
    assert got == {"alloc3.0": (-0.5, False), "alloc2.5": (2.0, True)}
    out = tmp_path / "out" / "size.json"
    size_accuracy.main([f"--rows={tmp_path}", f"--out={out}"])
    import importlib.util
    assert out.with_suffix(".png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert "| alloc2.5 | hessian | 2.490 | 2490 | 81.50, 82.50 | 82.00 |" in \
        json.loads(out.read_text())["table_markdown"]
    (tmp_path / "random3.0_s0.json").write_text(json.dumps(
        {"meta": {"name": "random3.0_s0"}, "row": {"top1": 0.8}}))
    with pytest.raises(SystemExit, match="no bit_allocation"):
        size_accuracy.read_rows(str(tmp_path))


def test_issue27_gpu_script_commands_parse(tmp_path):
    """The GPU script (run when a GPU is lent, no time to fix it there): every command it would
    run names a known method and parses with its benchmark's own argument parser."""
    import shlex
    from bench import compile_time, kernel_table, largest_batch, step_time
    env = dict(os.environ, DRY="1", OUT=str(tmp_path), PY="python")
    proc = subprocess.run(["bash", "bench/issue27_gpu.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]
    parsers = {"bench/step_time.py": step_time.parse_args,
               "bench/compile_time.py": compile_time.parse_args,
               "bench/largest_batch.py": largest_batch.parse_args,
               "bench/kernel_table.py": kernel_table.parse_args}
    assert len(commands) >= 10 and {c[1] for c in commands} == set(parsers)
    models = set()
    for command in commands:
        args = parsers[command[1]](command[2:])
        methods = args.methods if isinstance(args.methods, list) else args.methods.split(",")
        assert set(methods) <= set(step_time.METHODS), command
        models.add(args.model)
    assert models == {"resnet20", "resnet18", "resnet50"}
    assert any("step_time_resnet20_gpu.json" in " ".join(c) for c in commands)
    assert any("step_time_resnet18_gpu.json" in " ".join(c) for c in commands)
    only = subprocess.run(["bash", "bench/issue27_gpu.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(env, ONLY="step_resnet50,largest"))
    picked = [shlex.split(line) for line in only.stdout.splitlines() if line.strip()]
    assert [c[1] for c in picked] == ["bench/step_time.py"] * 4 + ["bench/largest_batch.py"]


_FAKE_PY = '''
import pathlib, sys
args = sys.argv[1:]
if args[:1] == ["-c"]:          # the preflight's import check
    sys.exit(int(__import__("os").environ.get("FAKE_PREFLIGHT_RC", "0")))
if args[:2] == ["-m", "pip"]:   # wheel install
    sys.exit(0)
opts = dict(a[2:].split("=", 1) for a in args[1:] if a.startswith("--") and "=" in a)
if args[0] == __import__("os").environ.get("FAKE_FAIL"):
    sys.exit(3)
pathlib.Path(opts["json"]).write_text('{"script": "%s"}' % args[0])
if "trace_dir" in opts:
    run = pathlib.Path(opts["trace_dir"], "plugins", "profile", "run1")
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(b"trace")
print("ran", args[0])
'''


def _run_gpu_script(tmp_path, **env_extra):
    fake = tmp_path / "fake_py.py"
    fake.write_text(_FAKE_PY)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), WORK=str(work), PY=f"{sys.executable} {fake}",
               **env_extra)
    env.pop("DRY", None)
    proc = subprocess.run(["bash", "bench/issue27_gpu.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, out


def test_issue27_gpu_script_logs_each_items_exit_code_and_goes_on(tmp_path):
    """A failing item is logged with its own exit code (not `date`'s), and the next runs."""
    proc, out = _run_gpu_script(tmp_path, FAKE_FAIL="bench/kernel_table.py")
    assert proc.returncode == 0, proc.stderr
    log = (out / "log.txt").read_text()
    assert re.search(r"end kernels_resnet20 rc=3\n", log), log
    assert log.count("rc=0") == 9 and "end largest_batch_resnet50 rc=0" in log, log


def test_issue27_gpu_script_brings_back_at_most_8_files(tmp_path):
    """The device tool returns at most 8 files of $OUT (2 folders deep): every item's output,
    JSON and trace must come back inside them (run with a stand-in interpreter that writes each
    item's --json and --trace_dir as the benchmarks do)."""
    import tarfile
    proc, out = _run_gpu_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "issue27.tar.gz", "issue27_traces.tar.gz", "log.txt",
        "step_time_resnet18_gpu.json", "step_time_resnet20_gpu.json"]
    assert json.loads((out / "step_time_resnet20_gpu.json").read_text())["script"] == \
        "bench/step_time.py"
    with tarfile.open(out / "issue27.tar.gz") as t:
        names = {pathlib.PurePath(n).name for n in t.getnames()}
    with tarfile.open(out / "issue27_traces.tar.gz") as t:
        traces = [n for n in t.getnames() if n.endswith(".xplane.pb")]
    log = (out / "log.txt").read_text()
    items = re.findall(r"start (\S+)", log)
    assert len(items) == 10 and log.count("rc=0") == 10 and log.rstrip().endswith("done"), log
    assert {f"{i}.txt" for i in items} <= names  # each item's output
    jsons = {n for n in names if n.endswith("_gpu.json")}
    assert len(jsons) == 10 and "largest_batch_resnet50_gpu.json" in jsons, sorted(names)
    assert not any("xplane" in n for n in names) and traces == [
        "trace_resnet20/plugins/profile/run1/host.xplane.pb"]


def test_issue27_gpu_script_stops_when_the_program_does_not_import(tmp_path):
    """A device image without a package the program needs: the preflight fails, the script
    exits at once (no item runs) and the log names the fix."""
    proc, out = _run_gpu_script(tmp_path, FAKE_PREFLIGHT_RC="1")
    assert proc.returncode == 1
    log = (out / "log.txt").read_text()
    assert "preflight FAILED" in log and "wheel" in log and "start " not in log, log


def test_largest_batch_tiny_fits_the_affine_plan():
    """Compile-only: two batch sizes of XLA's planned peak give `fixed + per_image * batch`;
    the largest batch fits the given memory and the next multiple would not."""
    proc = _run("bench/largest_batch.py", "--model=digits_cnn", "--batches=8,16",
                "--methods=float,dq_w2a2", "--memory_gb=0.05", "--multiple=8",
                "--json=/dev/stdout")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    limit = out["memory_bytes"]
    for method, row in out["rows"].items():
        peaks = {int(b): p for b, p in row["peak_bytes"].items()}
        assert peaks[16] > peaks[8] > 0, method
        fit = lambda b: row["fixed_bytes"] + row["bytes_per_image"] * b
        assert fit(8) == pytest.approx(peaks[8]) and fit(16) == pytest.approx(peaks[16])
        b = row["largest_batch"]
        assert b % 8 == 0 and fit(b) <= limit < fit(b + 8), (method, b)


def test_largest_batch_rejects_bad_batches():
    proc = _run("bench/largest_batch.py", "--batches=128,64", timeout=60)
    assert proc.returncode != 0 and "two increasing batch sizes" in proc.stderr


def test_step_time_bf16_rows_step_memory_and_trace(tmp_path):
    """`<method>_bf16` rows (half_precision), XLA's planned step memory per row, the device
    named in the JSON, and a jax.profiler trace per method under --trace_dir."""
    out = tmp_path / "st.json"
    proc = _run("bench/step_time.py", "--model=digits_cnn", "--batch=8", "--repeats=1",
                "--warmup=0", "--methods=float,dq_w2a2_bf16", f"--json={out}",
                f"--trace_dir={tmp_path / 'trace'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert set(d["rows"]) == {"float", "dq_w2a2_bf16"} and d["device"]
    for row in d["rows"].values():
        mem = row["step_memory"]
        assert mem["step_peak"] == mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
        assert mem["step_peak"] > 0
    for method in ("float", "dq_w2a2_bf16"):
        assert list((tmp_path / "trace" / method).rglob("*.xplane.pb")), method
    from bench import step_time
    assert step_time.variant_config(step_time.base_config("digits_cnn", 8),
                                    "dq_w2a2_bf16").half_precision


def test_kernel_table_charges_device_time_to_the_parts_of_the_step(tmp_path):
    """Every traced kernel is an instruction of the compiled step; DQ's weight lookup and
    activation statistics appear only in the DQ step; the byte count of an HLO shape."""
    from bench import kernel_table
    assert kernel_table.shape_bytes("f32[128,16]{1,0}") == 128 * 16 * 4
    assert kernel_table.shape_bytes("(bf16[3,3], u8[10], pred[])") == 18 + 10 + 1
    assert kernel_table.part_of("jit(train_step)/finite_guard/and") == "guard"
    assert kernel_table.part_of("jit(train_step)/jvp(M)/conv/dq_weight/select_n") == \
        "weight lookup"
    out = tmp_path / "k.json"
    proc = _run("bench/kernel_table.py", "--model=digits_cnn", "--batch=8", "--steps=1",
                "--methods=float,dq_w2a2", f"--json={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for method, row in rows.items():
        assert 0 < row["kernels_run"] <= row["instructions"], method
        assert sum(p["ms_per_step"] for p in row["parts"].values()) > 0, method
        assert "guard" in row["parts"] and "optimizer update" in row["parts"], method
    assert "weight lookup" in rows["dq_w2a2"]["parts"] and \
        "weight lookup" not in rows["float"]["parts"]
    assert "act. statistics" in rows["dq_w2a2"]["parts"] and \
        "act. statistics" not in rows["float"]["parts"]


def test_step_time_json_keeps_finished_rows_when_a_later_method_fails(tmp_path, monkeypatch):
    """A GPU is lent for minutes and a time limit may kill a run: the JSON holds every finished
    method's row after each method, marked incomplete until the run ends."""
    from bench import step_time
    row = {"seconds": 0.01, "compile_s": 1.0, "note": "",
           "memory": {k: 0 for k in ("params", "codes", "opt_state", "stats", "total")}}

    def fake(bench_, method):
        if method == "dq_w2a2":
            raise RuntimeError("killed")
        return dict(row)

    monkeypatch.setattr(step_time, "run_method", fake)
    out = tmp_path / "st.json"
    with pytest.raises(RuntimeError, match="killed"):
        step_time.main(["--model=digits_cnn", "--batch=4", "--methods=float,dq_w2a2",
                        f"--json={out}"])
    partial = json.loads(out.read_text())
    assert set(partial["rows"]) == {"float"} and partial["complete"] is False
    step_time.main(["--model=digits_cnn", "--batch=4", "--methods=float,lsq_w2a2",
                    f"--json={out}"])
    done = json.loads(out.read_text())
    assert set(done["rows"]) == {"float", "lsq_w2a2"} and done["complete"] is True
