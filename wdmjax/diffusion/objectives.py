"""The three equivalent training objectives (eps, x0, v) and conversions between them.

With a = sqrt(abar_t), s = sqrt(1 - abar_t) and x_t = a x0 + s eps:
  eps-prediction (DDPM), x0-prediction, and v = a eps - s x0 (progressive distillation).
Any one of (eps, x0, v) and x_t determines the other two:
  x0 = (x_t - s eps) / a,   x0 = a x_t - s v,   eps = s x_t + a v.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from wdmjax.diffusion.process import coef_at, q_sample, sample_timesteps
from wdmjax.diffusion.schedules import Schedule
from wdmjax.errors import check

OBJECTIVES = ("eps", "x0", "v")


def check_objective(objective: str) -> None:
  check(objective in OBJECTIVES,
        f"objective: expected one of {list(OBJECTIVES)}, got {objective!r}")


def _coefs(schedule: Schedule, t: chex.Array, ndim: int) -> tuple[chex.Array, chex.Array]:
  ac = coef_at(schedule.alphas_cumprod, t, ndim)
  return jnp.sqrt(ac), jnp.sqrt(1.0 - ac)


def target(objective: str, schedule: Schedule, x0: chex.Array, noise: chex.Array,
           t: chex.Array) -> chex.Array:
  """The regression target of `objective` for clean x0 [B, ...] and noise eps [B, ...]."""
  check_objective(objective)
  if objective == "eps":
    return noise
  if objective == "x0":
    return x0
  a, s = _coefs(schedule, t, x0.ndim)
  return a * noise - s * x0


def to_x0_eps(objective: str, schedule: Schedule, out: chex.Array, xt: chex.Array,
              t: chex.Array) -> tuple[chex.Array, chex.Array]:
  """Converts a network output under `objective` into (x0_hat, eps_hat), both [B, ...]."""
  check_objective(objective)
  a, s = _coefs(schedule, t, xt.ndim)
  if objective == "eps":
    return (xt - s * out) / a, out
  if objective == "x0":
    return out, (xt - a * out) / s
  return a * xt - s * out, s * xt + a * out


def eps_from_x0(schedule: Schedule, x0: chex.Array, xt: chex.Array, t: chex.Array) -> chex.Array:
  """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
  a, s = _coefs(schedule, t, xt.ndim)
  return (xt - a * x0) / s


# A network as the engine sees it: (params, x_t [B,H,W,C], t [B], y [B] or None, rng, train)
# -> output [B,H,W,C'] (C' = 2C when the model also learns its variance; only the first C
# channels are the objective's prediction).
ApplyFn = Callable[..., chex.Array]


def diffusion_loss(apply_fn: ApplyFn, schedule: Schedule, objective: str = "eps",
                   class_dropout_prob: float = 0.0, null_label: int | None = None,
                   input_transform: Callable[[chex.Array, chex.Array], chex.Array] | None = None
                   ) -> Callable[[chex.ArrayTree, dict, chex.PRNGKey],
                                 tuple[chex.Array, dict]]:
  """The simple (unweighted MSE) DDPM loss for any of the three objectives.

  Returns `loss_fn(params, batch, rng) -> (loss, metrics)` with `batch['image']: [B, H, W, C]`
  in [-1, 1] and optional `batch['label']: [B]`. With `class_dropout_prob > 0` labels are
  replaced by `null_label` at that rate, which trains the unconditional branch that
  classifier-free guidance needs. `input_transform(x_t, t)` changes what the network sees
  (not the target): WDM's watermark process feeds `gamma1 * x_t + (1 - gamma1) * tau`.
  """
  check_objective(objective)
  check(0.0 <= class_dropout_prob < 1.0,
        f"class_dropout_prob: expected a value in [0, 1), got {class_dropout_prob}")
  check(class_dropout_prob == 0.0 or null_label is not None,
        "null_label: expected the null class index when class_dropout_prob > 0, got None")

  def loss_fn(params, batch, rng):
    x0 = batch["image"]
    chex.assert_rank(x0, 4)
    y = batch.get("label")
    rng_t, rng_n, rng_y, rng_d = jax.random.split(rng, 4)
    t = sample_timesteps(rng_t, x0.shape[0], schedule.num_timesteps)
    noise = jax.random.normal(rng_n, x0.shape, x0.dtype)
    xt = q_sample(schedule, x0, t, noise)
    if y is not None and class_dropout_prob > 0:
      drop = jax.random.bernoulli(rng_y, class_dropout_prob, y.shape)
      y = jnp.where(drop, null_label, y)
    x_in = xt if input_transform is None else input_transform(xt, t)
    out = apply_fn(params, x_in, t, y, rng_d, True)
    out = out[..., : x0.shape[-1]]
    err = (out.astype(jnp.float32) - target(objective, schedule, x0, noise, t)) ** 2
    loss = jnp.mean(err)
    return loss, {"loss": loss}

  return loss_fn
