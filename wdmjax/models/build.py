"""Building score networks from configs, initialising and counting their parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import WdmjaxError
from wdmjax.models.dit import DIT_PRESETS, DiT
from wdmjax.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT}

# Fields given as lists in a config but stored as tuples (modules must stay hashable).
_TUPLE_FIELDS = ("ch_mult", "attn_resolutions")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _fields(cls: type[nn.Module]) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _to_dict(model_cfg: Any) -> dict[str, Any]:
  if hasattr(model_cfg, "to_dict"):  # ml_collections.ConfigDict
    model_cfg = model_cfg.to_dict()
  if not isinstance(model_cfg, Mapping):
    raise WdmjaxError("model_cfg: expected a mapping or ConfigDict, "
                      f"got {type(model_cfg).__name__}")
  return dict(model_cfg)


def build_model(model_cfg: Any) -> nn.Module:
  """Builds a UNet or DiT from a mapping / ConfigDict.

  `name` picks the class ('unet' or 'dit'); every other key is a field of that class.
  A DiT config may also give `preset` (a key of DIT_PRESETS, e.g. 'XL/2') whose values
  are defaults that explicit keys override. `dtype` may be a string ('bfloat16').

  Raises:
    WdmjaxError: unknown name, unknown key, or inconsistent hyper-parameters.
  """
  cfg = _to_dict(model_cfg)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise WdmjaxError(f"model.name: expected one of {sorted(MODELS)}, got {name!r}")
  cls = MODELS[name]
  preset = cfg.pop("preset", None)
  if preset is not None:
    if name != "dit" or preset not in DIT_PRESETS:
      expected = sorted(DIT_PRESETS) if name == "dit" else "no preset for 'unet'"
      raise WdmjaxError(f"model.preset: expected one of {expected}, got {preset!r}")
    cfg = {**DIT_PRESETS[preset], **cfg}
  known = _fields(cls)
  for key in cfg:
    if key not in known:
      raise WdmjaxError(f"model.{key}: unknown key for model {name!r}; expected one of {known}")
  for key in _TUPLE_FIELDS:
    if key in cfg and cfg[key] is not None:
      cfg[key] = tuple(cfg[key])
  if isinstance(cfg.get("dtype"), str):
    if cfg["dtype"] not in _DTYPES:
      raise WdmjaxError(f"model.dtype: expected one of {sorted(_DTYPES)}, got {cfg['dtype']!r}")
    cfg["dtype"] = _DTYPES[cfg["dtype"]]
  try:
    model = cls(**cfg)
  except TypeError as e:  # a missing required field such as resolution
    raise WdmjaxError(f"model_cfg: {e}") from None
  model.check_config()
  return model


def dummy_inputs(model: nn.Module, batch_size: int = 1
                 ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Zero inputs of the right shapes: x [B, R, R, C] float32, t [B] int32, y [B] or None."""
  x = jnp.zeros((batch_size, model.resolution, model.resolution, model.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  y = jnp.zeros((batch_size,), jnp.int32) if model.num_classes > 0 else None
  return x, t, y


def init_params(model: nn.Module, rng: jax.Array, batch_size: int = 1) -> chex.ArrayTree:
  """Initialises `model` on dummy inputs (train=False) and returns its 'params' collection."""
  x, t, y = dummy_inputs(model, batch_size)
  init = jax.jit(lambda r: model.init({"params": r}, x, t, y, train=False)["params"])
  return init(rng)


def count_params(params: chex.ArrayTree) -> int:
  """Number of scalars in a parameter tree (arrays or jax.ShapeDtypeStruct leaves)."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params)))


def param_count_from_config(model_cfg: Any) -> int:
  """Parameter count of the model a config describes, via jax.eval_shape (no allocation)."""
  model = build_model(model_cfg)
  shapes = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
  return count_params(shapes)
