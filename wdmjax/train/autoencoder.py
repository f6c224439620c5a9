"""Training the KL autoencoder of a latent diffusion model, and encoding / decoding with it.

`train_autoencoder` fits `wdmjax.models.autoencoder` to in-memory images; `latent_scale`
is Stable Diffusion's 0.18215 for this autoencoder (1 / std of the posterior means), so that
the diffusion model sees latents of unit variance; `encode` and `decode` go between images
in [-1, 1] and scaled latents in fixed-shape batches (one compile each); `sample_latents`
draws latents from a latent diffusion model without clipping them to [-1, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from wdmjax.errors import check, check_number
from wdmjax.models.autoencoder import (
  Decoder,
  Encoder,
  autoencoder_loss,
  autoencoder_modules,
  init_autoencoder,
)
from wdmjax.models.layers import check_int_sequence, check_positive_int
from wdmjax.train.sampling import sample_images

# Images whose posterior means set the latent scale (a fixed subset: a few thousand suffice).
SCALE_IMAGES = 2048


def _check_images(images, name: str = "images") -> np.ndarray:
  x = np.asarray(images)
  check(x.ndim == 4 and np.issubdtype(x.dtype, np.floating) and x.shape[0] > 0,
        f"{name}: expected float [N, H, W, C] images in [-1, 1], got {x.dtype} {x.shape}")
  return x.astype(np.float32, copy=False)


def _check_key(key) -> None:
  ok = isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or (key.dtype == jnp.uint32 and key.shape == (2,)))
  check(ok, f"key: expected a PRNG key (jax.random.key or PRNGKey), got {key!r}")


def train_autoencoder(images: np.ndarray, key: chex.PRNGKey, *, steps: int = 2000,
                      batch_size: int = 64, lr: float = 1e-3, kl_weight: float = 1e-6,
                      channels: Sequence[int] = (32, 64), latent_channels: int = 4,
                      progress: bool = False, callback: Callable | None = None,
                      log_every: int = 10) -> tuple[dict, list[dict]]:
  """Fits the autoencoder to `images` with Adam (warm-up, then cosine decay to lr / 20).

  The images stay on the device; step s draws its batch (with replacement) and its posterior
  noise from `fold_in(key, s)`, so a run is a pure function of its arguments.

  Args:
    images: float32 [N, H, W, C] in [-1, 1], H and W multiples of 2 ** len(channels).
    key: PRNG key (initialisation and batches).
    steps, batch_size, lr: the optimisation.
    kl_weight: weight of the KL term (see `autoencoder_loss`).
    channels, latent_channels: the architecture (see `wdmjax.models.autoencoder`).
    progress: a tqdm progress bar with the running loss.
    callback: called as `callback(step, metrics)` with each history row.
    log_every: steps between history rows (the last step always has one).

  Returns:
    (params {'encoder', 'decoder'}, history: dicts with step, loss, l1, mse, kl).
  """
  x = _check_images(images)
  _check_key(key)
  check_positive_int("steps", steps)
  check_positive_int("batch_size", batch_size)
  check_positive_int("log_every", log_every)
  check_number(lr, "lr", 0, low_open=True)
  check_number(kl_weight, "kl_weight", 0)
  check_int_sequence("channels", channels, allow_empty=False)
  check_positive_int("latent_channels", latent_channels)
  check(callback is None or callable(callback), f"callback: expected a callable, got "
                                                f"{callback!r}")
  encoder, decoder = autoencoder_modules(x.shape[1:], channels, latent_channels)
  init_key, data_key = jax.random.split(key)
  params = init_autoencoder(init_key, x.shape[1:], tuple(channels), latent_channels)
  warmup = min(100, steps // 10)
  schedule = (optax.warmup_cosine_decay_schedule(0.0, float(lr), warmup, int(steps),
                                                 float(lr) / 20) if warmup
              else optax.cosine_decay_schedule(float(lr), int(steps), alpha=1 / 20))
  tx = optax.adam(schedule)
  opt_state = tx.init(params)
  step_fn = _make_step(encoder, decoder, tx, int(batch_size), float(kl_weight))
  x_dev = jnp.asarray(x)
  history: list[dict] = []
  bar = tqdm(range(int(steps)), desc="autoencoder", disable=not progress)
  for step in bar:
    params, opt_state, metrics = step_fn(params, opt_state, x_dev,
                                         jax.random.fold_in(data_key, step))
    if (step + 1) % log_every == 0 or step + 1 == steps:
      row = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
      history.append(row)
      if progress:
        bar.set_postfix(loss=f"{row['loss']:.4f}")
      if callback is not None:
        callback(step + 1, row)
  bar.close()
  return params, history


def _make_step(encoder: Encoder, decoder: Decoder, tx: optax.GradientTransformation,
               batch_size: int, kl_weight: float) -> Callable:
  def step(params, opt_state, x, key):
    k_batch, k_noise = jax.random.split(key)
    batch = x[jax.random.randint(k_batch, (batch_size,), 0, x.shape[0])]
    grads, metrics = jax.grad(
        lambda p: autoencoder_loss(encoder, decoder, p, batch, k_noise, kl_weight),
        has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


@functools.partial(jax.jit, static_argnames=("encoder",))
def _encode(encoder: Encoder, params: chex.ArrayTree, x: chex.Array) -> tuple:
  return encoder.apply({"params": params}, x)


@functools.partial(jax.jit, static_argnames=("decoder",))
def _decode(decoder: Decoder, params: chex.ArrayTree, z: chex.Array) -> chex.Array:
  return decoder.apply({"params": params}, z)


def _batches(x: np.ndarray, batch_size: int):
  """(start, chunk zero-padded to one batch shape, real length) over x's first axis."""
  bs = min(batch_size, x.shape[0])
  for start in range(0, x.shape[0], bs):
    chunk = x[start:start + bs]
    n = chunk.shape[0]
    if n < bs:
      chunk = np.concatenate([chunk, np.zeros((bs - n, *chunk.shape[1:]), chunk.dtype)])
    yield start, chunk, n


def _encoder_params(params: dict) -> chex.ArrayTree:
  """The encoder's tree of `params`, given whole ({'encoder', 'decoder'}) or already picked."""
  return params["encoder"] if isinstance(params, dict) and "encoder" in params else params


def latent_scale(encoder: Encoder, params: dict, images: np.ndarray,
                 batch_size: int = 256) -> float:
  """1 / std of the posterior means of (the first SCALE_IMAGES of) `images` [N, H, W, C]:
  scaled latents have unit variance (Stable Diffusion's 0.18215). `params`: the
  autoencoder's {'encoder', 'decoder'} or the encoder's own tree."""
  x = _check_images(images)[:SCALE_IMAGES]
  means = encode(encoder, _encoder_params(params), x, 1.0, batch_size=batch_size)
  std = float(np.std(means, dtype=np.float64))
  check(np.isfinite(std) and std > 0, f"images: the posterior means have std {std}; "
                                      f"expected a positive finite std")
  return 1.0 / std


def encode(encoder: Encoder, enc_params: chex.ArrayTree, images: np.ndarray, scale: float,
           key: chex.PRNGKey | None = None, batch_size: int = 256) -> np.ndarray:
  """Scaled latents of images [N, H, W, C] in [-1, 1]: scale * the posterior mean, or a
  posterior sample when `key` is given. Returns float32 [N, h, w, latent_channels]."""
  x = _check_images(images)
  check_number(scale, "scale", 0, low_open=True)
  check_positive_int("batch_size", batch_size)
  if key is not None:
    _check_key(key)
  out = []
  for start, chunk, n in _batches(x, batch_size):
    mean, logvar = _encode(encoder, enc_params, jnp.asarray(chunk))
    z = mean
    if key is not None:
      noise = jax.random.normal(jax.random.fold_in(key, start), mean.shape, mean.dtype)
      z = mean + jnp.exp(0.5 * logvar) * noise
    out.append(np.asarray(z)[:n])
  return np.concatenate(out) * np.float32(scale)


def decode(decoder: Decoder, dec_params: chex.ArrayTree, latents: np.ndarray, scale: float,
           batch_size: int = 256) -> np.ndarray:
  """Images float32 [N, H, W, C] clipped to [-1, 1] of scaled latents [N, h, w, c] (divided
  by `scale` first)."""
  z = np.asarray(latents)
  check(z.ndim == 4 and np.issubdtype(z.dtype, np.floating) and z.shape[0] > 0,
        f"latents: expected float [N, h, w, c], got {z.dtype} {z.shape}")
  check_number(scale, "scale", 0, low_open=True)
  check_positive_int("batch_size", batch_size)
  z = z.astype(np.float32) / np.float32(scale)
  out = [np.asarray(_decode(decoder, dec_params, jnp.asarray(chunk)))[:n]
         for _, chunk, n in _batches(z, batch_size)]
  return np.clip(np.concatenate(out), -1.0, 1.0)


def sample_latents(cfg: ml_collections.ConfigDict, params: chex.ArrayTree, rng: chex.PRNGKey,
                   num: int, *, steps: int | None = None, guidance_scale: float | None = None,
                   labels: chex.Array | None = None, batch_size: int = 256) -> np.ndarray:
  """`num` latents [num, R, R, C] float32 of a latent diffusion model, as configured.

  `wdmjax.train.sample_images` with `clip=False`: neither the predicted x0 nor the result is
  clipped to [-1, 1], since scaled latents have unit variance.
  """
  return sample_images(cfg, params, rng, num, steps=steps, guidance_scale=guidance_scale,
                       labels=labels, batch_size=batch_size, clip=False)
