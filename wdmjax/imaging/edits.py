"""Edits of images, NHWC in [-1, 1]: the attacks every watermark paper reports, and the
differentiable ones a watermark extractor trains through (HiDDeN, Stable Signature).

Geometric and photometric edits are JAX functions batched over the leading axis (jit and vmap
them; they are differentiable in the images); `jpeg` is real JPEG through Pillow (evaluation),
`jpeg_ste` a differentiable approximation for training (8x8 DCT quantised with the standard
tables, rounding passed straight through). `compose` chains any of them in order.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from wdmjax.errors import check

ImageAttack = Callable[[chex.Array], chex.Array]


def _check_images(x) -> None:
  check(jnp.ndim(x) == 4, f"images: expected shape [B, H, W, C], got {jnp.shape(x)}")


def _check_value(ok, message: str) -> None:
  """A strength's range check, skipped for a traced strength (vmapped over strengths)."""
  if not isinstance(ok, jax.core.Tracer):
    check(bool(ok), message)


def _resize(x: chex.Array, h: int, w: int) -> chex.Array:
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear", antialias=True)


def _side(n: int, area: float) -> int:
  return max(1, int(round(n * math.sqrt(area))))


def center_crop(x: chex.Array, area: float, resize_back: bool = True) -> chex.Array:
  """Keeps the central `area` share of each image, resized back to the full size (or, with
  `resize_back=False`, left smaller: Stable Signature's crop, read by a size-free extractor)."""
  _check_images(x)
  check(0.0 < area <= 1.0, f"crop: expected a kept area in (0, 1], got {area!r}")
  _, h, w, _ = x.shape
  ch, cw = _side(h, area), _side(w, area)
  top, left = (h - ch) // 2, (w - cw) // 2
  crop = x[:, top:top + ch, left:left + cw]
  return _resize(crop, h, w) if resize_back else crop


def random_crop(x: chex.Array, key: chex.PRNGKey, area: float) -> chex.Array:
  """A crop of `area` share at a random place per image, resized back to the full size."""
  _check_images(x)
  check(0.0 < area <= 1.0, f"crop: expected a kept area in (0, 1], got {area!r}")
  b, h, w, c = x.shape
  ch, cw = _side(h, area), _side(w, area)
  tops = jax.random.randint(jax.random.fold_in(key, 0), (b,), 0, h - ch + 1)
  lefts = jax.random.randint(jax.random.fold_in(key, 1), (b,), 0, w - cw + 1)
  crops = jax.vmap(lambda im, top, left: jax.lax.dynamic_slice(im, (top, left, 0), (ch, cw, c)))(
      x, tops, lefts)
  return _resize(crops, h, w)


def resize(x: chex.Array, area: float, resize_back: bool = True) -> chex.Array:
  """Down to `area` share of the pixels and back up: the detail a rescale loses (with
  `resize_back=False`, left small: the rescale Stable Signature evaluates)."""
  _check_images(x)
  check(0.0 < area <= 1.0, f"resize: expected an area in (0, 1], got {area!r}")
  _, h, w, _ = x.shape
  small = _resize(x, _side(h, area), _side(w, area))
  return _resize(small, h, w) if resize_back else small


def brightness(x: chex.Array, delta: float) -> chex.Array:
  """Adds `delta` (in [-1, 1] units; 0.2 is a tenth of the range) and clips."""
  _check_images(x)
  return jnp.clip(x + delta, -1.0, 1.0)


def contrast(x: chex.Array, factor: float) -> chex.Array:
  """Scales each image's deviation from its mean by `factor` (> 0) and clips."""
  _check_images(x)
  _check_value(factor > 0, f"contrast: expected a positive factor, got {factor!r}")
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return jnp.clip(mean + factor * (x - mean), -1.0, 1.0)


def gaussian_blur(x: chex.Array, sigma: float) -> chex.Array:
  """Separable Gaussian blur of standard deviation `sigma` pixels (edge-replicated)."""
  _check_images(x)
  check(sigma > 0, f"blur: expected a positive sigma, got {sigma!r}")
  r = max(1, int(math.ceil(3 * sigma)))
  t = jnp.arange(-r, r + 1, dtype=jnp.float32)
  k = jnp.exp(-0.5 * (t / sigma) ** 2)
  k = k / k.sum()
  pad = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
  rows = sum(k[i] * pad[:, i:i + x.shape[1], :, :] for i in range(2 * r + 1))
  return sum(k[i] * rows[:, :, i:i + x.shape[2], :] for i in range(2 * r + 1))


def gaussian_noise(x: chex.Array, key: chex.PRNGKey, std: float) -> chex.Array:
  """Adds N(0, std^2) per pixel (in [-1, 1] units) and clips."""
  _check_images(x)
  _check_value(std >= 0, f"noise: expected a non-negative std, got {std!r}")
  return jnp.clip(x + std * jax.random.normal(key, x.shape, x.dtype), -1.0, 1.0)


def rotate(x: chex.Array, degrees: float) -> chex.Array:
  """Rotates about the centre by `degrees` (counter-clockwise), bilinear, corners filled
  with -1 (black)."""
  _check_images(x)
  _, h, w, c = x.shape
  a = -jnp.deg2rad(degrees)  # rows grow downwards: negate for counter-clockwise on screen
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  # The source pixel of each output pixel: the inverse rotation.
  sy = cy + (yy - cy) * jnp.cos(a) - (xx - cx) * jnp.sin(a)
  sx = cx + (yy - cy) * jnp.sin(a) + (xx - cx) * jnp.cos(a)

  def one(im):
    return jnp.stack([jax.scipy.ndimage.map_coordinates(im[..., ch], [sy, sx], order=1,
                                                        mode="constant", cval=-1.0)
                      for ch in range(c)], axis=-1)

  return jax.vmap(one)(x)


# ----------------------------------------------------------------------------- JPEG


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


def jpeg(x: np.ndarray, quality: int, subsampling: str = "4:2:0") -> np.ndarray:
  """Real JPEG at `quality` (1-95) through Pillow: encode each image, decode it back.

  x: [B, H, W, C] in [-1, 1], C 1 (grayscale) or 3 (RGB). subsampling: the chroma
  subsampling of RGB images (Pillow's default 4:2:0; `jpeg_ste` models 4:4:4).
  Returns float32 in [-1, 1]. Not traceable (it leaves JAX); use `jpeg_ste` in training.
  """
  x = np.asarray(x)
  _check_images(x)
  check(isinstance(quality, int | np.integer) and 1 <= quality <= 95,
        f"jpeg: expected an integer quality in [1, 95], got {quality!r}")
  check(x.shape[3] in (1, 3), f"jpeg: expected 1 or 3 channels, got {x.shape[3]}")
  check(subsampling in SUBSAMPLING,
        f"subsampling: expected one of {list(SUBSAMPLING)}, got {subsampling!r}")
  out = []
  for im in _to_uint8(x):
    buf = io.BytesIO()
    Image.fromarray(im[..., 0] if im.shape[2] == 1 else im).save(
        buf, format="JPEG", quality=int(quality), subsampling=SUBSAMPLING[subsampling])
    dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    out.append(dec.reshape(im.shape))
  return np.stack(out).astype(np.float32) / 127.5 - 1.0


# The standard JPEG (ITU T.81, Annex K) luminance and chrominance quantisation tables.
_Q_LUMA = np.array([
  16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
  14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
  18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
  49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], np.float32)
_Q_CHROMA = np.array([
  17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
  24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32, np.float32)


def _quant_table(base: np.ndarray, quality: int) -> np.ndarray:
  """libjpeg's quality scaling of a base table."""
  scale = 5000 / quality if quality < 50 else 200 - 2 * quality
  return np.clip(np.floor((base * scale + 50) / 100), 1, 255).reshape(8, 8)


def _dct_matrix() -> np.ndarray:
  k = np.arange(8)
  m = np.cos((2 * k[None, :] + 1) * k[:, None] * np.pi / 16) * np.sqrt(2 / 8)
  m[0] /= np.sqrt(2)
  return m.astype(np.float32)  # orthonormal: m @ m.T = I


def _round_ste(v: chex.Array) -> chex.Array:
  return v + jax.lax.stop_gradient(jnp.round(v) - v)


def jpeg_ste(x: chex.Array, quality: int) -> chex.Array:
  """A differentiable JPEG: YCbCr, 8x8 DCT, quantisation by the quality-scaled standard
  tables, rounding with a straight-through gradient, and back (no chroma subsampling).
  x: [B, H, W, C] in [-1, 1], C 1 or 3; sides that are not multiples of 8 are padded by
  edge replication (as an encoder pads its last blocks) and cropped back."""
  _check_images(x)
  b, h, w, c = x.shape
  check(c in (1, 3), f"jpeg_ste: expected 1 or 3 channels, got {c}")
  check(1 <= quality <= 95, f"jpeg_ste: expected a quality in [1, 95], got {quality!r}")
  ph, pw = -h % 8, -w % 8
  v = (jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") + 1.0) * 127.5
  hp, wp = h + ph, w + pw
  if c == 3:
    r, g, bl = v[..., 0], v[..., 1], v[..., 2]
    v = jnp.stack([0.299 * r + 0.587 * g + 0.114 * bl,
                   -0.168736 * r - 0.331264 * g + 0.5 * bl + 128.0,
                   0.5 * r - 0.418688 * g - 0.081312 * bl + 128.0], axis=-1)
  m = jnp.asarray(_dct_matrix())
  tables = jnp.asarray(np.stack([_quant_table(_Q_LUMA, quality)]
                                + [_quant_table(_Q_CHROMA, quality)] * (c - 1)), jnp.float32)
  blocks = (v - 128.0).reshape(b, hp // 8, 8, wp // 8, 8, c)
  coef = jnp.einsum("uy,bhywxc,vx->bhuwvc", m, blocks, m)
  q = tables.transpose(1, 2, 0)[None, None, :, None, :, :]
  coef = _round_ste(coef / q) * q
  v = jnp.einsum("uy,bhuwvc,vx->bhywxc", m, coef, m).reshape(b, hp, wp, c) + 128.0
  if c == 3:
    y, cb, cr = v[..., 0], v[..., 1] - 128.0, v[..., 2] - 128.0
    v = jnp.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
  return jnp.clip(v[:, :h, :w] / 127.5 - 1.0, -1.0, 1.0)


def compose(attacks: Sequence[ImageAttack]) -> ImageAttack:
  """One attack applying `attacks` in the given order."""
  attacks = list(attacks)

  def run(x):
    for a in attacks:
      x = a(x)
    return x

  return run
