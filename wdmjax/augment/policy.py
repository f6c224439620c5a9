"""Compositions of L random transformations, and the policies that use them.

`random_augment` is the random-sampling baseline (RandAugment-style, Cubuk et al. 2019, with
random magnitudes): every image gets L transformations drawn uniformly from the family,
each with a magnitude drawn uniformly from [0, magnitude]. `augment_candidates` draws C such
compositions per image, the input of uncertainty-based selection (`uncertainty.py`).
`Augmentation` names a policy and its settings once, validated, hashable (a static argument
of `jax.jit`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.augment.transforms import (
  FAMILY,
  GEOMETRIC,
  MIXING,
  TRANSFORMS,
  apply_one,
  check_images,
  partners,
  rotate,
  translate_x,
  translate_y,
  warp,
)
from wdmjax.errors import check, check_number

Array = jax.Array
POLICIES = ("none", "random", "uncertainty")


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
  ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= low and (
      high is None or value <= high)
  want = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
  check(ok, f"{name}: expected {want}, got {value!r}")
  return int(value)


def check_ops(ops: Any) -> tuple[str, ...]:
  """A non-empty sequence of distinct transformation names -> a tuple of them."""
  check(isinstance(ops, Sequence) and not isinstance(ops, str) and len(ops) > 0,
        f"ops: expected a non-empty list of names from {', '.join(FAMILY)}, got {ops!r}")
  bad = [o for o in ops if not isinstance(o, str) or o not in TRANSFORMS]
  check(not bad, f"ops: expected names from {', '.join(FAMILY)}, got {(bad or [None])[0]!r}")
  twice = [o for i, o in enumerate(ops) if o in ops[:i]]
  check(not twice, f"ops: expected distinct names (a repeated one is drawn more often), got "
                   f"{(twice or [None])[0]!r} more than once")
  return tuple(ops)


def check_targets(y: Any, batch: int, ops: tuple[str, ...]) -> None:
  """y: [B, ...] targets; float (one-hot) when a mixing transform may mix them."""
  check(hasattr(y, "shape") and hasattr(y, "dtype") and y.shape[:1] == (batch,),
        f"targets: expected an array [B, ...] with B = {batch}, got "
        f"{getattr(y, 'shape', type(y).__name__)}")
  mixing = [o for o in ops if o in MIXING]
  check(not mixing or jnp.issubdtype(y.dtype, jnp.floating),
        f"targets: expected float targets (one-hot labels) since ops include "
        f"{(mixing or [None])[0]}, got dtype {y.dtype}")


def _composition_step(ops: tuple[str, ...]):
  """(key, img, y, partner img, partner y, op index into ops, magnitude) -> (img, y): one
  transformation of one image, the op chosen by a traced index.

  Under `vmap` a traced choice computes every branch, so the six geometric transforms share
  one warp (their affine maps are selected, then one resampling) and only the others are
  computed side by side.
  """
  geo = [o for o in ops if o in GEOMETRIC]
  rest = [o for o in ops if o not in GEOMETRIC]
  geo_pos = jnp.asarray([geo.index(o) if o in GEOMETRIC else len(geo) for o in ops])
  rest_pos = jnp.asarray([rest.index(o) if o not in GEOMETRIC else len(rest) for o in ops])
  keep = lambda k, im, y, pi, py, m: (im, y)
  branches = [functools.partial(apply_one, name) for name in rest] + [keep]

  def step(k: Array, im: Array, y: Array, pi: Array, py: Array, w: Array, m: Array
           ) -> tuple[Array, Array]:
    if geo:
      h, wd = im.shape[:2]
      affines = [GEOMETRIC[o](k, m, h, wd) for o in geo] + [(jnp.eye(2), jnp.zeros(2))]
      mats = jnp.stack([a for a, _ in affines])
      shifts = jnp.stack([t for _, t in affines])
      g = geo_pos[w]
      im = warp(im, mats[g], shifts[g])
    if rest:
      im, y = jax.lax.switch(rest_pos[w], branches, k, im, y, pi, py, m)
    return jnp.clip(im, -1.0, 1.0), y

  return step


def random_augment(key: Array, images: Array, targets: Array, *, L: int = 2,
                   ops: Sequence[str] = FAMILY, magnitude: float = 1.0
                   ) -> tuple[Array, Array]:
  """Every image through L transformations drawn uniformly from `ops` (with repetition).

  Args:
    key: PRNG key.
    images: [B, H, W, C] float in [-1, 1].
    targets: [B, ...] per-image targets carried along (mixed by mixup/cutmix, which need
      them float, e.g. one-hot labels).
    L: transformations per composition (>= 1).
    ops: names from `TRANSFORMS`.
    magnitude: upper end of the uniform magnitude of each transformation, in [0, 1].

  Returns:
    (images, targets) of the input shapes and dtypes.
  """
  check_images(images, "images")
  L = check_int("L", L, 1)
  ops = check_ops(ops)
  b = images.shape[0]
  check_targets(targets, b, ops)
  if not isinstance(magnitude, jax.core.Tracer):
    scalar = isinstance(magnitude, np.generic | jax.Array) and np.ndim(magnitude) == 0
    check_number(magnitude.item() if scalar else magnitude, "magnitude", 0.0, 1.0)
  k_ops, k_mag, k_pair, k_apply = jax.random.split(key, 4)
  which = jax.random.randint(k_ops, (L, b), 0, len(ops))
  mags = jax.random.uniform(k_mag, (L, b), maxval=magnitude)
  j = partners(k_pair, b)
  x0 = images.astype(jnp.float32)
  # Floating targets travel as float32, so every branch of the switch returns one dtype.
  y0 = targets.astype(jnp.float32) if jnp.issubdtype(targets.dtype, jnp.floating) else targets
  p_img, p_y = x0[j], y0[j]  # mixing partners are the originals, drawn once

  step = _composition_step(ops)

  def one(k: Array, im: Array, y: Array, pi: Array, py: Array, w: Array, m: Array
          ) -> tuple[Array, Array]:
    # A loop, not L unrolled copies: every branch is traced (and compiled) once.
    body = lambda i, c: step(jax.random.fold_in(k, i), c[0], c[1], pi, py, w[i], m[i])
    return jax.lax.fori_loop(0, L, body, (im, y))

  keys = jax.random.split(k_apply, b)
  out, y = jax.vmap(one)(keys, x0, y0, p_img, p_y, which.T, mags.T)
  return out.astype(images.dtype), y.astype(targets.dtype)


def augment_candidates(key: Array, images: Array, targets: Array, *, C: int, L: int = 2,
                       ops: Sequence[str] = FAMILY, magnitude: float = 1.0
                       ) -> tuple[Array, Array]:
  """C independent `random_augment` compositions of every image.

  Returns:
    (images [C, B, H, W, C_img], targets [C, B, ...]).
  """
  C = check_int("C", C, 1)
  keys = jax.random.split(key, C)
  return jax.vmap(lambda k: random_augment(k, images, targets, L=L, ops=ops,
                                           magnitude=magnitude))(keys)


def shifted(key: Array, images: Array, magnitude: float = 0.5) -> Array:
  """A shifted test set: every image rotated, then translated in x and y, each by
  `magnitude` (in [0, 1] of `MAX_STRENGTH`; 0.5 is 15 degrees and 15% of the side) with a
  random sign per image. images: [B, H, W, C] in [-1, 1] -> same shape."""
  check_images(images, "images")
  k1, k2, k3 = jax.random.split(key, 3)
  x = rotate(k1, images, magnitude)
  return translate_y(k3, translate_x(k2, x, magnitude), magnitude)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """An augmentation policy and its settings.

  Attributes:
    policy: "none", "random" (L transformations drawn at random, the baseline) or
      "uncertainty" (C such candidates per image, train on the S with the highest loss).
    L: transformations per composition.
    C: candidates per image (uncertainty).
    S: candidates kept per image (uncertainty), S <= C.
    ops: the transformation family (names from `TRANSFORMS`).
    magnitude: upper end of the uniform magnitudes, in [0, 1].
    selection: "top" (the S highest losses, as the paper states it) or "proportional"
      (S drawn with probability proportional to the loss, as the authors' code does).
  """
  policy: str = "uncertainty"
  L: int = 2
  C: int = 4
  S: int = 1
  ops: tuple[str, ...] = FAMILY
  magnitude: float = 1.0
  selection: str = "top"

  def __post_init__(self) -> None:
    check(self.policy in POLICIES,
          f"policy: expected one of {', '.join(POLICIES)}, got {self.policy!r}")
    check_int("L", self.L, 1)
    check_int("C", self.C, 1)
    check_int("S", self.S, 1, self.C if isinstance(self.C, int) else None)
    object.__setattr__(self, "ops", check_ops(self.ops))
    object.__setattr__(self, "magnitude", check_number(self.magnitude, "magnitude", 0.0, 1.0))
    check(self.selection in ("top", "proportional"),
          f"selection: expected one of top, proportional, got {self.selection!r}")

  @property
  def mixing(self) -> bool:
    """Whether a transformation of the family mixes images (and so targets)."""
    return any(o in MIXING for o in self.ops)

  @property
  def examples_per_image(self) -> int:
    """Training examples each input image becomes: S for "uncertainty", else 1."""
    return self.S if self.policy == "uncertainty" else 1
