"""Configs: Python files with `get_config() -> ConfigDict`, loadable by name or path.

Every preset is one file in this package (`mnist5k_dit.py`, `dit_xl2_imagenet256.py`, ...),
so a host with only the installed wheel can run `--config mnist5k_dit`; a user's own file
with a `get_config()` works the same way. `load_config` merges the file's sections over the
defaults of `schema.default_config()`, applies `section.key=value` overrides, validates and
locks the result.
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from wdmjax.configs.schema import (
  BASE_SECTIONS,
  FSDP_MIN_SIZE,
  apply_override,
  apply_overrides,
  default_config,
  from_json,
  merge,
  to_json,
  validate,
)
from wdmjax.errors import WdmjaxError, check

_NOT_CONFIGS = ("__init__", "schema")


def shipped_configs() -> list[str]:
  """The names of the configs that ship with the package (files of `wdmjax/configs/`)."""
  files = importlib.resources.files(__name__).iterdir()
  return sorted(f.name[:-3] for f in files
                if f.name.endswith(".py") and f.name[:-3] not in _NOT_CONFIGS)


def config_path(name: str) -> str:
  """The file of the shipped config `name`, e.g. to copy and edit."""
  check(name in shipped_configs(), f"config: expected one of {shipped_configs()}, got {name!r}")
  return str(importlib.resources.files(__name__) / f"{name}.py")


def _get_config(path_or_name: str):
  if not os.path.isfile(path_or_name) and path_or_name in shipped_configs():
    return importlib.import_module(f"{__name__}.{path_or_name}").get_config()
  check(os.path.isfile(path_or_name),
        f"config: expected a config file or one of {shipped_configs()}, got {path_or_name!r}")
  spec = importlib.util.spec_from_file_location("wdmjax_user_config", path_or_name)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report where, not a traceback
    raise WdmjaxError(f"config: could not execute {path_or_name!r}: {type(e).__name__}: "
                      f"{e}") from e
  check(hasattr(module, "get_config"), f"config: {path_or_name!r} defines no get_config()")
  return module.get_config()


def load_config(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `config` (a Python file defining `get_config()`, or the name of a shipped config),
  merges it over the defaults, applies `key=value` overrides (`train.steps=100`) and
  returns it validated and locked."""
  user = _get_config(config)
  cfg = merge(default_config(), user.to_dict() if hasattr(user, "to_dict") else dict(user))
  for item in overrides:
    apply_override(cfg, item)
  return validate(cfg)


__all__ = ["BASE_SECTIONS", "FSDP_MIN_SIZE", "apply_override", "apply_overrides", "config_path",
           "default_config", "from_json", "load_config", "merge", "shipped_configs", "to_json",
           "validate"]
