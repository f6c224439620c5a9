"""Local (average-case) robustness: P(argmax f(x + eps) = argmax f(x)), eps ~ N(0, sigma^2 I).

Monte Carlo answers it by brute force (n forward passes per input). The analytic estimators
of Han, Srinivas & Lakkaraju ("Characterizing data point vulnerability via average-case
robustness", UAI 2024) answer it from one gradient computation:

  taylor       linearise the margins g_i = f_t - f_i (t the clean prediction, i != t) at x:
               g_i(x + eps) ~ g_i + grad g_i . eps, so with z_i = g_i / (sigma ||grad g_i||)
               and unit rows u_i = grad g_i / ||grad g_i||, p = Phi_Sigma(z), the
               multivariate normal CDF with Sigma = U U^T (`wdmjax.stats.mvn_cdf`);
  mmse         the same with g and grad g averaged over `num_noisy` noisy copies of x (the
               smoothed classifier's margins: the best linear fit in mean square);
  mv_sigmoid   the multivariate sigmoid 1 / (1 + sum_i exp(-s z_i)) of the Taylor z, no
               CDF at all (s = `mvs_scale`, 1 by default; 1.702 matches Phi in 1-D);
  monte_carlo  the reference, `num_samples` noisy copies per input, in chunks.

Everything is one jitted computation batched over inputs, for any classifier
`apply_fn(params, x[B, ...]) -> logits [B, K]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from wdmjax.errors import check
from wdmjax.stats.genz import mvn_cdf

METHODS = ("monte_carlo", "taylor", "mmse", "mv_sigmoid")
ApplyFn = Callable[[chex.ArrayTree, chex.Array], chex.Array]
# Added to Sigma's diagonal: a margin with a zero gradient gives a zero row, and Cholesky
# needs a positive definite matrix (the added variance changes p by about this much).
_JITTER = 1e-5


def _others(t: chex.Array, k: int) -> chex.Array:
  """The K - 1 class indices other than t, in order."""
  i = jnp.arange(k - 1)
  return jnp.where(i >= t, i + 1, i)


def _margins(apply_fn: ApplyFn, params, x: chex.Array, t: chex.Array
             ) -> tuple[chex.Array, chex.Array]:
  """x [...] one input, t its class -> g [K - 1] margins f_t - f_i, grads [K - 1, D]."""
  def logits(xi):
    return apply_fn(params, xi[None])[0]

  f, vjp = jax.vjp(logits, x)
  k = f.shape[0]
  others = _others(t, k)
  # One backward pass per margin, batched: rows e_t - e_i of the logits' cotangent.
  cot = jax.nn.one_hot(t, k)[None] - jax.nn.one_hot(others, k)
  grads = jax.vmap(lambda c: vjp(c)[0])(cot)
  return f[t] - f[others], grads.reshape(k - 1, -1)


def _z_and_cov(g: chex.Array, grads: chex.Array, sigma: chex.Numeric
               ) -> tuple[chex.Array, chex.Array]:
  norms = jnp.maximum(jnp.linalg.norm(grads, axis=-1), jnp.finfo(grads.dtype).tiny)
  z = g / (sigma * norms)
  u = grads / norms[:, None]
  cov = u @ u.T + _JITTER * jnp.eye(u.shape[0], dtype=u.dtype)
  return z, cov


@functools.partial(jax.jit, static_argnames=("apply_fn", "method", "num_samples", "chunk",
                                             "num_noisy", "mvn_points", "mvn_shifts"))
def _p_robust(apply_fn, params, x, sigma, key, *, method, num_samples, chunk, num_noisy,
              mvn_points, mvn_shifts, mvs_scale):
  t = jnp.argmax(apply_fn(params, x), axis=-1)
  if method == "monte_carlo":
    return _monte_carlo(apply_fn, params, x, t, sigma, key, num_samples, chunk)
  if method == "mmse":
    noise_key, key = jax.random.split(key)

    def smoothed(xi, ti, ki):
      eps = sigma * jax.random.normal(ki, (num_noisy, *xi.shape), xi.dtype)
      g, grads = jax.vmap(lambda e: _margins(apply_fn, params, xi + e, ti))(eps)
      return g.mean(0), grads.mean(0)

    g, grads = jax.vmap(smoothed)(x, t, jax.random.split(noise_key, x.shape[0]))
  else:
    g, grads = jax.vmap(lambda xi, ti: _margins(apply_fn, params, xi, ti))(x, t)
  z, cov = jax.vmap(lambda a, b: _z_and_cov(a, b, sigma))(g, grads)
  if method == "mv_sigmoid":
    return 1.0 / (1.0 + jnp.sum(jnp.exp(-mvs_scale * z), axis=-1))
  return mvn_cdf(z, cov, key, num_points=mvn_points, num_shifts=mvn_shifts).p


def _monte_carlo(apply_fn, params, x, t, sigma, key, num_samples, chunk):
  """Fraction of num_samples noisy copies of each input keeping its class, chunk at a time."""
  num_chunks = -(-num_samples // chunk)

  def one(xi, ti, ki):
    def body(count, c):
      eps = sigma * jax.random.normal(jax.random.fold_in(ki, c), (chunk, *xi.shape), xi.dtype)
      same = jnp.argmax(apply_fn(params, xi[None] + eps), axis=-1) == ti
      valid = c * chunk + jnp.arange(chunk) < num_samples  # the last chunk may overhang
      return count + jnp.sum(same & valid), None

    count, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), jnp.arange(num_chunks))
    return count / num_samples

  return jax.lax.map(lambda a: one(*a), (x, t, jax.random.split(key, x.shape[0])))


def p_robust(apply_fn: ApplyFn, params: chex.ArrayTree, x: chex.Array, sigma: float,
             method: str = "taylor", key: chex.PRNGKey | None = None, *,
             num_samples: int = 10_000, chunk: int = 1000, num_noisy: int = 16,
             mvn_points: int = 1024, mvn_shifts: int = 8, mvs_scale: float = 1.0
             ) -> chex.Array:
  """The probability that Gaussian noise of scale sigma leaves each input's class unchanged.

  Args:
    apply_fn: classifier, apply_fn(params, x[B, ...]) -> logits [B, K], K >= 2.
    params: its parameters.
    x: [B, ...] inputs (e.g. images [B, H, W, C]), on the scale sigma refers to.
    sigma: noise standard deviation, > 0.
    method: one of METHODS (see the module docstring).
    key: PRNG key (noise for monte_carlo and mmse, lattice shifts for the CDF).
    num_samples: monte_carlo's noisy copies per input (its standard error is
      sqrt(p (1 - p) / num_samples)).
    chunk: monte_carlo's copies per forward pass.
    num_noisy: mmse's noisy copies per input.
    mvn_points, mvn_shifts: the quasi-Monte Carlo of the multivariate normal CDF.
    mvs_scale: mv_sigmoid's scale s.

  Returns:
    [B] float probabilities in [0, 1].
  """
  check(method in METHODS, f"method: expected one of {list(METHODS)}, got {method!r}")
  check(callable(apply_fn), f"apply_fn: expected a callable, got {type(apply_fn).__name__}")
  x = jnp.asarray(x)
  check(x.ndim >= 2 and x.shape[0] >= 1, f"x: expected shape [B, ...], got {x.shape}")
  if not isinstance(sigma, jax.core.Tracer):
    check(jnp.ndim(sigma) == 0 and float(sigma) > 0,
          f"sigma: expected a positive noise scale, got {sigma!r}")
  check(key is not None, "key: expected a PRNG key (jax.random.key or PRNGKey), got None")
  for name, v in (("num_samples", num_samples), ("chunk", chunk), ("num_noisy", num_noisy)):
    check(isinstance(v, int) and v >= 1, f"{name}: expected a positive int, got {v!r}")
  return _p_robust(apply_fn, params, x, jnp.asarray(sigma, x.dtype), key, method=method,
                   num_samples=num_samples, chunk=min(chunk, num_samples),
                   num_noisy=num_noisy, mvn_points=mvn_points, mvn_shifts=mvn_shifts,
                   mvs_scale=mvs_scale)


def taylor_z_and_cov(apply_fn: ApplyFn, params: chex.ArrayTree, x: chex.Array,
                     sigma: float) -> tuple[chex.Array, chex.Array]:
  """The Taylor estimator's normal problem for each input: p = P(Y <= z), Y ~ N(0, Sigma).

  x: [B, ...] -> (z [B, K - 1], Sigma [B, K - 1, K - 1]), margins to the clean prediction.
  """
  x = jnp.asarray(x)
  t = jnp.argmax(apply_fn(params, x), axis=-1)
  g, grads = jax.vmap(lambda xi, ti: _margins(apply_fn, params, xi, ti))(x, t)
  return jax.vmap(lambda a, b: _z_and_cov(a, b, sigma))(g, grads)


def robustness_by_class(p: chex.Array, labels: chex.Array, num_classes: int
                        ) -> tuple[chex.Array, chex.Array]:
  """Mean robustness per class and the robustness bias (max minus min over classes).

  p: [N] robustness of each example; labels: [N] ints in [0, num_classes). Returns
  ([num_classes] means, NaN for an absent class; the bias over the classes present).
  """
  p, labels = jnp.asarray(p), jnp.asarray(labels)
  chex.assert_equal_shape([p, labels])
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=p.dtype)
  counts = one_hot.sum(0)
  means = jnp.where(counts > 0, (one_hot * p[:, None]).sum(0) / jnp.maximum(counts, 1), jnp.nan)
  return means, jnp.nanmax(means) - jnp.nanmin(means)


def most_vulnerable(p: chex.Array, k: int) -> chex.Array:
  """Indices of the k examples with the lowest robustness, the most vulnerable first."""
  p = jnp.asarray(p)
  chex.assert_rank(p, 1)
  check(isinstance(k, int) and 1 <= k <= p.shape[0],
        f"k: expected an int in [1, {p.shape[0]}], got {k!r}")
  return jax.lax.top_k(-p, k)[1]
