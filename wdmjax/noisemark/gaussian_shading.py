"""Gaussian Shading (Yang, Zeng, Chen, Fang, Zhang, Yu 2024): message bits written into the
signs of the initial noise through a keyed stream cipher, so that x_T stays exactly N(0, I).

Embedding (one bit per noise element, the paper's l = 1):
  1. the K-bit message is laid out as [H / block, W / block, C / channel_factor] and
     replicated block x block x channel_factor times to fill [H, W, C] (the diffusion);
  2. the replicated bits are XOR-ed with a keystream s [H, W, C] (the encryption): uniform
     bits independent of the message, so the result m is uniform whatever the message;
  3. x_T = (2 m - 1) |u| with u ~ N(0, I): the sign carries m, the magnitude is a half-normal
     draw; since m is uniform and independent of |u|, x_T ~ N(0, I) exactly.
Detection inverts an image to x_T' (DDIM inversion with the owner's model), reads the signs,
XORs the keystream back out, and takes the majority vote over each bit's replicas (a tie
takes the bit's first replica, which keeps the vote a fair coin under the null). Agreement
with the message is counted over the K bits.

The exact null: for an image made without the key, the keystream is independent of x_T', so
every recovered bit is a fair coin and the K votes are independent: p = P(Bin(K, 1/2) >= k),
exact over the key whatever the image. The keystream here is JAX's threefry (a keyed
counter-mode generator built on the Threefish block cipher) where the paper uses ChaCha20;
the test only needs uniform bits independent of the image. As in the paper, one key gives
one keystream for all images, so every image of a key shares the sign pattern of m: exact
per image, but the images of one key are not independent draws of N(0, I).

Shapes: x_T and images [B, H, W, C]; the key's arrays [H, W, C] and [K].
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check, check_seed
from wdmjax.stats.binomial import binomial_log10_sf


class GaussianShadingKey(NamedTuple):
  """message [K] uint8 bits, stream [H, W, C] uint8 keystream bits, and the replication."""

  message: np.ndarray
  stream: np.ndarray
  block: int
  channel_factor: int

  @property
  def message_shape(self) -> tuple[int, int, int]:
    h, w, c = self.stream.shape
    return h // self.block, w // self.block, c // self.channel_factor


def make_key(seed: int, shape: tuple[int, int, int], block: int = 4, channel_factor: int = 1,
             message: np.ndarray | None = None) -> GaussianShadingKey:
  """A key for x_T of `shape` (H, W, C): keystream and (unless given) message from `seed`.

  The message has (H / block) (W / block) (C / channel_factor) bits; block and
  channel_factor must divide the sides and the channels."""
  seed = check_seed(seed)
  check(len(shape) == 3, f"shape: expected (H, W, C), got {shape}")
  h, w, c = shape
  check(isinstance(block, int | np.integer) and block >= 1 and h % block == 0
        and w % block == 0,
        f"block: expected a positive integer dividing {h} and {w}, got {block!r}")
  check(isinstance(channel_factor, int | np.integer) and channel_factor >= 1
        and c % channel_factor == 0,
        f"channel_factor: expected a positive integer dividing {c}, got {channel_factor!r}")
  k = (h // block) * (w // block) * (c // channel_factor)
  base = jax.random.PRNGKey(seed)
  stream = np.asarray(jax.random.bits(jax.random.fold_in(base, 0), (h, w, c), jnp.uint8) & 1)
  if message is None:
    message = np.asarray(jax.random.bits(jax.random.fold_in(base, 1), (k,), jnp.uint8) & 1)
  message = np.asarray(message)
  check(message.shape == (k,) and np.isin(message, (0, 1)).all(),
        f"message: expected {k} bits (0 or 1) for this shape and replication, got shape "
        f"{message.shape}")
  return GaussianShadingKey(message.astype(np.uint8), stream.astype(np.uint8), int(block),
                            int(channel_factor))


def _spread(key: GaussianShadingKey) -> np.ndarray:
  """The message replicated to [H, W, C] (each bit over its block x block x channel_factor)."""
  m = key.message.reshape(key.message_shape)
  m = np.repeat(np.repeat(m, key.block, axis=0), key.block, axis=1)
  return np.repeat(m, key.channel_factor, axis=2)


def watermark_noise(rng: chex.PRNGKey, key: GaussianShadingKey, batch: int) -> chex.Array:
  """x_T [batch, H, W, C] ~ N(0, I) whose signs encode the key's message."""
  check(isinstance(batch, int) and batch >= 1, f"batch: expected a positive integer, got {batch!r}")
  bits = jnp.asarray(_spread(key) ^ key.stream, jnp.float32)
  u = jnp.abs(jax.random.normal(rng, (batch, *key.stream.shape), jnp.float32))
  return (2.0 * bits - 1.0) * u


def decode(x_T: chex.Array, key: GaussianShadingKey) -> chex.Array:
  """The voted message bits [B, K] (uint8) read from inverted noise x_T' [B, H, W, C]."""
  chex.assert_rank(x_T, 4)
  check(tuple(x_T.shape[1:]) == key.stream.shape,
        f"x_T: expected [B, {', '.join(map(str, key.stream.shape))}], got {tuple(x_T.shape)}")
  b = x_T.shape[0]
  hb, wb, cb = key.message_shape
  bits = (jnp.asarray(x_T) > 0).astype(jnp.int32) ^ jnp.asarray(key.stream, jnp.int32)
  rep = bits.reshape(b, hb, key.block, wb, key.block, cb, key.channel_factor)
  ones = rep.sum(axis=(2, 4, 6))
  n = key.block * key.block * key.channel_factor
  first = rep[:, :, 0, :, 0, :, 0]
  vote = jnp.where(2 * ones == n, first, (2 * ones > n).astype(jnp.int32))
  return vote.reshape(b, -1).astype(jnp.uint8)


def detect(x_T: chex.Array, key: GaussianShadingKey) -> tuple[np.ndarray, np.ndarray]:
  """(bit accuracy [B], exact log10 p [B]) of inverted noise x_T' [B, H, W, C]."""
  votes = decode(x_T, key)
  agree = (votes == jnp.asarray(key.message)[None]).sum(axis=1)
  n = key.message.size
  log10_p = binomial_log10_sf(agree, jnp.full_like(agree, n), 0.5)
  return np.asarray(agree / n, np.float64), np.asarray(log10_p, np.float64)
