"""The DDPM forward process q(x_t | x_0) and its posterior q(x_{t-1} | x_t, x_0)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from wdmjax.diffusion.schedules import Schedule


def coef_at(a: chex.Array, t: chex.Array, ndim: int) -> chex.Array:
  """Gathers a[t] for a batch of timesteps t [B] and reshapes to [B, 1, ..., 1] (ndim dims)."""
  return a[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: chex.Array, t: chex.Array, noise: chex.Array) -> chex.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

  Args:
    x0: [B, H, W, C] clean images in [-1, 1].
    t: [B] int timesteps in [0, T).
    noise: [B, H, W, C] standard normal.
  Returns:
    x_t: [B, H, W, C].
  """
  chex.assert_equal_shape([x0, noise])
  chex.assert_shape(t, (x0.shape[0],))
  ac = coef_at(schedule.alphas_cumprod, t, x0.ndim)
  return jnp.sqrt(ac) * x0 + jnp.sqrt(1.0 - ac) * noise


def q_posterior(schedule: Schedule, x0: chex.Array, xt: chex.Array, t: chex.Array
                ) -> tuple[chex.Array, chex.Array, chex.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0).

  Args:
    x0, xt: [B, ...]; t: [B] int timesteps.
  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...]).
  """
  ac = coef_at(schedule.alphas_cumprod, t, xt.ndim)
  ac_prev = coef_at(schedule.alphas_cumprod_prev, t, xt.ndim)
  beta = coef_at(schedule.betas, t, xt.ndim)
  coef0 = beta * jnp.sqrt(ac_prev) / (1.0 - ac)
  coeft = (1.0 - ac_prev) * jnp.sqrt(1.0 - beta) / (1.0 - ac)
  var = beta * (1.0 - ac_prev) / (1.0 - ac)
  # At t = 0 the posterior variance is 0; improved-DDPM clips the log at the t = 1 value.
  b, acs = schedule.betas, schedule.alphas_cumprod
  var1 = b[1] * (1.0 - acs[0]) / (1.0 - acs[1]) if schedule.num_timesteps > 1 else b[0]
  log_var = jnp.log(jnp.maximum(var, var1))
  return coef0 * x0 + coeft * xt, var, log_var


def sample_timesteps(rng: chex.PRNGKey, batch: int, num_timesteps: int) -> chex.Array:
  """Uniform timesteps [batch] int32 in [0, T)."""
  return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
