"""DDPM ancestral and DDIM samplers, each one `jax.lax.scan` over the reverse steps.

Every sampler takes
  * `denoise_fn(x_in [B,H,W,C], t [B] int32) -> out [B,H,W,C']`, the network with its
    parameters (and labels, guidance) bound; only the first C output channels are used;
  * a noise stream: a PRNG key (the k-th reverse step draws from `fold_in(key, k)`) or an
    explicit array [S, B, H, W, C] whose k-th slice is the noise of the k-th reverse step
    (k = 0 is the step that leaves x_T);
  * an optional `input_transform(x_t, t) -> x_in` applied to the chain state before it is
    fed to the network (WDM extraction feeds gamma1 * x_t + (1 - gamma1) * tau) while the
    update itself uses the untransformed x_t;
  * any number of steps S <= T: the steps are respaced over the T-step process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.diffusion.guidance import MAX_GUIDANCE, guided_model_fn
from wdmjax.diffusion.objectives import check_objective, eps_from_x0, to_x0_eps
from wdmjax.diffusion.schedules import Schedule, respaced_timesteps
from wdmjax.errors import check, check_number

DenoiseFn = Callable[[chex.Array, chex.Array], chex.Array]
InputTransform = Callable[[chex.Array, chex.Array], chex.Array]
SAMPLERS = ("ddpm", "ddim")
VARIANCES = ("fixed_large", "fixed_small")


def _noise_at(noise: chex.Array, k: chex.Array, shape, dtype) -> chex.Array:
  """The k-th noise draw of a stream that is a key or an explicit [S, ...] array."""
  if _is_key(noise):
    return jax.random.normal(jax.random.fold_in(noise, k), shape, dtype)
  return noise[k]


def _is_key(noise) -> bool:
  if isinstance(noise, jax.Array) and jnp.issubdtype(noise.dtype, jax.dtypes.prng_key):
    return True
  return getattr(noise, "dtype", None) == jnp.uint32 and noise.shape == (2,)


def _check_stream(noise, x_T: chex.Array, steps: int) -> None:
  if noise is None or _is_key(noise):
    return
  check(tuple(noise.shape) == (steps,) + tuple(x_T.shape),
        f"noise: expected a PRNG key or an array of shape {(steps,) + tuple(x_T.shape)}, "
        f"got shape {tuple(noise.shape)}")


def _predict(denoise_fn, input_transform, objective, schedule, x, t, clip):
  """Network call at chain state x: returns (x0_hat, eps_hat), with x0 clipped to [-1, 1]."""
  tb = jnp.full((x.shape[0],), t, jnp.int32)
  x_in = x if input_transform is None else input_transform(x, tb)
  out = denoise_fn(x_in, tb)[..., : x.shape[-1]].astype(x.dtype)
  x0, eps = to_x0_eps(objective, schedule, out, x, tb)
  if clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = eps_from_x0(schedule, x0, x, tb)
  return x0, eps


def ddim_sample(denoise_fn: DenoiseFn, schedule: Schedule, x_T: chex.Array, noise=None, *,
                steps: int = 50, eta: float = 0.0, objective: str = "eps",
                input_transform: InputTransform | None = None,
                clip_denoised: bool = True) -> chex.Array:
  """DDIM (Song et al. 2021) from x_T [B,H,W,C] in `steps` respaced steps; returns x_0.

  eta = 0 is the deterministic DDIM; eta = 1 matches DDPM's posterior variance (eta in
  [0, 1]: beyond 1 the noise would exceed the variance the step leaves).
  `noise` (key or [steps, B, H, W, C]) is only read when eta > 0.
  """
  check_objective(objective)
  if isinstance(eta, (int, float)):  # a traced eta is checked by `sample`
    check_number(eta, "eta", 0, 1)
  ts = respaced_timesteps(schedule.num_timesteps, steps)
  _check_stream(noise, x_T, steps)
  check(noise is not None or not (isinstance(eta, (int, float)) and eta > 0),
        "noise: expected a PRNG key or a noise array when eta > 0, got None")
  ts_rev = jnp.asarray(ts[::-1])
  prev_rev = jnp.asarray(np.concatenate([[-1], ts[:-1]])[::-1].copy(), jnp.int32)
  ac = schedule.alphas_cumprod

  def body(x, inp):
    k, t, t_prev = inp
    x0, eps = _predict(denoise_fn, input_transform, objective, schedule, x, t, clip_denoised)
    a = ac[t]
    a_prev = jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], 1.0)
    sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma**2, 0.0)) * eps
    if noise is not None:
      x_prev = x_prev + sigma * _noise_at(noise, k, x.shape, x.dtype)
    return x_prev, None

  ks = jnp.arange(steps, dtype=jnp.int32)
  x, _ = jax.lax.scan(body, x_T, (ks, ts_rev, prev_rev))
  return x


def ddpm_sample(denoise_fn: DenoiseFn, schedule: Schedule, x_T: chex.Array, noise, *,
                steps: int | None = None, objective: str = "eps",
                variance: str = "fixed_large",
                input_transform: InputTransform | None = None,
                clip_denoised: bool = True) -> chex.Array:
  """DDPM ancestral sampling (Ho et al. 2020) from x_T [B,H,W,C]; returns x_0.

  `variance`: 'fixed_large' (sigma^2 = beta_t, with the t = 1 posterior variance at the first
  step as in improved-DDPM) or 'fixed_small' (the posterior variance beta~_t). With
  `steps` < T the process is respaced: beta'_i = 1 - abar(t_i) / abar(t_{i-1}).
  The last step (to x_0) adds no noise, but still consumes its slice of the stream.
  """
  check_objective(objective)
  check(variance in VARIANCES, f"variance: expected one of {list(VARIANCES)}, got {variance!r}")
  steps = schedule.num_timesteps if steps is None else steps
  ts = respaced_timesteps(schedule.num_timesteps, steps)
  _check_stream(noise, x_T, steps)
  check(noise is not None, "noise: expected a PRNG key or a noise array, got None")
  # Respaced process (works with a traced schedule, so the sampler can be jitted over it).
  ac = schedule.alphas_cumprod[jnp.asarray(ts)]
  ac_prev = jnp.concatenate([jnp.ones((1,), ac.dtype), ac[:-1]])
  betas = 1.0 - ac / ac_prev
  post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
  if variance == "fixed_small":
    var = post_var
  else:
    var = jnp.concatenate([post_var[1:2], betas[1:]]) if steps > 1 else betas
  coef0 = betas * jnp.sqrt(ac_prev) / (1.0 - ac)
  coeft = (1.0 - ac_prev) * jnp.sqrt(1.0 - betas) / (1.0 - ac)
  per_step = (jnp.arange(steps, dtype=jnp.int32), jnp.asarray(ts[::-1].copy()),
              coef0[::-1], coeft[::-1], jnp.sqrt(var)[::-1])

  def body(x, inp):
    k, t, c0, ct, std = inp
    x0, _ = _predict(denoise_fn, input_transform, objective, schedule, x, t, clip_denoised)
    mean = c0 * x0 + ct * x
    z = _noise_at(noise, k, x.shape, x.dtype)
    return mean + jnp.where(t > 0, std, 0.0) * z, None

  x, _ = jax.lax.scan(body, x_T, per_step)
  return x


def _with_args(fn: Callable, args: tuple, x: chex.Array, t: chex.Array) -> chex.Array:
  return fn(x, t, *args)


@functools.partial(jax.jit, static_argnames=(
    "model_fn", "shape", "sampler", "steps", "objective", "variance", "input_transform",
    "clip_denoised", "guided"))
def _sample_jit(model_fn, params, rng, schedule, y, eta, guidance_scale, null_label, *, shape,
                sampler, steps, objective, variance, input_transform, clip_denoised, guided,
                transform_args):
  rng_T, rng_chain = jax.random.split(rng)
  if input_transform is not None and transform_args is not None:
    input_transform = functools.partial(_with_args, input_transform, transform_args)
  x_T = jax.random.normal(rng_T, shape, jnp.float32)
  if guided:
    denoise = guided_model_fn(model_fn, params, y, guidance_scale, null_label)
  else:
    denoise = lambda x, t: model_fn(params, x, t, y)
  if sampler == "ddim":
    return ddim_sample(denoise, schedule, x_T, rng_chain, steps=steps, eta=eta,
                       objective=objective, input_transform=input_transform,
                       clip_denoised=clip_denoised)
  return ddpm_sample(denoise, schedule, x_T, rng_chain, steps=steps, objective=objective,
                     variance=variance, input_transform=input_transform,
                     clip_denoised=clip_denoised)


def sample(model_fn: Callable, params: chex.ArrayTree, rng: chex.PRNGKey, schedule: Schedule, *,
           shape: tuple[int, ...], y: chex.Array | None = None, sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, objective: str = "eps",
           variance: str = "fixed_large", input_transform: InputTransform | None = None,
           guidance_scale: float | None = None, null_label: int | None = None,
           clip_denoised: bool = True, transform_args: chex.ArrayTree | None = None
           ) -> chex.Array:
  """Draws x_T ~ N(0, I) of `shape` [B,H,W,C] and runs one sampler, all inside one jit.

  `model_fn(params, x, t, y) -> out` must be hashable (a module's bound apply, or a
  top-level function). With `guidance_scale` set, classifier-free guidance mixes the
  conditional and the `null_label` predictions: out = u + scale * (c - u).
  `transform_args` (arrays, traced, so new values do not recompile) are passed on as
  `input_transform(x_t, t, *transform_args)`; without them it is `input_transform(x_t, t)`.
  Returns samples [B,H,W,C] (float32, roughly in [-1, 1]).
  """
  check(sampler in SAMPLERS, f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
  check(len(shape) == 4, f"shape: expected [B, H, W, C], got {shape}")
  check_number(eta, "eta", 0, 1)  # sigma = eta * (DDPM's posterior std): 0 to 1
  guided = guidance_scale is not None
  if guided:
    check_number(guidance_scale, "guidance_scale", -MAX_GUIDANCE, MAX_GUIDANCE)
    check(y is not None and null_label is not None,
          "guidance_scale: classifier-free guidance needs labels y and a null_label")
  return _sample_jit(model_fn, params, rng, schedule, y, jnp.float32(eta),
                     jnp.float32(guidance_scale if guided else 0.0),
                     jnp.int32(null_label if null_label is not None else 0), shape=tuple(shape),
                     sampler=sampler, steps=int(steps), objective=objective, variance=variance,
                     input_transform=input_transform, clip_denoised=clip_denoised,
                     guided=guided, transform_args=transform_args)
