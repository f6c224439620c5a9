"""Noise schedules of the DDPM forward process (DDPM linear betas, improved-DDPM cosine)."""

from __future__ import annotations

import math

import chex
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check


@chex.dataclass(frozen=True)
class Schedule:
  """All per-timestep constants of a discrete diffusion process with T steps.

  Every field is a float32 array of shape [T]; index t is the t-th forward step (0-based), so
  `alphas_cumprod[t]` is abar_{t+1} in the paper's 1-based notation.
  """

  betas: chex.Array
  alphas_cumprod: chex.Array
  alphas_cumprod_prev: chex.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def sqrt_alphas_cumprod(self) -> chex.Array:
    return jnp.sqrt(self.alphas_cumprod)

  @property
  def sqrt_one_minus_alphas_cumprod(self) -> chex.Array:
    return jnp.sqrt(1.0 - self.alphas_cumprod)


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear betas, [T] float64."""
  check(num_timesteps >= 1, f"num_timesteps: expected >= 1, got {num_timesteps}")
  check(0.0 < beta_start <= beta_end < 1.0,
        f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, "
        f"got {beta_start}, {beta_end}")
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008,
                 max_beta: float = 0.999) -> np.ndarray:
  """Improved-DDPM cosine schedule: abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), [T] float64."""
  check(num_timesteps >= 1, f"num_timesteps: expected >= 1, got {num_timesteps}")
  f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
           for i in range(num_timesteps)]
  return np.asarray(betas, dtype=np.float64)


def schedule_from_betas(betas: np.ndarray) -> Schedule:
  """Builds a `Schedule` from betas [T] (cumulative products in float64, stored as float32)."""
  betas = np.asarray(betas, dtype=np.float64)
  check(betas.ndim == 1 and betas.size >= 1, f"betas: expected shape [T], got {betas.shape}")
  check(bool(np.all((betas > 0) & (betas < 1))), "betas: expected every value in (0, 1)")
  ac = np.cumprod(1.0 - betas)
  ac_prev = np.concatenate([[1.0], ac[:-1]])
  f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
  return Schedule(betas=f32(betas), alphas_cumprod=f32(ac), alphas_cumprod_prev=f32(ac_prev))


def make_schedule(name: str = "linear", num_timesteps: int = 1000, **kwargs) -> Schedule:
  """`name` in {'linear', 'cosine'}; kwargs go to `linear_betas` / `cosine_betas`."""
  builders = {"linear": linear_betas, "cosine": cosine_betas}
  check(name in builders, f"schedule: expected one of {sorted(builders)}, got {name!r}")
  return schedule_from_betas(builders[name](num_timesteps, **kwargs))


def check_steps(steps, num_timesteps: int) -> int:
  """A number of sampling steps: an integer in [1, T] (the steps are respaced over the T-step
  process); returns it as an int."""
  check(isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
        and 1 <= steps <= num_timesteps,
        f"steps: expected an integer in [1, {num_timesteps}], got {steps!r}")
  return int(steps)


def respaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
  """`steps` evenly spaced timesteps of a T-step process, increasing, always ending at T-1.

  Returns an int32 array [steps]; steps == T gives arange(T).
  """
  check_steps(steps, num_timesteps)
  ts = np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int32)
  return ts
