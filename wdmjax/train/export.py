"""Parameters in and out of workdirs: flat float16 `.npz` exports and workdirs made from them.

The demo's base model ships as such an export (see experiments/make_demo_base.py), and
`workdir_from_params` turns it back into an ordinary workdir that every command accepts.
"""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from wdmjax.errors import check
from wdmjax.train.checkpoint import Checkpointer
from wdmjax.train.config import from_json, to_json
from wdmjax.train.loop import init_state, write_config
from wdmjax.train.sampling import model_from_config
from wdmjax.train.sharding import local_mesh
from wdmjax.train.state import make_optimizer


def save_params_npz(params: chex.ArrayTree, path: str, dtype=np.float16) -> str:
  """Writes params as a flat `.npz` ('a/b/kernel' -> array in `dtype`), atomically."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **{k: np.asarray(v, dtype) for k, v in flat.items()})
  os.replace(tmp, path)
  return path


def load_params_npz(path: str) -> chex.ArrayTree:
  """The params saved by `save_params_npz`, as float32 jax arrays."""
  check(os.path.isfile(path), f"params: no such file {path!r}")
  with np.load(path) as z:
    flat = {k: jnp.asarray(z[k], jnp.float32) for k in z.files}
  return traverse_util.unflatten_dict(flat, sep="/")


def save_config_json(cfg: ml_collections.ConfigDict, path: str) -> None:
  with open(path, "w") as f:
    f.write(to_json(cfg))


def load_config_json(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return from_json(f.read())


def workdir_from_params(cfg: ml_collections.ConfigDict, params: chex.ArrayTree, workdir: str,
                        step: int) -> str:
  """Makes `workdir` a trained run at `step` whose raw and EMA weights are both `params`."""
  model = model_from_config(cfg)
  tx = make_optimizer(cfg.train.lr, cfg.train.warmup_steps, cfg.train.weight_decay,
                      cfg.train.grad_clip)
  state = init_state(cfg, model, tx, local_mesh(), params)
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  write_config(cfg, workdir)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    ckpt.save(step, state)
  finally:
    ckpt.close()
  with open(os.path.join(workdir, "train_summary.json"), "w") as f:
    json.dump({"step": step, "seconds": 0.0, "from_params": True}, f)
  return workdir
