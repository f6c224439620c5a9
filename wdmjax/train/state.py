"""The training state: step, parameters, EMA parameters, optimizer state and base PRNG key."""

from __future__ import annotations

import chex
import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """A pure pytree, so it can be jitted, donated, sharded and checkpointed as a whole.

  `rng` is a raw uint32 key [2]; the key of step s is `fold_in(rng, s)`, so a resumed run
  draws exactly the noise an uninterrupted run would have drawn.
  """

  step: chex.Array
  params: chex.ArrayTree
  ema_params: chex.ArrayTree
  opt_state: optax.OptState
  rng: chex.Array


def create_train_state(params: chex.ArrayTree, tx: optax.GradientTransformation,
                       rng: chex.Array) -> TrainState:
  """A step-0 state; the EMA starts as a copy of the parameters.

  The state holds copies: the jitted train step donates its state, which must not delete
  the caller's `params` (e.g. a base model fine-tuned twice).
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, params),
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    rng=rng)


def make_optimizer(lr: float, warmup_steps: int = 0, weight_decay: float = 0.0,
                   grad_clip: float | None = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps_root: float = 0.0) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate and global-norm gradient clipping.

  `eps_root` goes under Adam's square root (optax's `eps_root`): 0 for training; positive
  where the updates themselves are differentiated, since d sqrt(v) / dv is infinite at a
  gradient entry that is exactly zero (NaN once multiplied by that entry's zero).
  """
  schedule = (optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps > 0
              else optax.constant_schedule(lr))
  if warmup_steps > 0:
    schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [warmup_steps])
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps_root=eps_root,
                           weight_decay=weight_decay))
  return optax.chain(*parts)
