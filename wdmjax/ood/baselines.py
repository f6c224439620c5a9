"""Classic OOD detectors from a classifier, the baselines of the reconstruction score.

  * maximum softmax probability (Hendrycks and Gimpel 2017): score = -max_k softmax(f)_k;
  * energy (Liu et al. 2020): score = -T logsumexp(f / T), T = 1;
  * Mahalanobis distance (Lee et al. 2018) in the classifier's penultimate features:
    class means and one shared covariance fitted on the training images, score = the
    smallest squared distance to a class mean.
All scores are "higher: more OOD". The classifier is wdmjax's LeNet-5 (`wdmjax.models.LeNet`,
pixels in [0, 1]); its penultimate features are the 84 ReLU units of `fc2`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check
from wdmjax.models import LeNet


def _check_logits(logits) -> jax.Array:
  f = jnp.asarray(logits, jnp.float32)
  check(f.ndim == 2 and f.shape[1] >= 2,
        f"logits: expected [N, K] with K >= 2 classes, got shape {tuple(f.shape)}")
  return f


def msp_score(logits: chex.Array) -> np.ndarray:
  """-max softmax probability of logits [N, K] -> [N]."""
  return np.asarray(-jnp.max(jax.nn.softmax(_check_logits(logits), axis=-1), axis=-1))


def energy_score(logits: chex.Array, temperature: float = 1.0) -> np.ndarray:
  """The free energy -T logsumexp(f / T) of logits [N, K] -> [N]."""
  f = _check_logits(logits)
  return np.asarray(-temperature * jax.nn.logsumexp(f / temperature, axis=-1))


@functools.partial(jax.jit, static_argnames=("model",))
def _logits_and_features(model: LeNet, params: chex.ArrayTree, x: jax.Array):
  logits, state = model.apply({"params": params}, x,
                              capture_intermediates=lambda mdl, _: mdl.name == "fc2")
  return logits, jax.nn.relu(state["intermediates"]["fc2"]["__call__"][0])


def lenet_outputs(model: LeNet, params: chex.ArrayTree, images01: chex.Array,
                  batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, K], penultimate features [N, 84]) of LeNet on images [N, H, W, 1] in
  [0, 1], in batches of one shape (one compile)."""
  x = np.asarray(images01, np.float32)
  check(x.ndim == 4 and x.shape[0] >= 1,
        f"images: expected [N, H, W, C] images in [0, 1], got shape {x.shape}")
  n = x.shape[0]
  bs = min(batch_size, n)
  outs = []
  for s in range(0, n, bs):
    chunk = x[s:s + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    lg, ft = _logits_and_features(model, params, jnp.asarray(chunk))
    outs.append((np.asarray(lg)[:bs - pad], np.asarray(ft)[:bs - pad]))
  return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


class Mahalanobis(NamedTuple):
  """Class means [K, F] and the precision [F, F] of the shared covariance."""
  means: np.ndarray
  precision: np.ndarray


def fit_mahalanobis(features: chex.Array, labels: chex.Array) -> Mahalanobis:
  """Class means and shared covariance of training features [N, F] with labels [N]; the
  covariance gets a small ridge (1e-6 of its mean variance) so dead units keep it
  invertible."""
  f = np.asarray(features, np.float64)
  y = np.asarray(labels)
  check(f.ndim == 2 and y.shape == (f.shape[0],),
        f"labels: expected [N] labels for features {f.shape}, got shape {y.shape}")
  classes = np.unique(y)
  check(len(classes) >= 1 and f.shape[0] > len(classes),
        f"features: expected more examples than classes, got {f.shape[0]} for {len(classes)}")
  means = np.stack([f[y == c].mean(axis=0) for c in classes])
  centred = f - means[np.searchsorted(classes, y)]
  cov = centred.T @ centred / f.shape[0]
  cov += np.eye(cov.shape[0]) * (1e-6 * max(float(np.trace(cov)) / cov.shape[0], 1e-12))
  return Mahalanobis(means, np.linalg.pinv(cov))


def mahalanobis_score(features: chex.Array, fit: Mahalanobis) -> np.ndarray:
  """min over classes of (f - mu_k)^T P (f - mu_k) for features [N, F] -> [N]."""
  f = np.asarray(features, np.float64)
  check(f.ndim == 2 and f.shape[1] == fit.means.shape[1],
        f"features: expected [N, {fit.means.shape[1]}], got shape {f.shape}")
  d = f[:, None, :] - fit.means[None]
  return np.einsum("nkf,fg,nkg->nk", d, fit.precision, d).min(axis=1)
