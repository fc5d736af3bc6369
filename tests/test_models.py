"""Model zoo: registry, reference parameter counts, shapes, float equivalence with
plain-Flax references, 2-bit level counts, activation-quantizer signs, jit fwd+bwd.

Big (ImageNet-size) nets are only traced (`jax.eval_shape`), never compiled;
real compiles use small CIFAR/digits nets and `unsafe_rbg` keys (threefry
initialisers of ~50 layers take tens of seconds to compile on CPU).
"""
from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dq_jax import models
from dq_jax.layers import QuantConv, QuantDense, zero_perturbations
from dq_jax.models.mobilenet_v2 import make_divisible
from dq_jax.optim import dq_layer_paths
from dq_jax.quant.config import QuantConfig

MUTABLE = ["batch_stats", "quant_stats"]
FLOAT = QuantConfig.float()
# W2A2 with one Lloyd / calibration iteration: the model structure is under test
# here, not the fitting, and every iteration adds compile time to each layer.
W2A2 = QuantConfig(weights="dq", weight_bits=2, acts="dq", act_bits=2, lloyd_iters=1,
                   act_calib_iters=1)
# Compiled checks use a narrow MobileNetV2-CIFAR with its first two stages: the
# stem-fed t=1 block, an expand block with stride, a residual block, last conv.
MINI_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2))
SMALL = {"mobilenetv2_cifar": dict(width_multiplier=0.35, setting=MINI_SETTING)}


def key(seed: int = 0) -> jax.Array:
    return jax.random.key(seed, impl="unsafe_rbg")


def flat(tree) -> dict:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)) if tree else {}


def n_params(variables) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def input_batch(name: str, batch: int = 2, seed: int = 0) -> jax.Array:
    shape = (batch,) + models.INPUT_SHAPES[name]
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def abstract_init(model, x):
    return jax.eval_shape(lambda k: model.init(k, x, train=False), key())


def small_model(name: str, quant: QuantConfig, **kw) -> nn.Module:
    if name == "mobilenetv2_cifar":  # `setting` is a field, not a registry option
        model = models.create(name, 10, quant, **kw)
        return model.clone(**SMALL[name])
    return models.create(name, 10, quant, **kw)


def run_jit(fun, *args):
    """`jax.jit(fun)(*args)`, compiled at XLA backend optimisation level 0: same
    semantics, about half the CPU compile time (compiles dominate this file)."""
    compiled = jax.jit(fun).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


def real_init(model: nn.Module, name: str):
    x = input_batch(name)
    return run_jit(lambda k: model.init(k, x, train=False), key())


def kernel_layer_paths(variables) -> set:
    """Module paths of every conv/dense (anything with a kernel of some kind)."""
    paths = {p[:-1] for p in flat(variables["params"]) if p[-1] in ("kernel", "kernel_levels")}
    return paths | {p[:-1] for p in flat(variables.get("codes", {}))}


# --------------------------------------------------------------------------- registry

REQUIRED = ("resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet20", "resnet56",
            "alexnet", "alexnet_cifar", "mobilenetv2", "mobilenetv2_cifar", "digits_cnn")


def test_registry_names_and_errors():
    assert set(REQUIRED) <= set(models.MODEL_NAMES)
    assert isinstance(models.MODEL_NAMES, tuple)
    for name in models.MODEL_NAMES:
        model = models.create(name, 7)
        assert isinstance(model, nn.Module) and model.num_classes == 7
        assert model.quant == FLOAT and model.quantize_first_last is False
    with pytest.raises(ValueError, match="known models: .*resnet20"):
        models.create("resnet19", 10)
    with pytest.raises(ValueError, match=r"unexpected keyword.*\['width_multiplier'\].*accepted"):
        models.create("resnet20", 10, width_multiplier=0.5)
    with pytest.raises(ValueError, match="num_classes"):
        models.create("resnet20", 0)
    with pytest.raises(ValueError, match="shortcut"):
        models.create("resnet20", 10, shortcut="identity")
    with pytest.raises(ValueError, match="width_multiplier"):
        models.create("mobilenetv2", 10, width_multiplier=0.0)
    with pytest.raises(TypeError, match="quant"):
        models.create("resnet20", 10, quant="dq")
    with pytest.raises(ValueError, match="Unknown quantization option"):
        models.create("resnet20", 10, quant={"bits": 2})
    assert models.create("resnet20", 10, quant={"weights": "dq"}).quant == QuantConfig()
    assert models.create("mobilenetv2", 10, width_multiplier=0.5).width_multiplier == 0.5
    # A plain nn.Conv cannot carry a quantized config: clear error at trace time.
    model = models.create("digits_cnn", 10, W2A2, conv=nn.Conv)
    with pytest.raises(ValueError, match="cannot quantize"):
        abstract_init(model, input_batch("digits_cnn"))


# ------------------------------------------------------------------ parameter counts

PARAM_COUNTS = [
    # (name, num_classes, kwargs, count, reference)
    ("resnet18", 1000, {}, 11_689_512),                       # torchvision
    ("resnet34", 1000, {}, 21_797_672),                       # torchvision
    ("resnet50", 1000, {}, 25_557_032),                       # torchvision
    ("mobilenetv2", 1000, {}, 3_504_872),                     # torchvision, width 1.0
    ("mobilenetv2_cifar", 1000, {}, 3_504_872),               # same params, other strides
    ("alexnet", 1000, {"batch_norm": False}, 61_100_840),     # torchvision alexnet
    ("alexnet", 1000, {}, 61_110_184),                        # AlexNet-BN (derived, docstring)
    ("alexnet_cifar", 10, {"batch_norm": False}, 2_472_266),  # bearpaw/pytorch-classification
    ("alexnet_cifar", 10, {}, 2_473_418),                     # its BN variant
    ("resnet18_cifar", 10, {}, 11_173_962),                   # kuangliu/pytorch-cifar ResNet18
    ("resnet20", 10, {}, 269_722),                            # He et al. option A ("0.27M")
    ("resnet56", 10, {}, 853_018),                            # He et al. option A ("0.85M")
    ("resnet20", 10, {"shortcut": "projection"}, 272_474),    # option B: + 2 (1x1 conv + BN)
    ("digits_cnn", 10, {}, 56_554),
]


@pytest.mark.parametrize("name,num_classes,kwargs,expected", PARAM_COUNTS,
                         ids=[f"{p[0]}-{p[1]}-{'-'.join(p[2]) or 'default'}" for p in PARAM_COUNTS])
def test_param_counts(name, num_classes, kwargs, expected):
    model = models.create(name, num_classes, **kwargs)
    variables = abstract_init(model, jnp.zeros((1,) + models.INPUT_SHAPES[name]))
    assert n_params(variables) == expected
    assert "batch_stats" in variables or kwargs.get("batch_norm") is False


def test_make_divisible_matches_torchvision_channels():
    # torchvision mobilenet_v2(width_mult=0.5 / 0.35) channel tables.
    assert [make_divisible(c * 0.5) for c in (32, 16, 24, 32, 64, 96, 160, 320)] == [
        16, 8, 16, 16, 32, 48, 80, 160]
    assert [make_divisible(c * 0.35) for c in (32, 16, 24, 32, 64, 96, 160, 320)] == [
        16, 8, 8, 16, 24, 32, 56, 112]


# -------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_output_shapes(name):
    """Float nets traced at their designed input size (quantized, train mode: see the
    forward/backward tests)."""
    model = models.create(name, 13)
    x = jnp.zeros((3,) + models.INPUT_SHAPES[name])
    out = jax.eval_shape(lambda k, x: model.init_with_output(k, x, train=False)[0], key(), x)
    assert out.shape == (3, 13) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2"])
def test_imagenet_models_accept_32x32(name):
    model = models.create(name, 10)
    x = jnp.zeros((2, 32, 32, 3))
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), abstract_init(model, x), x)
    assert out.shape == (2, 10)


def test_bfloat16_compute_dtype():
    model = models.create("resnet20", 10, W2A2, dtype=jnp.bfloat16)
    x = jnp.zeros((2, 32, 32, 3))
    variables = abstract_init(model, x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables["params"]))
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.dtype == jnp.float32  # logits are float32 for the loss


# ------------------------------------------- float equivalence with plain-Flax references

def _bn(train):
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)


class RefResNet20(nn.Module):
    """He et al. CIFAR ResNet-20, option A, written directly with nn.Conv/nn.Dense."""

    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        conv = functools.partial(nn.Conv, use_bias=False, padding=1)
        x = nn.relu(bn(name="stem_bn")(conv(16, (3, 3), name="stem_conv")(x)))
        for i, width in enumerate((16, 32, 64)):
            for j in range(3):
                s = 2 if (i > 0 and j == 0) else 1
                x = RefBasic(width, s, name=f"stage{i + 1}_block{j + 1}")(x, train)
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


class RefBasic(nn.Module):
    width: int
    stride: int

    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        y = nn.Conv(self.width, (3, 3), self.stride, padding=1, use_bias=False, name="conv1")(x)
        y = nn.relu(bn(name="bn1")(y))
        y = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name="conv2")(y)
        y = bn(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = x[:, ::self.stride, ::self.stride]
            x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (self.width - x.shape[-1],))], -1)
        return nn.relu(x + y)


class RefMobileNetV2Cifar(nn.Module):
    """MobileNetV2 width 0.5 CIFAR variant, channels hard-coded from torchvision's table."""

    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        conv = functools.partial(nn.Conv, use_bias=False)
        x = jax.nn.relu6(bn(name="stem_bn")(conv(16, (3, 3), 1, padding=1, name="stem_conv")(x)))
        table = [(1, 8, 1, 1), (6, 16, 2, 1), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1),
                 (6, 80, 3, 2), (6, 160, 1, 1)]
        b = 0
        for t, c, n, s in table:
            for k in range(n):
                stride = s if k == 0 else 1
                cin = x.shape[-1]
                h = RefInvRes(c, stride, t, name=f"block{b}")(x, train)
                x = x + h if (stride == 1 and cin == c) else h
                b += 1
        x = jax.nn.relu6(bn(name="last_bn")(conv(1280, (1, 1), name="last_conv")(x)))
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


class RefInvRes(nn.Module):
    out: int
    stride: int
    t: int

    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        hidden = x.shape[-1] * self.t
        if self.t != 1:
            x = jax.nn.relu6(bn(name="expand_bn")(
                nn.Conv(hidden, (1, 1), use_bias=False, name="expand_conv")(x)))
        x = nn.Conv(hidden, (3, 3), self.stride, padding=1, feature_group_count=hidden,
                    use_bias=False, name="dw_conv")(x)
        x = jax.nn.relu6(bn(name="dw_bn")(x))
        return bn(name="project_bn")(nn.Conv(self.out, (1, 1), use_bias=False,
                                             name="project_conv")(x))


class RefAlexNetCifar(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        for i, (f, k, s, p, pool) in enumerate([(64, 11, 4, 5, 1), (192, 5, 1, 2, 1),
                                                (384, 3, 1, 1, 0), (256, 3, 1, 1, 0),
                                                (256, 3, 1, 1, 1)]):
            x = nn.Conv(f, (k, k), s, padding=p, use_bias=False, name=f"conv{i + 1}")(x)
            x = nn.relu(bn(name=f"bn{i + 1}")(x))
            if pool:
                x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


class RefTinyImageNetResNet(nn.Module):
    """torchvision-style ImageNet stem + one block per stage (basic or bottleneck v1.5)."""

    block: str

    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        conv = functools.partial(nn.Conv, use_bias=False)
        x = nn.relu(bn(name="stem_bn")(conv(4, (7, 7), 2, padding=3, name="stem_conv")(x)))
        x = jax.lax.reduce_window(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)),
                                          constant_values=-jnp.inf),
                                  -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")
        for i, width in enumerate((4, 8)):
            s = 1 if i == 0 else 2
            out = width * (4 if self.block == "bottleneck" else 1)
            with_proj = s != 1 or x.shape[-1] != out
            scope = f"stage{i + 1}_block1"
            x = RefTinyBlock(self.block, width, out, s, with_proj, name=scope)(x, train)
        return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


class RefTinyBlock(nn.Module):
    block: str
    width: int
    out: int
    stride: int
    proj: bool

    @nn.compact
    def __call__(self, x, train):
        bn = _bn(train)
        conv = functools.partial(nn.Conv, use_bias=False)
        if self.block == "basic":
            y = nn.relu(bn(name="bn1")(conv(self.width, (3, 3), self.stride, padding=1,
                                            name="conv1")(x)))
            y = bn(name="bn2")(conv(self.width, (3, 3), padding=1, name="conv2")(y))
        else:
            y = nn.relu(bn(name="bn1")(conv(self.width, (1, 1), name="conv1")(x)))
            y = nn.relu(bn(name="bn2")(conv(self.width, (3, 3), self.stride, padding=1,
                                            name="conv2")(y)))
            y = bn(name="bn3")(conv(self.out, (1, 1), name="conv3")(y))
        if self.proj:
            x = bn(name="proj_bn")(conv(self.out, (1, 1), self.stride, name="proj_conv")(x))
        return nn.relu(x + y)


def _randomize(variables, seed=1):
    """Non-trivial BN affine and running statistics (identity BN would hide bugs)."""
    rng = np.random.default_rng(seed)

    def perturb(path, v):
        v = np.asarray(v)
        if path[-1] == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, v.shape), v.dtype)
        if path[-1] == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
        if path[-1] in ("bias", "mean"):
            return jnp.asarray(rng.normal(0, 0.2, v.shape), v.dtype)
        return jnp.asarray(v)

    return jax.tree_util.tree_map_with_path(
        lambda p, v: perturb(tuple(getattr(k, "key", k) for k in p), v), variables)


@pytest.mark.parametrize("name,kwargs,ref,check_train", [
    ("resnet20", {}, RefResNet20(), True),
    # Full depth; eval mode only (random running stats: the stricter check) to save compiles.
    ("mobilenetv2_cifar", {"width_multiplier": 0.5}, RefMobileNetV2Cifar(), False),
    ("alexnet_cifar", {}, RefAlexNetCifar(), True),
])
def test_float_model_equals_plain_flax_reference(name, kwargs, ref, check_train):
    model = models.create(name, 10, FLOAT, **kwargs)
    x = input_batch(name, batch=4)
    ref_vars = _randomize(run_jit(lambda k: ref.init(k, x, train=False), key()))
    # Same variable tree (names and shapes) as the independent reference.
    assert jax.tree.map(lambda a: a.shape, abstract_init(model, x)) == jax.tree.map(
        jnp.shape, ref_vars)

    a_eval, b_eval = run_jit(
        lambda v: (model.apply(v, x, train=False), ref.apply(v, x, train=False)), ref_vars)
    np.testing.assert_allclose(a_eval, b_eval, rtol=1e-4, atol=1e-4)
    assert float(jnp.std(a_eval)) > 1e-3  # a non-degenerate comparison
    if check_train:  # batch statistics and the running-average update (momentum 0.9)
        a_tr, a_up, b_tr, b_up = run_jit(lambda v: (
            *model.apply(v, x, train=True, mutable=["batch_stats"]),
            *ref.apply(v, x, train=True, mutable=["batch_stats"])), ref_vars)
        np.testing.assert_allclose(a_tr, b_tr, rtol=1e-4, atol=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     a_up, b_up)
        assert float(jnp.std(a_tr)) > 1e-3


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_imagenet_stem_and_blocks_equal_plain_flax_reference(block):
    """The ResNet class with the ImageNet stem (torch padding, -inf max-pool padding),
    projection shortcuts and v1.5 bottlenecks, on a tiny width so it compiles fast."""
    model = models.ResNet(stage_sizes=(1, 1), block=block, num_classes=10, widths=(4, 8))
    ref = RefTinyImageNetResNet(block)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 40, 40, 3)), jnp.float32)
    v = _randomize(run_jit(lambda k: ref.init(k, x, train=False), key()))
    assert jax.tree.map(lambda a: a.shape, abstract_init(model, x)) == jax.tree.map(
        jnp.shape, v)
    a, b = run_jit(lambda v: (model.apply(v, x, train=False), ref.apply(v, x, train=False)), v)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert float(jnp.std(a)) > 1e-3


def test_quant_layers_with_float_config_equal_plain_layers():
    """`conv=nn.Conv, dense=nn.Dense` builds the same net as the QuantConv default."""
    plain = models.create("digits_cnn", 10, conv=nn.Conv, dense=nn.Dense)
    ours = models.create("digits_cnn", 10)
    x = input_batch("digits_cnn", batch=8)
    v = _randomize(run_jit(lambda k: plain.init(k, x, train=False), key()))
    a, b = run_jit(lambda v: (ours.apply(v, x, train=False), plain.apply(v, x, train=False)), v)
    np.testing.assert_array_equal(a, b)


# ------------------------------------- quantized models: layers, levels, signs, fwd+bwd

FIRST_LAST = {
    "digits_cnn": (("conv1",), ("head",)),
    "resnet20": (("stem_conv",), ("head",)),
    "alexnet_cifar": (("conv1",), ("head",)),
    "mobilenetv2_cifar": (("stem_conv",), ("head",)),
}


def _check_levels(variables, granularity, bits=2) -> int:
    """<= 2**bits distinct W_q values per group in every dq layer; returns #depthwise.

    W_q = levels[group, code] is rebuilt here in numpy (independent of the library).
    """
    params = flat(jax.device_get(variables["params"]))
    codes = flat(jax.device_get(variables["codes"]))
    assert codes
    depthwise = 0
    for path, code in codes.items():
        levels = params[path[:-1] + ("kernel_levels",)]
        groups = code.shape[-1] if granularity == "per_channel" else 1
        assert levels.shape == (groups, 2 ** bits), path
        assert np.all(np.diff(levels, axis=-1) >= 0), path  # sorted ascending
        assert code.dtype == np.uint8 and code.max() < 2 ** bits, path
        w = levels[np.arange(code.shape[-1]) % groups, code]  # broadcast on the last axis
        rows = w.reshape(-1, code.shape[-1]).T if groups > 1 else w.reshape(1, -1)
        assert max(len(np.unique(r)) for r in rows) <= 2 ** bits, path
        if groups > 1:  # per channel: each channel has its own set
            assert len(np.unique(w)) > 2 ** bits, path
        depthwise += path[-2] == "dw_conv" and code.shape[2] == 1
    return depthwise


def _loss_and_grads(model, variables, x, labels, signed=None):
    """Train-mode loss and grads w.r.t. params and perturbations (dL/dW_q).

    With a dict `signed`, also returns the minimum input of every layer that has
    an activation quantizer, and fills `signed[path] = quant.act_signed`.
    """
    params = variables["params"]
    perts = zero_perturbations(variables.get("codes", {}))
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params, perts):
        mins = {}

        def spy(next_fun, args, kwargs, ctx):
            if (signed is not None and ctx.method_name == "__call__"
                    and isinstance(ctx.module, (QuantConv, QuantDense))
                    and ctx.module.quant.acts != "float"):
                mins[ctx.module.path] = jnp.min(args[0])
                signed[ctx.module.path] = ctx.module.quant.act_signed
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(spy):
            logits, updates = model.apply({"params": params, "perturbations": perts, **rest}, x,
                                          train=True, mutable=MUTABLE)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates, mins)

    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, perts)


@pytest.mark.parametrize("name,granularity,qfl", [
    ("digits_cnn", "per_channel", True),
    ("resnet20", "per_layer", False),
    ("mobilenetv2_cifar", "per_channel", True),   # narrow, 2 stages; per-channel depthwise
    ("alexnet_cifar", "per_channel", False),
])
def test_dq_w2a2_levels_and_jit_forward_backward(name, granularity, qfl):
    model = small_model(name, W2A2.replace(granularity=granularity), quantize_first_last=qfl)
    variables = real_init(model, name)

    # Which layers are quantized: all but first/last unless quantize_first_last.
    all_layers = kernel_layer_paths(abstract_init(small_model(name, FLOAT), input_batch(name)))
    first, last = FIRST_LAST[name]
    assert {first, last} <= all_layers and kernel_layer_paths(variables) == all_layers
    dq = set(dq_layer_paths(variables["codes"]))
    stats = {p[:-2] for p in flat(variables["quant_stats"])}
    params = flat(variables["params"])
    if qfl:
        assert dq == all_layers and stats == all_layers
    else:
        assert dq == all_layers - {first, last} and stats == dq
        for edge in (first, last):  # plain float kernels, no quantizer
            assert edge + ("kernel",) in params and edge + ("kernel_levels",) not in params
    assert "perturbations" not in variables  # init stores only what must be stored
    assert (_check_levels(variables, granularity) > 0) == name.startswith("mobilenet")

    # One jitted forward + backward in training mode.
    x = input_batch(name, batch=4, seed=3)
    labels = jnp.arange(4) % 10
    signed = {}
    (loss, (logits, updates, mins)), (g_params, g_perts) = jax.device_get(run_jit(
        functools.partial(_loss_and_grads, model, signed=signed), variables, x, labels))
    assert logits.shape == (4, 10) and np.isfinite(float(loss))

    # Signed activation grids exactly where a quantized layer's input goes negative:
    # the image (first conv, when quantized) and MobileNetV2's expand convs and last
    # 1x1 conv (they read linear bottlenecks); every post-ReLU input is unsigned.
    assert set(mins) == stats
    for path, lo in mins.items():
        assert bool(lo < 0) == signed[path], (path, float(lo), signed[path])
    expected = int(qfl)
    if name.startswith("mobilenet"):
        expected += sum(n for t, _, n, _ in model.setting if t != 1) + 1
    assert sum(signed.values()) == expected

    assert jax.tree.structure(g_params) == jax.tree.structure(variables["params"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves((g_params, g_perts)))
    gp, gw = flat(g_params), flat(g_perts)
    assert set(gw) == set(flat(variables["codes"]))
    for path, g in gw.items():   # dL/dW_q (the code update's signal) and dL/dlevels
        assert g.shape == flat(variables["codes"])[path].shape
        assert np.any(g != 0), path
        assert np.any(gp[path[:-1] + ("kernel_levels",)] != 0), path
    # Statistics were updated: BN running averages moved, every quantizer calibrated.
    old_bs, new_bs = flat(jax.device_get(variables["batch_stats"])), flat(updates["batch_stats"])
    assert any(not np.allclose(old_bs[k], new_bs[k]) for k in old_bs)
    inits = [v for k, v in flat(updates["quant_stats"]).items() if k[-1] == "initialized"]
    assert len(inits) == len(stats) and all(bool(v) for v in inits)


# Executed above: digits_cnn, resnet20, alexnet_cifar, (narrow) mobilenetv2_cifar.
# resnet34_cifar / resnet50_cifar are resnet34 / resnet50 blocks behind resnet18_cifar's
# stem (see test_cifar_stem_variants_share_the_imagenet_blocks), so not traced again.
TRACED = ("resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet56", "alexnet",
          "mobilenetv2")


@pytest.mark.parametrize("name", TRACED)
def test_jit_forward_backward_traces(name):
    """Full-size nets: the jitted train-step gradient is traced with eval_shape, not run."""
    model = models.create(name, 10, W2A2.replace(granularity="per_channel"),
                          quantize_first_last=True)
    x = jnp.zeros((2,) + models.INPUT_SHAPES[name])
    variables = abstract_init(model, x)
    labels = jnp.zeros((2,), jnp.int32)
    (loss, (logits, updates, _)), (g_params, g_perts) = jax.eval_shape(
        jax.jit(functools.partial(_loss_and_grads, model)), variables, x, labels)
    assert loss.shape == () and logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert jax.tree.map(lambda a: (a.shape, a.dtype), g_params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), variables["params"])
    assert jax.tree.map(lambda a: a.shape, g_perts) == jax.tree.map(
        lambda a: a.shape, variables["codes"])
    assert jax.tree.structure(updates["quant_stats"]) == jax.tree.structure(
        variables["quant_stats"])
    # Every conv/dense is quantized (quantize_first_last=True).
    assert set(dq_layer_paths(variables["codes"])) == kernel_layer_paths(variables)


@pytest.mark.parametrize("cifar,imagenet", [("resnet18_cifar", "resnet18"),
                                            ("resnet34_cifar", "resnet34"),
                                            ("resnet50_cifar", "resnet50"),
                                            ("mobilenetv2_cifar", "mobilenetv2")])
def test_cifar_stem_variants_share_the_imagenet_blocks(cifar, imagenet):
    """Same variables as the ImageNet net except the stem conv kernel (3x3 vs 7x7)."""
    shapes = {}
    for name in (cifar, imagenet):
        v = abstract_init(models.create(name, 10, FLOAT), jnp.zeros((1, 32, 32, 3)))
        shapes[name] = {k: x.shape for k, x in flat(v).items()}
    a, b = shapes[cifar], shapes[imagenet]
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k] != b[k]}
    if cifar.startswith("resnet"):
        assert differ == {("params", "stem_conv", "kernel")}
        assert a[("params", "stem_conv", "kernel")][:2] == (3, 3)
    else:
        assert not differ
