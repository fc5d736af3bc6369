"""Make a training `.npz` from an image folder with one sub-folder per class.

    python -m dq_jax.data.folder_to_npz --src=DIR --out=data.npz [--image_size=32]
        [--test_fraction=0.1] [--seed=0] [--channels=auto|1|3] [--compress]

Accepted layouts (class = sub-folder name; labels follow the sorted class names):

* ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (``val``, ``valid`` or
  ``validation`` are accepted for ``test``): the splits as given.
* ``DIR/<class>/*``: a seeded, stratified split; ``--test_fraction`` of each
  class goes to the test split (default 0.1; at least one image of every class
  with two or more images).

Images: any format Pillow reads (png, jpg, bmp, gif, webp, tiff, ppm/pgm);
hidden files and other files are skipped, an unreadable image stops with its
path. All images become ``channels`` channels (auto: 1 if every image is
grayscale, else 3 - RGB; alpha is dropped). Without ``--image_size`` every image
must already have one size; with it (``32`` or ``HxW``) each image is scaled,
aspect kept, to cover ``HxW`` and centre-cropped to it.

The output holds ``x_train``/``x_test`` uint8 ``(N, H, W, C)``,
``y_train``/``y_test`` int32 ``(N,)`` and ``label_names`` (str) - exactly what
``config.dataset='npz'`` + ``config.data_dir=OUT`` reads. The file is checked
with the same loader before the command reports success. Needs Pillow (the
``train`` extra: ``pip install 'dq_jax[train]'``).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif",
                            ".tiff", ".ppm", ".pgm", ".pbm"})
TEST_DIR_NAMES = ("test", "val", "valid", "validation")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _class_dirs(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _image_files(class_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in class_dir.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(class_dir).parts))


def _listing(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """class name -> its image files under `root/<class>/` (sorted, non-empty)."""
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(f"{root}: no class sub-folders; expected {root}/<class>/<images>.")
    out = {}
    for d in classes:
        files = _image_files(d)
        if not files:
            raise ValueError(f"{d}: class folder holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
        out[d.name] = files
    return out


def find_splits(src: str | os.PathLike, test_fraction: float | None = None, seed: int = 0
                ) -> tuple[list[str], dict[str, list[tuple[pathlib.Path, int]]]]:
    """The class names and each split's (file, label) list, following the module docstring."""
    root = pathlib.Path(src).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory.")
    test_dirs = [root / n for n in TEST_DIR_NAMES if (root / n).is_dir()]
    if (root / "train").is_dir():
        if not test_dirs:
            raise ValueError(f"{root}: has train/ but no test/ (or val/) folder; add one, or "
                             "put the class folders directly under it and use --test_fraction.")
        if len(test_dirs) > 1:
            raise ValueError(f"{root}: several test folders {[d.name for d in test_dirs]}; "
                             "keep one.")
        if test_fraction is not None:
            raise ValueError(f"{root}: has train/ and {test_dirs[0].name}/ splits already; "
                             "drop --test_fraction.")
        train, test = _listing(root / "train"), _listing(test_dirs[0])
        names = sorted(train)
        extra = sorted(set(test) - set(train))
        if extra:
            raise ValueError(f"{test_dirs[0]}: classes {extra} have no train/ folder; "
                             "every test class needs train images.")
        label = {n: i for i, n in enumerate(names)}
        return names, {
            "train": [(f, label[n]) for n in names for f in train[n]],
            "test": [(f, label[n]) for n in sorted(test) for f in test[n]]}
    fraction = 0.1 if test_fraction is None else float(test_fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction={fraction} must lie in (0, 1).")
    listing = _listing(root)
    names = sorted(listing)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[pathlib.Path, int]]] = {"train": [], "test": []}
    for label, name in enumerate(names):
        files = listing[name]
        n_test = int(round(fraction * len(files)))
        if len(files) >= 2:
            n_test = min(max(n_test, 1), len(files) - 1)
        order = rng.permutation(len(files))
        test_idx = set(order[:n_test].tolist())
        for i, f in enumerate(files):
            splits["test" if i in test_idx else "train"].append((f, label))
    if not splits["test"]:
        raise ValueError(f"{root}: test_fraction={fraction} leaves the test split empty; "
                         "raise it or add images.")
    return names, splits


def _parse_size(image_size: str | int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None or image_size == "":
        return None
    if isinstance(image_size, int):
        h = w = image_size
    elif isinstance(image_size, str):
        parts = image_size.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"image_size={image_size!r}: expected N or HxW, e.g. 32 or 64x48.")
        h, w = int(parts[0]), int(parts[-1])
    else:
        h, w = (int(v) for v in image_size)
    if h < 1 or w < 1:
        raise ValueError(f"image_size={image_size!r} must be positive.")
    return h, w


def _open(path: pathlib.Path):
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(path)
        image.load()
        return image
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({e}).") from e


def _to_array(image, channels: int, size: tuple[int, int] | None, path) -> np.ndarray:
    from PIL import Image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # deep grayscale -> 8-bit
        a = np.asarray(image, np.float64)
        if image.mode.startswith("I;16"):
            a = a / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    image = image.convert("L" if channels == 1 else "RGB")
    if size is not None:
        h, w = size
        scale = max(h / image.height, w / image.width)
        rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
        if (rw, rh) != (image.width, image.height):
            image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - w) // 2, (rh - h) // 2
        image = image.crop((left, top, left + w, top + h))
    a = np.asarray(image, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def folder_to_arrays(src: str | os.PathLike, *, image_size=None,
                     test_fraction: float | None = None, seed: int = 0,
                     channels: str | int = "auto") -> dict[str, np.ndarray]:
    """The arrays of an image folder (see the module docstring), ready for `np.savez`."""
    try:
        import PIL  # noqa: F401
    except ImportError:
        from dq_jax import extras
        raise extras.MissingExtraError(extras.message(
            "train", "dq_jax.data.folder_to_npz", ["pillow"])) from None
    size = _parse_size(image_size)
    if channels not in ("auto", 1, 3, "1", "3"):
        raise ValueError(f"channels={channels!r} must be 'auto', 1 or 3.")
    names, splits = find_splits(src, test_fraction, seed)
    files = [f for split in ("train", "test") for f, _ in splits[split]]
    if channels == "auto":
        from PIL import Image
        gray = True
        for f in files:
            try:
                with Image.open(f) as im:
                    if im.mode not in _GRAY_MODES:
                        gray = False
                        break
            except OSError as e:
                raise ValueError(f"{f}: cannot be read as an image ({e}).") from e
        channels = 1 if gray else 3
    channels = int(channels)
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    first_of_shape: dict[tuple[int, ...], pathlib.Path] = {}
    for split in ("train", "test"):
        for f, _ in splits[split]:
            with _open(f) as image:
                a = _to_array(image, channels, size, f)
            first_of_shape.setdefault(a.shape, f)
            images[split].append(a)
    if len(first_of_shape) > 1:
        examples = "; ".join(f"{s[0]}x{s[1]} ({p})" for s, p in list(first_of_shape.items())[:3])
        raise ValueError(f"images differ in size ({examples}); pass --image_size=HxW "
                         "(or image_size=) to resize and centre-crop them to one size.")
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        out[f"x_{split}"] = np.stack(images[split]).astype(np.uint8)
        out[f"y_{split}"] = np.asarray([label for _, label in splits[split]], np.int32)
    out["label_names"] = np.asarray(names, dtype=str)
    return out


def write_npz(arrays: dict[str, np.ndarray], out: str | os.PathLike,
              compress: bool = False) -> pathlib.Path:
    """Writes `arrays` to `out` (.npz appended if missing) and validates it by loading."""
    from dq_jax.data.arrays import load_npz
    out = pathlib.Path(out).expanduser()
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compress else np.savez)(out, **arrays)
    load_npz(out)  # The training program's own checks.
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dq_jax.data.folder_to_npz",
        description="Make a dataset .npz (for --config.dataset=npz) from an image folder "
                    "with one sub-folder per class: DIR/train/<class>/, DIR/test/<class>/ or "
                    "DIR/<class>/ with --test_fraction.")
    parser.add_argument("--src", required=True, help="the image folder")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--image_size", default=None,
                        help="N or HxW: resize (aspect kept) and centre-crop every image; "
                             "default: images must share one size")
    parser.add_argument("--test_fraction", type=float, default=None,
                        help="DIR/<class>/ layout: share of each class for the test split "
                             "(default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--channels", default="auto", choices=("auto", "1", "3"),
                        help="1 (grayscale) or 3 (RGB); auto: 1 if every image is grayscale")
    parser.add_argument("--compress", action="store_true", help="write a compressed .npz")
    args = parser.parse_args(argv)
    try:
        arrays = folder_to_arrays(args.src, image_size=args.image_size,
                                  test_fraction=args.test_fraction, seed=args.seed,
                                  channels=args.channels)
        path = write_npz(arrays, args.out, compress=args.compress)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"dq_jax.data.folder_to_npz: error: {e}", file=sys.stderr)
        return 2
    h, w, c = arrays["x_train"].shape[1:]
    names = [str(n) for n in arrays["label_names"]]
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    print(f"wrote {path}: {len(arrays['x_train'])} train / {len(arrays['x_test'])} test "
          f"images of {h}x{w}x{c}, {len(names)} classes ({shown})")
    print(f"train on it: python -m dq_jax.main --config=configs/FILE.py --workdir=DIR "
          f"--config.dataset=npz --config.data_dir={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
