"""Sampling a trained model as configured: the bridge from a config to `diffusion.sample`."""

from __future__ import annotations

from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wdmjax.diffusion import make_schedule, sample
from wdmjax.diffusion.schedules import Schedule
from wdmjax.errors import check
from wdmjax.models import build_model

_MODEL_FNS: dict[int, Callable] = {}


def model_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """The model section with the data resolution and channel count filled in."""
  kw = dict(cfg.model.to_dict())
  kw.setdefault("resolution", cfg.data.resolution)
  kw.setdefault("in_channels", cfg.data.channels)
  return kw


def model_from_config(cfg: ml_collections.ConfigDict) -> nn.Module:
  return build_model(model_kwargs(cfg))


def schedule_from_config(cfg: ml_collections.ConfigDict) -> Schedule:
  d = cfg.diffusion
  if d.schedule == "linear":
    return make_schedule("linear", d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
  return make_schedule(d.schedule, d.num_timesteps)


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  return int(cfg.model.get("num_classes", 0) or 0)


def apply_fn_for(model: nn.Module) -> Callable:
  """(params, x, t, y, rng, train) -> output: the network as the losses see it."""

  def apply(params, x, t, y, rng, train):
    return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": rng})

  return apply


def model_fn_for(model: nn.Module, dropout_key: chex.PRNGKey | None = None) -> Callable:
  """(params, x, t, y) -> output, one function object per model so jitted samplers are reused.

  With `dropout_key` the model runs with dropout on (train=True), a fresh mask per timestep
  (a sampling-time attack); that function is new on every call, so its sampler recompiles.
  """
  if dropout_key is not None:
    return lambda params, x, t, y: model.apply(
        {"params": params}, x, t, y, train=True,
        rngs={"dropout": jax.random.fold_in(dropout_key, jnp.asarray(t).reshape(-1)[0])})
  key = id(model)
  if key not in _MODEL_FNS:
    _MODEL_FNS[key] = lambda params, x, t, y: model.apply({"params": params}, x, t, y,
                                                          train=False)
  return _MODEL_FNS[key]


def sample_labels(cfg: ml_collections.ConfigDict, num: int) -> chex.Array | None:
  """Labels cycling through the classes (one class per grid column), or None."""
  k = num_classes(cfg)
  return jnp.arange(num, dtype=jnp.int32) % k if k else None


def sample_images(cfg: ml_collections.ConfigDict, model: nn.Module, params: chex.ArrayTree,
                  rng: chex.PRNGKey, num: int, *, sampler: str | None = None,
                  steps: int | None = None, eta: float | None = None,
                  guidance_scale: float | None = None, batch_size: int = 256,
                  labels: chex.Array | None = None, input_transform: Callable | None = None,
                  transform_args: tuple | None = None) -> np.ndarray:
  """`num` samples [num, R, R, C] in [-1, 1] as numpy, drawn in batches of `batch_size`.

  `labels` [num] overrides the cycling class labels; `input_transform` and `transform_args`
  go to `diffusion.sample` (WDM's extraction feeds the network a trigger-shifted input).
  """
  s = cfg.sample
  sampler = sampler or s.sampler
  steps = steps or s.steps
  eta = s.eta if eta is None else eta
  guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
  check(isinstance(num, int) and num >= 1, f"num: expected a positive integer, got {num!r}")
  check(steps <= cfg.diffusion.num_timesteps,
        f"steps: expected at most {cfg.diffusion.num_timesteps}, got {steps}")
  schedule = schedule_from_config(cfg)
  y_all = sample_labels(cfg, num) if labels is None else jnp.asarray(labels, jnp.int32)
  use_cfg = guidance_scale is not None and y_all is not None and guidance_scale != 1.0
  res, ch = cfg.data.resolution, cfg.data.channels
  # Sampling with dropout on (the `dropout` attack): one model function for all batches.
  model_fn = model_fn_for(model, jax.random.fold_in(rng, 0xD0) if s.get("dropout") else None)
  out = []
  for i, start in enumerate(range(0, num, batch_size)):
    b = min(batch_size, num - start)
    y = None if y_all is None else y_all[start:start + b]
    x = sample(model_fn, params, jax.random.fold_in(rng, i), schedule,
               shape=(b, res, res, ch), y=y, sampler=sampler, steps=steps, eta=eta,
               objective=cfg.diffusion.objective, guidance_scale=guidance_scale if use_cfg
               else None, null_label=-1 if use_cfg else None, input_transform=input_transform,
               transform_args=transform_args)
    out.append(np.asarray(x))
  return np.clip(np.concatenate(out), -1.0, 1.0)
