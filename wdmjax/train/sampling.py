"""Sampling a trained model as configured: the bridge from a config to `diffusion.sample`."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wdmjax.diffusion import sample
from wdmjax.diffusion.schedules import check_steps
from wdmjax.errors import check
from wdmjax.train.derived import setup


def sample_labels(cfg: ml_collections.ConfigDict, num: int) -> chex.Array | None:
  """Labels cycling through the classes (one class per grid column), or None."""
  k = setup(cfg).num_classes
  return jnp.arange(num, dtype=jnp.int32) % k if k else None


def sample_images(cfg: ml_collections.ConfigDict, params: chex.ArrayTree, rng: chex.PRNGKey,
                  num: int, *, sampler: str | None = None, steps: int | None = None,
                  eta: float | None = None, guidance_scale: float | None = None,
                  batch_size: int = 256, labels: chex.Array | None = None,
                  input_transform: Callable | None = None,
                  transform_args: tuple | None = None, clip: bool | None = None
                  ) -> np.ndarray:
  """`num` samples [num, R, R, C] in [-1, 1] as numpy, drawn in batches of `batch_size`.

  `clip` (default: for images, 1 or 3 channels) clips the predicted x0 at every step and the
  result to [-1, 1]; latents (4 channels, unit variance) are left unclipped.

  Sampler, steps, eta and guidance default to the config's `sample` section. `labels` [num]
  overrides the cycling class labels; `input_transform` and `transform_args` go to
  `diffusion.sample` (WDM's extraction feeds the network a trigger-shifted input).
  """
  s, su = cfg.sample, setup(cfg)
  sampler = sampler or s.sampler
  steps = check_steps(s.steps if steps is None else steps, cfg.diffusion.num_timesteps)
  eta = s.eta if eta is None else eta
  guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
  check(isinstance(num, int) and num >= 1, f"num: expected a positive integer, got {num!r}")
  check(isinstance(steps, int) and 1 <= steps <= cfg.diffusion.num_timesteps,
        f"steps: expected an integer in [1, {cfg.diffusion.num_timesteps}], got {steps!r}")
  y_all = sample_labels(cfg, num) if labels is None else jnp.asarray(labels, jnp.int32)
  use_cfg = guidance_scale is not None and y_all is not None and guidance_scale != 1.0
  check(not use_cfg or su.null_label is not None,
        f"guidance_scale: classifier-free guidance needs a model trained with label dropout "
        f"(model.class_dropout_prob > 0), got guidance_scale={guidance_scale}")
  # Sampling with dropout on (the `dropout` attack): one model function for all batches.
  if clip is None:
    clip = su.image_shape[-1] in (1, 3)
  model_fn = (su.dropout_model_fn(jax.random.fold_in(rng, 0xD0)) if s.get("dropout")
              else su.model_fn)
  out = []
  for i, start in enumerate(range(0, num, batch_size)):
    b = min(batch_size, num - start)
    y = None if y_all is None else y_all[start:start + b]
    x = sample(model_fn, params, jax.random.fold_in(rng, i), su.schedule,
               shape=(b, *su.image_shape), y=y, sampler=sampler, steps=steps, eta=eta,
               objective=cfg.diffusion.objective,
               guidance_scale=guidance_scale if use_cfg else None,
               null_label=su.null_label if use_cfg else None, input_transform=input_transform,
               transform_args=transform_args, clip_denoised=clip)
    out.append(np.asarray(x))
  out = np.concatenate(out)
  return np.clip(out, -1.0, 1.0) if clip else out
