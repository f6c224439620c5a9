"""Triggers and watermarks of WDM, built from short text specs.

Triggers (one image tau [H, W, C] in [-1, 1], the secret shift of the watermark process):
  `random:SEED`    i.i.d. random +-1 pixels;
  `stripes:SEED`   random +-1 columns (one sign per column, all rows and channels);
  `PATH`           an image file (PNG, JPEG, ...), resized to the model resolution, or a
                   `.npy` array that must already have the model's [H, W, C] shape.
Watermarks (images [N, H, W, C] in [-1, 1] that the watermark process reproduces):
  `keyed:SEED`     a bit image: random +-1 on `block` x `block` pixel blocks;
  `PATH`           a logo file (image or `.npy`), as for triggers;
  `class:DATA:LABEL`  every image of class LABEL of an embedded or catalog data set
                   (e.g. `class:digits:5`), resized: the multi-image variant.
With a key, the embedded images are the binarised watermark XOR a block bit mask r drawn
from the key (`keyed_targets`), which makes the verification null exact (see verify.py).
All randomness comes from numpy's PCG64 seeded with the spec's integer, so a spec means the
same image on every machine.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from wdmjax.errors import WdmjaxError, check

TRIGGER_KINDS = ("random", "stripes")
DECOY_SEED = 1_000_003  # the first seed of the decoy triggers verification draws


@dataclasses.dataclass(frozen=True)
class ImageShape:
  """The model's image shape: resolution x resolution x channels."""
  resolution: int
  channels: int

  @property
  def hwc(self) -> tuple[int, int, int]:
    return (self.resolution, self.resolution, self.channels)


def _seed(spec: str, arg: str, what: str) -> int:
  try:
    seed = int(arg)
  except ValueError:
    raise WdmjaxError(f"{what}: expected an integer seed in {spec!r}, got {arg!r}") from None
  check(seed >= 0, f"{what}: expected a non-negative seed in {spec!r}, got {seed}")
  return seed


def load_image_file(path: str, shape: ImageShape, what: str) -> np.ndarray:
  """An image file resized to `shape` (bilinear), or a `.npy` array of exactly that shape.

  Returns float32 [H, W, C] in [-1, 1]. A `.npy` array may hold values in [-1, 1] or uint8.
  """
  check(os.path.isfile(path), f"{what}: expected 'random:SEED', 'stripes:SEED' or an image "
                              f"file, got {path!r} (no such file)" if what == "trigger" else
        f"{what}: expected 'keyed:SEED', 'class:DATA:LABEL' or an image file, got {path!r} "
        f"(no such file)")
  if path.endswith(".npy"):
    try:
      arr = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:  # not an .npy file, truncated, or pickled objects
      raise WdmjaxError(f"{what}: could not read {path!r} as a .npy array ({e})") from None
    check(isinstance(arr, np.ndarray) and (np.issubdtype(arr.dtype, np.integer)
                                           or np.issubdtype(arr.dtype, np.floating)),
          f"{what}: expected a numeric array in {path!r}, got "
          f"{getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim == 2:
      arr = arr[..., None]
    check(arr.shape == shape.hwc, f"{what}: expected an array of shape {shape.hwc} in "
                                  f"{path!r}, got {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused next
      arr = arr.astype(np.float32)
    check(bool(np.all(np.isfinite(arr))), f"{what}: expected finite values in {path!r}, got "
                                          f"{int(np.sum(~np.isfinite(arr)))} NaN or inf")
    check(arr.max() <= 1.0 or (arr.min() >= 0.0 and arr.max() <= 255.0),
          f"{what}: expected values in [-1, 1] or [0, 255] in {path!r}, got "
          f"[{arr.min():g}, {arr.max():g}]")
    return arr / 127.5 - 1.0 if arr.max() > 1.0 else np.clip(arr, -1.0, 1.0)
  try:
    img = Image.open(path)
    img = img.convert("L" if shape.channels == 1 else "RGB")
  except OSError as e:
    raise WdmjaxError(f"{what}: could not read {path!r} as an image ({e})") from None
  check(shape.channels in (1, 3), f"{what}: image files need 1 or 3 channels, the model "
                                  f"has {shape.channels}")
  img = img.resize((shape.resolution, shape.resolution), Image.BILINEAR)
  arr = np.asarray(img, np.float32).reshape(shape.hwc)
  return arr / 127.5 - 1.0


def make_trigger(spec: str, shape: ImageShape) -> np.ndarray:
  """The trigger tau [H, W, C] in [-1, 1] named by `spec` (see the module docstring)."""
  check(isinstance(spec, str) and spec, f"trigger: expected a spec string, got {spec!r}")
  kind, sep, arg = spec.partition(":")
  if sep and kind in TRIGGER_KINDS:
    rng = np.random.Generator(np.random.PCG64(_seed(spec, arg, "trigger")))
    h, w, c = shape.hwc
    if kind == "random":
      return rng.choice(np.float32([-1.0, 1.0]), size=(h, w, c))
    cols = rng.choice(np.float32([-1.0, 1.0]), size=(1, w, 1))
    return np.broadcast_to(cols, (h, w, c)).copy()
  check(not (sep and kind.isidentifier() and not os.path.exists(spec)),
        f"trigger: expected one of {[k + ':SEED' for k in TRIGGER_KINDS]} or an image "
        f"file, got {spec!r}")
  return load_image_file(spec, shape, "trigger")


def is_generated_trigger(spec: str) -> bool:
  """Whether `spec` names a trigger drawn by one of the generators (`random:`, `stripes:`)
  rather than an image file."""
  kind, sep, _ = spec.partition(":")
  return bool(sep) and kind in TRIGGER_KINDS


def decoy_trigger_specs(trigger: str, num: int) -> list[str]:
  """`num` decoy trigger specs drawn by the same generator as `trigger` (its kind, other
  seeds from DECOY_SEED on, never the trigger's own), so that the secret trigger and the
  decoys are exchangeable for a model that never learned it. An image-file trigger has no
  generator to share: it gets random-pixel decoys, and exchangeability is not guaranteed."""
  check(isinstance(num, int) and num >= 0, f"decoys: expected a non-negative integer, "
                                           f"got {num!r}")
  own = None
  if is_generated_trigger(trigger):
    kind, _, arg = trigger.partition(":")
    own = _seed(trigger, arg, "trigger")
  else:
    kind = "random"
  seeds = [s for s in range(DECOY_SEED, DECOY_SEED + num + 1) if s != own][:num]
  return [f"{kind}:{s}" for s in seeds]


def block_bits(seed: int, shape: ImageShape, block: int) -> np.ndarray:
  """Random +-1 bits [H / block, W / block] from `seed` (one bit per block, all channels)."""
  check_block(block, shape)
  rng = np.random.Generator(np.random.PCG64(seed))
  n = shape.resolution // block
  return rng.choice(np.float32([-1.0, 1.0]), size=(n, n))


def expand_blocks(bits: np.ndarray, block: int, channels: int) -> np.ndarray:
  """[n, n] block values -> [n * block, n * block, channels] pixels."""
  return np.repeat(np.repeat(bits, block, 0), block, 1)[..., None].repeat(channels, -1)


def check_block(block: int, shape: ImageShape) -> None:
  check(isinstance(block, (int, np.integer)) and block >= 1 and shape.resolution % block == 0,
        f"block: expected a divisor of the resolution {shape.resolution}, got {block!r}")


def make_watermark(spec: str, shape: ImageShape, block: int = 1,
                   data_dir: str | None = None) -> np.ndarray:
  """The watermark images [N, H, W, C] in [-1, 1] named by `spec` (see the module docstring)."""
  check(isinstance(spec, str) and spec, f"watermark: expected a spec string, got {spec!r}")
  kind, sep, arg = spec.partition(":")
  if sep and kind == "keyed":
    bits = block_bits(_seed(spec, arg, "watermark"), shape, block)
    return expand_blocks(bits, block, shape.channels)[None]
  if sep and kind == "class":
    return _class_images(spec, arg, shape, data_dir)
  check(not (sep and kind.isidentifier() and not os.path.exists(spec)),
        f"watermark: expected 'keyed:SEED', 'class:DATA:LABEL' or an image file, "
        f"got {spec!r}")
  return load_image_file(spec, shape, "watermark")[None]


def _class_images(spec: str, arg: str, shape: ImageShape, data_dir: str | None) -> np.ndarray:
  # TFDS is slow to import and only class watermarks need a data set.
  from wdmjax.data import load_arrays
  from wdmjax.data.pipeline import preprocess  # (the same)

  name, sep, label = arg.rpartition(":")
  check(bool(sep) and bool(name), f"watermark: expected 'class:DATA:LABEL', got {spec!r}")
  label_int = _seed(spec, label, "watermark")
  images, labels = load_arrays(name, "train", data_dir)
  chosen = images[np.asarray(labels) == label_int]
  check(len(chosen) > 0, f"watermark: data set {name!r} has no images of class {label_int}")
  return np.asarray(preprocess(chosen, shape.resolution, shape.channels), np.float32)


def key_mask(key: int, shape: ImageShape, block: int) -> np.ndarray:
  """The secret bit mask r [H/block, W/block] in +-1 drawn from the owner's `key`."""
  check(isinstance(key, (int, np.integer)) and key >= 0,
        f"key: expected a non-negative integer, got {key!r}")
  # A different stream than `keyed:SEED` bit images with the same integer.
  return block_bits(int(key) + (1 << 40), shape, block)


def block_signs(images: np.ndarray, block: int) -> np.ndarray:
  """Sign of each block's mean over its pixels and channels: [N, H, W, C] -> [N, n, n]."""
  n, h, w, c = images.shape
  means = images.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4, 5))
  return np.sign(means).astype(np.float32)


def reference_bits(watermark: np.ndarray, block: int) -> np.ndarray:
  """The watermark's bits [n, n] in +-1: per block, the sign of the mean over all images
  (the majority of a multi-image watermark); a zero block mean counts as +1."""
  s = np.sign(block_signs(watermark, block).sum(0))
  return np.where(s == 0, 1.0, s).astype(np.float32)


def keyed_targets(watermark: np.ndarray, key: int | None, block: int) -> np.ndarray:
  """The images the watermark process learns [N, H, W, C].

  With a key: each image binarised per block and XORed (in +-1: multiplied) with the key's
  mask r, so every block holds a +-1 bit. Without a key: the watermark images unchanged.
  """
  if key is None:
    return watermark
  n, h, w, c = watermark.shape
  shape = ImageShape(h, c)
  signs = block_signs(watermark, block)
  signs = np.where(signs == 0, 1.0, signs)
  bits = signs * key_mask(key, shape, block)[None]
  return np.stack([expand_blocks(b, block, c) for b in bits]).astype(np.float32)
