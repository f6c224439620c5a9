"""The image transformations of uncertainty-based augmentation (Wu, Zhang, Valiant, Re 2020).

Each label-preserving transform is a pure function `(key, x, magnitude) -> x` on a batch
x [B, H, W, C] of images in [-1, 1]; each mixing transform (`mixup`, `cutmix`) is
`(key, x, y, magnitude) -> (x, y)` and mixes every image, and its target y [B, ...] (one-hot
labels), with another image of the batch. All are jittable and vmappable; the output has the
input's shape and dtype and stays in [-1, 1].

`magnitude` is a number (or one per image, [B]) in [0, 1], scaled to each transform's range
(`MAX_STRENGTH`); every transform except `flip` is the identity at magnitude 0 (`equalize`
and `autocontrast` blend towards their output by the magnitude).
The key draws what is random in a transform: the sign of a rotation, shift, shear, zoom or
colour change, the place of a cutout, the partner of a mix. The key is split per image, so
images of one batch get independent draws.

Geometric transforms sample bilinearly and fill what comes from outside the image with -1
(black, the background of digits).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from wdmjax.errors import check

Array = jax.Array

# The transform's strength at magnitude 1.
MAX_STRENGTH = {
  "rotate": 30.0,        # degrees
  "translate_x": 0.3,    # fraction of the width
  "translate_y": 0.3,    # fraction of the height
  "shear_x": 0.3,        # shear factor
  "shear_y": 0.3,
  "scale": 0.3,          # zoom factor 1 +- 0.3
  "cutout": 0.5,         # side of the erased square, fraction of the image side
  "brightness": 0.9,     # enhancement factor 1 +- 0.9 (PIL ImageEnhance convention)
  "contrast": 0.9,
  "sharpness": 0.9,
  "posterize": 4.0,      # bits removed of 8
  "solarize": 1.0,       # threshold lowered from 1 (nothing) to 0 (the brighter half)
  "autocontrast": 1.0,   # blend towards the stretched image
  "equalize": 1.0,       # blend towards the equalized image
  "blur": 1.5,           # Gaussian sigma in pixels
  "mixup": 0.5,          # weight of the partner image
  "cutmix": 0.5,         # area fraction of the partner's patch
}
_FILL = -1.0
_BLUR_RADIUS = 4


def _sign(key: Array) -> Array:
  return jnp.where(jax.random.bernoulli(key), 1.0, -1.0)


def _grid(h: int, w: int) -> tuple[Array, Array]:
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  return yy - (h - 1) / 2.0, xx - (w - 1) / 2.0


def _sample(img: Array, sy: Array, sx: Array) -> Array:
  """Bilinear samples of img [H, W, C] at centred source coordinates sy, sx [H, W]."""
  h, w, _ = img.shape
  y = sy + (h - 1) / 2.0
  x = sx + (w - 1) / 2.0
  y0, x0 = jnp.floor(y), jnp.floor(x)
  out = 0.0
  for dy in (0, 1):
    for dx in (0, 1):
      yi, xi = y0 + dy, x0 + dx
      wt = (1.0 - jnp.abs(y - yi)) * (1.0 - jnp.abs(x - xi))
      inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
      v = img[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
      out = out + (wt * inside)[..., None] * v + (wt * ~inside)[..., None] * _FILL
  return out


# Geometric transforms: the source coordinate of each output pixel, src = M @ dst + t in
# coordinates centred on the image, as (M [2, 2], t [2]) for one image of side h x w. All
# six share one bilinear warp, so a composition pays for one resampling per step.

def _rotate_affine(key: Array, m: Array, h: int, w: int) -> tuple[Array, Array]:
  a = _sign(key) * m * math.radians(MAX_STRENGTH["rotate"])
  c, s = jnp.cos(a), jnp.sin(a)
  return jnp.array([[c, -s], [s, c]]), jnp.zeros(2)


def _translate_x_affine(key: Array, m: Array, h: int, w: int) -> tuple[Array, Array]:
  d = _sign(key) * m * MAX_STRENGTH["translate_x"] * w
  return jnp.eye(2), jnp.array([0.0, -d])


def _translate_y_affine(key: Array, m: Array, h: int, w: int) -> tuple[Array, Array]:
  d = _sign(key) * m * MAX_STRENGTH["translate_y"] * h
  return jnp.eye(2), jnp.array([-d, 0.0])


def _shear_x_affine(key: Array, m: Array, h: int, w: int) -> tuple[Array, Array]:
  k = _sign(key) * m * MAX_STRENGTH["shear_x"]
  return jnp.array([[1.0, 0.0], [k, 1.0]]), jnp.zeros(2)


def _shear_y_affine(key: Array, m: Array, h: int, w: int) -> tuple[Array, Array]:
  k = _sign(key) * m * MAX_STRENGTH["shear_y"]
  return jnp.array([[1.0, k], [0.0, 1.0]]), jnp.zeros(2)


def _scale_affine(key: Array, m: Array, h: int, w: int) -> tuple[Array, Array]:
  zoom = 1.0 + _sign(key) * m * MAX_STRENGTH["scale"]
  return jnp.eye(2) / zoom, jnp.zeros(2)


GEOMETRIC = {
  "rotate": _rotate_affine, "translate_x": _translate_x_affine,
  "translate_y": _translate_y_affine, "shear_x": _shear_x_affine,
  "shear_y": _shear_y_affine, "scale": _scale_affine,
}


def warp(img: Array, mat: Array, shift: Array) -> Array:
  """img [H, W, C] resampled at src = mat @ dst + shift (centred coordinates); the identity
  (eye, 0) returns img exactly."""
  yy, xx = _grid(*img.shape[:2])
  return _sample(img, mat[0, 0] * yy + mat[0, 1] * xx + shift[0],
                 mat[1, 0] * yy + mat[1, 1] * xx + shift[1])


def _geometric(name: str) -> Callable[[Array, Array, Array], Array]:
  affine = GEOMETRIC[name]

  def fn(key: Array, img: Array, m: Array) -> Array:
    return warp(img, *affine(key, m, *img.shape[:2]))

  return fn


def _flip(key: Array, img: Array, m: Array) -> Array:
  del key, m  # a mirror has no strength
  return img[:, ::-1]


def _cutout(key: Array, img: Array, m: Array) -> Array:
  h, w, _ = img.shape
  side = jnp.round(m * MAX_STRENGTH["cutout"] * min(h, w))
  cy = jax.random.uniform(jax.random.fold_in(key, 0), (), minval=0.0, maxval=h)
  cx = jax.random.uniform(jax.random.fold_in(key, 1), (), minval=0.0, maxval=w)
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  inside = (jnp.abs(yy + 0.5 - cy) < side / 2) & (jnp.abs(xx + 0.5 - cx) < side / 2)
  return jnp.where(inside[..., None], 0.0, img)  # mid-grey, as Cutout fills with the mean


def _enhance(img: Array, base: Array, factor: Array) -> Array:
  """PIL's ImageEnhance: base + factor * (img - base); factor 1 is the identity."""
  return base + factor * (img - base)


def _brightness(key: Array, img: Array, m: Array) -> Array:
  factor = 1.0 + _sign(key) * m * MAX_STRENGTH["brightness"]
  return _enhance(img, jnp.full_like(img, -1.0), factor)


def _contrast(key: Array, img: Array, m: Array) -> Array:
  factor = 1.0 + _sign(key) * m * MAX_STRENGTH["contrast"]
  return _enhance(img, jnp.full_like(img, img.mean()), factor)


def _smooth(img: Array) -> Array:
  """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the border kept."""
  h, w, _ = img.shape
  pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
  acc = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3)) + 4.0 * img
  inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
  return jnp.where(inner, acc / 13.0, img)


def _sharpness(key: Array, img: Array, m: Array) -> Array:
  return _enhance(img, _smooth(img), 1.0 + _sign(key) * m * MAX_STRENGTH["sharpness"])


def _posterize(key: Array, img: Array, m: Array) -> Array:
  del key
  levels = 2.0 ** jnp.round(8.0 - m * MAX_STRENGTH["posterize"])  # whole bits
  u = jnp.clip((img + 1.0) / 2.0, 0.0, 1.0)
  q = jnp.floor(jnp.minimum(u * levels, levels - 1.0)) / jnp.maximum(levels - 1.0, 1.0)
  return jnp.where(m > 0, 2.0 * q - 1.0, img)


def _solarize(key: Array, img: Array, m: Array) -> Array:
  del key
  return jnp.where(img > 1.0 - m * MAX_STRENGTH["solarize"], -img, img)


def _autocontrast(key: Array, img: Array, m: Array) -> Array:
  del key
  lo = img.min(axis=(0, 1), keepdims=True)
  hi = img.max(axis=(0, 1), keepdims=True)
  span = hi - lo
  stretched = jnp.where(span > 0, (img - lo) / jnp.where(span > 0, span, 1.0) * 2.0 - 1.0, img)
  return img + m * MAX_STRENGTH["autocontrast"] * (stretched - img)


def _equalize(key: Array, img: Array, m: Array) -> Array:
  """Histogram equalization per channel on 256 levels, blended by m: the textbook map
  (cdf - cdf_min) / (N - cdf_min), within a few levels of PIL's table (which leaves images
  with fewer than 255 pixels outside their brightest level unchanged; this does not)."""
  del key
  h, w, c = img.shape
  q = jnp.clip(jnp.round((img + 1.0) * 127.5), 0, 255).astype(jnp.int32)

  def channel(qc: Array) -> Array:
    hist = jnp.zeros(256, jnp.float32).at[qc.reshape(-1)].add(1.0)
    cdf = jnp.cumsum(hist)
    cdf_min = cdf[jnp.argmax(hist > 0)]  # the count at the darkest level present
    denom = h * w - cdf_min
    lut = (cdf - cdf_min) / jnp.where(denom > 0, denom, 1.0)
    return jnp.where(denom > 0, lut[qc] * 2.0 - 1.0, qc / 127.5 - 1.0)

  eq = jnp.stack([channel(q[..., i]) for i in range(c)], axis=-1)
  return img + m * MAX_STRENGTH["equalize"] * (eq - img)


def _blur(key: Array, img: Array, m: Array) -> Array:
  del key
  sigma = m * MAX_STRENGTH["blur"]
  t = jnp.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * t ** 2 / (sigma ** 2 + 1e-12))  # sigma 0: a unit impulse
  k = k / k.sum()
  h, w, _ = img.shape
  r = _BLUR_RADIUS
  pad = jnp.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
  rows = sum(k[i] * pad[i:i + h] for i in range(2 * r + 1))
  return sum(k[i] * rows[:, i:i + w] for i in range(2 * r + 1))


# Mixing transforms on one image, its target and a partner's: (img, y) -> (img, y).

def _mixup(key: Array, img: Array, y: Array, p_img: Array, p_y: Array, m: Array
           ) -> tuple[Array, Array]:
  del key
  lam = m * MAX_STRENGTH["mixup"]
  return (1.0 - lam) * img + lam * p_img, (1.0 - lam) * y + lam * p_y


def _cutmix(key: Array, img: Array, y: Array, p_img: Array, p_y: Array, m: Array
            ) -> tuple[Array, Array]:
  h, w, _ = img.shape
  side = jnp.sqrt(m * MAX_STRENGTH["cutmix"])
  cy = jax.random.uniform(jax.random.fold_in(key, 0), (), minval=0.0, maxval=h)
  cx = jax.random.uniform(jax.random.fold_in(key, 1), (), minval=0.0, maxval=w)
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  inside = (jnp.abs(yy + 0.5 - cy) < side * h / 2) & (jnp.abs(xx + 0.5 - cx) < side * w / 2)
  area = inside.mean()  # the patch clipped at the border: the labels mix by what was pasted
  return jnp.where(inside[..., None], p_img, img), (1.0 - area) * y + area * p_y


class Transform(NamedTuple):
  """One transformation of the family: its per-image function and whether it mixes."""
  name: str
  fn: Callable[..., Any]
  mixing: bool


TRANSFORMS: dict[str, Transform] = {t.name: t for t in [
  Transform("rotate", _geometric("rotate"), False),
  Transform("translate_x", _geometric("translate_x"), False),
  Transform("translate_y", _geometric("translate_y"), False),
  Transform("shear_x", _geometric("shear_x"), False),
  Transform("shear_y", _geometric("shear_y"), False),
  Transform("scale", _geometric("scale"), False),
  Transform("flip", _flip, False),
  Transform("cutout", _cutout, False),
  Transform("brightness", _brightness, False),
  Transform("contrast", _contrast, False),
  Transform("sharpness", _sharpness, False),
  Transform("posterize", _posterize, False),
  Transform("solarize", _solarize, False),
  Transform("autocontrast", _autocontrast, False),
  Transform("equalize", _equalize, False),
  Transform("blur", _blur, False),
  Transform("mixup", _mixup, True),
  Transform("cutmix", _cutmix, True),
]}
FAMILY = tuple(TRANSFORMS)
MIXING = tuple(n for n, t in TRANSFORMS.items() if t.mixing)
# The family without the horizontal mirror, which changes a digit's label (a mirrored 3 is
# no digit); mixup and cutmix stay, mixing labels as they mix images.
DIGIT_FAMILY = tuple(n for n in FAMILY if n != "flip")


def check_images(x: Any, name: str = "x") -> None:
  """x: float [B, H, W, C] (shape and dtype only: values may be traced)."""
  check(hasattr(x, "shape") and hasattr(x, "dtype") and len(x.shape) == 4,
        f"{name}: expected images [B, H, W, C], got "
        f"{getattr(x, 'shape', type(x).__name__)}")
  check(jnp.issubdtype(x.dtype, jnp.floating),
        f"{name}: expected float images in [-1, 1], got dtype {x.dtype}")


def check_magnitude(magnitude: Any, batch: int, name: str = "magnitude") -> Array:
  """A number or [B] numbers in [0, 1] -> float32 [B] (the range is checked when concrete)."""
  m = jnp.asarray(magnitude, jnp.float32)
  check(m.ndim == 0 or m.shape == (batch,),
        f"{name}: expected a number or one per image ({batch},), got shape {m.shape}")
  if not isinstance(m, jax.core.Tracer):
    lo, hi = float(m.min()), float(m.max())
    check(0.0 <= lo and hi <= 1.0, f"{name}: expected values in [0, 1], got range "
                                   f"[{lo:.4g}, {hi:.4g}]")
  return jnp.broadcast_to(m, (batch,))


def partners(key: Array, batch: int) -> Array:
  """[B] indices: each image's partner for mixing, another image of the batch when B > 1
  (the batch rolled by a random shift in [1, B))."""
  shift = jax.random.randint(key, (), 1, max(batch, 2)) if batch > 1 else 0
  return (jnp.arange(batch) + shift) % batch


def apply_one(name: str, key: Array, img: Array, y: Array, p_img: Array, p_y: Array,
              m: Array) -> tuple[Array, Array]:
  """Transform `name` of one image [H, W, C] and its target; the partner is used by mixing
  transforms only. Output clipped to [-1, 1]."""
  t = TRANSFORMS[name]
  if t.mixing:
    out, y = t.fn(key, img, y, p_img, p_y, m)
  else:
    out = t.fn(key, img, m)
  return jnp.clip(out, -1.0, 1.0), y


def _label_preserving(name: str) -> Callable[[Array, Array, Any], Array]:
  fn = TRANSFORMS[name].fn

  def transform(key: Array, x: Array, magnitude: Any) -> Array:
    check_images(x)
    m = check_magnitude(magnitude, x.shape[0])
    keys = jax.random.split(key, x.shape[0])
    out = jax.vmap(fn)(keys, x.astype(jnp.float32), m)
    return jnp.clip(out, -1.0, 1.0).astype(x.dtype)

  transform.__name__ = transform.__qualname__ = name
  transform.__doc__ = (f"`{name}` of every image: key, x [B, H, W, C] in [-1, 1], magnitude "
                       f"in [0, 1] (at 1: {MAX_STRENGTH.get(name, 'no strength')}) -> x, same "
                       "shape and dtype.")
  return transform


def _mixing(name: str) -> Callable[[Array, Array, Array, Any], tuple[Array, Array]]:
  fn = TRANSFORMS[name].fn

  def transform(key: Array, x: Array, y: Array, magnitude: Any) -> tuple[Array, Array]:
    check_images(x)
    check(hasattr(y, "shape") and y.shape[:1] == x.shape[:1]
          and jnp.issubdtype(y.dtype, jnp.floating),
          f"y: expected float targets [B, ...] (one-hot labels) with B = {x.shape[0]}, got "
          f"{getattr(y, 'shape', None)} {getattr(y, 'dtype', type(y).__name__)}")
    m = check_magnitude(magnitude, x.shape[0])
    k_pair, k_img = jax.random.split(key)
    j = partners(k_pair, x.shape[0])
    keys = jax.random.split(k_img, x.shape[0])
    xf = x.astype(jnp.float32)
    out, y_out = jax.vmap(fn)(keys, xf, y, xf[j], y[j], m)
    return jnp.clip(out, -1.0, 1.0).astype(x.dtype), y_out.astype(y.dtype)

  transform.__name__ = transform.__qualname__ = name
  transform.__doc__ = (f"`{name}` of every image with another of the batch: key, x [B, H, W, "
                       "C] in [-1, 1], y [B, ...] float targets, magnitude in [0, 1] (at 1: "
                       f"{MAX_STRENGTH[name]}) -> (x, y); the targets mix as the pixels do.")
  return transform


rotate = _label_preserving("rotate")
translate_x = _label_preserving("translate_x")
translate_y = _label_preserving("translate_y")
shear_x = _label_preserving("shear_x")
shear_y = _label_preserving("shear_y")
scale = _label_preserving("scale")
flip = _label_preserving("flip")
cutout = _label_preserving("cutout")
brightness = _label_preserving("brightness")
contrast = _label_preserving("contrast")
sharpness = _label_preserving("sharpness")
posterize = _label_preserving("posterize")
solarize = _label_preserving("solarize")
autocontrast = _label_preserving("autocontrast")
equalize = _label_preserving("equalize")
blur = _label_preserving("blur")
mixup = _mixing("mixup")
cutmix = _mixing("cutmix")
