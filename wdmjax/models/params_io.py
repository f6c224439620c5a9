"""Parameters as flat `.npz` files ('a/b/kernel' -> array): shipped weights and exports."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wdmjax.errors import check
from wdmjax.files import save_npz


def save_params_npz(params: chex.ArrayTree, path: str, dtype=np.float16,
                    mode: int = 0o644) -> str:
  """Writes params as a flat compressed `.npz` in `dtype`, atomically (`mode` 0o600: a
  private file, never readable by others even while it is written)."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  return save_npz(path, {k: np.asarray(v, dtype) for k, v in flat.items()}, compressed=True,
                  mode=mode)


def load_params_npz(path: str) -> chex.ArrayTree:
  """The params saved by `save_params_npz`, as float32 jax arrays."""
  check(os.path.isfile(path), f"path: no such file {path!r}")
  with np.load(path) as z:
    flat = {k: jnp.asarray(z[k], jnp.float32) for k in z.files}
  return traverse_util.unflatten_dict(flat, sep="/")
