"""Uncertainty-based augmentation (Wu, Zhang, Valiant, Re 2020, Section 4).

For every training example draw C candidate augmentations, each a composition of L random
transformations; compute the model's loss on all of them in one forward pass; train on the
S with the highest loss, the ones the model is least certain about. The published setting:
L = 2, C = 4, S = 1. Everything here is traced inside the caller's jitted train step: the
candidates, the forward pass and the top-S choice never leave the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from wdmjax.augment.policy import augment_candidates, check_int
from wdmjax.augment.transforms import FAMILY
from wdmjax.errors import check

Array = jax.Array
# loss_per_example(params, images [N, H, W, C], targets [N, ...]) -> losses [N]
LossPerExample = Callable[[Any, Array, Array], Array]
SELECTIONS = ("top", "proportional")


class Selection(NamedTuple):
  """What `uncertainty_augment` keeps.

  images: [B * S, H, W, C], example-major (the S picks of image 0 first).
  targets: [B * S, ...], the kept candidates' targets (mixed where a mixing transform ran).
  losses: [B, S] the kept candidates' losses (highest first for "top"; in draw order for
    "proportional"); no gradient flows through.
  candidate_losses: [C, B] the losses of all candidates.
  """
  images: Array
  targets: Array
  losses: Array
  candidate_losses: Array


def select_top(candidates: Array, losses: Array, S: int) -> tuple[Array, Array]:
  """The S highest-loss candidates of every example.

  Args:
    candidates: [C, B, ...] candidate arrays.
    losses: [C, B] their losses.
    S: how many to keep, 1 <= S <= C.

  Returns:
    (kept [B * S, ...] example-major, their losses [B, S] in decreasing order).
  """
  top, idx = jax.lax.top_k(losses.T, S)  # [B, S]
  kept = jnp.take_along_axis(jnp.moveaxis(candidates, 0, 1),
                             idx.reshape(idx.shape + (1,) * (candidates.ndim - 2)), axis=1)
  return kept.reshape((-1,) + candidates.shape[2:]), top


def select_proportional(key: Array, candidates: Array, losses: Array, S: int
                        ) -> tuple[Array, Array]:
  """S of the C candidates of every example, drawn with replacement with probability
  proportional to their loss (uniformly where all are 0).

  Args:
    key: PRNG key (the same key draws the same picks for any `candidates`).
    candidates: [C, B, ...]; losses: [C, B] (negative losses count as 0).
    S: draws per example.

  Returns:
    (kept [B * S, ...] example-major, their losses [B, S]).
  """
  w = jnp.maximum(losses.T, 0.0)  # [B, C]
  w = jnp.where(w.sum(-1, keepdims=True) > 0, w, 1.0)
  idx = jax.random.categorical(key, jnp.log(w), axis=-1, shape=(S, w.shape[0])).T  # [B, S]
  kept = jnp.take_along_axis(jnp.moveaxis(candidates, 0, 1),
                             idx.reshape(idx.shape + (1,) * (candidates.ndim - 2)), axis=1)
  return kept.reshape((-1,) + candidates.shape[2:]), jnp.take_along_axis(losses.T, idx, 1)


def uncertainty_augment(loss_per_example: LossPerExample, params: chex.ArrayTree,
                        batch: tuple[Array, Array], key: Array, L: int = 2, C: int = 4,
                        S: int = 1, *, ops: Sequence[str] = FAMILY,
                        magnitude: float = 1.0, selection: str = "top") -> Selection:
  """C candidate augmentations per example, the S with the highest loss kept.

  `selection="top"` keeps the S highest-loss candidates, as the paper states the scheme.
  `selection="proportional"` draws S of the C (with replacement) with probability
  proportional to the loss, as the authors' released code does (uniformly when every loss
  is 0); the draw spares the model a diet of nothing but the hardest candidates, which at
  large C can be images a transformation has made unrecognizable.

  Args:
    loss_per_example: (params, images [N, H, W, C], targets [N, ...]) -> losses [N]; any
      per-example loss (a classifier's cross-entropy, a watermark extractor's bit loss).
      It is called once, on all B * C candidates together.
    params: the model's parameters (the current ones: the selection follows training).
    batch: (images [B, H, W, C] float in [-1, 1], targets [B, ...]); targets must be float
      (e.g. one-hot) when `ops` include mixup or cutmix, which mix them.
    key: PRNG key.
    L: transformations per candidate (>= 1).
    C: candidates per example (>= 1).
    S: candidates kept per example, 1 <= S <= C.
    ops: the transformation family (names of `wdmjax.augment.TRANSFORMS`).
    magnitude: upper end of the uniform magnitudes, in [0, 1].
    selection: "top" or "proportional" (see above).

  Returns:
    Selection(images [B * S, ...], targets [B * S, ...], losses [B, S], candidate_losses
    [C, B]); no gradient flows into the selection.
  """
  check(callable(loss_per_example),
        f"loss_per_example: expected a function (params, images, targets) -> losses [N], "
        f"got {type(loss_per_example).__name__}")
  check(isinstance(batch, tuple | list) and len(batch) == 2,
        f"batch: expected (images, targets), got {type(batch).__name__}")
  C = check_int("C", C, 1)
  S = check_int("S", S, 1, C)
  check(selection in SELECTIONS,
        f"selection: expected one of {', '.join(SELECTIONS)}, got {selection!r}")
  images, targets = batch
  if selection == "proportional":
    key, k_pick = jax.random.split(key)
  cand_x, cand_y = augment_candidates(key, images, targets, C=C, L=L, ops=ops,
                                      magnitude=magnitude)
  b = images.shape[0]
  flat_x = cand_x.reshape((C * b,) + cand_x.shape[2:])
  flat_y = cand_y.reshape((C * b,) + cand_y.shape[2:])
  losses = jax.lax.stop_gradient(loss_per_example(params, flat_x, flat_y))
  check(losses.shape == (C * b,),
        f"loss_per_example: expected one loss per candidate, shape ({C * b},), got "
        f"{losses.shape}")
  losses = losses.reshape(C, b)
  if selection == "proportional":
    kept_x, top = select_proportional(k_pick, jax.lax.stop_gradient(cand_x), losses, S)
    kept_y, _ = select_proportional(k_pick, jax.lax.stop_gradient(cand_y), losses, S)
  else:
    kept_x, top = select_top(jax.lax.stop_gradient(cand_x), losses, S)
    kept_y, _ = select_top(jax.lax.stop_gradient(cand_y), losses, S)
  return Selection(kept_x, kept_y, top, losses)
