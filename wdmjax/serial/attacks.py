"""Attacks on a serial-number lock, as a thief holding a student's weights would try them.

- `finetune_unlocked`: fine-tune the student on a share of labelled training data, raw
  (unstamped) images and hard labels, hoping it then works without a serial number.
- `reverse_engineer_serial`: optimise a stamp by gradient descent on a small labelled set.
  The attacker knows where the stamp is and how big (the worst case for the owner), not its
  bits: each cell is sigmoid(z) in [0, 1] (grey allowed), z from a random start, Adam on the
  cross-entropy of the stamped images. The result is read both as it is (grey cells) and
  rounded to bits, as a typed serial number would be.
- `search_serials`: try every serial number on a few labelled images, keep the best.
(Magnitude pruning is `wdmjax.attacks.prune`, applied to the student's params.)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdmjax.errors import check
from wdmjax.models.layers import check_positive_int
from wdmjax.serial.stamps import StampSpec, stamp

Array = jax.Array


def _logits(model: nn.Module, params: chex.ArrayTree, x: Array) -> Array:
  out = model.apply({"params": params}, x)
  return out[0] if isinstance(out, tuple) else out


@functools.lru_cache(maxsize=8)
def _finetune_step(model: nn.Module, batch_size: int, lr: float):
  tx = optax.adam(lr)

  def step(params, opt, images, labels, key):
    idx = jax.random.randint(key, (batch_size,), 0, images.shape[0])
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      _logits(model, p, images[idx]), labels[idx]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  return tx, jax.jit(step)


def finetune_unlocked(model: nn.Module, params: chex.ArrayTree, images: np.ndarray,
                      labels: np.ndarray, rng: Array, *, steps: int = 300,
                      batch_size: int = 64, lr: float = 1e-3) -> chex.ArrayTree:
  """Fine-tunes all of the student's params on raw images [N, H, W, C] and labels [N] with
  Adam (cross-entropy); returns the new params. A pure function of `rng`."""
  check_positive_int("steps", steps)
  tx, step = _finetune_step(model, int(batch_size), float(lr))
  opt = tx.init(params)
  x, y = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
  for s in range(steps):
    params, opt, _ = step(params, opt, x, y, jax.random.fold_in(rng, s))
  return params


class ReverseEngineered(NamedTuple):
  cells: np.ndarray  # [k] in [0, 1]: the optimised stamp
  bits: np.ndarray  # [k] 0/1: rounded
  losses: np.ndarray  # [steps]


@functools.lru_cache(maxsize=8)
def _reverse_fn(model: nn.Module, spec: StampSpec, steps: int, lr: float):
  tx = optax.adam(lr)

  def run(params, images, labels, z0):
    def loss_fn(z):
      x = stamp(images, jnp.broadcast_to(jax.nn.sigmoid(z), (spec.bits,)), spec)
      return optax.softmax_cross_entropy_with_integer_labels(
        _logits(model, params, x), labels).mean()

    def body(carry, _):
      z, opt = carry
      loss, g = jax.value_and_grad(loss_fn)(z)
      upd, opt = tx.update(g, opt, z)
      return (optax.apply_updates(z, upd), opt), loss

    (z, _), losses = jax.lax.scan(body, (z0, tx.init(z0)), None, length=steps)
    return jax.nn.sigmoid(z), losses

  return jax.jit(run)


def reverse_engineer_serial(model: nn.Module, params: chex.ArrayTree, images: np.ndarray,
                            labels: np.ndarray, spec: StampSpec, rng: Array, *,
                            steps: int = 300, lr: float = 0.1) -> ReverseEngineered:
  """Optimises the stamp's k cells (see the module docstring) on images [N, H, W, C] and
  labels [N] for `steps` Adam steps from a random start drawn from `rng`."""
  check_positive_int("steps", steps)
  x = jnp.asarray(images, jnp.float32)
  chex.assert_rank(x, 4)
  spec.origin(*x.shape[1:3])
  check(np.shape(labels) == (x.shape[0],), f"labels: expected [{x.shape[0]}], "
                                           f"got {np.shape(labels)}")
  z0 = jax.random.normal(rng, (spec.bits,))
  cells, losses = _reverse_fn(model, spec, int(steps), float(lr))(
    params, x, jnp.asarray(labels, jnp.int32), z0)
  cells = np.asarray(cells)
  return ReverseEngineered(cells, (cells > 0.5).astype(np.uint8), np.asarray(losses))


class SearchResult(NamedTuple):
  bits: np.ndarray  # [k] the best-scoring serial
  scores: np.ndarray  # [2^k] accuracy of every serial on the attacker's images
  candidates: int


@functools.lru_cache(maxsize=8)
def _score_fn(model: nn.Module, spec: StampSpec):
  def score(params, images, labels, codes):
    bits = ((codes[:, None] >> jnp.arange(spec.bits - 1, -1, -1)) & 1).astype(jnp.float32)

    def one(b):
      return jnp.mean(_logits(model, params, stamp(images, b, spec)).argmax(-1) == labels)

    return jax.lax.map(one, bits)

  return jax.jit(score)


def search_serials(model: nn.Module, params: chex.ArrayTree, images: np.ndarray,
                   labels: np.ndarray, spec: StampSpec, *, chunk: int = 1024
                   ) -> SearchResult:
  """Exhaustive search: every one of the 2^k serial numbers stamped onto images [N, ...]
  (a few labelled ones), scored by accuracy on them; the best is returned. Cheap for small k
  (16 bits: 65,536 candidates), hopeless for large k: what the serial's length must beat."""
  check(spec.bits <= 24, f"bits: expected at most 24 bits to search exhaustively, "
                         f"got {spec.bits}")
  check_positive_int("chunk", chunk)
  x = jnp.asarray(images, jnp.float32)
  y = jnp.asarray(labels, jnp.int32)
  fn = _score_fn(model, spec)
  n = 2 ** spec.bits
  scores = np.concatenate([np.asarray(fn(params, x, y, jnp.arange(s, min(s + chunk, n))))
                           for s in range(0, n, chunk)])
  best = int(scores.argmax())
  bits = np.array([(best >> i) & 1 for i in range(spec.bits - 1, -1, -1)], np.uint8)
  return SearchResult(bits, scores, n)
