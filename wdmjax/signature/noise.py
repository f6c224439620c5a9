"""The image attacks a HiDDeN extractor trains through ("noise layers", Zhu et al. 2018):
differentiable versions of the edits Stable Signature evaluates, each `(key, x) -> x` on
[B, H, W, C] in [-1, 1], so that the extractor's bits survive them.

One attack is applied per batch, as in Stable Signature's pre-training. Which one is either
drawn uniformly or chosen among C drawn candidates as the one with the highest loss: the
uncertainty-based selection of Wu, Zhang, Valiant and Re (2020), at the granularity of a batch
(`wdmjax.augment.select_top`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from wdmjax import imaging
from wdmjax.errors import check

Array = jax.Array
NoiseLayer = Callable[[Array, Array], Array]


def _brightness_factor(key: Array, x: Array) -> Array:
  # A factor in [0.5, 2] on the [0, 1] scale (torchvision's adjust_brightness), per image.
  f = jnp.exp(jax.random.uniform(key, (x.shape[0], 1, 1, 1), minval=jnp.log(0.5),
                                 maxval=jnp.log(2.0)))
  return jnp.clip((x + 1.0) * f - 1.0, -1.0, 1.0)


def _noise(key: Array, x: Array) -> Array:
  return imaging.gaussian_noise(x, key, 0.08)


def _rotate(key: Array, x: Array) -> Array:
  # rotate takes a static angle: one of +-10 degrees, chosen by the key.
  return jnp.where(jax.random.bernoulli(key), imaging.rotate(x, 10.0), imaging.rotate(x, -10.0))


NOISE_LAYERS: dict[str, NoiseLayer] = {
  "identity": lambda key, x: x,
  "crop": lambda key, x: imaging.random_crop(x, key, 0.3),
  "resize": lambda key, x: imaging.resize(x, 0.5),
  "jpeg": lambda key, x: imaging.jpeg_ste(x, 50),
  "blur": lambda key, x: imaging.gaussian_blur(x, 1.0),
  "brightness": _brightness_factor,
  "noise": _noise,
  "rotate": _rotate,
}


def check_noise_layers(names) -> tuple[str, ...]:
  """`names` as a tuple of known noise layers (at least one, no repeats)."""
  check(not isinstance(names, str) and len(names) >= 1 and len(set(names)) == len(names)
        and all(n in NOISE_LAYERS for n in names),
        f"attacks: expected distinct names from {list(NOISE_LAYERS)}, got {names!r}")
  return tuple(names)


def apply_noise(names: tuple[str, ...], index: Array, key: Array, x: Array) -> Array:
  """The noise layer `names[index]` (a traced index: one branch runs) on x."""
  return jax.lax.switch(index, [NOISE_LAYERS[n] for n in names], key, x)
