"""Image attacks named `NAME:STRENGTH`, chained with '+': `jpeg:50+crop:0.8`.

  none            the image as generated
  crop:A          centre crop keeping a share A of the area, resized back
  resize:A        down to a share A of the pixels and back up
  jpeg:Q          real JPEG (Pillow) at quality Q in [1, 95]
  blur:S          Gaussian blur of std S pixels
  noise:S         additive Gaussian noise of std S (in [-1, 1] units)
  rotate:D        rotation by D degrees
  brightness:D    + D (in [-1, 1] units)
  contrast:F      deviation from the mean times F
  regen:T         regeneration: noise the image to step T and denoise it with a different
                  clean model (the caller supplies that model)

`apply_image_attack` runs a parsed chain on images [B, H, W, C] in [-1, 1]; the JAX edits
are jitted once per (name, strength), JPEG leaves JAX. `apply_image_attacks` runs many
chains on the same images: the single edits whose strength is a plain number in the math
(noise, rotate, brightness, contrast) go through one compiled function vmapped over their
strengths, the same numbers as one call each.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax import imaging
from wdmjax.errors import check

IMAGE_ATTACKS = ("none", "crop", "resize", "jpeg", "blur", "noise", "rotate", "brightness",
                 "contrast", "regen")
_RANGES = {"crop": (0.0, 1.0), "resize": (0.0, 1.0), "blur": (0.0, 20.0), "noise": (0.0, 2.0),
           "rotate": (-180.0, 180.0), "brightness": (-2.0, 2.0), "contrast": (0.0, 10.0)}
Regenerate = Callable[[chex.Array, int, chex.PRNGKey], chex.Array]


@dataclass(frozen=True)
class ImageAttack:
  name: str
  strength: float | int | None = None

  def __str__(self) -> str:
    return self.name if self.strength is None else f"{self.name}:{self.strength:g}"


def parse_image_attack(text: str) -> tuple[ImageAttack, ...]:
  """'jpeg:50+crop:0.8' -> (ImageAttack('jpeg', 50), ImageAttack('crop', 0.8)); one-line
  errors naming the attack and the expected strength."""
  check(isinstance(text, str) and text.strip(), f"attack: expected NAME:STRENGTH, got {text!r}")
  out = []
  for part in text.split("+"):
    name, _, value = part.strip().partition(":")
    check(name in IMAGE_ATTACKS,
          f"attack: expected a name in {list(IMAGE_ATTACKS)}, got {name!r} in {text!r}")
    if name == "none":
      check(not value, f"attack: 'none' takes no strength, got {part!r}")
      out.append(ImageAttack("none"))
      continue
    check(bool(value), f"attack: expected {name}:STRENGTH, got {part!r}")
    if name in ("jpeg", "regen"):
      lo, hi = (1, 95) if name == "jpeg" else (1, 999)
      check(value.isascii() and value.isdigit() and lo <= int(value) <= hi,
            f"attack: expected {name}:N with N an integer in [{lo}, {hi}], got {part!r}")
      out.append(ImageAttack(name, int(value)))
      continue
    try:
      x = float(value)
    except ValueError:
      x = math.nan
    lo, hi = _RANGES[name]
    low_open = name in ("crop", "resize", "blur", "contrast")
    ok = math.isfinite(x) and (x > lo if low_open else x >= lo) and x <= hi
    check(ok, f"attack: expected {name}:X with X in {'(' if low_open else '['}{lo:g}, {hi:g}], "
              f"got {part!r}")
    out.append(ImageAttack(name, x))
  return tuple(out)


# The JAX edits as (images, key, strength) -> images.
_EDITS = {
  "crop": lambda x, k, s: imaging.center_crop(x, s),
  "resize": lambda x, k, s: imaging.resize(x, s),
  "blur": lambda x, k, s: imaging.gaussian_blur(x, s),
  "noise": lambda x, k, s: imaging.gaussian_noise(x, k, s),
  "rotate": lambda x, k, s: imaging.rotate(x, s),
  "brightness": lambda x, k, s: imaging.brightness(x, s),
  "contrast": lambda x, k, s: imaging.contrast(x, s),
}


# Edits whose strength can be traced: crop, resize and blur size arrays from it.
SWEEPABLE = ("noise", "rotate", "brightness", "contrast")


@functools.cache
def _swept(name: str) -> Callable:
  """(images [B, ...], keys [S], strengths [S]) -> [S, B, ...]: one compiled sweep per edit."""
  edit = _EDITS[name]
  return jax.jit(jax.vmap(edit, in_axes=(None, 0, 0)))


@functools.cache
def _jitted(name: str, strength: float) -> Callable:
  """One compiled function per (edit, strength): strengths are static in the edits."""
  edit = _EDITS[name]
  return jax.jit(lambda x, k: edit(x, k, strength))


def apply_image_attack(chain: tuple[ImageAttack, ...], x: chex.Array, key: chex.PRNGKey,
                       regenerate: Regenerate | None = None) -> np.ndarray:
  """Images [B, H, W, C] in [-1, 1] after each attack of `chain` in order (numpy float32)."""
  check(np.ndim(x) == 4, f"images: expected shape [B, H, W, C], got {np.shape(x)}")
  x = np.asarray(x, np.float32)
  for i, a in enumerate(chain):
    k = jax.random.fold_in(key, i)
    if a.name == "none":
      continue
    if a.name == "jpeg":
      x = imaging.jpeg(x, int(a.strength))
    elif a.name == "regen":
      check(regenerate is not None, f"attack: {a} needs a second clean model to regenerate with")
      x = np.asarray(regenerate(x, int(a.strength), k), np.float32)
    else:
      x = np.asarray(_jitted(a.name, float(a.strength))(x, k))
  return x


def apply_image_attacks(chains: Sequence[tuple[ImageAttack, ...]], x: chex.Array,
                        keys: Sequence[chex.PRNGKey], regenerate: Regenerate | None = None
                        ) -> list[np.ndarray]:
  """`apply_image_attack(chains[i], x, keys[i])` for every i, with the single SWEEPABLE
  edits of one name run as one vmapped call over their strengths."""
  check(len(chains) == len(keys), f"keys: expected one per chain ({len(chains)}), got "
        f"{len(keys)}")
  check(np.ndim(x) == 4, f"images: expected shape [B, H, W, C], got {np.shape(x)}")
  x = np.asarray(x, np.float32)
  out: list[np.ndarray | None] = [None] * len(chains)
  groups: dict[str, list[int]] = {}
  for i, chain in enumerate(chains):
    if len(chain) == 1 and chain[0].name in SWEEPABLE:
      groups.setdefault(chain[0].name, []).append(i)
    else:
      out[i] = apply_image_attack(chain, x, keys[i], regenerate)
  for name, idx in groups.items():
    # fold_in(key, 0): the key apply_image_attack gives a chain's first edit
    ks = jnp.stack([jax.random.fold_in(keys[i], 0) for i in idx])
    ss = jnp.asarray([float(chains[i][0].strength) for i in idx], jnp.float32)
    swept = np.asarray(_swept(name)(jnp.asarray(x), ks, ss))
    for j, i in enumerate(idx):
      out[i] = swept[j]
  return out
