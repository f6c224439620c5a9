"""Parameters in and out of workdirs: workdirs made from parameters, configs as JSON files.

The demo's base model ships as a flat float16 `.npz` (`wdmjax.models.save_params_npz`) and a
config JSON (see experiments/make_demo_base.py); `workdir_from_params` turns such parameters
back into an ordinary workdir that every command accepts.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
import ml_collections

from wdmjax.configs import from_json, to_json
from wdmjax.files import atomic_write
from wdmjax.train.checkpoint import Checkpointer
from wdmjax.train.loop import init_state
from wdmjax.train.sharding import local_mesh
from wdmjax.workdir import Workdir


def save_config_json(cfg: ml_collections.ConfigDict, path: str) -> str:
  return atomic_write(path, to_json(cfg))


def load_config_json(path: str) -> ml_collections.ConfigDict:
  with open(path) as f:
    return from_json(f.read())


def workdir_from_params(cfg: ml_collections.ConfigDict, params: chex.ArrayTree,
                        workdir: str | Workdir, step: int) -> Workdir:
  """Makes `workdir` a trained run at `step` whose raw and EMA weights are both `params`."""
  wd = Workdir(workdir)
  state = init_state(cfg, local_mesh(), params)
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  wd.write_config(cfg)
  ckpt = Checkpointer(wd, keep=cfg.train.keep_checkpoints)
  try:
    ckpt.save(step, state)
  finally:
    ckpt.close()
  wd.write_json(Workdir.SUMMARY, {"step": step, "seconds": 0.0, "from_params": True})
  return wd
