"""Image sets for OOD screening, all offline: the embedded data sets, their held-out splits,
and out-of-distribution sets made from what installed packages ship.

`load_images(spec, shape)` reads any of them as float32 [N, H, W, C] in [-1, 1], resized
and converted (RGB <-> gray) to a model's shape. A spec is
  * a built-in OOD set (`OOD_SETS`): digits28 (scikit-learn's 8x8 digits upsampled),
    inverted_mnist5k, gaussian and uniform noise, gray_crops (crops of the grayscale
    photographs and textures scikit-image ships), photos32_gray (the RGB photo crops of
    the Stable Signature domain in gray);
  * or a data set `NAME[:SPLIT][@CLASSES]`: an embedded or prepared TFDS set, a split
    (default train) and a class filter, e.g. `mnist5k@9`, `mnist5k:train[:100]@0-4`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.data import load_arrays
from wdmjax.errors import WdmjaxError, check

ImageShape = tuple[int, int, int]
_GRAY = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "clock")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def fit_images(images: np.ndarray, shape: ImageShape, name: str = "images") -> np.ndarray:
  """uint8 [N, h, w, c] (0..255) or float [N, h, w, c] (in [-1, 1]) images -> float32
  [N, H, W, C] in [-1, 1]: channels converted (luma for RGB -> gray, repeated for gray ->
  RGB) and resized (antialiased bilinear) to `shape`."""
  x = np.asarray(images)
  check(x.ndim == 4 and x.shape[0] >= 1 and x.shape[3] in (1, 3),
        f"{name}: expected [N, H, W, 1 or 3] images, got shape {x.shape}")
  x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
  h, w, c = shape
  if x.shape[3] == 3 and c == 1:
    x = (x @ _LUMA)[..., None]
  elif x.shape[3] == 1 and c == 3:
    x = np.repeat(x, 3, axis=3)
  if x.shape[1:3] != (h, w):
    x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], h, w, c), "linear",
                                    antialias=True))
  return np.clip(x, -1.0, 1.0)


def _pick(x: np.ndarray, n: int | None, seed: int) -> np.ndarray:
  if n is None or n >= len(x):
    return x
  return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def class_split(name: str = "mnist5k", classes: Sequence[int] = tuple(range(9)),
                train: int = 350, val: int = 50, data_dir: str | None = None) -> dict:
  """A per-class train / validation / test split of a class-sorted embedded set (mnist5k's
  5,000 digits are stored class by class): of each class in `classes` the first `train`
  images train, the next `val` validate, the rest test.

  Returns {'split': the TFDS split string of the training images (for `data.split`),
  'val' and 'test': (images uint8 [N, H, W, C], labels [N]), 'classes'}.
  """
  images, labels = load_arrays(name, "train", data_dir)
  check(np.all(np.diff(labels) >= 0), f"name: expected a class-sorted data set, got {name!r}")
  parts, val_idx, test_idx = [], [], []
  for c in classes:
    idx = np.flatnonzero(labels == c)
    check(len(idx) > train + val,
          f"classes: expected more than {train + val} images of class {c} in {name!r}, got "
          f"{len(idx)}")
    parts.append(f"train[{idx[0]}:{idx[0] + train}]")
    val_idx.append(idx[train:train + val])
    test_idx.append(idx[train + val:])
  v, t = np.concatenate(val_idx), np.concatenate(test_idx)
  return {"split": "+".join(parts), "val": (images[v], labels[v]),
          "test": (images[t], labels[t]), "classes": [int(c) for c in classes]}


def _digits28(shape, n, seed, data_dir):
  return fit_images(_pick(load_arrays("digits", "train", data_dir)[0], n, seed), shape)


def _inverted(shape, n, seed, data_dir):
  return -fit_images(_pick(load_arrays("mnist5k", "train", data_dir)[0], n, seed), shape)


def _gaussian(shape, n, seed, data_dir):
  del data_dir
  x = np.random.default_rng(seed).standard_normal((n or 1000,) + tuple(shape))
  return np.clip(x, -1, 1).astype(np.float32)


def _uniform(shape, n, seed, data_dir):
  del data_dir
  return np.random.default_rng(seed).uniform(-1, 1, (n or 1000,) + tuple(shape)).astype(
      np.float32)


def _gray_crops(shape, n, seed, data_dir):
  del data_dir
  import skimage.data  # only when the set is asked for
  rng = np.random.default_rng(seed)
  photos = [np.asarray(getattr(skimage.data, name)(), np.uint8) for name in _GRAY]
  n = n or 1000
  crops = []
  for i in range(n):
    p = photos[i % len(photos)]
    # A crop of at least the model's side (or the whole short side of a smaller photo) and
    # up to half the photo's short side, then resized to the model's size.
    low = min(shape[0], shape[1], min(p.shape[:2]))
    side = int(rng.integers(low, max(low, min(p.shape[:2]) // 2) + 1))
    y = int(rng.integers(0, p.shape[0] - side + 1))
    x = int(rng.integers(0, p.shape[1] - side + 1))
    crops.append(fit_images(p[None, y:y + side, x:x + side, None], shape)[0])
  return np.stack(crops)


def _photos32_gray(shape, n, seed, data_dir):
  return fit_images(_pick(load_arrays("photos32", "train", data_dir)[0], n, seed), shape)


# name -> (kind, maker(shape, n, seed, data_dir) -> [n, H, W, C] in [-1, 1])
OOD_SETS: dict[str, tuple[str, Callable]] = {
    "digits28": ("near", _digits28),
    "inverted_mnist5k": ("far", _inverted),
    "gaussian": ("far", _gaussian),
    "uniform": ("far", _uniform),
    "gray_crops": ("far", _gray_crops),
    "photos32_gray": ("far", _photos32_gray),
}

_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_./-]+)(?::(?P<split>[^@]+))?(?:@(?P<classes>[0-9,-]+))?$")


def _classes(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    lo, dash, hi = part.partition("-")
    check(lo.isdigit() and (not dash or hi.isdigit()),
          f"data: expected classes like @9, @0-4 or @1,3, got @{text}")
    out.extend(range(int(lo), int(hi or lo) + 1))
  return out


def may_share_images(a: str, b: str) -> bool:
  """Whether the data specs `a` and `b` may hold the same images: the same built-in set, or
  the same data set and split whose class filters overlap (no filter: every class). Two
  different slices of one split (`train[:300]`, `train[300:]`) count as disjoint, a slice and
  its whole split (`train`, `train[:300]`) as overlapping."""
  if a in OOD_SETS or b in OOD_SETS:
    return a == b
  ma, mb = _SPEC.match(a), _SPEC.match(b)
  if ma is None or mb is None:
    return a == b
  if ma["name"] != mb["name"]:
    return False
  sa, sb = (m["split"] or "train" for m in (ma, mb))
  if sa.split("[")[0] != sb.split("[")[0] or ("[" in sa and "[" in sb and sa != sb):
    return False
  if ma["classes"] is None or mb["classes"] is None:
    return True
  try:
    return bool(set(_classes(ma["classes"])) & set(_classes(mb["classes"])))
  except WdmjaxError:  # a malformed filter: load_images says so
    return False


def load_images(spec: str, shape: ImageShape, *, n: int | None = None, seed: int = 0,
                data_dir: str | None = None, name: str = "data") -> np.ndarray:
  """The images of `spec` (see the module docstring) as float32 [N, H, W, C] in [-1, 1],
  fitted to `shape`; at most `n` of them (a seeded choice), the noise sets `n` (1,000).
  Errors name the argument `name`."""
  check(isinstance(spec, str) and spec, f"{name}: expected a data set name, got {spec!r}")
  if spec in OOD_SETS:
    return OOD_SETS[spec][1](tuple(shape), n, seed, data_dir)
  m = _SPEC.match(spec)
  check(m is not None, f"{name}: expected NAME[:SPLIT][@CLASSES] or one of "
                       f"{sorted(OOD_SETS)}, got {spec!r}")
  try:
    images, labels = load_arrays(m["name"], m["split"] or "train", data_dir)
    classes = _classes(m["classes"]) if m["classes"] else None
  except WdmjaxError as e:  # 'name: ...', 'split: ...': say which argument held them
    raise WdmjaxError(f"{name}: " + str(e).split(": ", 1)[-1]) from None
  check(images.dtype == np.uint8, f"{name}: expected an image set, got {spec!r} (dtype "
                                  f"{images.dtype})")
  if classes is not None:
    keep = np.isin(labels, classes)
    check(keep.any(), f"{name}: no images of classes @{m['classes']} in {spec!r}")
    images = images[keep]
  return fit_images(_pick(images, n, seed), shape, name)
