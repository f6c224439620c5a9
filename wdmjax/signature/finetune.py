"""Rooting a message in a latent decoder (Stable Signature's second stage).

Only the decoder's parameters change: the frozen extractor must read the user's message m from
every decoded image, while the images stay close to the ORIGINAL decoder's output:

    loss = BCE(10 * whitened extractor logits, m) + image_weight * d(decoded, original)

with d = (1 - SSIM) + MSE here (the paper's Watson-VGG perceptual distance needs VGG weights
that cannot ship offline; SSIM is the structural part of such a distance and MSE the plain
one). AdamW at 5e-4 for about 100 steps of 4 latents, as published. Many users are fine-tuned
at once: their decoders are stacked on a leading axis and the step is vmapped over it, each
user with their own message and their own latents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdmjax.errors import check, check_number
from wdmjax.metrics.quality import ssim
from wdmjax.signature.whitening import Whitening, whiten

Array = jax.Array
Decode = Callable[[Any, Array], Array]    # (decoder params, latents [B, h, w, c]) -> images
Extract = Callable[[Array], Array]        # images [B, H, W, C] -> logits [B, k]
LOGIT_SCALE = 10.0  # the published loss reads BCE(10 * whitened logits, m)


@jax.custom_vjp
def clip_into_range(x: Array) -> Array:
  """x clipped to [-1, 1], as a pipeline delivers its images (then stored as 8-bit). Its
  gradient passes where a descent step would move a clipped pixel back towards the range and
  is cut where it would push the pixel further out: a plain clip passes no gradient to clipped
  pixels (a black background could never carry bits), the identity lets them drift away."""
  return jnp.clip(x, -1.0, 1.0)


def _clip_fwd(x):
  return jnp.clip(x, -1.0, 1.0), x


def _clip_bwd(x, g):
  outward = ((x > 1.0) & (g < 0)) | ((x < -1.0) & (g > 0))
  return (jnp.where(outward, 0.0, g),)


clip_into_range.defvjp(_clip_fwd, _clip_bwd)


def image_distance(x: Array, ref: Array) -> Array:
  """(1 - SSIM) + MSE per image [B]; x, ref [B, H, W, C] in [-1, 1]."""
  return (1.0 - ssim(x, ref)) + jnp.mean((x - ref) ** 2, axis=(1, 2, 3))


def signature_loss(decode: Decode, extract: Extract, whitening: Whitening, params: Any,
                   latents: Array, original: Array, message: Array, image_weight: float
                   ) -> tuple[Array, dict]:
  """The fine-tuning loss of one user's decoder on latents [B, h, w, c]; original [B, H, W, C]
  the original decoder's outputs for them; message [k] in {0, 1}. The extractor reads the
  decoded images clipped to [-1, 1] (`clip_into_range`), as a pipeline delivers them; the
  distance compares the outputs before clipping, which also holds back any drift beyond the
  range that the clip would hide."""
  raw = decode(params, latents)
  images = clip_into_range(raw)
  logits = whiten(whitening, extract(images))
  target = jnp.broadcast_to(message.astype(jnp.float32), logits.shape)
  bce = optax.sigmoid_binary_cross_entropy(LOGIT_SCALE * logits, target).mean()
  dist = image_distance(raw, original).mean()
  bit_acc = ((logits > 0) == (target > 0)).mean()
  return bce + image_weight * dist, {"bce": bce, "distance": dist, "bit_acc": bit_acc}


class FinetuneResult(NamedTuple):
  params: Any           # the users' decoders, stacked: every leaf [U, ...]
  history: list[dict]   # per logged step: mean and worst user's bit accuracy, bce, distance


def finetune_decoders(decode: Decode, extract: Extract, whitening: Whitening,
                      decoder_params: Any, latents: np.ndarray, messages: np.ndarray,
                      key: Array, *, steps: int = 100, batch_size: int = 4, lr: float = 5e-4,
                      weight_decay: float = 0.0, image_weight: float = 0.2,
                      log_every: int = 10, progress: bool = False) -> FinetuneResult:
  """Fine-tunes one copy of `decoder_params` per row of `messages` [U, k].

  latents: [N, h, w, c], the decoder's inputs (encoded clean images); each step draws
  `batch_size` of them per user. `extract` is the frozen, whitened-to-be extractor.
  """
  msgs = np.asarray(messages)
  check(msgs.ndim == 2 and msgs.shape[0] >= 1 and bool(np.isin(msgs, (0, 1)).all()),
        f"messages: expected [users, k] bits in {{0, 1}}, got shape {msgs.shape}")
  check(msgs.shape[1] == whitening.mean.shape[0],
        f"messages: expected k = {whitening.mean.shape[0]} bits (the extractor's), got "
        f"{msgs.shape[1]}")
  lat = np.asarray(latents, np.float32)
  chex.assert_rank(lat, 4)
  for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
    check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          f"{name}: expected a positive integer, got {v!r}")
  check(len(lat) >= batch_size, f"latents: expected at least batch_size = {batch_size}, got "
                                f"{len(lat)}")
  check_number(lr, "lr", 0, low_open=True)
  check_number(weight_decay, "weight_decay", 0)
  check_number(image_weight, "image_weight", 0)
  users = msgs.shape[0]
  tx = optax.adamw(lr, weight_decay=weight_decay)
  original_params = decoder_params
  stacked = jax.tree.map(lambda p: jnp.broadcast_to(p, (users, *jnp.shape(p))), decoder_params)
  opt = jax.vmap(tx.init)(stacked)
  m = jnp.asarray(msgs, jnp.int32)

  def one(params, opt_state, lat_b, message, w):
    original = jax.lax.stop_gradient(decode(original_params, lat_b))
    (loss, aux), g = jax.value_and_grad(
      lambda p: signature_loss(decode, extract, w, p, lat_b, original, message,
                               image_weight), has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  # The whitening is an argument, not a constant of the program: one compiled step serves
  # every whitening (a signing's own, see wdmjax.runs.signature.embed).
  step = jax.jit(jax.vmap(one, in_axes=(0, 0, 0, 0, None)))
  w = Whitening(jnp.asarray(whitening.mean, jnp.float32),
                jnp.asarray(whitening.matrix, jnp.float32))
  rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))
  history, it = [], range(steps)
  if progress:
    from tqdm.auto import tqdm  # only for interactive runs
    it = tqdm(it, desc=f"decoders ({users} users)", unit="step")
  for i in it:
    idx = np.stack([rng.choice(len(lat), batch_size, replace=False) for _ in range(users)])
    stacked, opt, aux = step(stacked, opt, jnp.asarray(lat[idx]), m, w)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      acc = np.asarray(aux["bit_acc"])
      row = {"step": i + 1, "bit_acc": float(acc.mean()), "worst_bit_acc": float(acc.min()),
             "bce": float(np.mean(aux["bce"])), "distance": float(np.mean(aux["distance"]))}
      history.append(row)
      if progress:
        it.set_postfix(bit_acc=f"{row['bit_acc']:.3f}", dist=f"{row['distance']:.4f}")
  return FinetuneResult(stacked, history)


def user_params(stacked: Any, user: int) -> Any:
  """One user's decoder from the stacked tree of `finetune_decoders`."""
  return jax.tree.map(lambda p: p[user], stacked)
