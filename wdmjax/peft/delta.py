"""Delta checkpoints: the trainable leaves of a fine-tune plus a reference to its base.

A delta is `delta.npz` (the trainable leaves, float32, '/'-joined paths) beside `peft.json`
(strategy, base workdir, the base parameters' content hash). Applying it needs the same
base: a different one is refused, so a delta never lands silently on the wrong model.
"""

from __future__ import annotations

import hashlib
import os

import chex
import jax
import numpy as np
from flax import traverse_util

from wdmjax.errors import check
from wdmjax.files import save_npz


def params_hash(params: chex.ArrayTree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (sorted by path)."""
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  for k in sorted(flat):
    a = np.ascontiguousarray(flat[k])
    h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save_delta(trainable: chex.ArrayTree, path: str) -> str:
  """Writes the trainable leaves (float32, exact) to `path` (.npz), atomically."""
  flat = traverse_util.flatten_dict(jax.device_get(trainable), sep="/")
  return save_npz(path, {k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_delta(path: str) -> dict:
  check(os.path.isfile(path), f"delta: no such file {path!r}")
  with np.load(path) as z:
    flat = {k: np.asarray(z[k]) for k in z.files}
  return traverse_util.unflatten_dict(flat, sep="/")


def check_base(base_params: chex.ArrayTree, expected_hash: str, base: str) -> None:
  """Refuses a base whose parameters differ from the ones the delta was trained on."""
  got = params_hash(base_params)
  check(got == expected_hash,
        f"base: the parameters in {base!r} are not the base this fine-tune was trained on "
        f"(content hash {got[:12]}..., expected {expected_hash[:12]}...)")
