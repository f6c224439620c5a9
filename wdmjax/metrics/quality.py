"""Image quality against a reference: PSNR and SSIM (Wang, Bovik, Sheikh, Simoncelli 2004),
both differentiable, for images in [-1, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wdmjax.errors import check

Array = jax.Array


def _check_pair(x: Array, ref: Array) -> None:
  check(jnp.ndim(x) == 4, f"images: expected [B, H, W, C], got shape {jnp.shape(x)}")
  check(jnp.shape(x) == jnp.shape(ref),
        f"reference: expected the images' shape {jnp.shape(x)}, got {jnp.shape(ref)}")


def psnr(x: Array, ref: Array) -> Array:
  """Peak signal-to-noise ratio in dB per image [B], on the [0, 1] scale (peak 1); capped at
  100 dB for identical images. x, ref: [B, H, W, C] in [-1, 1]."""
  _check_pair(x, ref)
  mse = jnp.mean(((x - ref) / 2.0) ** 2, axis=(1, 2, 3))
  return jnp.minimum(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)), 100.0)


def _gaussian_window(size: int, sigma: float) -> Array:
  t = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  k = jnp.exp(-0.5 * (t / sigma) ** 2)
  return k / k.sum()


def _filter(x: Array, k: Array) -> Array:
  """Separable 'valid' filtering of [B, H, W, C] by the 1-D window k along H and W."""
  n = k.shape[0]
  rows = sum(k[i] * x[:, i:x.shape[1] - n + 1 + i] for i in range(n))
  return sum(k[i] * rows[:, :, i:x.shape[2] - n + 1 + i] for i in range(n))


def ssim(x: Array, ref: Array, window: int = 11, sigma: float = 1.5) -> Array:
  """Structural similarity per image [B] (mean over pixels and channels), Gaussian window
  `window` x `window` of std `sigma` (the paper's 11 and 1.5; smaller images get a window of
  their side), constants K1 = 0.01, K2 = 0.03 on the [0, 1] scale."""
  _check_pair(x, ref)
  size = min(window, x.shape[1], x.shape[2])
  k = _gaussian_window(size, sigma * size / window)
  a, b = (x + 1.0) / 2.0, (ref + 1.0) / 2.0
  c1, c2 = 0.01**2, 0.03**2
  mu_a, mu_b = _filter(a, k), _filter(b, k)
  var_a = _filter(a * a, k) - mu_a**2
  var_b = _filter(b * b, k) - mu_b**2
  cov = _filter(a * b, k) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))
