"""Inference from a bit-packed `.dqz` export (see `dq_jax.export`).

    python -m dq_jax.predict --model=model.dqz --images=PATH [--integer] [--top_k=3]
        [--output=logits.npy] [--prenormalized] [--batch_size=256] [--expected_model=NAME]

`PATH` is a folder of image files (png/jpg/bmp/gif/tif/webp, loaded with
Pillow in sorted name order) or an `.npz` holding the images as `x_test` or
`images` (N, H, W[, C]) and, optionally, their labels as `y_test` or `labels`
(N,) integers: when labels are present the CLI prints the top-1 (and top-k)
accuracy after the predictions. Python:

    m = dq_jax.predict.load_model("model.dqz", expected_model=None, integer=False,
                                  module=None)    # module: your flax Module, to check/use
    logits = m.predict(images)        # images already normalised like training
    logits = m.predict_raw(pixels)    # raw pixels on the dataset's scale

What runs: the packed codes and float tensors are put on the device as they
are; one jitted function unpacks the codes with jnp bit ops
(`export.unpack_bits_jnp`), rebuilds the variables and applies the model in
eval mode (the file's `apply_kwargs`, `train=False` by default), so the packed
bytes - not float kernels - are what
lives on the device. With `integer=True`, DQ layers with uniform activation
grids run the integer path (`dq_jax.intpath`).

Equivalence: `predict` rebuilds every quantized kernel `W_q` bit for bit
(tested: exported codes+levels gathered == the training forward's `W_q`,
for dq, latent_ste and lsq), so its logits equal the training program's eval
logits (`model.apply(state.variables(), x, train=False)` of the
fake-quantized model). The tests assert bit-exact equality on random models
and |diff| <= 1e-5 (absolute; logits O(1-10), measured 0.0) for the trained
digits model, whose reference ran at another batch size (XLA may pick other
conv algorithms per shape). The integer path agrees to float32 rounding
(tests: <= 1e-5 x the largest |logit|; measured ~1e-7 relative).

Normalisation: `.predict` expects inputs normalised exactly as the training
pipeline does (`(pixels - mean) / std` on the dataset's raw pixel scale).
The CLI normalises with the mean/std stored in the export header: `.npz`
arrays are taken to be on the dataset's raw scale (as its `x_test`: 0..255,
or 0..16 for digits); image files (0..255) are first rescaled to the
dataset's `pixel_max` and resized (bilinear) to the model's input size when
they differ (no center crop). `--prenormalized` skips normalisation.

Checks: loading verifies the file's tensor table against the model its
header describes (`export.check_model`: names, shapes, dtypes, bit widths,
class count). Inputs with NaN/inf, or far outside the range of the training
pixels (more than twice that range beyond either end, known from the
normalisation the export records), get an `InputWarning` (CLI: a
`dq_jax.predict: warning:` line); the prediction still runs.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dq_jax import export, intpath
from dq_jax.data.arrays import npz_array
from dq_jax.quant.activations import check_calibrated, skip_calibration_check

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")


class InputWarning(UserWarning):
    """Inputs the model cannot answer meaningfully: NaN/inf, or far outside the trained range."""


# Inputs more than this many times the trained range past either end are "far outside" it.
RANGE_MARGIN = 2.0


def _check_finite(x: np.ndarray) -> None:
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        warnings.warn(f"{int(bad.sum())} of {len(x)} images contain NaN or inf values (first: "
                      f"image {int(np.argmax(bad))}); their predictions are meaningless.",
                      InputWarning, stacklevel=3)


def _check_range(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, what: str, hint: str) -> None:
    """Warns when finite values lie more than RANGE_MARGIN x (hi - lo) outside [lo, hi]."""
    finite = np.where(np.isfinite(x), x, np.nan)
    if not np.isfinite(finite).any():
        return
    span = hi - lo
    axes = tuple(range(x.ndim - 1))
    xmin, xmax = np.nanmin(finite, axis=axes), np.nanmax(finite, axis=axes)
    if np.any(xmin < lo - RANGE_MARGIN * span) or np.any(xmax > hi + RANGE_MARGIN * span):
        warnings.warn(
            f"inputs span [{float(np.min(xmin)):.4g}, {float(np.max(xmax)):.4g}], far outside "
            f"the {what} the model was trained on ([{float(np.min(lo)):.4g}, "
            f"{float(np.max(hi)):.4g}]); {hint}", InputWarning, stacklevel=3)


class Model:
    """A loaded export; `.predict(images) -> logits` (numpy float32 [N, num_classes]).

    Loading checks the file's tensor table against the model its header describes
    (`export.check_model`). Inputs with NaN/inf, or far outside the range the training data
    had (known from the normalisation the export records), get an `InputWarning`.
    """

    def __init__(self, exported: export.Export, *, integer: bool = False,
                 batch_size: int = 256, module: Any = None):
        self.exported = exported
        self.model_name = exported.model_name
        self.num_classes = exported.num_classes
        self.image_shape = tuple(exported.image_shape)
        self.normalization = exported.normalization
        self.integer = bool(integer)
        self.batch_size = int(batch_size)
        export.check_model(exported, module)  # a mismatched (given) module fails here
        self.module = exported.create_model() if module is None else module
        for name, value in exported.tensors.items():  # here, not in every forward
            if name.startswith("quant_stats/") and name.endswith("/initialized"):
                check_calibrated(name[len("quant_stats/"):-len("/act_quant/initialized")], value)
        self._floats = {k: jnp.asarray(v) for k, v in exported.tensors.items()}
        self._packed = {k: jnp.asarray(data) for k, (data, _, _) in exported.packed.items()}
        self._packed_meta = {k: (bits, tuple(shape))
                             for k, (_, bits, shape) in exported.packed.items()}
        plan = None
        if self.integer:
            plan = intpath.plan_layers(exported.variables())
        self.plan = plan
        self._forward = jax.jit(functools.partial(_forward, self.module, self._packed_meta, plan,
                                                  tuple(sorted(exported.apply_kwargs.items()))))

    def variables(self) -> dict:
        """The runtime variables, codes unpacked on device (jitted jnp bit ops)."""
        return jax.jit(functools.partial(_unpack_all, self._packed_meta))(
            self._floats, self._packed)

    def _raw_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.normalization:
            return None
        return (np.zeros(1, np.float32),
                np.full(1, float(self.normalization["pixel_max"]), np.float32))

    def _shaped(self, images: Any) -> np.ndarray:
        x = np.asarray(images, np.float32)
        if x.ndim == len(self.image_shape) and self.image_shape[-1] == 1:
            x = x[..., None]
        if x.ndim != len(self.image_shape) + 1 or x.shape[1:] != self.image_shape:
            raise ValueError(
                f"{self.model_name} expects images of shape (N, "
                f"{', '.join(map(str, self.image_shape))}), got {x.shape}.")
        return x

    def predict(self, images: Any, *, check_inputs: bool = True) -> np.ndarray:
        """Logits of normalised images [N, H, W, C] (C may be omitted for 1 channel).

        Warns (`InputWarning`) on NaN/inf and on values far outside the normalised range of
        the training pixels, when the export records its normalisation.
        """
        x = self._shaped(images)
        if check_inputs and len(x):
            _check_finite(x)
            raw = self._raw_range()
            if raw is not None:
                mean = np.asarray(self.normalization["mean"], np.float32)
                std = np.asarray(self.normalization["std"], np.float32)
                _check_range(x, (raw[0] - mean) / std, (raw[1] - mean) / std,
                             "normalised pixel range",
                             "are they raw pixels? Use predict_raw (CLI: drop --prenormalized).")
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, self.num_classes), np.float32)
        bs = min(self.batch_size, n)
        out = []
        for start in range(0, n, bs):
            chunk = x[start:start + bs]
            real = chunk.shape[0]
            if real < bs:  # one compiled shape
                chunk = np.concatenate([chunk, np.zeros((bs - real, *chunk.shape[1:]),
                                                        np.float32)])
            logits = self._forward(self._floats, self._packed, jnp.asarray(chunk))
            out.append(np.asarray(jax.device_get(logits))[:real])
        return np.concatenate(out).astype(np.float32)

    def normalize(self, pixels: Any) -> np.ndarray:
        """(pixels - mean) / std with the export's dataset statistics (raw pixel scale)."""
        if not self.normalization:
            source = self.exported.header.get("source") or {}
            why = (f"its workdir's dataset ({source['workdir']}) could not be read at export "
                   "time; export again where it can, or pass" if "workdir" in source else
                   "it was exported without them; export again with normalization={'mean': "
                   "[...], 'std': [...], 'pixel_max': 255} (CLI: --normalization='{...}'), or "
                   "pass")
            raise ValueError(
                f"{self.exported.path}: raw pixels need the dataset's mean/std, and the export "
                f"records none: {why} normalised inputs to .predict (CLI: --prenormalized).")
        mean = np.asarray(self.normalization["mean"], np.float32)
        std = np.asarray(self.normalization["std"], np.float32)
        x = np.asarray(pixels, np.float32)
        if x.ndim == len(self.image_shape) and self.image_shape[-1] == 1:
            x = x[..., None]
        return ((x - mean) / std).astype(np.float32)

    def predict_raw(self, pixels: Any) -> np.ndarray:
        """Logits of raw pixels on the dataset's scale (normalised here); warns like
        `predict` on NaN/inf and on pixels far outside 0..pixel_max."""
        x = self._shaped(pixels)
        normalized = self.normalize(x)  # (raises without normalisation constants)
        if len(x):
            _check_finite(x)
            lo, hi = self._raw_range()
            _check_range(x, lo, hi, "raw pixel range",
                         f"give pixels on the dataset's scale (0..{float(hi[0]):g}; image "
                         "files are rescaled to it), or normalised inputs to predict "
                         "(CLI: --prenormalized).")
        return self.predict(normalized, check_inputs=False)


def _unpack_all(meta, floats, packed):
    flat = dict(floats)
    for name, data in packed.items():
        bits, shape = meta[name]
        flat[name] = export.unpack_bits_jnp(data, bits, int(math.prod(shape))).reshape(shape)
    return export.unflatten_names(flat)


def _forward(module, meta, plan, apply_kwargs, floats, packed, images):
    variables = _unpack_all(meta, floats, packed)
    with skip_calibration_check():  # checked on the host when the file is loaded
        if plan is not None:
            with intpath.integer_inference(plan):
                return module.apply(variables, images, **dict(apply_kwargs))
        return module.apply(variables, images, **dict(apply_kwargs))


def load_model(path: str, *, expected_model: str | None = None, integer: bool = False,
               batch_size: int = 256, module: Any = None) -> Model:
    """Loads a `.dqz` export (validated, see `export.load`) as a `Model`.

    `module`: the flax Module to run (e.g. your own, when its package is not importable by
    the recorded reference); it must have exactly the file's variables, or this raises.
    """
    return Model(export.load(path, expected_model=expected_model), integer=integer,
                 batch_size=batch_size, module=module)


# --------------------------------------------------------------------------- inputs

def load_labels(path: str, count: int) -> np.ndarray | None:
    """Integer labels `y_test` or `labels` of an `.npz` of images (None if it has none)."""
    if not path.endswith(".npz"):
        return None
    with np.load(path, allow_pickle=False) as npz:
        key = next((k for k in ("y_test", "labels") if k in npz.files), None)
        if key is None:
            return None
        y = np.asarray(npz_array(npz, key, path))
    if y.shape != (count,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: {key} has shape {y.shape} and dtype {y.dtype}; labels must be "
                         f"({count},) integers, one per image.")
    return y.astype(np.int64)


def load_images(path: str, image_shape: Sequence[int],
                pixel_max: float = 255.0) -> tuple[np.ndarray, list[str]]:
    """Raw pixels float32 [N, H, W, C] on the dataset's scale, and a name per image."""
    h, w, c = image_shape
    if os.path.isdir(path):
        from PIL import Image
        names = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it.")
        out = []
        for name in names:
            with Image.open(os.path.join(path, name)) as im:
                im = im.convert("L" if c == 1 else "RGB")
                if im.size != (w, h):
                    im = im.resize((w, h), Image.BILINEAR)
                arr = np.asarray(im, np.float32).reshape(h, w, c)
            out.append(arr * (pixel_max / 255.0))
        return np.stack(out), names
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            key = next((k for k in ("x_test", "images") if k in npz.files), None)
            if key is None:
                raise ValueError(f"{path}: no 'x_test' or 'images' array (found "
                                 f"{sorted(npz.files)}).")
            x = np.asarray(npz_array(npz, key, path), np.float32)
        if x.ndim == 3 and c == 1:
            x = x[..., None]
        if x.shape[1:] != (h, w, c):
            raise ValueError(f"{path}: {key} has shape {x.shape}; the model expects "
                             f"(N, {h}, {w}, {c}).")
        return x, [f"{key}[{i}]" for i in range(len(x))]
    raise ValueError(f"--images={path!r} is neither a folder of images nor an .npz file.")


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str]) -> None:
    from absl import flags
    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments: {argv[1:]}")
    def show(message, category, filename, lineno, file=None, line=None):
        del filename, lineno, file, line
        kind = "warning" if issubclass(category, InputWarning) else category.__name__
        print(f"dq_jax.predict: {kind}: {message}", file=sys.stderr, flush=True)
    warnings.showwarning = show
    try:
        model = load_model(f.model, expected_model=f.expected_model, integer=f.integer,
                           batch_size=f.batch_size)
        norm = model.normalization or {}
        pixels, names = load_images(f.images, model.image_shape, norm.get("pixel_max", 255.0))
        labels = load_labels(f.images, len(pixels))
        logits = model.predict(pixels) if f.prenormalized else model.predict_raw(pixels)
    except (ValueError, FileNotFoundError) as e:
        print(f"dq_jax.predict: error: {e}", file=sys.stderr)
        sys.exit(2)
    probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
    k = max(1, min(f.top_k, model.num_classes))
    top = np.argsort(-logits, axis=-1)[:, :k]
    for i, name in enumerate(names):
        preds = ", ".join(f"{int(c)} ({float(probs[i, c]):.3f})" for c in top[i])
        print(f"{name}\t{preds}")
    if labels is not None and len(labels):
        bad = (labels < 0) | (labels >= model.num_classes)
        if bad.any():
            print(f"dq_jax.predict: warning: {int(bad.sum())} label(s) outside 0.."
                  f"{model.num_classes - 1}; they count as wrong.", file=sys.stderr)
        top1 = float(np.mean(top[:, 0] == labels))
        topk = float(np.mean((top == labels[:, None]).any(axis=1)))
        print(f"accuracy: top-1 {top1:.4f}, top-{k} {topk:.4f} on {len(labels)} labelled images")
    if f.output:
        np.save(f.output, logits)
        print(f"wrote logits {logits.shape} to {f.output}", file=sys.stderr)


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("model", None, "A .dqz file written by dq_jax.export.")
    flags.DEFINE_string("images", None, "Folder of image files, or .npz with x_test/images.")
    flags.DEFINE_bool("integer", False, "Run DQ layers on the integer path (dq_jax.intpath).")
    flags.DEFINE_bool("prenormalized", False, "Inputs are already normalised like training.")
    flags.DEFINE_integer("top_k", 3, "Classes to print per image.")
    flags.DEFINE_integer("batch_size", 256, "Images per device call.")
    flags.DEFINE_string("output", None, "Optional .npy file for the logits.")
    flags.DEFINE_string("expected_model", None, "Refuse an export of any other model name.")
    flags.mark_flags_as_required(["model", "images"])


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
