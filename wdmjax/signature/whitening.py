"""PCA whitening of a bit extractor's logits (Stable Signature, Fernandez et al. 2023).

After pre-training, the extractor's k logits on clean images are correlated and of unequal
scale, so some bits flip more easily than others. Whitening them, z = W (logits - mean) with
W = diag(e)^-1/2 V^T from the eigen-decomposition V diag(e) V^T of their covariance on clean
images, makes them uncorrelated with unit variance: the bits' errors spread evenly. The map
is affine, so it folds into the extractor's last linear layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check

Array = jax.Array


class Whitening(NamedTuple):
  """z = (logits - mean) @ matrix.T; mean [k], matrix [k, k]."""
  mean: Array
  matrix: Array


def fit_whitening(logits: Array, eps: float = 1e-6) -> Whitening:
  """The whitening of logits [N, k] (N > k clean images): their mean and W = diag(e)^-1/2
  V^T, eigenvalues below eps * the largest clamped there (a direction the extractor never
  varies stays finite)."""
  x = np.asarray(logits, np.float64)
  check(x.ndim == 2 and x.shape[0] > x.shape[1],
        f"logits: expected [N, k] with more images than bits (N > k), got {x.shape}")
  check(bool(np.isfinite(x).all()), "logits: expected finite values")
  mean = x.mean(0)
  cov = np.cov(x - mean, rowvar=False)
  e, v = np.linalg.eigh(cov)
  e = np.maximum(e, eps * max(float(e.max()), 1e-30))
  w = (v / np.sqrt(e)).T
  return Whitening(jnp.asarray(mean, jnp.float32), jnp.asarray(w, jnp.float32))


def whiten(w: Whitening, logits: Array) -> Array:
  """logits [..., k] -> whitened logits [..., k]."""
  check(logits.shape[-1] == w.mean.shape[0],
        f"logits: expected {w.mean.shape[0]} bits in the last axis, got {logits.shape}")
  return (logits - w.mean) @ w.matrix.T
