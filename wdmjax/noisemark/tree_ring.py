"""Tree-Ring watermarks (Wen, Kirchenbauer, Geiping, Goldstein 2023): a key written into the
Fourier transform of the initial noise x_T, found again by DDIM inversion of an image.

The key is a set of concentric rings around the zero frequency of one channel's 2-D FFT,
each ring one real value (a ring of constant value is what makes the key invariant to
rotation; real values keep the noise real: the FFT of a real image is conjugate-symmetric,
and the mask is symmetric under k -> -k). Generation overwrites the masked coefficients of
Gaussian noise with the key and transforms back; detection inverts the image to x_T', takes
the same FFT and measures the distance of the masked coefficients to the key.

Two p-values (the left tail of a noncentral chi-squared: a watermarked x_T' is close to the
key):
  * `published`: the paper's test: eta = sum_M |k - y|^2 / s2 with s2 = mean_M |y|^2
    estimated from the image, |M| degrees of freedom and noncentrality sum_M |k|^2 / s2.
    It counts each conjugate pair twice and mixes real and complex coefficients, so it is
    not calibrated; the benchmark measures by how much.
  * `gaussian`: the test under x_T' ~ N(0, I): each conjugate pair once, the real and the
    imaginary parts of a coefficient as independent N(0, H W / 2) (the self-conjugate zero
    frequency N(0, H W)), so eta is exactly noncentral chi-squared. Exact for noise drawn
    from the null; for an inverted image only as good as the inversion's Gaussianity, which
    the benchmark checks on unwatermarked images.

Shapes: x_T and images [B, H, W, C]; the key's arrays [H, W].
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check
from wdmjax.stats.noncentral import ncx2_log10_cdf

NULLS = ("gaussian", "published")


class TreeRingKey(NamedTuple):
  """The secret: a mask of frequencies, the real key value at each, and the channel.

  mask [H, W] bool (in numpy's unshifted FFT layout), values [H, W] float (0 off the mask),
  ring [H, W] int (the ring index of each frequency, -1 off the mask)."""

  mask: np.ndarray
  values: np.ndarray
  ring: np.ndarray
  channel: int


def _frequency_radius(h: int, w: int) -> np.ndarray:
  fy = np.fft.fftfreq(h) * h
  fx = np.fft.fftfreq(w) * w
  return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def make_key(seed: int, shape: tuple[int, int, int], radius: int, channel: int = -1,
             inner: int = 0) -> TreeRingKey:
  """A ring key for images of `shape` (H, W, C) on `channel`, rings inner..radius.

  Ring j holds the frequencies with round(|k|) == j; its value is drawn from N(0, H W / 2),
  the law of the real part of a Gaussian-noise coefficient (Wen et al. copy their ring values
  from the FFT of a noise draw, too). The paper's rings start at the zero frequency
  (inner = 0); in pixel space the lowest frequencies of an inverted image are the image's
  own layout (MNIST's black background), so rings from inner >= 2 up are the ones that
  survive there (experiments/results/watermark_benchmark.md)."""
  check(len(shape) == 3, f"shape: expected (H, W, C), got {shape}")
  h, w, c = shape
  check(isinstance(radius, int | np.integer) and 1 <= radius < min(h, w) // 2,
        f"radius: expected an integer in [1, {min(h, w) // 2 - 1}] for {h}x{w} images, "
        f"got {radius!r}")
  check(isinstance(inner, int | np.integer) and 0 <= inner <= radius,
        f"inner: expected an integer in [0, radius={radius}], got {inner!r}")
  check(-c <= channel < c, f"channel: expected an integer in [{-c}, {c - 1}], got {channel!r}")
  r = np.rint(_frequency_radius(h, w)).astype(np.int64)
  mask = (r >= inner) & (r <= radius)
  rng = np.random.default_rng(seed)
  ring_values = rng.normal(0.0, np.sqrt(h * w / 2.0), radius + 1)
  values = np.where(mask, ring_values[np.minimum(r, radius)], 0.0).astype(np.float32)
  return TreeRingKey(mask, values, np.where(mask, r, -1), int(channel % c))


def watermark_noise(rng: chex.PRNGKey, key: TreeRingKey, batch: int,
                    shape: tuple[int, int, int]) -> chex.Array:
  """x_T [batch, H, W, C]: Gaussian noise whose masked Fourier coefficients on the key's
  channel are replaced by the key (the other channels stay untouched)."""
  check(tuple(shape[:2]) == key.mask.shape,
        f"shape: expected images of {key.mask.shape[0]}x{key.mask.shape[1]} for this key, "
        f"got {shape}")
  x = jax.random.normal(rng, (batch, *shape), jnp.float32)
  return inject(x, key)


def inject(x: chex.Array, key: TreeRingKey) -> chex.Array:
  """x [B, H, W, C] with the key written into its channel's spectrum."""
  chex.assert_rank(x, 4)
  f = jnp.fft.fft2(x[..., key.channel])
  f = jnp.where(jnp.asarray(key.mask), jnp.asarray(key.values).astype(f.dtype), f)
  return x.at[..., key.channel].set(jnp.fft.ifft2(f).real.astype(x.dtype))


def _unique_half(mask: np.ndarray) -> np.ndarray:
  """The masked frequencies with each conjugate pair (k, -k) counted once."""
  h, w = mask.shape
  iy, ix = np.nonzero(mask)
  keep = np.zeros_like(mask)
  for y, x in zip(iy, ix, strict=True):
    cy, cx = (-y) % h, (-x) % w
    if not keep[cy, cx]:
      keep[y, x] = True
  return keep


@jax.jit
def _spectrum(x_T: chex.Array, channel: chex.Array) -> chex.Array:
  return jnp.fft.fft2(jnp.take(x_T, channel, axis=-1))


def distances(x_T: chex.Array, key: TreeRingKey) -> np.ndarray:
  """Wen et al.'s score: the mean |y - k| over the mask of each inverted x_T' [B,H,W,C]
  (smaller: more likely watermarked). Returns [B]."""
  chex.assert_rank(x_T, 4)
  y = np.asarray(_spectrum(x_T, key.channel))[:, key.mask]
  return np.abs(y - key.values[key.mask]).mean(axis=1)


def log10_p_values(x_T: chex.Array, key: TreeRingKey, null: str = "gaussian") -> np.ndarray:
  """log10 p of each inverted x_T' [B,H,W,C] under `null` (see the module docstring).
  Small p: the image carries the key. Returns [B] float64."""
  check(null in NULLS, f"null: expected one of {list(NULLS)}, got {null!r}")
  chex.assert_rank(x_T, 4)
  h, w = key.mask.shape
  y_all = np.asarray(_spectrum(x_T, key.channel), np.complex128)
  out = []
  if null == "published":
    k = key.values[key.mask].astype(np.float64)
    for y in y_all[:, key.mask]:
      s2 = np.mean(np.abs(y) ** 2)
      out.append(ncx2_log10_cdf(float(np.sum(np.abs(k - y) ** 2) / s2), float(k.size),
                                float(np.sum(k ** 2) / s2)))
    return np.asarray(out)
  half = _unique_half(key.mask)
  self_conj = np.zeros_like(half)
  self_conj[0, 0] = half[0, 0]  # the only self-conjugate frequency inside radius < min(h,w)/2

  pair = half & ~self_conj
  var = h * w / 2.0
  k_pair, k_self = key.values[pair].astype(np.float64), key.values[self_conj].astype(np.float64)
  dof = 2.0 * pair.sum() + self_conj.sum()
  nc = np.sum(k_pair ** 2) / var + np.sum(k_self ** 2) / (2 * var)
  for y in y_all:
    eta = (np.sum((y[pair].real - k_pair) ** 2 + y[pair].imag ** 2) / var
           + np.sum((y[self_conj].real - k_self) ** 2) / (2 * var))
    out.append(ncx2_log10_cdf(float(eta), float(dof), float(nc)))
  return np.asarray(out)
