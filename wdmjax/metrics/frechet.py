"""Frechet distance between Gaussians fitted to two feature sets (FID with any feature net).

d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}). For covariances S1, S2 (symmetric,
positive semi-definite), S1 S2 is similar to the symmetric PSD matrix
M = S1^{1/2} S2 S1^{1/2}, so Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)). Both square roots
are taken from `eigh` with round-off negatives clipped to zero, so the result is always a
finite, real number >= 0: no complex `sqrtm`, no NaN for singular covariances (N <= D).
Everything runs in float64 numpy.
"""

from __future__ import annotations

import numpy as np

from wdmjax.errors import check

# Relative slack for the symmetry and PSD checks: covariances computed in float64 differ
# from exact symmetry / semi-definiteness only by round-off, far below this.
_RTOL = 1e-6


def _features(features: np.ndarray, name: str) -> np.ndarray:
  """features: [N, D] real, finite, N >= 2 -> float64 copy; raises WdmjaxError naming `name`."""
  x = np.asarray(features)
  check(x.ndim == 2, f"{name}: expected shape [N, D], got {x.shape}")
  check(np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x),
        f"{name}: expected a real numeric array, got dtype {x.dtype}")
  check(x.shape[0] >= 2, f"{name}: expected N >= 2 rows to estimate a covariance, got "
        f"shape {x.shape}")
  check(x.shape[1] >= 1, f"{name}: expected D >= 1 columns, got shape {x.shape}")
  x = x.astype(np.float64)
  check(bool(np.isfinite(x).all()), f"{name}: expected finite values, got NaN or inf")
  return x


def _stats(features: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  x = _features(features, name)
  mu = x.mean(axis=0)
  sigma = np.atleast_2d(np.cov(x, rowvar=False))
  return mu, sigma


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean and unbiased covariance (ddof=1, as in pytorch-fid) of a feature set.

  Args:
    features: [N, D] real, finite, N >= 2.

  Returns:
    mu: [D] float64, sigma: [D, D] float64.
  """
  return _stats(features, "features")


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
  """Symmetric PSD square root via eigh; raises WdmjaxError if `sigma` is clearly not PSD."""
  w, v = np.linalg.eigh(sigma)
  scale = max(float(np.abs(w).max()), 1e-300)
  check(float(w.min()) >= -_RTOL * scale,
        f"{name}: expected a positive semi-definite covariance, got smallest eigenvalue "
        f"{float(w.min()):.3g} (largest magnitude {scale:.3g})")
  return (v * np.sqrt(_drop_noise(w))) @ v.T


def _drop_noise(w: np.ndarray) -> np.ndarray:
  """Eigenvalues below the round-off of the largest (D eps max|w|) set to zero: they are
  zero eigenvalues of a rank-deficient covariance (fewer samples than features), and their
  square roots, about sqrt(eps) instead of 0, would otherwise make the distance depend on
  the order of its arguments."""
  tol = len(w) * np.finfo(w.dtype).eps * max(float(np.abs(w).max()), 1e-300)
  return np.where(w > tol, w, 0.0)


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, mu_name: str, sigma_name: str
                    ) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu)
  sigma = np.asarray(sigma)
  check(mu.ndim == 1 and mu.shape[0] >= 1, f"{mu_name}: expected shape [D], got {mu.shape}")
  d = mu.shape[0]
  check(sigma.shape == (d, d),
        f"{sigma_name}: expected shape [D, D] = ({d}, {d}) to match {mu_name}, got "
        f"{sigma.shape}")
  for name, a in ((mu_name, mu), (sigma_name, sigma)):
    check(np.issubdtype(a.dtype, np.number) and not np.iscomplexobj(a),
          f"{name}: expected a real numeric array, got dtype {a.dtype}")
  mu = mu.astype(np.float64)
  sigma = sigma.astype(np.float64)
  for name, a in ((mu_name, mu), (sigma_name, sigma)):
    check(bool(np.isfinite(a).all()), f"{name}: expected finite values, got NaN or inf")
  asym = float(np.abs(sigma - sigma.T).max())
  check(asym <= _RTOL * max(float(np.abs(sigma).max()), 1e-300),
        f"{sigma_name}: expected a symmetric covariance, got max |S - S^T| = {asym:.3g}")
  return mu, 0.5 * (sigma + sigma.T)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: [D] mean of the first Gaussian.
    sigma1: [D, D] symmetric PSD covariance of the first Gaussian.
    mu2: [D] mean of the second Gaussian.
    sigma2: [D, D] symmetric PSD covariance of the second Gaussian.

  Returns:
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}) as a Python float >= 0
    (this is what FID reports: the squared distance).
  """
  mu1, sigma1 = _check_gaussian(mu1, sigma1, "mu1", "sigma1")
  mu2, sigma2 = _check_gaussian(mu2, sigma2, "mu2", "sigma2")
  check(mu1.shape == mu2.shape,
        f"mu2: expected shape [D] = {mu1.shape} to match mu1, got {mu2.shape}")
  _psd_sqrt(sigma2, "sigma2")  # only to reject a non-PSD sigma2 by name
  root1 = _psd_sqrt(sigma1, "sigma1")
  m = root1 @ sigma2 @ root1
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = float(np.sqrt(_drop_noise(eig)).sum())
  diff = mu1 - mu2
  dist = float(diff @ diff) + float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * tr_covmean
  # Exactly equal inputs can land a few ulps below zero.
  return max(dist, 0.0)


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
  """`frechet_distance` of the Gaussians fitted (`gaussian_stats`) to two feature sets.

  Args:
    a: [N, D] features of the first set, N >= 2.
    b: [M, D] features of the second set, M >= 2, same D.

  Returns:
    The squared Frechet distance as a Python float >= 0.
  """
  mu_a, sigma_a = _stats(a, "a")
  mu_b, sigma_b = _stats(b, "b")
  check(mu_a.shape == mu_b.shape,
        f"b: expected shape [M, {mu_a.shape[0]}] to match a's feature width, got "
        f"{np.shape(b)}")
  return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
