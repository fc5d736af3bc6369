"""The experiment config schema: defaults for every key, and start-up validation.

Every file in `configs/` starts from `base_config()` and overrides values, so a
typo in a config file or an override is an *unknown key* here and fails at
start with close matches, instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import pathlib
from typing import Any

import ml_collections

from dq_jax.quant.config import (CANDIDATE_BITS, FEEDBACK_ROUNDINGS, INERTIA_AFTER_MOVE,
                                 RANDOM_STREAMS, ROUNDINGS, QuantConfig)

DATASETS = ("digits", "cifar10_npz", "npz", "cifar10", "cifar100", "imagenet2012")
SCHEDULES = ("cosine", "step", "constant")
NONFINITE_POLICIES = ("stop", "skip")


def base_config() -> ml_collections.ConfigDict:
    """All keys with their defaults (a float ResNet-20 on the bundled digits: every user has
    that dataset; the configs/*.py files set the model and dataset they are about)."""
    c = ml_collections.ConfigDict()
    c.model = "resnet20"
    c.model_kwargs = ml_collections.ConfigDict()   # e.g. width_multiplier for MobileNetV2
    c.num_classes = -1                             # -1: the dataset's
    c.half_precision = False                       # bfloat16 activations

    c.dataset = "digits"                           # bundled with scikit-learn: no download
    c.data_dir = ""                                # TFDS data_dir / .npz path / '' default
    c.image_size = 224                             # ImageNet crops
    c.augment = True
    c.batch_size = 128                             # global, over all devices and hosts
    c.grad_accum_steps = 1                         # micro-batches (of batch_size) per update
    c.eval_batch_size = 256

    c.num_epochs = 1.0
    c.num_train_steps = -1                         # -1: from num_epochs
    c.learning_rate = 0.1                          # peak, for batch_size
    c.levels_learning_rate = 1e-3                  # peak Adam LR of weight levels
    c.code_learning_rate = -1.0                    # peak LR of the DQ code update; -1: learning_rate
    c.momentum = 0.9
    c.code_momentum = -1.0                         # SGD momentum of the DQ code update; -1: momentum
    c.nesterov = False
    c.weight_decay = 1e-4
    c.schedule = "cosine"
    c.warmup_epochs = 0.0
    c.step_boundaries = (0.5, 0.75)                # fractions of training, schedule='step'
    c.step_decay = 0.1
    c.label_smoothing = 0.0
    # DQ-W code re-assignment: stochastic (the method); inertia (deterministic, evidence-
    # thresholded: the multi-level form of Bop); nearest, error_feedback, latent_feedback (ablations)
    c.rounding = "stochastic"
    # rounding='inertia' only: the evidence a move needs, in level gaps (u = code LR * momentum
    # must reach threshold * gap), and what a move does to the momentum (subtract, reset, keep)
    c.inertia_threshold = 1.0
    c.inertia_after_move = "subtract"
    c.rounding_anneal = False                      # stochastic -> nearest as the LR decays
    # The random roundings' uniforms (stochastic; feedback_residual_bits): 'hash' = one
    # counter-based hash over all layers (issue 27); 'per_layer' = the per-layer threefry
    # stream before it, to resume a workdir trained with it (its config.json lacks this key)
    c.rounding_stream = "hash"
    # feedback roundings and inertia only: the residual at init_from, 'zero' or 'float' (float
    # kernel - W_q, the float model's position inside each cell: latent-STE's start). For
    # inertia it seeds the code momentum (no extra state); for the feedback roundings (ablations)
    # their float residual
    c.feedback_residual = "zero"
    # feedback roundings only: 0 = the float32 residual; b >= 1 = only its b-bit position
    # inside the cell is used (how many bits of position DQ's state would need; an ablation)
    c.feedback_residual_bits = 0
    # DQ codes at init_from: the nearest level (default), or 'adaround': each weight the level
    # just below/above its float value, chosen by its layer's output error on calibration
    # images (float inputs; nothing of the float kernel is kept afterwards)
    c.conversion_rounding = "nearest"
    c.adaround_steps = 500                         # Adam steps per layer
    c.adaround_images = 256                        # calibration images (first train batches)
    c.code_momentum_dtype = "bfloat16"             # or float32: 2x the buffer, no gain

    c.quant = ml_collections.ConfigDict(dataclasses.asdict(QuantConfig.float()))
    c.quantize_first_last = False
    # Mixed widths (dq_jax/mixed.py, docs/quantize_any_model.md). first_last_bits=b (1..8): the
    # first conv and the last dense at b bits, weights and the activations feeding them (the
    # first conv's input image too: a fitted signed b-bit grid), whatever quantize_first_last
    # says; 0: off (quantize_first_last decides). The LSQ/APoT convention is 8. Per-channel
    # levels on a layer with fewer weights per channel than 2^b: that layer gets per_layer.
    c.first_last_bits = 0
    # rules: ((module-path regex, {QuantConfig field: value}), ...) applied on top of each
    # matching layer's config; every match applies, on a field set twice the earlier rule
    # wins (config.rules before first_last_bits); e.g.
    # --config.rules='(("stage3_.*", {"weight_bits": 4, "act_bits": 4}),)'. A regex that
    # matches no conv/dense layer fails at start, listing the layer paths.
    c.rules = ()
    # Bit allocation (dq_jax/allocation.py). bit_budget: average bits per weight (2..8, e.g.
    # 2.5) over the layers rules/first_last_bits leave at config.quant; each gets a weight
    # width from (2, 3, 4, 8) minimising Hutchinson-trace x Lloyd-error sensitivity, computed
    # on the float weights of init_from (required) before conversion; 0: off. allocation:
    # the chosen ((layer path, weight bits), ...), filled by the program (and recorded); set
    # it by hand to impose widths (e.g. a random control of the same size).
    c.bit_budget = 0.0
    c.allocation_method = "hessian"                # or 'random': the seeded control (config.seed)
    c.allocation_probes = 16                       # Rademacher probes per trace
    c.allocation_batches = 2                       # calibration batches (train batches)
    c.allocation = ()
    c.calibration_batches = 1                      # activation calibration at start
    c.bn_recalibration_batches = 0                 # BN statistics re-estimated after training
    c.init_from = ""                               # float workdir/checkpoint to fine-tune from

    c.seed = 0
    c.log_every_steps = 50
    c.eval_every_steps = -1                        # -1: once per epoch
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.nonfinite_policy = "stop"
    # JAX's persistent compilation cache: 'auto' = <workdir>/compilation_cache (a resume loads
    # the compiled steps instead of compiling them), a directory (shared by runs of the same
    # shapes, e.g. seeds), '' = none. JAX_COMPILATION_CACHE_DIR, if set, wins.
    c.compilation_cache_dir = "auto"
    c.force_new = False                            # start over in a workdir of another config
    c.allow_config_change = False                  # resume under changed hyperparameters
                                                   # (recorded in run_history.jsonl)
    c.mesh = ml_collections.ConfigDict({"data": -1})  # axis name -> size (-1: the rest)
    return c


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py), loaded as `--config=PATH` would be."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"dq_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def random_rounding(d: dict) -> bool:
    """Whether a config (dict) draws random numbers in the DQ code update."""
    return d.get("rounding", "stochastic") == "stochastic" or (
        d.get("rounding") in FEEDBACK_ROUNDINGS and bool(d.get("feedback_residual_bits")))


def _not_applicable(d: dict) -> set[str]:
    """Dotted keys of a config dict that its other settings make irrelevant."""
    quant = d.get("quant", {})
    weights, acts = quant.get("weights"), quant.get("acts")
    out = set()
    if d.get("dataset") != "imagenet2012":
        out.add("image_size")
    if d.get("dataset") == "digits":
        out.add("data_dir")
    if d.get("schedule") != "step":
        out |= {"step_boundaries", "step_decay"}
    if weights != "dq":
        out |= {"code_learning_rate", "code_momentum", "code_momentum_dtype", "rounding",
                "rounding_anneal", "feedback_residual", "feedback_residual_bits",
                "conversion_rounding", "inertia_threshold", "inertia_after_move",
                "adaround_steps", "adaround_images"}
    if not d.get("bit_budget"):
        out |= {"allocation_probes", "allocation_batches", "allocation_method"}
    if d.get("rounding") != "inertia":
        out |= {"inertia_threshold", "inertia_after_move"}
    if weights != "dq" or not random_rounding(d):
        out.add("rounding_stream")
    if weights not in ("dq", "latent_ste"):
        out |= {"levels_learning_rate", "quant.lloyd_iters"}
    if weights == "float":
        out |= {"quant.weight_bits", "quant.granularity"}
    if acts == "float":
        out |= {f"quant.{k}" for k in quant if k.startswith("act_")}
    if weights == "float" and acts == "float":
        out |= {"quantize_first_last", "calibration_batches"}
    return out


def applicable(config: ml_collections.ConfigDict | dict) -> dict:
    """The config as a JSON dict without the keys its other settings make irrelevant (no
    `image_size` on digits, no code learning rate for LSQ): what results.json and config.json
    record. `complete` restores the dropped keys' defaults."""
    d = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") \
        else json.loads(json.dumps(dict(config), default=str))
    for key in _not_applicable(d):
        parent, _, leaf = key.rpartition(".")
        (d.get(parent, {}) if parent else d).pop(leaf, None)
    return d


def complete(recorded: dict) -> ml_collections.ConfigDict:
    """A full config from a recorded (`applicable`) dict: base_config() defaults for the
    keys it lacks."""
    c = base_config()

    def merge(target: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
        for key, value in values.items():
            if key not in target:
                _fail(f"recorded config key {prefix}{key} is unknown to this dq_jax version.")
            if isinstance(value, dict) and key != "model_kwargs":
                merge(target[key], value, f"{prefix}{key}.")
            elif key == "model_kwargs":
                target[key] = ml_collections.ConfigDict(value)
            else:
                target[key] = tuple(value) if isinstance(target[key], tuple) else value
    merge(c, dict(recorded), "")
    return c


def _close_keys(key: str, choices: Any) -> list[str]:
    """The nearest key names (difflib): a typo's fix, else the three least far."""
    choices = list(choices)
    return (difflib.get_close_matches(key, choices, n=3)
            or difflib.get_close_matches(key, choices, n=3, cutoff=0.0))


def _unknown_key_message(name: str, close: list[str]) -> str:
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown key 'config.{name}'.{hint} (all keys: dq_jax/configlib.py)"


def unknown_override(argv: list[str]) -> str | None:
    """The error for the first `--config.KEY=...` naming no key of `base_config()` (with the
    nearest keys), or None; `model_kwargs.*` is free-form."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, path = base_config(), arg[len("--config."):].split("=", 1)[0].split(".")
        for i, part in enumerate(path):
            if part not in node:
                return _unknown_key_message(".".join(path[:i + 1]), _close_keys(part, node.keys()))
            if part == "model_kwargs" or not isinstance(node[part], ml_collections.ConfigDict):
                break
            node = node[part]
    return None


def _unknown_keys(cfg: Any, ref: Any, prefix: str = "") -> list[tuple[str, list[str]]]:
    out = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in ref:
            out.append((name, _close_keys(key, ref.keys())))
        elif isinstance(ref[key], ml_collections.ConfigDict) and key != "model_kwargs":
            if isinstance(cfg[key], (ml_collections.ConfigDict, dict)):
                out.extend(_unknown_keys(cfg[key], ref[key], name + "."))
    return out


def _fail(message: str) -> None:
    raise ValueError(f"Invalid config: {message}")


def validate(config: ml_collections.ConfigDict, *, device_count: int) -> QuantConfig:
    """Checks the whole config at start; returns the layer QuantConfig.

    Raises ValueError with one line naming the key, the bad value and the fix.
    """
    unknown = _unknown_keys(config, base_config())
    if unknown:
        _fail(_unknown_key_message(*unknown[0]))

    from dq_jax import models  # local import: models import layers (heavier)
    if config.model not in models.MODEL_NAMES:
        _fail(f"config.model={config.model!r} is unknown; known models: "
              f"{', '.join(models.MODEL_NAMES)}.")
    if config.dataset not in DATASETS:
        _fail(f"config.dataset={config.dataset!r} is unknown; known datasets: "
              f"{', '.join(DATASETS)}.")
    if config.schedule not in SCHEDULES:
        _fail(f"config.schedule={config.schedule!r}; allowed: {', '.join(SCHEDULES)}.")
    if config.nonfinite_policy not in NONFINITE_POLICIES:
        _fail(f"config.nonfinite_policy={config.nonfinite_policy!r}; allowed: "
              f"{', '.join(NONFINITE_POLICIES)}.")
    if config.rounding not in ROUNDINGS:
        _fail(f"config.rounding={config.rounding!r}; allowed: "
              f"{', '.join(repr(r) for r in ROUNDINGS)}.")
    if config.rounding_stream not in RANDOM_STREAMS:
        _fail(f"config.rounding_stream={config.rounding_stream!r}; allowed: "
              f"{', '.join(repr(r) for r in RANDOM_STREAMS)} ('per_layer' only to resume a "
              "workdir trained before the 'hash' stream).")
    if config.conversion_rounding not in ("nearest", "adaround"):
        _fail(f"config.conversion_rounding={config.conversion_rounding!r}; allowed: 'nearest', "
              "'adaround'.")
    if config.conversion_rounding == "adaround":
        if not config.init_from or config.quant.weights != "dq":
            _fail("config.conversion_rounding='adaround' rounds a float checkpoint into DQ "
                  "codes: set config.init_from and quant.weights='dq', or use 'nearest'.")
        if config.feedback_residual == "float":
            _fail("config.conversion_rounding='adaround' and feedback_residual='float' both "
                  "decide what the float positions do; use one of them.")
        for key in ("adaround_steps", "adaround_images"):
            if int(config[key]) < 1:
                _fail(f"config.{key}={config[key]} must be >= 1.")
    if config.feedback_residual not in ("zero", "float"):
        _fail(f"config.feedback_residual={config.feedback_residual!r}; allowed: 'zero', 'float'.")
    seeded = FEEDBACK_ROUNDINGS + ("inertia",)
    if config.feedback_residual == "float" and config.quant.weights == "dq":
        if config.rounding not in seeded:
            _fail("config.feedback_residual='float' seeds the residual of a feedback rounding (or "
                  "inertia's code momentum) from a float checkpoint: set config.rounding to one "
                  f"of {seeded} and config.init_from, or feedback_residual='zero'.")
        if not config.init_from:
            _fail("config.feedback_residual='float' starts the code update from the float model "
                  "at config.init_from, which is not set: pass --config.init_from=<float workdir "
                  "or checkpoint> (the recipes fine-tune a float model), or "
                  "--config.feedback_residual=zero to start from zero (e.g. from scratch).")
    if config.inertia_after_move not in INERTIA_AFTER_MOVE:
        _fail(f"config.inertia_after_move={config.inertia_after_move!r}; allowed: "
              f"{', '.join(repr(r) for r in INERTIA_AFTER_MOVE)}.")
    threshold = config.inertia_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            0 < threshold < math.inf):
        _fail(f"config.inertia_threshold={threshold!r} must be a number > 0 (the evidence a "
              "move needs, in level gaps; e.g. 1.0).")
    if config.rounding != "inertia" and (threshold != 1.0
                                         or config.inertia_after_move != "subtract"):
        _fail(f"config.inertia_threshold / inertia_after_move apply to rounding='inertia' only "
              f"(rounding={config.rounding!r}); set rounding='inertia' or leave them at 1.0 / "
              "'subtract' (moving a recipe to rounding='stochastic': also feedback_residual=zero, "
              "code_learning_rate=0.01 x learning_rate and code_momentum=0.99, the settings the "
              "study chose for it: configlib.apply_dq_findings(c, 'stochastic')).")
    bits = config.feedback_residual_bits
    if not isinstance(bits, int) or bits < 0:
        _fail(f"config.feedback_residual_bits={bits!r} must be an int >= 0 (0 = the float32 "
              "residual).")
    if bits and config.rounding not in FEEDBACK_ROUNDINGS:
        _fail(f"config.feedback_residual_bits={bits} keeps a feedback rounding's residual to "
              f"{bits} bits: set config.rounding to one of {FEEDBACK_ROUNDINGS}, or "
              "feedback_residual_bits=0.")
    if config.rounding_anneal and config.rounding != "stochastic":
        _fail(f"config.rounding_anneal=True anneals stochastic rounding toward nearest, but "
              f"config.rounding={config.rounding!r}; set rounding='stochastic' or drop the "
              "anneal.")
    if config.code_momentum_dtype not in ("float32", "bfloat16"):
        _fail(f"config.code_momentum_dtype={config.code_momentum_dtype!r}; allowed: "
              "'float32', 'bfloat16'.")
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0 or value % device_count:
            _fail(f"config.{key}={value} must be a positive multiple of the device count "
                  f"({device_count}); e.g. --config.{key}={max(device_count, value - value % device_count or device_count)}.")
    for key in ("num_epochs", "learning_rate", "levels_learning_rate", "code_learning_rate",
                "momentum", "code_momentum", "weight_decay", "label_smoothing", "warmup_epochs"):
        if not math.isfinite(float(config[key])):
            _fail(f"config.{key}={config[key]!r} is not a finite number.")
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        _fail("set config.num_epochs > 0 or config.num_train_steps > 0.")
    if config.learning_rate <= 0 or config.levels_learning_rate < 0:
        _fail("config.learning_rate must be > 0 and config.levels_learning_rate >= 0.")
    if config.code_learning_rate <= 0 and config.code_learning_rate != -1:
        _fail(f"config.code_learning_rate={config.code_learning_rate!r} must be > 0, or -1 "
              "for config.learning_rate.")
    if not 0.0 <= config.label_smoothing < 1.0:
        _fail(f"config.label_smoothing={config.label_smoothing!r} must be in [0, 1).")
    if not (0.0 <= config.code_momentum < 1.0 or config.code_momentum == -1):
        _fail(f"config.code_momentum={config.code_momentum!r} must be in [0, 1), or -1 "
              "for config.momentum.")
    if not 0.0 <= config.momentum < 1.0 or config.weight_decay < 0:
        _fail("config.momentum must be in [0, 1) and config.weight_decay >= 0.")
    if (isinstance(config.grad_accum_steps, bool) or not isinstance(config.grad_accum_steps, int)
            or config.grad_accum_steps < 1):
        _fail(f"config.grad_accum_steps={config.grad_accum_steps!r} must be an integer >= 1 "
              "(1: no accumulation).")
    if config.num_train_steps > 0 and config.num_train_steps % config.grad_accum_steps:
        _fail(f"config.num_train_steps={config.num_train_steps} is not a multiple of "
              f"config.grad_accum_steps={config.grad_accum_steps} (the last update would "
              "never be applied); round it to a multiple.")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if int(config[key]) < 1:
            _fail(f"config.{key}={config[key]!r} must be >= 1"
                  + (" (0 would keep nothing to resume from)." if key == "keep_checkpoints"
                     else "."))
    if config.eval_every_steps == 0 or config.eval_every_steps < -1:
        _fail(f"config.eval_every_steps={config.eval_every_steps!r} must be >= 1, or -1 for "
              "once per epoch.")
    _validate_mixed_widths(config)
    validate_allocation(config)
    for key in ("force_new", "allow_config_change", "augment", "nesterov", "half_precision",
                "quantize_first_last"):
        value = config.get(key, False)  # absent in configs recorded by older versions
        if not isinstance(value, bool):
            _fail(f"config.{key}={value!r} must be True or False.")
    for key, meaning in (("num_train_steps", "from num_epochs"), ("num_classes", "the dataset's")):
        if config[key] == 0 or config[key] < -1:
            _fail(f"config.{key}={config[key]!r} must be >= 1, or -1 ({meaning}).")
    for key in ("warmup_epochs", "calibration_batches"):
        if config[key] < 0:
            _fail(f"config.{key}={config[key]!r} must be >= 0 (0: none).")
    if config.bn_recalibration_batches < 0:
        _fail(f"config.bn_recalibration_batches={config.bn_recalibration_batches!r} must be "
              ">= 0 (0: off).")
    try:
        return QuantConfig.from_mapping(config.quant)
    except ValueError as e:
        _fail(str(e).replace("QuantConfig.", "config.quant."))


def _validate_mixed_widths(config: ml_collections.ConfigDict) -> None:
    """config.first_last_bits and config.rules (dq_jax/mixed.py)."""
    bits = config.get("first_last_bits", 0)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 8:
        _fail(f"config.first_last_bits={bits!r} must be an integer in 1..8 (the first and last "
              "layer's weight and input bits), or 0 for off.")
    if bits and config.quant.weights == "float" and config.quant.acts == "float":
        _fail(f"config.first_last_bits={bits} quantizes the first and last layer of a quantized "
              "model, but config.quant is float; set config.quant.weights/acts, or "
              "first_last_bits=0.")
    from dq_jax import rules  # local: imports flax
    try:
        overrides = rules.overrides_from_pairs(config.get("rules", ()))
    except ValueError as e:
        _fail(str(e))
    for i, rule in enumerate(overrides):
        for field, value in rule.changes:
            if field in ("weights", "acts") and value not in ("float", config.quant[field]):
                _fail(f"config.rules[{i}] sets {field}={value!r}; a rule may set {field} only "
                      f"to 'float' (the method is config.quant.{field}={config.quant[field]!r} "
                      "for every quantized layer).")


def validate_allocation(config: ml_collections.ConfigDict) -> None:
    """config.bit_budget, allocation_probes/batches and allocation (dq_jax/allocation.py)."""
    budget = config.get("bit_budget", 0.0)
    lo, hi = min(CANDIDATE_BITS), max(CANDIDATE_BITS)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (
            budget == 0 or lo <= budget <= hi):
        _fail(f"config.bit_budget={budget!r} is outside the feasible range [{lo}, {hi}] "
              f"average bits per weight (every allocated layer at {lo} .. at {hi} bits); set "
              "one in that range, or 0 for off.")
    if budget:
        if not config.init_from:
            _fail(f"config.bit_budget={budget} allocates widths from a float model's "
                  "sensitivities: set config.init_from to a float checkpoint.")
        if config.quant.weights not in ("dq", "latent_ste", "lsq"):
            _fail(f"config.bit_budget={budget} allocates weight widths, but "
                  f"config.quant.weights={config.quant.weights!r}; quantize the weights.")
    if config.get("allocation_method", "hessian") not in ("hessian", "random"):
        _fail(f"config.allocation_method={config.allocation_method!r}; allowed: 'hessian' (the "
              "sensitivity DP), 'random' (a seeded allocation of the same budget).")
    for key in ("allocation_probes", "allocation_batches"):
        value = config.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"config.{key}={value!r} must be an integer >= 1.")
    allocation = config.get("allocation", ())
    form = ("config.allocation must be ((layer path, weight bits 1..8), ...), e.g. "
            "(('stage1_block1/conv1', 3),)")
    if not isinstance(allocation, (list, tuple)):
        _fail(f"{form}; got {allocation!r}.")
    for i, entry in enumerate(allocation):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2
                or not isinstance(entry[0], str) or isinstance(entry[1], bool)
                or not isinstance(entry[1], int) or not 1 <= entry[1] <= 8):
            _fail(f"{form}; entry {i} is {entry!r}.")


def _set_quant(c: ml_collections.ConfigDict, bits: int) -> None:
    c.quant.weights, c.quant.weight_bits = "dq", bits
    c.quant.acts, c.quant.act_bits = "dq", bits


# What the CIFAR-10 ResNet-20 W2A2 fine-tuning study chose for DQ (RESULTS.md; 1-epoch screens
# and the 5-epoch protocol, 3 seeds each): the code re-assignment `rounding='inertia'` (82.67,
# against 81.52 for the stochastic rounding; LSQ 82.63, latent-STE 82.79): a weight moves one
# level when its code momentum's step reaches half a gap, the momentum a slow trace (0.999)
# seeded at conversion with the float model's position inside each cell; the code LR as a ratio
# of the float LR, 10 = 1 / (1 - 0.9): per gradient, the step a latent weight under SGD momentum
# 0.9 takes; one level set per output channel, levels Adam 1e-3 and BatchNorm statistics
# re-estimated after training. Every shipped recipe takes them, so its code step follows its own
# LR and batch. The inertia start needs the float model (config.init_from): without one, set
# feedback_residual='zero' (from scratch the study measured no gain: digits 98.59 vs 98.74).
DQ_ROUNDING = "inertia"
DQ_INERTIA_THRESHOLD = 0.5
DQ_INERTIA_CODE_MOMENTUM = 0.999
DQ_INERTIA_CODE_LR_RATIO = 10.0
DQ_FEEDBACK_RESIDUAL = "float"
# The stochastic rounding's best settings (the paper's rule; `apply_dq_findings(c, 'stochastic')`):
# code LR 0.01 x the float LR (the float LR itself cost 3 points) and momentum 0.99.
DQ_CODE_LR_RATIO = 0.01
DQ_CODE_MOMENTUM = 0.99
DQ_GRANULARITY = "per_channel"
DQ_LEVELS_LEARNING_RATE = 1e-3
DQ_BN_RECALIBRATION_BATCHES = 50


def apply_dq_findings(c: ml_collections.ConfigDict,
                      rounding: str = DQ_ROUNDING) -> ml_collections.ConfigDict:
    """`c` (its `learning_rate` already set) with the DQ settings the CIFAR-10 study chose for
    `rounding` ('inertia', the default, or 'stochastic', the paper's rule)."""
    if rounding == "inertia":
        c.rounding = "inertia"
        c.inertia_threshold = DQ_INERTIA_THRESHOLD
        c.code_learning_rate = DQ_INERTIA_CODE_LR_RATIO * c.learning_rate
        c.code_momentum = DQ_INERTIA_CODE_MOMENTUM
        c.feedback_residual = DQ_FEEDBACK_RESIDUAL
    elif rounding == "stochastic":
        c.rounding = "stochastic"
        c.inertia_threshold = 1.0
        c.code_learning_rate = DQ_CODE_LR_RATIO * c.learning_rate
        c.code_momentum = DQ_CODE_MOMENTUM
        c.feedback_residual = "zero"
    else:
        raise ValueError(f"apply_dq_findings: rounding={rounding!r}; the study chose settings "
                         "for 'inertia' and 'stochastic'.")
    c.quant.granularity = DQ_GRANULARITY
    c.levels_learning_rate = DQ_LEVELS_LEARNING_RATE
    c.bn_recalibration_batches = DQ_BN_RECALIBRATION_BATCHES
    return c


def cifar100_recipe(model: str, bits: int) -> ml_collections.ConfigDict:
    """Quantized fine-tuning on TFDS cifar100 (the configs/cifar100_*.py files' shared recipe).

    SGD momentum 0.9 (Nesterov), wd 5e-4, cosine, peak LR 0.01, batch 128, 100 epochs;
    pad-4 crop + flip; the DQ settings of the CIFAR-10 study (`apply_dq_findings`).
    """
    c = base_config()
    c.model = model
    c.dataset = "cifar100"
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_epochs = 100.0
    c.learning_rate = 0.01
    c.nesterov = True
    c.weight_decay = 5e-4
    _set_quant(c, bits)
    return apply_dq_findings(c)


def imagenet_recipe(model: str, bits: int) -> ml_collections.ConfigDict:
    """Quantized fine-tuning on TFDS imagenet2012 (the configs/imagenet_*.py files' recipe).

    SGD momentum 0.9 (Nesterov), wd 1e-4, 1 warm-up epoch then cosine, peak LR 0.01 x
    batch/256, label smoothing 0.1, batch 1024, 30 epochs, bfloat16 activations; inception
    crop + flip at 224, eval resize + center crop; the DQ settings of the CIFAR-10 study
    (`apply_dq_findings`: the code LR follows the batch-scaled float LR).
    """
    c = base_config()
    c.model = model
    c.dataset = "imagenet2012"
    c.image_size = 224
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_epochs = 30.0
    c.learning_rate = 0.01 * c.batch_size / 256
    c.nesterov = True
    c.weight_decay = 1e-4
    c.warmup_epochs = 1.0
    c.label_smoothing = 0.1
    c.half_precision = True
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    _set_quant(c, bits)
    return apply_dq_findings(c)
