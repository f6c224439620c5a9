"""The losses of Deep Serial Number: gradient reversal, the soft nearest neighbour loss,
distillation and the lock (near-chance outputs).

SNNL (Frosst, Papernot and Hinton 2019), for features f [B, D], labels y [B], temperature T:

  SNNL = -1/B' sum_i log( sum_{j != i, y_j = y_i} e^{-|f_i - f_j|^2 / T}
                          / sum_{k != i} e^{-|f_i - f_k|^2 / T} ),

over the B' points that have another point of their label. It is small when points sit with
their own label. The sign is a choice the DSN paper leaves open: wdmjax MINIMISES it, with
the class as the label of a valid-SN input and one extra "locked" label for every raw or
invalid-SN input. Then the locked inputs gather in one cluster that no class shares, which
the classifier head can map to the uniform output. Maximising it, as entangled watermarks do,
would mix the locked inputs in with the classes: the opposite of a lock.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import optax


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gradient_reversal(x: chex.ArrayTree, scale: float = 1.0) -> chex.ArrayTree:
  """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky)."""
  return x


def _grl_fwd(x, scale):
  return x, None


def _grl_bwd(scale, _, g):
  return (jax.tree.map(lambda v: -scale * v, g),)


gradient_reversal.defvjp(_grl_fwd, _grl_bwd)


def soft_nearest_neighbor_loss(features: chex.Array, labels: chex.Array,
                               temperature: float = 100.0) -> chex.Array:
  """The soft nearest neighbour loss (above) in log space: features [B, D], labels [B] int
  -> scalar. Rows with no other point of their label are left out of the mean."""
  chex.assert_rank(features, 2)
  chex.assert_rank(labels, 1)
  f = features.astype(jnp.float32)
  sq = jnp.sum(f * f, axis=-1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
  logits = -d2 / temperature
  b = f.shape[0]
  other = ~jnp.eye(b, dtype=bool)
  same = (labels[:, None] == labels[None, :]) & other
  neg = jnp.finfo(jnp.float32).min
  num = jax.nn.logsumexp(jnp.where(same, logits, neg), axis=-1)
  den = jax.nn.logsumexp(jnp.where(other, logits, neg), axis=-1)
  has = jnp.any(same, axis=-1)
  per = jnp.where(has, den - num, 0.0)
  return per.sum() / jnp.maximum(has.sum(), 1)


def distillation_loss(student_logits: chex.Array, teacher_logits: chex.Array,
                      temperature: float = 1.0) -> chex.Array:
  """KL(teacher || student) at `temperature`, times T^2 (Hinton et al.); logits [B, K]."""
  t = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
  s = jax.nn.log_softmax(student_logits / temperature)
  kl = jnp.sum(t * (jnp.log(jnp.clip(t, 1e-12)) - s), axis=-1)
  return temperature ** 2 * kl.mean()


def lock_loss(logits: chex.Array) -> chex.Array:
  """KL(uniform || softmax(logits)), zero when the output is chance; logits [B, K]."""
  k = logits.shape[-1]
  return (-jax.nn.log_softmax(logits).mean(-1) - jnp.log(k)).mean()


def domain_loss(domain_logits: chex.Array, valid: chex.Array) -> chex.Array:
  """Cross-entropy of the domain head: logits [B, 2], valid [B] bool (1 = a valid SN)."""
  return optax.softmax_cross_entropy_with_integer_labels(
    domain_logits, valid.astype(jnp.int32)).mean()
