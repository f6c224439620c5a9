"""Linear augmentations in over-parametrized ridge regression, in closed form: the theory of
"On the Generalization Effects of Linear Transformations in Data Augmentation" (Wu, Zhang,
Valiant, Re, ICML 2020, section 3), checked numerically.

Setting. Data X [n, p] with n < p (over-parametrized), labels y = X beta + eps with
eps ~ N(0, sigma^2 I_n), and the ridge estimator whose penalty scales with the number N of
training points (augmented points count in N):

    beta_hat(X, y; lam) = argmin_b ||X b - y||^2 + N lam ||b||^2
                        = (X^T X + N lam I_p)^{-1} X^T y = X^T (X X^T + N lam I_N)^{-1} y.

lam = 0 is the minimum-norm interpolator X^+ y (the ridgeless limit, computed exactly, not
as a small lam). The estimation error is ||beta_hat - beta||^2.

(a) A label-preserving linear map F ((F x)^T beta = x^T beta for every x, i.e.
F^T beta = beta) adds points F x_i with the labels y_i. Without noise and at lam = 0 the
estimate is P_X beta (P_X: projection on the row space of X), with error ||P_X^perp beta||^2;
adding one point F x lowers it by exactly <z, beta>^2 / ||z||^2, z = P_X^perp F x (zero when
F x already lies in the span of X). Augmentation helps by enlarging the span.
`label_preserving_drop` returns this predicted drop next to the measured one.

(b) Mixup adds m points lam_i x_a + (1 - lam_i) x_b (a != b) with the labels mixed alike.
They lie in the span of X and their labels agree with every interpolator, so at lam = 0
nothing changes; at lam > 0 they act as extra regularization. For centered independent x,
E||lam x_a + (1 - lam) x_b||^2 = c E||x||^2 with c = E[lam^2 + (1 - lam)^2]
= 1 - 2 E[lam (1 - lam)] = (alpha + 1) / (2 alpha + 1) for lam ~ Beta(alpha, alpha)
(E[lam (1 - lam)] = alpha / (2 (2 alpha + 1))). So the n + m points, penalised by
(n + m) lam, have a Gram matrix of about (1 + c m / n) X^T X (and X^T y grows alike), which is
ridge on X alone at lam_eff = lam (n + m) / (n + c m) (`matching_ridge_strength`): a
stronger penalty, at most lam / c <= 2 lam. The match is approximate. Exactly, with A [m, n]
the mixing weights (the mixed data are A X, A y), the estimate is the generalised ridge
X^T (X X^T + (n + m) lam W^{-1})^{-1} y with W = I + A^T A, and lam_eff replaces the random W
by about its mean (1 + c m / n) I. Measured (experiments/augment_ridge.py, p = 64, n = 32,
sigma = 0.5): mixup at lam has the error of plain ridge at 1.08-1.17 times lam_eff for small
lam, helps below the error-minimising strength and hurts above it, and its best error is
slightly above plain ridge's best.

Every function is pure JAX: jittable, and vmappable over random problems drawn from explicit
PRNG keys. Argument values (lam >= 0, sigma >= 0, alpha > 0) are checked when concrete;
shapes and the sizes n, p, m (Python ints: they fix shapes) always.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check

Array = jax.Array
# (key, X [n, p], y [n]) -> (X' [N, p], y' [N]): an augmentation of one data set.
Augment = Callable[[Array, Array, Array], tuple[Array, Array]]


class Problem(NamedTuple):
  """One random regression problem: X [n, p], y [n] = X beta + noise, beta [p] (unit norm)."""
  X: Array
  y: Array
  beta: Array


class Drop(NamedTuple):
  """The error drop from adding one label-preserving point (noise-free, lam = 0): the error
  ||P_X^perp beta||^2 before, the measured drop and the closed-form <z, beta>^2 / ||z||^2."""
  before: Array
  measured: Array
  predicted: Array


class Curves(NamedTuple):
  """Errors ||beta_hat - beta||^2 over random problems: mean [L] and its standard error [L]
  per lam of the grid, and every problem's errors [num_problems, L] (each with a leading
  axis over the sizes when `error_curves` gets several)."""
  mean: Array
  sem: Array
  errors: Array


def _concrete(*xs: Any) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _float(a: Any) -> Array:
  a = jnp.asarray(a)
  return a if jnp.issubdtype(a.dtype, jnp.floating) else a.astype(jnp.result_type(float))


def _check_int(name: str, v: Any, low: int) -> int:
  check(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= low,
        f"{name}: expected an int >= {low}, got {v!r}")
  return int(v)


def _check_nonneg(name: str, v: Any) -> None:
  """v (a number or array) finite and >= 0, when concrete."""
  if _concrete(v):
    a = np.asarray(v, dtype=np.float64)
    check(a.size > 0 and bool(np.all(np.isfinite(a))) and bool(np.all(a >= 0)),
          f"{name}: expected non-negative finite values, got {v!r}")


def _check_alpha(alpha: Any) -> None:
  check(jnp.ndim(alpha) == 0, f"alpha: expected a positive number, got shape {jnp.shape(alpha)}")
  if _concrete(alpha):
    a = float(alpha)
    check(np.isfinite(a) and a > 0, f"alpha: expected a positive number, got {alpha!r}")


def _check_data(X: Array, y: Array) -> None:
  check(X.ndim == 2 and X.shape[0] >= 1, f"X: expected a matrix [n, p], got shape {X.shape}")
  check(y.shape == (X.shape[0],), f"y: expected shape ({X.shape[0]},) to match X "
                                  f"{X.shape}, got {y.shape}")


def _check_map(F: Array, p: int, name: str = "F") -> None:
  check(F.shape == (p, p), f"{name}: expected a linear map [{p}, {p}] on x [{p}], "
                           f"got shape {F.shape}")


def _rtol(shape: tuple[int, ...], dtype: Any) -> float:
  # jnp.linalg.pinv's default cutoff: singular values below it are rounding noise.
  return 10.0 * max(shape) * float(jnp.finfo(dtype).eps)


def _svd(X: Array) -> tuple[Array, Array, Array]:
  """Thin SVD (u [N, k], s [k] descending, vt [k, p]). The QR-iteration LAPACK path: on CPU
  the default divide-and-conquer one was measured 10-30x slower on near-square batches."""
  return jax.lax.linalg.svd(X, full_matrices=False,
                            algorithm=jax.lax.linalg.SvdAlgorithm.QR)


def flip_matrix(h: int, w: int, axis: str = "horizontal") -> Array:
  """The permutation [h w, h w] that mirrors an h x w image flattened row-major: `F @ x` is
  the flipped image. "horizontal" reverses each row (left <-> right), "vertical" the order
  of the rows. Symmetric, orthogonal and an involution (F F = I)."""
  h, w = _check_int("h", h, 1), _check_int("w", w, 1)
  check(axis in ("horizontal", "vertical"),
        f"axis: expected 'horizontal' or 'vertical', got {axis!r}")
  idx = np.arange(h * w).reshape(h, w)
  perm = (idx[:, ::-1] if axis == "horizontal" else idx[::-1, :]).reshape(-1)
  return jnp.asarray(np.eye(h * w)[perm], jnp.result_type(float))


def fixed_space_projector(F: Array) -> Array:
  """The orthogonal projector [p, p] onto {b : F^T b = b}: the parameters for which F is
  label-preserving, (F x)^T b = x^T b. For an orthogonal involution it is (I + F^T) / 2."""
  F = _float(F)
  check(F.ndim == 2 and F.shape[0] == F.shape[1],
        f"F: expected a square matrix [p, p], got shape {F.shape}")
  return _fixed_space_projector(F)


@jax.jit
def _fixed_space_projector(F: Array) -> Array:
  _, s, vt = _svd(F.T - jnp.eye(F.shape[0], dtype=F.dtype))
  # the null space of F^T - I: directions whose singular value is rounding noise
  null = s <= _rtol(F.shape, F.dtype) * jnp.maximum(s[0], 1.0)
  return vt.T @ (null[:, None] * vt)


def random_problem(key: Array, n: int, p: int, sigma: float | Array,
                   invariant: Array | None = None) -> Problem:
  """A random over-parametrized regression problem.

  Args:
    key: PRNG key.
    n, p: data points and dimension, 1 <= n < p.
    sigma: noise standard deviation, >= 0.
    invariant: None, or a map F [p, p] that should preserve labels: beta is then drawn in
      {b : F^T b = b}, so x^T beta = (F x)^T beta (for a symmetric F such as a flip:
      F beta = beta).

  Returns:
    Problem(X [n, p] with N(0, 1) entries, y [n] = X beta + sigma eps, beta [p] uniform on
    the unit sphere of its space).
  """
  n, p = _check_int("n", n, 1), _check_int("p", p, 2)
  check(n < p, f"n: expected fewer points than dimensions (n < p = {p}), got {n}")
  check(jnp.ndim(sigma) == 0, f"sigma: expected a number, got shape {jnp.shape(sigma)}")
  _check_nonneg("sigma", sigma)
  proj = None if invariant is None else _invariant_projector(invariant, p)
  return _random_problem(key, sigma, proj, n=n, p=p)


def _invariant_projector(F: Any, p: int) -> Array:
  """The checked `fixed_space_projector` of the `invariant` argument."""
  F = _float(F)
  _check_map(F, p, "invariant")
  proj = fixed_space_projector(F)
  if _concrete(proj):
    check(float(jnp.trace(proj)) > 0.5, "invariant: expected a map with a fixed "
                                        "direction (F^T b = b for some b != 0), got none")
  return proj


@functools.partial(jax.jit, static_argnames=("n", "p"))
def _random_problem(key: Array, sigma: Array, proj: Array | None, *, n: int, p: int
                    ) -> Problem:
  dtype = jnp.result_type(float)
  # one draw split three ways: each random call is a separate (slow) compilation
  z = jax.random.normal(key, (n * p + p + n,), dtype)
  X, beta, eps = z[:n * p].reshape(n, p), z[n * p:n * p + p], z[n * p + p:]
  if proj is not None:
    beta = proj.astype(dtype) @ beta  # an isotropic draw restricted to the fixed space
  beta = beta / jnp.linalg.norm(beta)
  return Problem(X, X @ beta + sigma * eps, beta)


@jax.jit
def _ridge_svd(X: Array, y: Array, lams: Array) -> Array:
  """[L, p] ridge estimates for lams [L] from one thin SVD of X [N, p].

  X^T (X X^T + N lam I)^{-1} y = V diag(s / (s^2 + N lam)) U^T y: the dual form through
  X's thin SVD, O(N^2 p) for N < p like the N x N solve (no p x p matrix), without squaring
  the condition number, and lam = 0 is the pseudo-inverse (cut singular values dropped).
  """
  u, s, vt = _svd(X)
  keep = s > _rtol(X.shape, X.dtype) * s[0]
  s_safe = jnp.where(keep, s, 1.0)
  n_lam = X.shape[0] * lams[:, None]
  filt = jnp.where(keep, s_safe / (s_safe**2 + n_lam), 0.0)  # [L, k]
  return (filt * (u.T @ y)) @ vt


def ridge(X: Array, y: Array, lam: float | Array) -> Array:
  """The ridge estimate (X^T X + N lam I)^{-1} X^T y, penalty scaled by N = X.shape[0].

  Args:
    X: [N, p] data (any N; augmented data may have N >= p).
    y: [N] labels.
    lam: ridge strength >= 0; 0 gives the minimum-norm least-squares solution X^+ y.

  Returns:
    beta_hat [p].
  """
  X, y = _float(X), _float(y)
  _check_data(X, y)
  check(jnp.ndim(lam) == 0, f"lam: expected a number, got shape {jnp.shape(lam)}")
  _check_nonneg("lam", lam)
  return _ridge_svd(X, y.astype(X.dtype), jnp.reshape(jnp.asarray(lam, X.dtype), (1,)))[0]


def ridge_path(X: Array, y: Array, lams: Array) -> Array:
  """`ridge` at every strength of lams [L] (>= 0) from one decomposition: [L, p]."""
  X, y, lams = _float(X), _float(y), _float(lams)
  _check_data(X, y)
  check(lams.ndim == 1 and lams.shape[0] >= 1,
        f"lams: expected a 1-D grid of strengths, got shape {lams.shape}")
  _check_nonneg("lams", lams)
  return _ridge_svd(X, y.astype(X.dtype), lams.astype(X.dtype))


def estimation_error(beta_hat: Array, beta: Array) -> Array:
  """||beta_hat - beta||^2 over the last axis: beta_hat [..., p], beta [p] -> [...]."""
  return jnp.sum((beta_hat - beta) ** 2, axis=-1)


def augment_label_preserving(X: Array, y: Array, F: Array) -> tuple[Array, Array]:
  """Every point also through F, with its own label: ([X; X F^T] [2n, p], [y; y] [2n])."""
  X, y, F = _float(X), _float(y), _float(F)
  _check_data(X, y)
  _check_map(F, X.shape[1])
  return jnp.concatenate([X, X @ F.T.astype(X.dtype)]), jnp.concatenate([y, y])


def label_preserving_drop(X: Array, beta: Array, F: Array, index: int | Array = 0) -> Drop:
  """The noise-free ridgeless error drop from adding the point F x (x = X[index]) with
  x's label x^T beta, measured and in closed form.

  Before: beta_hat = P_X beta, error ||P_X^perp beta||^2. After: the span grows by
  z = P_X^perp F x, so the error drops by <z, beta>^2 / ||z||^2 (0 when z = 0, i.e. F x in
  the span of X). The identity needs F to preserve labels ((F x)^T beta = x^T beta);
  otherwise the measured drop differs (and may be negative).

  Args:
    X: [n, p] data, n < p.
    beta: [p] true parameter.
    F: [p, p] linear map.
    index: which row of X to transform.

  Returns:
    Drop(before, measured, predicted), scalars.
  """
  X, beta, F = _float(X), _float(beta), _float(F)
  check(X.ndim == 2, f"X: expected a matrix [n, p], got shape {X.shape}")
  n, p = X.shape
  check(1 <= n < p, f"X: expected fewer rows than columns (n < p), got shape {X.shape}")
  check(beta.shape == (p,), f"beta: expected shape ({p},) to match X {X.shape}, "
                            f"got {beta.shape}")
  _check_map(F, p)
  if _concrete(index):
    check(jnp.ndim(index) == 0 and 0 <= int(index) < n,
          f"index: expected a row of X in [0, {n}), got {index!r}")
  return _drop(X, beta, F.astype(X.dtype), index)


@jax.jit
def _drop(X: Array, beta: Array, F: Array, index: Array) -> Drop:
  n, p = X.shape
  x = X[index]
  fx = F @ x
  y = X @ beta
  zero = jnp.zeros((1,), X.dtype)
  before = estimation_error(_ridge_svd(X, y, zero)[0], beta)
  after = estimation_error(_ridge_svd(jnp.concatenate([X, fx[None]]),
                                      jnp.concatenate([y, (x @ beta)[None]]), zero)[0], beta)
  # z = P_X^perp F x, through the row space of X (its kept right singular vectors)
  _, s, vt = _svd(X)
  keep = s > _rtol(X.shape, X.dtype) * s[0]
  z = fx - vt.T @ (keep * (vt @ fx))
  zz = jnp.sum(z**2)
  # in the span up to rounding: the tiny z has a random direction, so its ratio is meaningless
  in_span = jnp.sqrt(zz) <= _rtol((n + 1, p), X.dtype) * jnp.linalg.norm(fx)
  predicted = jnp.where(in_span, 0.0, (z @ beta) ** 2 / jnp.where(in_span, 1.0, zz))
  return Drop(before, before - after, predicted)


def augment_mixup(key: Array, X: Array, y: Array, m: int, alpha: float | Array
                  ) -> tuple[Array, Array]:
  """The data with m mixed points appended.

  Point i is lam_i x_a + (1 - lam_i) x_b with label lam_i y_a + (1 - lam_i) y_b,
  lam_i ~ Beta(alpha, alpha) (`symmetric_beta`), a uniform in [0, n) and b uniform among the
  other n - 1 rows (a != b, so x_a and x_b are independent, as `mixup_norm_factor`
  assumes).

  Args:
    key: PRNG key.
    X: [n, p] data, n >= 2.
    y: [n] labels.
    m: mixed points to add, >= 0.
    alpha: Beta parameter, > 0.

  Returns:
    (X' [n + m, p], y' [n + m]), the originals first.
  """
  X, y = _float(X), _float(y)
  _check_data(X, y)
  m = _check_int("m", m, 0)
  _check_alpha(alpha)
  n = X.shape[0]
  check(n >= 2, f"X: expected at least 2 points to mix, got shape {X.shape}")
  return _mixup(key, X, y.astype(X.dtype), jnp.asarray(alpha, X.dtype), m=m)


@functools.partial(jax.jit, static_argnames=("m",))
def _mixup(key: Array, X: Array, y: Array, alpha: Array, *, m: int) -> tuple[Array, Array]:
  n = X.shape[0]
  # one uniform draw for everything: each random call site is a slow compilation
  u = jax.random.uniform(key, (2 * _JOEHNK_TRIES + 4, m), X.dtype,
                         minval=jnp.finfo(X.dtype).tiny)
  lam = _beta_from_uniforms(u[2:], alpha)
  # a uniform in [0, n), b = a + a uniform shift in [1, n)
  a = jnp.minimum(jnp.floor(u[0] * n), n - 1).astype(jnp.int32)
  b = (a + 1 + jnp.minimum(jnp.floor(u[1] * (n - 1)), n - 2).astype(jnp.int32)) % n
  x_mix = lam[:, None] * X[a] + (1.0 - lam)[:, None] * X[b]
  y_mix = lam * y[a] + (1.0 - lam) * y[b]
  chex.assert_shape(x_mix, (m, X.shape[1]))
  return jnp.concatenate([X, x_mix]), jnp.concatenate([y, y_mix])


# Joehnk candidates per draw: each is accepted with probability >= pi / 4 for alpha <= 1/2,
# so all K fail with probability <= (1 - pi / 4)^K < 1e-16.
_JOEHNK_TRIES = 24


def symmetric_beta(key: Array, alpha: float | Array, m: int, dtype: Any = None) -> Array:
  """m draws of Beta(alpha, alpha) [m], without loops (jax.random.beta's rejection loops are
  slow to compile, and mixup compiles once per shape).

  alpha > 1/2: Ulrich's polar method, 1/2 + 1/2 sqrt(1 - U^(2 / (2 alpha - 1))) cos(2 pi V)
  (exact). alpha <= 1/2: Joehnk's method, S / (S + T) for the first of 24 candidates
  S = U^(1/alpha), T = V^(1/alpha) with S + T <= 1 (exact unless all 24 fail, probability
  < 1e-16). Values within rounding of 1 come out as 1.0.
  """
  _check_alpha(alpha)
  m = _check_int("m", m, 0)
  dtype = jnp.result_type(float) if dtype is None else dtype
  return _symmetric_beta(key, jnp.asarray(alpha, dtype), m, dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _symmetric_beta(key: Array, alpha: Array, m: int, dtype: Any) -> Array:
  u = jax.random.uniform(key, (2 * _JOEHNK_TRIES + 2, m), dtype,
                         minval=jnp.finfo(dtype).tiny)
  return _beta_from_uniforms(u, alpha)


def _beta_from_uniforms(u: Array, alpha: Array) -> Array:
  """Beta(alpha, alpha) [m] from uniforms u [2 K + 2, m] in (0, 1), K = _JOEHNK_TRIES."""
  k, m = _JOEHNK_TRIES, u.shape[1]
  # Ulrich: -expm1 keeps 1 - U^e accurate when e is small (large alpha)
  e = 2.0 / jnp.maximum(2.0 * alpha - 1.0, jnp.finfo(u.dtype).tiny)
  polar = 0.5 + 0.5 * jnp.sqrt(-jnp.expm1(e * jnp.log(u[0]))) * jnp.cos(2 * jnp.pi * u[1])
  # Joehnk in logs: U^(1/alpha) underflows for small alpha
  log_st = jnp.log(u[2:2 + 2 * k].reshape(2, k, m)) / alpha
  log_sum = jnp.logaddexp(log_st[0], log_st[1])
  first = jnp.argmax(log_sum <= 0.0, axis=0)  # the first accepted candidate
  joehnk = jnp.exp(log_st[0] - log_sum)[first, jnp.arange(m)]
  return jnp.where(alpha > 0.5, polar, joehnk).astype(u.dtype)


def mixup_norm_factor(alpha: float | Array) -> float | Array:
  """c = E[lam^2 + (1 - lam)^2] = (alpha + 1) / (2 alpha + 1) for lam ~ Beta(alpha, alpha):
  E||lam x_a + (1 - lam) x_b||^2 = c E||x||^2 for centered independent x_a, x_b. In (1/2, 1):
  1 as alpha -> 0 (no mixing), 1/2 as alpha -> inf (midpoints)."""
  _check_alpha(alpha)
  # 1 - 2 E[lam (1 - lam)] with E[lam (1 - lam)] = alpha / (2 (2 alpha + 1))
  return 1.0 - alpha / (2.0 * alpha + 1.0)


def matching_ridge_strength(lam: float | Array, n: int, m: int, alpha: float | Array
                            ) -> float | Array:
  """The strength lam_eff at which plain ridge on n points matches ridge at lam on those
  points plus m mixup points: lam_eff = lam (n + m) / (n + c m), c = mixup_norm_factor.

  Why: the n + m points have a Gram matrix (and X^T y) of about (1 + c m / n) times the
  original's, against a penalty (n + m) lam, i.e. n lam_eff per original Gram. lam_eff >= lam
  (equal for m = 0 or lam = 0) and < lam / c <= 2 lam. An approximation that replaces the
  random mixing by its mean: measured, mixup regularises somewhat more than lam_eff says
  (see the module docstring).
  """
  _check_nonneg("lam", lam)
  n, m = _check_int("n", n, 1), _check_int("m", m, 0)
  c = mixup_norm_factor(alpha)
  return lam * (n + m) / (n + c * m)


def error_curves(key: Array, n: int | Sequence[int], p: int, sigma: float | Array,
                 lams: Array, augments: Mapping[str, Augment | None] | None = None, *,
                 invariant: Array | None = None, num_problems: int = 200
                 ) -> dict[str, Curves]:
  """Estimation errors averaged over random problems, for a grid of ridge strengths, several
  augmentations and (optionally) several training-set sizes.

  The problems are drawn once, `random_problem(k_j, max(n), p, sigma, invariant)` with k_j
  from `key` alone, and size n uses their first n points. So every augmentation, size and
  strength sees the same beta, X and noise (nested in n), and calls with the same key see
  the same problems: the comparisons are paired. Compiled once for the draw and once per
  size (the augmentations run in one program; sigma and the lam values are traced).

  Args:
    key: PRNG key.
    n: training points, an int or a sequence of ints, each 1 <= n < p.
    p: dimension.
    sigma: noise standard deviation, >= 0.
    lams: [L] ridge strengths >= 0 (0: the minimum-norm interpolator).
    augments: name -> None (the data as is) or (key, X, y) -> (X', y'), applied to each
      problem's data before the fit (e.g. `lambda k, X, y: augment_mixup(k, X, y, m, a)`);
      the penalty counts the augmented points. Default {"none": None}.
    invariant: passed to `random_problem`.
    num_problems: random problems to average over, >= 2.

  Returns:
    name -> Curves(mean, sem, errors): mean and sem [L] and errors [num_problems, L] for an
    int n; [len(n), L] and [len(n), num_problems, L] for a sequence.
  """
  ns = [n] if isinstance(n, int | np.integer) else list(n)
  check(len(ns) >= 1, f"n: expected an int or a non-empty sequence of ints, got {n!r}")
  p = _check_int("p", p, 2)
  for v in ns:
    _check_int("n", v, 1)
    check(v < p, f"n: expected fewer points than dimensions (n < p = {p}), got {v}")
  num_problems = _check_int("num_problems", num_problems, 2)
  augments = {"none": None} if augments is None else augments
  check(isinstance(augments, Mapping) and len(augments) >= 1
        and all(a is None or callable(a) for a in augments.values()),
        f"augments: expected a non-empty mapping name -> None or (key, X, y) -> (X, y), "
        f"got {augments!r}")
  check(jnp.ndim(sigma) == 0, f"sigma: expected a number, got shape {jnp.shape(sigma)}")
  _check_nonneg("sigma", sigma)
  lams = _float(lams)
  check(lams.ndim == 1 and lams.shape[0] >= 1,
        f"lams: expected a 1-D grid of strengths, got shape {lams.shape}")
  _check_nonneg("lams", lams)
  if invariant is not None:
    invariant = _float(invariant)
    _invariant_projector(invariant, p)  # the checks, before the draw
  k_prob, k_aug = jax.random.split(key)
  X, y, beta = _draw(k_prob, jnp.asarray(sigma, lams.dtype), invariant, n=max(ns), p=p,
                     num_problems=num_problems)
  per_n = [_fit(k_aug, X[:, :v], y[:, :v], beta, lams, augments=tuple(augments.values()))
           for v in ns]
  out = {}
  for i, name in enumerate(augments):
    e = jnp.stack([errs[i] for errs in per_n])  # [len(ns), num_problems, L]
    e = e[0] if isinstance(n, int | np.integer) else e
    out[name] = Curves(e.mean(-2), e.std(-2, ddof=1) / np.sqrt(num_problems), e)
  return out


@functools.partial(jax.jit, static_argnames=("n", "p", "num_problems"))
def _draw(key: Array, sigma: Array, invariant: Array | None, *, n: int, p: int,
          num_problems: int) -> Problem:
  keys = jax.random.split(key, num_problems)
  return jax.vmap(lambda k: random_problem(k, n, p, sigma, invariant))(keys)


@functools.partial(jax.jit, static_argnames=("augments",))
def _fit(key: Array, X: Array, y: Array, beta: Array, lams: Array, *,
         augments: tuple[Augment | None, ...]) -> list[Array]:
  """[num_problems, L] errors per augmentation, for problems X [P, n, p], y [P, n],
  beta [P, p]."""
  def one(k: Array, X: Array, y: Array, beta: Array) -> list[Array]:
    out = []
    for i, augment in enumerate(augments):
      Xa, ya = (X, y) if augment is None else augment(jax.random.fold_in(k, i), X, y)
      out.append(estimation_error(_ridge_svd(Xa, ya, lams.astype(Xa.dtype)), beta))
    return out

  return jax.vmap(one)(jax.random.split(key, X.shape[0]), X, y, beta)
