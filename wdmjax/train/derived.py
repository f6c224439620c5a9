"""Everything a run derives from its config, built in one place, once per config.

`setup(cfg)` gives the model, the noise schedule, the optimizer, the default loss, the label
conventions (number of classes, label dropout, the null label) and dummy inputs. It is
cached by the config's contents, so every caller gets the same model object and the jitted
functions keyed on it (samplers, train steps) compile once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from wdmjax.configs import from_json, to_json
from wdmjax.diffusion import diffusion_loss, make_schedule
from wdmjax.diffusion.schedules import Schedule
from wdmjax.models import NULL_LABEL, build_model, dummy_inputs, init_params
from wdmjax.train.state import make_optimizer
from wdmjax.train.step import LossFn


def model_kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """The model section with the data resolution and channel count filled in."""
  kw = dict(cfg.model.to_dict())
  kw.setdefault("resolution", cfg.data.resolution)
  kw.setdefault("in_channels", cfg.data.channels)
  return kw


def _schedule(cfg: ml_collections.ConfigDict) -> Schedule:
  d = cfg.diffusion
  if d.schedule == "linear":
    return make_schedule("linear", d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end)
  return make_schedule(d.schedule, d.num_timesteps)


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
  """The objects of one config (see `setup`).

  Attributes:
    cfg: the validated config it was built from.
    model: the score network (Flax module).
    schedule: the noise schedule.
    num_classes: 0 for an unconditional model.
    class_dropout_prob: label dropout for classifier-free guidance (0 without labels).
    null_label: the label meaning "no class" (NULL_LABEL) when there is label dropout,
      else None.
  """

  cfg: ml_collections.ConfigDict
  model: nn.Module
  schedule: Schedule
  num_classes: int
  class_dropout_prob: float
  null_label: int | None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(resolution, resolution, channels) of one example."""
    return (self.cfg.data.resolution, self.cfg.data.resolution, self.cfg.data.channels)

  @functools.cached_property
  def optimizer(self) -> optax.GradientTransformation:
    t = self.cfg.train
    return make_optimizer(t.lr, t.warmup_steps, t.weight_decay, t.grad_clip)

  @functools.cached_property
  def apply_fn(self) -> Callable:
    """(params, x, t, y, rng, train) -> output: the network as the losses see it."""
    model = self.model

    def apply(params, x, t, y, rng, train):
      return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": rng})

    return apply

  @functools.cached_property
  def model_fn(self) -> Callable:
    """(params, x, t, y) -> output with dropout off: the network as the samplers see it.
    One function object per config, so jitted samplers are reused."""
    model = self.model
    return lambda params, x, t, y: model.apply({"params": params}, x, t, y, train=False)

  def dropout_model_fn(self, key: chex.PRNGKey) -> Callable:
    """The network with dropout on (train=True) and a fresh mask per timestep: the sampling
    dropout attack. A new function on every call, so its sampler recompiles."""
    model = self.model
    return lambda params, x, t, y: model.apply(
        {"params": params}, x, t, y, train=True,
        rngs={"dropout": jax.random.fold_in(key, jnp.asarray(t).reshape(-1)[0])})

  def loss(self) -> LossFn:
    """The plain diffusion loss of the configured objective (with label dropout for CFG)."""
    loss = diffusion_loss(self.apply_fn, self.schedule, self.cfg.diffusion.objective,
                          class_dropout_prob=self.class_dropout_prob,
                          null_label=self.null_label)
    if self.num_classes:
      return loss

    def unconditional(params, batch, rng):  # never feed labels to an unconditional model
      return loss(params, {"image": batch["image"]}, rng)

    return unconditional

  def dummy_inputs(self, batch_size: int = 1):
    """Zero inputs x [B, R, R, C], t [B], y [B] or None."""
    return dummy_inputs(self.model, batch_size)

  def init_params(self, rng: chex.PRNGKey) -> chex.ArrayTree:
    return init_params(self.model, rng)

  def abstract_params(self) -> chex.ArrayTree:
    """The parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves); nothing allocated."""
    return jax.eval_shape(self.init_params, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=64)
def _setup(text: str) -> Setup:
  cfg = from_json(text)
  k = int(cfg.model.get("num_classes", 0) or 0)
  p = float(cfg.model.get("class_dropout_prob", 0.0) or 0.0) if k else 0.0
  return Setup(cfg=cfg, model=build_model(model_kwargs(cfg)), schedule=_schedule(cfg),
               num_classes=k, class_dropout_prob=p, null_label=NULL_LABEL if p > 0 else None)


def setup(cfg: ml_collections.ConfigDict) -> Setup:
  """The `Setup` of `cfg`, built once per distinct config."""
  return _setup(to_json(cfg))
