"""The multivariate normal CDF P(X <= z), X ~ N(0, cov), by Genz's algorithm, in JAX.

Genz (1992) separates the variables: with cov = L L^T (Cholesky), X = L Y for standard
normal Y, and the box {L y <= z} becomes a product of one-dimensional conditional
probabilities,

  e_1 = Phi(z_1 / L_11),  y_1 = Phi^-1(w_1 e_1),
  e_i = Phi((z_i - sum_{j<i} L_ij y_j) / L_ii),  y_i = Phi^-1(w_i e_i),
  P = E_w[e_1 e_2 ... e_d],  w ~ U[0, 1]^(d-1),

an integral over the unit cube of a smooth function, which quasi-Monte Carlo integrates far
faster than plain Monte Carlo. The points are a randomised Richtmyer lattice (Genz's own
choice in MVNDST): point k is frac(k sqrt(p_j)) for the first d - 1 primes p_j, shifted by
`num_shifts` independent uniform vectors and folded by the tent map |2w - 1| (periodising
the integrand). Each shift gives an unbiased estimate; their spread is the error estimate.

Everything is one jitted computation, vmapped over leading batch dimensions of (z, cov):
thousands of CDFs of dimension up to a few hundred in one call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from wdmjax.errors import check


class MvnCdf(NamedTuple):
  """p: the probability estimate; stderr: its standard error across the random shifts."""
  p: chex.Array
  stderr: chex.Array


def _primes(count: int) -> np.ndarray:
  """The first `count` primes (sieve; count is small)."""
  limit = max(16, int(count * (np.log(count + 2) + np.log(np.log(count + 2)) + 3)))
  sieve = np.ones(limit, bool)
  sieve[:2] = False
  for i in range(2, int(limit ** 0.5) + 1):
    if sieve[i]:
      sieve[i * i::i] = False
  return np.nonzero(sieve)[0][:count]


@functools.lru_cache(maxsize=32)
def richtmyer_lattice(num_points: int, dim: int) -> np.ndarray:
  """[num_points, dim] points frac(k sqrt(p_j)), k = 1..num_points, in float64."""
  alpha = np.sqrt(_primes(dim).astype(np.float64))
  k = np.arange(1, num_points + 1, dtype=np.float64)[:, None]
  return np.mod(k * alpha[None, :], 1.0)


def _genz_one(z: chex.Array, cov: chex.Array, w: chex.Array) -> tuple[chex.Array, chex.Array]:
  """z [d], cov [d, d], w [S, P, d - 1] points in [0, 1] -> per-shift estimates [S]."""
  d = z.shape[0]
  chol = jnp.linalg.cholesky(cov)
  s, p = w.shape[:2]
  w = w.reshape(s * p, max(d - 1, 1))
  eps = jnp.finfo(w.dtype).eps

  def step(carry, i):
    y, f = carry  # y [M, d] (zero beyond column i), f [M] running product
    row = chol[i]
    e = ndtr((z[i] - y @ row) / row[i])
    f = f * e
    u = jnp.clip(jnp.take(w, jnp.minimum(i, d - 2), axis=1) * e, eps, 1.0 - eps)
    y = y.at[:, i].set(ndtri(u))
    return (y, f), None

  init = (jnp.zeros((s * p, d), w.dtype), jnp.ones((s * p,), w.dtype))
  (_, f), _ = jax.lax.scan(step, init, jnp.arange(d))
  per_shift = f.reshape(s, p).mean(axis=1)
  return per_shift.mean(), per_shift.std(ddof=1) / jnp.sqrt(s)


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def check_covariance(z, cov) -> None:
  """Clear errors for a z / cov pair that is not [..., d] / [..., d, d] symmetric PSD."""
  z, cov = np.asarray(z), np.asarray(cov)
  check(z.ndim >= 1, f"z: expected shape [..., d], got {z.shape}")
  d = z.shape[-1]
  check(cov.ndim >= 2 and cov.shape[-2:] == (d, d),
        f"cov: expected a square [..., {d}, {d}] matrix matching z's last axis, got "
        f"{cov.shape}")
  check(cov.shape[:-2] == z.shape[:-1],
        f"cov: expected batch shape {z.shape[:-1]} like z, got {cov.shape[:-2]}")
  check(np.all(np.isfinite(cov)), "cov: expected finite entries")
  scale = np.max(np.abs(cov)) if cov.size else 1.0
  check(np.allclose(cov, np.swapaxes(cov, -1, -2), atol=1e-6 * scale),
        "cov: expected a symmetric matrix")
  check(np.all(np.diagonal(cov, axis1=-2, axis2=-1) > 0),
        "cov: expected positive variances on the diagonal")
  low = np.min(np.linalg.eigvalsh(cov.astype(np.float64)))
  check(low > -1e-8 * scale,
        f"cov: expected a positive semi-definite matrix, got an eigenvalue {low:.3g}")


def mvn_cdf(z: chex.Array, cov: chex.Array, key: chex.PRNGKey, *, num_points: int = 2048,
            num_shifts: int = 8) -> MvnCdf:
  """P(X <= z) for X ~ N(0, cov), batched: Genz's algorithm with randomised QMC.

  Args:
    z: [..., d] upper limits (+inf allowed: that coordinate is unbounded).
    cov: [..., d, d] symmetric positive definite covariances, same batch shape as z.
    key: PRNG key for the random shifts of the lattice.
    num_points: lattice points per shift (the error falls about as 1 / num_points).
    num_shifts: independent random shifts (>= 2: their spread is the error estimate).

  Returns:
    MvnCdf(p, stderr), each of shape [...]. With concrete arrays bad shapes and non-PSD
    covariances raise clear errors; under jit a non-PD covariance gives NaN.
  """
  check(isinstance(num_points, int) and num_points >= 1,
        f"num_points: expected a positive int, got {num_points!r}")
  check(isinstance(num_shifts, int) and num_shifts >= 2,
        f"num_shifts: expected an int >= 2 (the error estimate needs two), got {num_shifts!r}")
  if _is_concrete(z, cov):
    check_covariance(z, cov)
  return _mvn_cdf(jnp.asarray(z), jnp.asarray(cov), key, num_points, num_shifts)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _mvn_cdf(z, cov, key, num_points, num_shifts):
  dtype = jnp.result_type(z.dtype, cov.dtype, float)
  z, cov = z.astype(dtype), cov.astype(dtype)
  d = z.shape[-1]
  lattice = jnp.asarray(richtmyer_lattice(num_points, max(d - 1, 1)), dtype)
  shifts = jax.random.uniform(key, (num_shifts, 1, lattice.shape[1]), dtype)
  w = jnp.abs(2.0 * jnp.mod(lattice[None] + shifts, 1.0) - 1.0)  # tent-folded: periodic
  p, err = jnp.vectorize(lambda zz, cc: _genz_one(zz, cc, w),
                         signature="(d),(d,d)->(),()")(z, cov)
  return MvnCdf(p, err)
