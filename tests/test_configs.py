"""Shipped configs read data a user has or can prepare: nothing outside the repository.

base_config() defaults to the bundled digits; CIFAR-10 reads TFDS `cifar10` (failing fast with
the `tfds build` instruction when it is not prepared) or any `.npz` via dataset='npz'."""
from __future__ import annotations

import numpy as np
import pytest

from dq_jax import configlib, data
from dq_jax.quant import weights as wq
from tests.helpers import REPO, load_config

CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py"))


def test_base_config_defaults_to_the_bundled_digits():
    c = configlib.base_config()
    assert c.dataset == "digits" and c.data_dir == ""
    c.batch_size, c.eval_batch_size = 64, 64
    configlib.validate(c, device_count=1)
    ds = data.create_dataset(c, process_index=0, process_count=1)
    assert (ds.name, ds.num_classes, ds.image_shape) == ("digits", 10, (8, 8, 1))


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_use_no_built_in_data_path(name):
    c = load_config(name)
    assert c.data_dir == "", (name, c.data_dir)       # the dataset's own default location
    assert c.dataset in ("digits", "cifar10", "cifar100", "imagenet2012"), (name, c.dataset)


def test_cifar10_config_reads_tfds_and_fails_fast_with_the_build_command(tmp_path):
    c = load_config("cifar10_resnet20")
    assert c.dataset == "cifar10"
    c.data_dir = str(tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match=r"'cifar10' is not prepared.*tfds build cifar10"):
        data.create_dataset(c, process_index=0, process_count=1)


def test_cifar10_config_takes_any_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 256),
             x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 20))
    c = load_config("cifar10_resnet20")
    c.dataset, c.data_dir = "npz", str(path)
    c.init_from = str(tmp_path / "float")  # the recipe fine-tunes (validate does not open it)
    configlib.validate(c, device_count=1)
    ds = data.create_dataset(c, process_index=0, process_count=1)
    assert (ds.name, ds.num_classes, ds.image_shape, ds.train_size) == (
        "npz", 10, (32, 32, 3), 256)
    batch = next(ds.train_batches())
    assert batch["image"].shape == (c.batch_size, 32, 32, 3)


def test_cifar10_config_docstring_states_data_and_commands():
    doc = (REPO / "configs" / "cifar10_resnet20.py").read_text().split('"""')[1]
    assert "tfds build cifar10" in doc
    assert "--config.dataset=npz --config.data_dir=" in doc
    assert "python -m dq_jax.main --config=configs/cifar10_resnet20.py" in doc


def test_applicable_drops_irrelevant_keys_and_complete_restores_them():
    from dq_jax import configlib
    c = configlib.base_config()
    c.quant.weights, c.quant.acts = "lsq", "dq"
    a = configlib.applicable(c)
    for key in ("image_size", "data_dir", "step_boundaries", "step_decay", "code_learning_rate",
                "code_momentum", "rounding", "levels_learning_rate"):
        assert key not in a, key
    assert "lloyd_iters" not in a["quant"] and a["quant"]["act_bits"] == c.quant.act_bits
    assert configlib.complete(a).to_dict() == c.to_dict()  # dropped keys were at defaults
    c.dataset, c.schedule = "imagenet2012", "step"
    c.quant.weights, c.quant.acts = "float", "float"
    a = configlib.applicable(c)
    assert a["image_size"] == 224 and a["step_boundaries"] == [0.5, 0.75]
    assert set(a["quant"]) == {"weights", "acts"}
    assert configlib.complete(a).to_dict() == c.to_dict()
    with pytest.raises(ValueError, match="recorded config key bogus is unknown"):
        configlib.complete({"bogus": 1})


RECIPES = ["cifar10_resnet20", "cifar100_alexnet", "cifar100_mobilenetv2", "cifar100_resnet",
           "imagenet_alexnet", "imagenet_mobilenetv2", "imagenet_resnet"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_carry_the_cifar10_study_findings(name):
    """Every shipped DQ recipe takes the settings the CIFAR-10 study chose: rounding='inertia'
    (threshold half a gap, code momentum 0.999 seeded from the float model) with the code LR as
    a ratio of the float LR, 10 = 1 / (1 - 0.9): per gradient, the step of a latent weight under
    SGD momentum 0.9 (latent-STE's); levels Adam 1e-3, BN re-estimation, per-channel levels
    wherever a channel has as many weights as levels; its docstring separates what was measured
    from what is extrapolated. It fine-tunes: without init_from it stops with the fix named."""
    from dq_jax.configlib import DQ_INERTIA_CODE_LR_RATIO
    c = load_config(name)
    assert c.quant.weights == "dq"
    assert (c.rounding, c.inertia_threshold, c.inertia_after_move, c.feedback_residual) == (
        "inertia", 0.5, "subtract", "float")
    assert DQ_INERTIA_CODE_LR_RATIO == 10.0 and c.code_momentum == 0.999
    assert c.code_learning_rate == pytest.approx(10.0 * c.learning_rate, rel=1e-12)
    assert c.code_learning_rate * (1 - c.momentum) == pytest.approx(c.learning_rate)
    assert c.levels_learning_rate == 1e-3 and c.bn_recalibration_batches == 50
    doc = (REPO / "configs" / f"{name}.py").read_text().split('"""')[1]
    assert "Measured" in doc and "Extrapolated:" in doc and "inertia" in doc
    with pytest.raises(ValueError, match=r"config.init_from, which is not set: pass "
                                         r"--config.init_from=.*or --config.feedback_residual=zero"):
        configlib.validate(c, device_count=1)
    c.init_from = "/float/workdir"
    configlib.validate(c, device_count=1)
    # the float pre-training stage the docstrings give (same file, weights and acts float)
    f = load_config(name)
    f.quant.weights, f.quant.acts = "float", "float"
    configlib.validate(f, device_count=1)
    if "mobilenetv2" in name:  # depthwise 3x3 kernels: 9 weights per channel < 16 levels
        assert c.quant.granularity == "per_layer" and c.quant.weight_bits == 4
        with pytest.raises(ValueError, match="needs at least 16 weights per output channel"):
            wq.check_kernel_shape((3, 3, 1, 32), "per_channel", 16)
    else:
        assert c.quant.granularity == "per_channel"


def test_apply_dq_findings_stochastic_gives_the_papers_rule_at_its_chosen_step():
    """`apply_dq_findings(c, 'stochastic')`: the settings the study chose for the stochastic rule
    (code LR 0.01 x float LR, momentum 0.99: effective step lr_c / (1 - beta_c) = the float LR),
    no inertia keys; an unknown rounding is refused."""
    c = configlib.apply_dq_findings(load_config("cifar10_resnet20"), "stochastic")
    assert (c.rounding, c.inertia_threshold, c.feedback_residual) == ("stochastic", 1.0, "zero")
    assert c.code_learning_rate == pytest.approx(1e-4) and c.code_momentum == 0.99
    assert c.code_learning_rate / (1 - c.code_momentum) == pytest.approx(c.learning_rate)
    configlib.validate(c, device_count=1)  # no float model needed
    with pytest.raises(ValueError, match="rounding='nearest'; the study chose settings"):
        configlib.apply_dq_findings(c, "nearest")
