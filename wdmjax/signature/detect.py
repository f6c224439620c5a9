"""Detection and identification of Stable Signature bits with an exact binomial null.

An image carries a k-bit message m when its extracted bits agree with m in many places: for
an image not signed with m, each bit agrees by a fair coin whatever the image, so the number
of agreeing bits is Binomial(k, 1/2) and the p-value P(X >= agreeing) is exact. For
k = 48, agreeing >= 41 gives a false-positive rate <= 1e-6 (P = 3.1e-7). Among N users, the
best-matching message is tested at fpr / N (union bound), so the global rate stays <= fpr.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from wdmjax.errors import check
from wdmjax.stats import Identification, binomial_log10_sf, identify, threshold_for_fpr

Array = jax.Array


class Detection(NamedTuple):
  """Per image: agreeing bits [N], log10 p [N], detected [N]; the threshold (bits)."""
  agreeing: Array
  log10_p: Array
  detected: Array
  threshold: Array


def message_bits(key: Array, num_bits: int = 48, num_users: int | None = None) -> Array:
  """Random messages from a key: [num_bits] int32 in {0, 1}, or [num_users, num_bits]."""
  shape = (num_bits,) if num_users is None else (num_users, num_bits)
  return jax.random.bernoulli(key, 0.5, shape).astype(jnp.int32)


def _bits(logits: Array) -> Array:
  return (jnp.asarray(logits) > 0).astype(jnp.int32)


def detect(logits: Array, message: Array, fpr: float = 1e-6) -> Detection:
  """Is `message` [k] in each image? logits [N, k] (bit = logit > 0)."""
  check(0.0 < fpr < 1.0, f"fpr: expected a rate in (0, 1), got {fpr!r}")
  check(logits.ndim == 2 and message.shape == (logits.shape[1],),
        f"message: expected [k] bits with k = {logits.shape[-1]} (the logits' last axis), "
        f"got {message.shape}")
  k = logits.shape[1]
  agreeing = (_bits(logits) == message[None]).sum(-1)
  tau = threshold_for_fpr(k, fpr)
  return Detection(agreeing, binomial_log10_sf(agreeing, k), agreeing >= tau, tau)


def identify_users(logits: Array, messages: Array, fpr: float = 1e-6) -> Identification:
  """Which of N users' messages [N_users, k] each image [N, k logits] carries."""
  check(0.0 < fpr < 1.0, f"fpr: expected a rate in (0, 1), got {fpr!r}")
  check(messages.ndim == 2 and logits.ndim == 2 and messages.shape[1] == logits.shape[1],
        f"messages: expected [users, k] with k = {logits.shape[-1]}, got {messages.shape}")
  agreements = (_bits(logits)[:, None, :] == messages[None]).sum(-1)  # [N, users]
  return identify(agreements, logits.shape[1], fpr)
