"""The train step: a pure function (state, batch) -> (state, metrics), jitted over a mesh."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wdmjax.errors import check
from wdmjax.train.sharding import FSDP_MIN_SIZE, batch_sharding, state_shardings
from wdmjax.train.state import TrainState

LossFn = Callable[[chex.ArrayTree, dict, chex.PRNGKey], tuple[chex.Array, dict]]


def ema_decay_at(step: chex.Array, decay: float) -> chex.Array:
  """EMA decay with warm-up, min(decay, (1 + step) / (10 + step)): early in training the
  average must forget the random initialisation quickly, or short runs sample from a blend
  of the initial and the trained weights."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: chex.ArrayTree, params: chex.ArrayTree, decay: chex.Numeric
               ) -> chex.ArrayTree:
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, ema_decay: float) -> tuple[TrainState, dict]:
  """One optimizer step on the global batch.

  `loss_fn(params, batch, rng) -> (loss, metrics)` is the method (plain diffusion, WDP, ...);
  the engine only differentiates it, updates parameters and the EMA, and counts steps.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # Checked on the host one step later (no sync per step): a run stops at the first step
  # whose loss, gradient or new weights are not finite, before anything of it is saved.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  for leaf in jax.tree.leaves(params):
    finite &= jnp.isfinite(leaf).all()
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite)
  new_state = state.replace(step=state.step + 1, params=params,
                            ema_params=ema_update(state.ema_params, params,
                                                  ema_decay_at(state.step, ema_decay)),
                            opt_state=opt_state)
  return new_state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, ema_decay: float,
                    mesh: Mesh, frozen: chex.ArrayTree | None = None,
                    combine: Callable[[chex.ArrayTree, chex.ArrayTree], chex.ArrayTree]
                    | None = None, state_sharding: chex.ArrayTree | None = None,
                    fsdp_min_size: int = FSDP_MIN_SIZE
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step` compiled with `jax.jit`: the batch is split over every batch axis of the
  mesh (`data`, and `fsdp` where present), the state is donated (its buffers are reused
  for the new state) and laid out as `state_sharding` (a pytree of shardings, e.g.
  `sharding.state_shardings` for FSDP), replicated by default. Metrics come back replicated.

  Parameter-efficient fine-tuning: the state holds only the trainable parameters, `frozen`
  the rest, and the loss sees `combine(trainable, frozen)` (e.g. `wdmjax.peft.merge`). The
  gradient is taken with respect to the trainable part alone, so the frozen weights'
  gradients are never computed, and the optimizer and the EMA never see them. `frozen` is
  placed on the mesh once (sharded by the FSDP rule, leaves of at least `fsdp_min_size`
  elements) and passed to every step (not donated,
  not baked into the program).
  """
  replicated = NamedSharding(mesh, P())
  batch = batch_sharding(mesh)
  state_sharding = replicated if state_sharding is None else state_sharding

  if frozen is None:
    def step(state, batch):
      return train_step(state, batch, loss_fn=loss_fn, tx=tx, ema_decay=ema_decay)

    return jax.jit(step, in_shardings=(state_sharding, batch),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)

  check(combine is not None, "combine: expected a function (trainable, frozen) -> params")

  def partial_step(state, batch, frozen):
    part_loss = lambda p, b, r: loss_fn(combine(p, frozen), b, r)
    return train_step(state, batch, loss_fn=part_loss, tx=tx, ema_decay=ema_decay)

  frozen_sharding = state_shardings(frozen, mesh, fsdp_min_size)
  jitted = jax.jit(partial_step, in_shardings=(state_sharding, batch, frozen_sharding),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)
  if jax.process_count() > 1:  # from each process's own copy onto the global mesh
    frozen = jax.device_get(frozen)
  frozen = jax.device_put(frozen, frozen_sharding)

  def step(state, batch):
    return jitted(state, batch, frozen)

  step.jitted, step.frozen = jitted, frozen  # for ahead-of-time lowering (benchmarks)
  return step
