"""DDIM inversion: the deterministic DDIM chain run backwards, from an image x_0 to the
initial noise x_T that DDIM (eta = 0) would turn into it.

One DDIM step from x_n (time t_n) to x_p (the earlier time t_p) is
    x_p = sqrt(abar_p) x0_hat(x_n) + sqrt(1 - abar_p) eps_hat(x_n),
and inverting it needs the network at the unknown x_n. The usual inversion (Song et al.
2021, used by Tree-Ring and Gaussian Shading) evaluates the network at x_p instead, which is
exact only in the limit of many steps. With `fixed_point_iters` = K > 0 each step is then
refined K times by
    x_n <- x_n + sqrt(abar_n / abar_p) (x_p - step(x_n)),
a fixed-point iteration whose solution DDIM maps back onto x_p exactly (the factor is the
inverse of the step's linear part, so the iteration contracts whenever the network varies
slowly in x). The sampler's clipping of x0_hat and its objective are used as they are, so a
DDIM sample inverts to its own x_T; pixels whose x0_hat was clipped carry no information
about x_T and cannot be recovered exactly.

Shapes: images [B, H, W, C] in [-1, 1]; the result [B, H, W, C].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.diffusion.guidance import MAX_GUIDANCE, guided_model_fn
from wdmjax.diffusion.objectives import check_objective
from wdmjax.diffusion.samplers import DenoiseFn, _predict, ddim_sample
from wdmjax.diffusion.schedules import Schedule, check_steps, respaced_timesteps
from wdmjax.errors import check, check_number

MAX_FIXED_POINT_ITERS = 100


def ddim_invert(denoise_fn: DenoiseFn, schedule: Schedule, x0: chex.Array, *, steps: int = 50,
                objective: str = "eps", clip_denoised: bool = True,
                fixed_point_iters: int = 0) -> chex.Array:
  """x_T [B,H,W,C] such that `ddim_sample(denoise_fn, schedule, x_T, steps=steps)` ~ x0.

  `denoise_fn(x_in, t) -> out` as for the samplers (bind guidance into it to invert a guided
  chain). `fixed_point_iters` = 0 is the usual approximate inversion; K > 0 refines every
  step K times (K + 1 network calls per step) towards the exact inverse of the sampler.
  """
  check_objective(objective)
  chex.assert_rank(x0, 4)
  ts = respaced_timesteps(schedule.num_timesteps, steps)
  t_next = jnp.asarray(ts, jnp.int32)  # forward order: t_1 < ... < t_S
  t_prev = jnp.asarray(np.concatenate([[-1], ts[:-1]]), jnp.int32)
  ac = schedule.alphas_cumprod
  predict = functools.partial(_predict, denoise_fn, None, objective, schedule)

  def body(x_p, inp):
    t_p, t_n = inp
    a_n = ac[t_n]
    a_p = jnp.where(t_p >= 0, ac[jnp.maximum(t_p, 0)], 1.0)
    # The usual inversion: the network's noise estimate at x_p stands in for the one at x_n.
    _, eps = predict(x_p, t_n, clip_denoised)
    x0_hat = (x_p - jnp.sqrt(1.0 - a_p) * eps) / jnp.sqrt(a_p)
    x_n = jnp.sqrt(a_n) * x0_hat + jnp.sqrt(1.0 - a_n) * eps

    def refine(_, x_n):
      x0_n, eps_n = predict(x_n, t_n, clip_denoised)
      step = jnp.sqrt(a_p) * x0_n + jnp.sqrt(1.0 - a_p) * eps_n
      return x_n + jnp.sqrt(a_n / a_p) * (x_p - step)

    # (A per-image secant slope converged faster on smooth toy networks but slower on the
    # trained DiT, whose clipped x0 makes the step flat in places: the plain iteration stays.)
    x_n = jax.lax.fori_loop(0, fixed_point_iters, refine, x_n)
    return x_n, None

  x_T, _ = jax.lax.scan(body, x0, (t_prev, t_next))
  return x_T


def _denoiser(model_fn, params, y, guided, guidance_scale, null_label):
  if guided:
    return guided_model_fn(model_fn, params, y, guidance_scale, null_label)
  return lambda x, t: model_fn(params, x, t, y)


@functools.partial(jax.jit, static_argnames=(
    "model_fn", "steps", "objective", "clip_denoised", "guided", "fixed_point_iters"))
def _invert_jit(model_fn, params, schedule, x0, y, guidance_scale, null_label, *, steps,
                objective, clip_denoised, guided, fixed_point_iters):
  denoise = _denoiser(model_fn, params, y, guided, guidance_scale, null_label)
  return ddim_invert(denoise, schedule, x0, steps=steps, objective=objective,
                     clip_denoised=clip_denoised, fixed_point_iters=fixed_point_iters)


@functools.partial(jax.jit, static_argnames=(
    "model_fn", "steps", "objective", "clip_denoised", "guided"))
def _generate_jit(model_fn, params, schedule, x_T, y, guidance_scale, null_label, *, steps,
                  objective, clip_denoised, guided):
  denoise = _denoiser(model_fn, params, y, guided, guidance_scale, null_label)
  return ddim_sample(denoise, schedule, x_T, steps=steps, objective=objective,
                     clip_denoised=clip_denoised)


def _check_guidance(y, guidance_scale, null_label) -> bool:
  guided = guidance_scale is not None
  if guided:
    check_number(guidance_scale, "guidance_scale", -MAX_GUIDANCE, MAX_GUIDANCE)
    check(y is not None and null_label is not None,
          "guidance_scale: classifier-free guidance needs labels y and a null_label")
  return guided


def invert(model_fn: Callable, params: chex.ArrayTree, schedule: Schedule, x0: chex.Array, *,
           steps: int = 50, objective: str = "eps", y: chex.Array | None = None,
           guidance_scale: float | None = None, null_label: int | None = None,
           clip_denoised: bool = True, fixed_point_iters: int = 0) -> chex.Array:
  """Jitted DDIM inversion of images x0 [B,H,W,C] with `model_fn(params, x, t, y)`.

  Without a guidance scale the network sees `y` as given (the null label: the unconditional
  chain, which is what a detector that does not know the prompt inverts). Returns x_T.
  """
  check(jnp.ndim(x0) == 4, f"images: expected shape [B, H, W, C], got {jnp.shape(x0)}")
  check_steps(steps, schedule.num_timesteps)
  check(isinstance(fixed_point_iters, int) and 0 <= fixed_point_iters <= MAX_FIXED_POINT_ITERS,
        f"fixed_point_iters: expected an integer in [0, {MAX_FIXED_POINT_ITERS}], "
        f"got {fixed_point_iters!r}")
  guided = _check_guidance(y, guidance_scale, null_label)
  return _invert_jit(model_fn, params, schedule, jnp.asarray(x0, jnp.float32), y,
                     jnp.float32(guidance_scale if guided else 0.0),
                     jnp.int32(null_label if null_label is not None else 0), steps=int(steps),
                     objective=objective, clip_denoised=clip_denoised, guided=guided,
                     fixed_point_iters=int(fixed_point_iters))


def generate(model_fn: Callable, params: chex.ArrayTree, schedule: Schedule, x_T: chex.Array, *,
             steps: int = 50, objective: str = "eps", y: chex.Array | None = None,
             guidance_scale: float | None = None, null_label: int | None = None,
             clip_denoised: bool = True) -> chex.Array:
  """Jitted deterministic DDIM from a given x_T [B,H,W,C] (the partner of `invert`: the
  generation-time watermarks choose x_T themselves). Returns x_0 [B,H,W,C]."""
  check(jnp.ndim(x_T) == 4, f"x_T: expected shape [B, H, W, C], got {jnp.shape(x_T)}")
  check_steps(steps, schedule.num_timesteps)
  guided = _check_guidance(y, guidance_scale, null_label)
  return _generate_jit(model_fn, params, schedule, jnp.asarray(x_T, jnp.float32), y,
                       jnp.float32(guidance_scale if guided else 0.0),
                       jnp.int32(null_label if null_label is not None else 0), steps=int(steps),
                       objective=objective, clip_denoised=clip_denoised, guided=guided)


def ddim_from(denoise_fn: DenoiseFn, schedule: Schedule, x_t: chex.Array, t: int, *,
              steps: int = 20, objective: str = "eps", clip_denoised: bool = True
              ) -> chex.Array:
  """Deterministic DDIM from x_t at step t (not T) down to x_0 in `steps` steps evenly spaced
  over [0, t]: the second half of a regeneration attack (noise an image to t, denoise it)."""
  check_objective(objective)
  ts = np.unique(np.round(np.linspace(0, t, steps + 1)).astype(np.int32))[::-1]
  ac = schedule.alphas_cumprod
  predict = functools.partial(_predict, denoise_fn, None, objective, schedule)

  def body(x, inp):
    t_n, t_p = inp
    x0, eps = predict(x, t_n, clip_denoised)
    a_p = jnp.where(t_p >= 0, ac[jnp.maximum(t_p, 0)], 1.0)
    return jnp.sqrt(a_p) * x0 + jnp.sqrt(1.0 - a_p) * eps, None

  pairs = (jnp.asarray(ts, jnp.int32), jnp.asarray(np.append(ts[1:], -1), jnp.int32))
  x, _ = jax.lax.scan(body, x_t, pairs)
  return x


@functools.partial(jax.jit, static_argnames=("model_fn", "t", "steps", "objective",
                                             "clip_denoised"))
def _regenerate_jit(model_fn, params, schedule, x0, y, key, *, t, steps, objective,
                    clip_denoised):
  a = schedule.alphas_cumprod[t]
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * jax.random.normal(key, x0.shape, x0.dtype)
  return ddim_from(lambda x, tt: model_fn(params, x, tt, y), schedule, x_t, t, steps=steps,
                   objective=objective, clip_denoised=clip_denoised)


def regenerate(model_fn: Callable, params: chex.ArrayTree, schedule: Schedule, x0: chex.Array,
               t: int, key: chex.PRNGKey, *, steps: int = 20, objective: str = "eps",
               y: chex.Array | None = None, clip_denoised: bool = True) -> chex.Array:
  """The regeneration attack: images x0 [B,H,W,C] noised to step t (q_sample with `key`) and
  denoised by DDIM with another model's `model_fn(params, x, t, y)`. Returns [B,H,W,C]."""
  check(jnp.ndim(x0) == 4, f"images: expected shape [B, H, W, C], got {jnp.shape(x0)}")
  check(isinstance(t, int | np.integer) and 1 <= t < schedule.num_timesteps,
        f"t: expected an integer in [1, {schedule.num_timesteps - 1}], got {t!r}")
  check_steps(steps, int(t))
  return _regenerate_jit(model_fn, params, schedule, jnp.asarray(x0, jnp.float32), y, key,
                         t=int(t), steps=int(steps), objective=objective,
                         clip_denoised=clip_denoised)
