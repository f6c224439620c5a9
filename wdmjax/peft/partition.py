"""Split parameters into a trainable and a frozen part, and merge them back.

Parameter-efficient fine-tuning differentiates the loss with respect to the trainable part
only (`loss(merge(trainable, frozen))`), so XLA never computes the frozen weights' gradients,
and the optimizer and the EMA hold state for the trainable leaves alone.
"""

from __future__ import annotations

import chex
from flax import traverse_util

from wdmjax.errors import check
from wdmjax.peft.labels import FREEZE, TRAIN


def split(params: chex.ArrayTree, labels: chex.ArrayTree) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts, each holding only its own leaves."""
  flat = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  check(set(flat) == set(flat_labels),
        "labels: expected a pytree with the same leaves as the parameters")
  bad = {v for v in flat_labels.values()} - {TRAIN, FREEZE}
  check(not bad, f"labels: expected leaves {TRAIN!r} or {FREEZE!r}, got {sorted(bad)}")
  train = {k: v for k, v in flat.items() if flat_labels[k] == TRAIN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] == FREEZE}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trainable: chex.ArrayTree, frozen: chex.ArrayTree) -> dict:
  """The full parameters from the two parts of `split` (a leaf in both is an error)."""
  a = traverse_util.flatten_dict(trainable)
  b = traverse_util.flatten_dict(frozen)
  both = set(a) & set(b)
  check(not both, f"merge: leaves in both parts: {sorted('/'.join(k) for k in both)[:3]}")
  return traverse_util.unflatten_dict({**b, **a})
