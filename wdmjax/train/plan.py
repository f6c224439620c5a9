"""Planning a run before renting the chips: parameters, state bytes per device under a given
(data, fsdp) mesh, model FLOPs per train step and the step time they imply on a chip.

Everything is computed from abstract shapes (`jax.eval_shape`, `jax.make_jaxpr`) on an
abstract mesh, so a 675M-parameter DiT-XL/2 on a 64-chip mesh is planned on a laptop in
seconds without allocating it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh

from wdmjax.errors import check
from wdmjax.models import count_params
from wdmjax.train.derived import setup
from wdmjax.train.sharding import MESH_AXES, state_shardings
from wdmjax.train.state import create_train_state
from wdmjax.train.step import train_step

# Dense bf16 peak TFLOP/s and memory (GiB) per chip, from the vendors' data sheets.
CHIPS: dict[str, tuple[float, float]] = {
    "v4": (275.0, 32.0), "v5e": (197.0, 16.0), "v5p": (459.0, 95.0), "v6e": (918.0, 32.0),
    "a100": (312.0, 80.0), "h100": (989.0, 80.0), "h200": (989.0, 141.0),
}


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  subs = []
  for v in params.values():
    for item in v if isinstance(v, (list, tuple)) else (v,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        subs.append(item.jaxpr)
      elif isinstance(item, jax.extend.core.Jaxpr):
        subs.append(item)
  return subs


def matmul_flops(jaxpr: Any) -> float:
  """FLOPs (2 per multiply-add) of every dot_general and convolution in a jaxpr, nested
  jaxprs (scan, cond, remat, custom_vjp) included.

  Elementwise work (norms, activations, softmax, the optimiser) is left out on purpose:
  this is the "model FLOPs" convention of MFU.
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      lhs = eqn.invars[0].aval.shape
      (contract, _), _ = eqn.params["dimension_numbers"]
      k = math.prod(lhs[d] for d in contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      k = math.prod(rhs[d] for d in rhs_spec[1:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
    # A scan runs its body `length` times; a cond runs one of its branches (the costliest
    # is counted: e.g. `lax.platform_dependent` keeps one per platform); other nested
    # jaxprs (remat, custom_vjp, pjit) run once.
    subs = [matmul_flops(sub) for sub in _sub_jaxprs(eqn.params)]
    if name == "cond":
      total += max(subs, default=0.0)
    else:
      total += (eqn.params.get("length", 1) if name == "scan" else 1) * sum(subs)
  return total


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What one train step of a config needs on a (data, fsdp) mesh."""

  params: int  # parameters of the network
  trainable: int  # of which the optimizer updates (all, or a PEFT strategy's share)
  batch: int  # global batch
  mesh: dict[str, int]
  state_bytes: int  # the whole TrainState (trainable params, EMA, optimizer moments)
  state_bytes_per_device: int  # its largest per-device shard total
  frozen_bytes_per_device: int  # PEFT's frozen weights, sharded by the same rule
  flops_per_step: float  # model (matmul) FLOPs of forward + backward on the global batch

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def step_seconds(self, chip: str, mfu: float) -> float:
    """The step time if every device runs at `mfu` of the chip's bf16 peak."""
    check(chip in CHIPS, f"chip: expected one of {sorted(CHIPS)}, got {chip!r}")
    check(0 < mfu <= 1, f"mfu: expected a fraction in (0, 1], got {mfu!r}")
    return self.flops_per_step / (self.devices * CHIPS[chip][0] * 1e12 * mfu)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _bytes_per_device(shapes, shardings) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings), strict=True):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


Split = Callable[[chex.ArrayTree], tuple[chex.ArrayTree, chex.ArrayTree,
                                          Callable[[chex.ArrayTree, chex.ArrayTree],
                                                   chex.ArrayTree]]]


def plan_step(cfg: ml_collections.ConfigDict, devices: int, fsdp: int | None = None,
              split: Split | None = None) -> StepPlan:
  """Plans one train step of `cfg` on `devices` chips split as (devices / fsdp, fsdp).

  Args:
    cfg: a validated config; `cfg.mesh.fsdp` unless `fsdp` is given.
    devices: chips in the mesh (data x fsdp).
    fsdp: the FSDP axis size, dividing `devices`.
    split: a fine-tune: `params -> (trainable, frozen, combine)` (e.g. a DiffFit split from
      `wdmjax.peft`), applied to abstract shapes. The state then holds the trainable part,
      the frozen weights are counted apart and their gradients are not computed.
  """
  fsdp = cfg.mesh.fsdp if fsdp is None else fsdp
  check(isinstance(devices, int) and devices >= 1,
        f"devices: expected an integer >= 1, got {devices!r}")
  check(isinstance(fsdp, int) and fsdp >= 1 and devices % fsdp == 0,
        f"fsdp: expected a divisor of devices={devices}, got {fsdp!r}")
  check(cfg.train.batch_size % devices == 0,
        f"train.batch_size: expected a multiple of the {devices} devices, got "
        f"{cfg.train.batch_size}")
  mesh = AbstractMesh((devices // fsdp, fsdp), MESH_AXES)
  min_size = cfg.mesh.fsdp_min_size
  su = setup(cfg)
  tx, tc, b = su.optimizer, cfg.train, cfg.train.batch_size
  x = jax.ShapeDtypeStruct((b, *su.image_shape), jnp.float32)
  y = jax.ShapeDtypeStruct((b,), jnp.int32)
  params = su.abstract_params()
  loss_fn = su.loss()
  trainable, frozen = params, None
  if split is not None:  # labels come from parameter paths, so shapes are enough
    trainable, frozen, combine = split(params)
    trainable = jax.eval_shape(lambda t: t, trainable)
  state = jax.eval_shape(lambda p: create_train_state(p, tx, jax.random.PRNGKey(0)), trainable)
  batch = {"image": x, "label": y}
  if frozen is None:
    jaxpr = jax.make_jaxpr(lambda s, bt: train_step(s, bt, loss_fn=loss_fn, tx=tx,
                                                      ema_decay=tc.ema_decay))(state, batch)
    frozen_bytes = 0
  else:
    def step(s, bt, fr):
      part = lambda p, bb, r: loss_fn(combine(p, fr), bb, r)
      return train_step(s, bt, loss_fn=part, tx=tx, ema_decay=tc.ema_decay)

    jaxpr = jax.make_jaxpr(step)(state, batch, frozen)
    frozen_bytes = _bytes_per_device(frozen, state_shardings(frozen, mesh, min_size))
  state_bytes = int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                        for s in jax.tree.leaves(state)))
  return StepPlan(params=count_params(params), trainable=count_params(trainable), batch=b,
                  mesh=dict(mesh.shape), state_bytes=state_bytes,
                  state_bytes_per_device=_bytes_per_device(
                    state, state_shardings(state, mesh, min_size)),
                  frozen_bytes_per_device=frozen_bytes,
                  flops_per_step=matmul_flops(jaxpr.jaxpr))
