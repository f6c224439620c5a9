"""Reconstruction losses of noised inputs: the diffusion OOD score, and the ELBO baseline.

The diffusion-and-OOD study (MaybeLizzy/Diffusion_OOD_Robustness) noises an input x to one
fixed step t, lets the model reconstruct x from x_t, and scores x by the reconstruction
loss: a model reconstructs inputs like its training data well and others badly. Here any
wdmjax denoiser, with any objective (eps, x0, v), scores images at several steps t and
noise draws at once:

  x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,   x_hat = the model's x0 from x_t,
  loss(x, t) = mean over pixels of (x_hat - x)^2          (metric "x0", the default)

`ddim_steps` > 1 reconstructs with a deterministic DDIM chain from t back to 0 instead of
one prediction. Metric "eps" is the training loss (eps error); metric "vlb" weights the eps
error as the variational bound does, which `elbo_score` averages over t: the likelihood
baseline (the bound's diffusion terms, in nats per dimension, without the t = 0 decoder).

Steps t count noising steps, 1..T (t = 1 is the first step, schedule index 0), as the
study writes them ("t around 500-700 of 1000").
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.diffusion.objectives import check_objective, eps_from_x0, to_x0_eps
from wdmjax.diffusion.process import q_sample
from wdmjax.diffusion.schedules import Schedule
from wdmjax.errors import check

# model_fn(params, x_t [B, H, W, C], t [B] int32 schedule indices) -> output [B, H, W, C']
# (only the first C channels, the objective's prediction, are read). It must be hashable
# and the same object from call to call, or every call compiles again.
ScoreModelFn = Callable[[chex.ArrayTree, chex.Array, chex.Array], chex.Array]
METRICS = ("x0", "eps", "vlb")
DEFAULT_BATCH = 128


def check_steps_t(t, num_timesteps: int, name: str = "t") -> tuple[int, ...]:
  """t: one step or a non-empty sequence of distinct steps, each an integer in [1, T];
  returns a tuple of ints."""
  ts = (t,) if isinstance(t, int | np.integer) else t
  ok = isinstance(ts, Sequence | np.ndarray) and len(ts) >= 1 and all(
      isinstance(v, int | np.integer) and not isinstance(v, bool) for v in ts)
  check(ok, f"{name}: expected an integer step or a non-empty list of steps in [1, "
            f"{num_timesteps}], got {t!r}")
  bad = [int(v) for v in ts if not 1 <= int(v) <= num_timesteps]
  check(not bad, f"{name}: expected steps in [1, {num_timesteps}] (T = {num_timesteps}), "
                 f"got {bad[:1]}")
  ts = tuple(int(v) for v in ts)
  twice = sorted({v for v in ts if ts.count(v) > 1})
  check(not twice, f"{name}: expected distinct steps (a repeated step counts its losses "
                   f"twice), got {twice[0] if twice else None} more than once in {list(ts)}")
  return ts


def _check_images(x, model_shape: tuple[int, ...] | None) -> jax.Array:
  x = jnp.asarray(x)
  check(x.ndim == 4 and x.shape[0] >= 1,
        f"x: expected images [N, H, W, C] with N >= 1, got shape {tuple(x.shape)}")
  check(jnp.issubdtype(x.dtype, jnp.floating),
        f"x: expected float images in [-1, 1], got dtype {x.dtype}")
  if model_shape is not None:
    check(tuple(x.shape[1:]) == tuple(model_shape),
          f"x: expected images of shape [N, {', '.join(map(str, model_shape))}] (the model's), "
          f"got shape {tuple(x.shape)}")
  return x.astype(jnp.float32)


def _vlb_weight(schedule: Schedule, t: jax.Array) -> jax.Array:
  """beta_t / (2 alpha_t (1 - abar_t)): the bound's weight on ||eps - eps_hat||^2 with the
  reverse variance sigma_t^2 = beta_t."""
  beta = schedule.betas[t]
  return beta / (2.0 * (1.0 - beta) * (1.0 - schedule.alphas_cumprod[t]))


def _reconstruct(model_fn, params, schedule, objective, xt, t, ddim_steps, clip):
  """x0 from x_t [B, ...] at indices t [B]: one prediction, or a DDIM chain (eta = 0) of
  `ddim_steps` steps from t down to 0. Returns (x0_hat, eps_hat at t)."""
  c = xt.shape[-1]

  def predict(x, tt):
    x0, eps = to_x0_eps(objective, schedule, model_fn(params, x, tt)[..., :c].astype(x.dtype),
                        x, tt)
    if clip:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = eps_from_x0(schedule, x0, x, tt)
    return x0, eps

  if ddim_steps == 1:
    return predict(xt, t)
  ac = schedule.alphas_cumprod
  shape = (-1,) + (1,) * (xt.ndim - 1)

  def body(x, k):
    u = t + 1  # in steps: u, ..., u / S (indices one less), S steps down to 0
    tk = (u * (ddim_steps - k)) // ddim_steps - 1
    tp = (u * (ddim_steps - k - 1)) // ddim_steps - 1  # -1: the last step lands on x0
    x0k, epsk = predict(x, tk)
    a_prev = jnp.where(tp >= 0, ac[jnp.maximum(tp, 0)], 1.0).reshape(shape)
    return jnp.sqrt(a_prev) * x0k + jnp.sqrt(1.0 - a_prev) * epsk, None

  x, _ = jax.lax.scan(body, xt, jnp.arange(ddim_steps))
  return x, eps_from_x0(schedule, x, xt, t)


@functools.partial(jax.jit, static_argnames=("model_fn", "objective", "metric", "draws",
                                             "ddim_steps", "clip", "batch_size"))
def reconstruction_losses_at(model_fn, params, schedule, x, key, t_index, *, objective, metric,
                             draws, ddim_steps, clip, batch_size):
  """[N, K, D] losses of images x [N, ...] (N a multiple of batch_size) at K steps, D draws;
  one `lax.map` over batches, each batch one network call on batch x K x D inputs."""
  n, shape, k = x.shape[0], x.shape[1:], t_index.shape[0]
  xb = x.reshape((n // batch_size, batch_size) + shape)
  ids = jnp.arange(n).reshape(n // batch_size, batch_size)

  def one(args):
    xs, i = args
    # Image i's noise depends on (key, i) only: a score does not change with the batching.
    noise = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j),
                                                 (k, draws) + shape))(i)
    flat = (batch_size * k * draws,) + shape
    x0 = jnp.broadcast_to(xs[:, None, None], noise.shape).reshape(flat)
    tt = jnp.broadcast_to(t_index[None, :, None], (batch_size, k, draws)).reshape(-1)
    eps = noise.reshape(flat)
    xt = q_sample(schedule, x0, tt, eps)
    x_hat, eps_hat = _reconstruct(model_fn, params, schedule, objective, xt, tt, ddim_steps,
                                  clip)
    axes = tuple(range(1, x0.ndim))
    if metric == "x0":
      loss = jnp.mean((x_hat - x0) ** 2, axis=axes)
    else:
      loss = jnp.mean((eps_hat - eps) ** 2, axis=axes)
      if metric == "vlb":
        loss = loss * _vlb_weight(schedule, tt)
    return loss.reshape(batch_size, k, draws)

  return jax.lax.map(one, (xb, ids)).reshape(n, k, draws)


def reconstruction_losses(model_fn: ScoreModelFn, params: chex.ArrayTree, schedule: Schedule,
                          x: chex.Array, key: chex.PRNGKey, *, t: int | Sequence[int] = 600,
                          draws: int = 1, objective: str = "eps", metric: str = "x0",
                          ddim_steps: int = 1, clip: bool = True,
                          batch_size: int = DEFAULT_BATCH,
                          image_shape: tuple[int, ...] | None = None) -> jax.Array:
  """Per-image reconstruction losses at each step and noise draw, in one jitted computation.

  Args:
    model_fn: the denoiser (see `ScoreModelFn`): hashable, one object per model.
    params: its parameters.
    schedule: the noise schedule it was trained with.
    x: images [N, H, W, C] in [-1, 1].
    key: PRNG key; image i's noise, one [K, D, H, W, C] block, is drawn from
      fold_in(key, i), so its losses are a pure function of (key, i, image, t, draws)
      whatever the batching.
    t: one step or K steps in [1, T].
    draws: noise draws D per image and step.
    objective: what the network predicts ('eps', 'x0' or 'v').
    metric: 'x0' (reconstruction error), 'eps' (the training loss) or 'vlb' (the eps error
      weighted by the variational bound).
    ddim_steps: 1: one x0 prediction; S > 1: a deterministic DDIM chain of S steps from t
      back to 0 (metric 'x0' only).
    clip: clip the predicted x0 to [-1, 1] (as the samplers do); metric 'x0' only: the
      'eps' and 'vlb' metrics read the network's own prediction (the training loss, the
      bound).
    batch_size: images per network call (each call evaluates batch_size x K x D inputs).
    image_shape: the model's (H, W, C), to refuse images of another shape in one line.

  Returns:
    [N, K, D] float32 losses.
  """
  check_objective(objective)
  check(metric in METRICS, f"metric: expected one of {list(METRICS)}, got {metric!r}")
  ts = check_steps_t(t, schedule.num_timesteps)
  for name, v in (("draws", draws), ("ddim_steps", ddim_steps), ("batch_size", batch_size)):
    check(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1,
          f"{name}: expected a positive integer, got {v!r}")
  check(ddim_steps == 1 or metric == "x0",
        f"ddim_steps: expected 1 with metric {metric!r} (a chain reconstructs x0), got "
        f"{ddim_steps}")
  check(ddim_steps <= min(ts), f"ddim_steps: expected at most the smallest step {min(ts)}, "
                               f"got {ddim_steps}")
  x = _check_images(x, image_shape)
  n = x.shape[0]
  bs = int(min(batch_size, n))
  pad = (-n) % bs
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  out = reconstruction_losses_at(model_fn, params, schedule, x, key,
                                 jnp.asarray(ts, jnp.int32) - 1, objective=objective,
                                 metric=metric, draws=int(draws), ddim_steps=int(ddim_steps),
                                 clip=bool(clip) and metric == "x0", batch_size=bs)
  return out[:n]


@functools.partial(jax.jit, static_argnames=("model_fn", "objective", "ddim_steps", "clip"))
def _reconstruct_jit(model_fn, params, schedule, x, key, t_index, *, objective, ddim_steps,
                     clip):
  noise = jax.random.normal(key, x.shape, x.dtype)
  tt = jnp.full((x.shape[0],), t_index, jnp.int32)
  xt = q_sample(schedule, x, tt, noise)
  return xt, _reconstruct(model_fn, params, schedule, objective, xt, tt, ddim_steps, clip)[0]


def reconstruct(model_fn: ScoreModelFn, params: chex.ArrayTree, schedule: Schedule,
                x: chex.Array, key: chex.PRNGKey, *, t: int = 600, objective: str = "eps",
                ddim_steps: int = 1, clip: bool = True) -> tuple[jax.Array, jax.Array]:
  """What the score looks at: (x_t, x_hat), both [N, H, W, C], for images x [N, H, W, C]
  noised to step t in [1, T] with one noise draw from `key`, and the model's reconstruction
  (one prediction, or a DDIM chain of `ddim_steps` steps)."""
  check_objective(objective)
  (t,) = check_steps_t(t, schedule.num_timesteps)
  check(isinstance(ddim_steps, int | np.integer) and not isinstance(ddim_steps, bool)
        and 1 <= ddim_steps <= t, f"ddim_steps: expected an integer in [1, {t}], got "
                                  f"{ddim_steps!r}")
  x = _check_images(x, None)
  return _reconstruct_jit(model_fn, params, schedule, x, key, t - 1, objective=objective,
                          ddim_steps=ddim_steps, clip=bool(clip))


def reconstruction_score(model_fn: ScoreModelFn, params: chex.ArrayTree, schedule: Schedule,
                         x: chex.Array, key: chex.PRNGKey, *, t: int | Sequence[int] = 600,
                         draws: int = 1, objective: str = "eps", ddim_steps: int = 1,
                         **kwargs) -> jax.Array:
  """The study's OOD score: the reconstruction loss averaged over the draws and steps t
  ([N]; higher: further from the training data). See `reconstruction_losses` for the
  arguments, and `wdmjax.ood.aggregate` for other ways to combine several t."""
  losses = reconstruction_losses(model_fn, params, schedule, x, key, t=t, draws=draws,
                                 objective=objective, ddim_steps=ddim_steps, **kwargs)
  return losses.mean(axis=(1, 2))


def elbo_steps(num_timesteps: int, num_t: int) -> tuple[int, ...]:
  """`num_t` steps spread evenly over [2, T] (the bound's terms L_1 .. L_{T-1})."""
  return tuple(int(v) for v in np.unique(np.linspace(2, num_timesteps, num_t).round()))


def elbo_score(model_fn: ScoreModelFn, params: chex.ArrayTree, schedule: Schedule,
               x: chex.Array, key: chex.PRNGKey, *, num_t: int = 20, draws: int = 1,
               objective: str = "eps", **kwargs) -> jax.Array:
  """The likelihood baseline: an estimate of the negative variational bound's diffusion
  terms, sum over t of w_t E||eps - eps_hat||^2, from `num_t` evenly spaced steps, in nats
  per dimension ([N]; higher: less likely under the model)."""
  check(isinstance(num_t, int) and not isinstance(num_t, bool) and num_t >= 1,
        f"num_t: expected a positive integer, got {num_t!r}")
  ts = elbo_steps(schedule.num_timesteps, min(num_t, schedule.num_timesteps - 1))
  losses = reconstruction_losses(model_fn, params, schedule, x, key, t=ts, draws=draws,
                                 objective=objective, metric="vlb", **kwargs)
  return losses.mean(axis=(1, 2)) * (schedule.num_timesteps - 1)
