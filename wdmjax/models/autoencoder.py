"""A tiny KL autoencoder (the Stable Diffusion VAE in miniature): images <-> latents.

The encoder maps [B, H, W, C] images in [-1, 1] to a diagonal Gaussian posterior over
latents [B, H/f, W/f, latent_channels], f = 2 ** len(channels) (4 by default: 28 -> 7,
32 -> 8); the decoder maps a latent back to an image. Each level of `channels` is a
stride-2 conv (nearest upsampling + conv in the decoder) and a GroupNorm-SiLU ResBlock.
Encoder and decoder are separate modules with separate parameter trees, so the decoder can
be fine-tuned alone (Stable Signature).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from wdmjax.errors import check
from wdmjax.models.layers import Array, check_int_sequence, check_positive_int

LOGVAR_RANGE = (-30.0, 20.0)


def _conv(features: int, name: str, stride: int = 1, kernel: int = 3) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), name=name)


def _norm(channels: int, name: str) -> nn.GroupNorm:
  # 8 groups (or fewer, for narrow layers): GroupNorm needs groups | channels.
  return nn.GroupNorm(math.gcd(channels, 8), epsilon=1e-6, name=name)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv twice, plus the input (1x1-conv'd when the width changes)."""
  out_ch: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, Cin] -> [B, H, W, out_ch]."""
    h = _conv(self.out_ch, "conv1")(nn.silu(_norm(x.shape[-1], "norm1")(x)))
    h = _conv(self.out_ch, "conv2")(nn.silu(_norm(self.out_ch, "norm2")(h)))
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, "skip", kernel=1)(x)
    return x + h


def _upsample_nearest(x: Array) -> Array:
  """x: [B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2 (a broadcast: its gradient
  is a cheap sum, unlike the gather of `jax.image.resize` on CPU)."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)


def downsample_factor(channels: Sequence[int]) -> int:
  """The side ratio of images to latents: 2 ** len(channels)."""
  return 2 ** len(channels)


def _check_channels(channels: Sequence[int], latent_channels: int) -> None:
  check_int_sequence("channels", channels, allow_empty=False)
  check_positive_int("latent_channels", latent_channels)


class Encoder(nn.Module):
  """Images -> posterior (mean, logvar).

  Attributes:
    channels: width of each level; one stride-2 conv and one ResBlock per level.
    latent_channels: channels of the latent.
  """
  channels: tuple[int, ...] = (32, 64)
  latent_channels: int = 4

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    """x: [B, H, W, C] in [-1, 1], H and W multiples of f = 2 ** len(channels) ->
    (mean, logvar), each [B, H/f, W/f, latent_channels]; logvar clipped to [-30, 20]."""
    _check_channels(self.channels, self.latent_channels)
    f = downsample_factor(self.channels)
    check(x.ndim == 4 and x.shape[1] % f == 0 and x.shape[2] % f == 0,
          f"x: expected [B, H, W, C] with H, W multiples of {f}, got shape {x.shape}")
    h = _conv(self.channels[0], "conv_in")(x)
    for i, ch in enumerate(self.channels):
      h = _conv(ch, f"down_{i}", stride=2)(h)
      h = ResBlock(ch, name=f"res_{i}")(h)
    h = nn.silu(_norm(h.shape[-1], "norm_out")(h))
    moments = _conv(2 * self.latent_channels, "conv_out")(h)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
  """Latents -> images (unbounded float, about [-1, 1]).

  Attributes:
    out_channels: image channels C.
    channels: the encoder's level widths (used in reverse).
  """
  out_channels: int
  channels: tuple[int, ...] = (32, 64)

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """z: [B, h, w, latent_channels] -> [B, f h, f w, out_channels], f = 2 ** len(channels)."""
    check_int_sequence("channels", self.channels, allow_empty=False)
    check_positive_int("out_channels", self.out_channels)
    check(z.ndim == 4, f"z: expected [B, h, w, C], got shape {z.shape}")
    h = _conv(self.channels[-1], "conv_in")(z)
    for i in reversed(range(len(self.channels))):
      ch = self.channels[i]
      h = ResBlock(ch, name=f"res_{i}")(h)
      h = _upsample_nearest(h)
      h = _conv(ch, f"up_{i}")(h)
    h = nn.silu(_norm(h.shape[-1], "norm_out")(h))
    return _conv(self.out_channels, "conv_out")(h)


def autoencoder_modules(image_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                        latent_channels: int = 4) -> tuple[Encoder, Decoder]:
  """(Encoder, Decoder) for images of `image_shape` (H, W, C)."""
  check(len(image_shape) == 3, f"image_shape: expected (H, W, C), got {tuple(image_shape)}")
  check_positive_int("image_shape", image_shape[-1])
  _check_channels(channels, latent_channels)
  channels = tuple(int(c) for c in channels)
  return (Encoder(channels, int(latent_channels)),
          Decoder(int(image_shape[-1]), channels))


def latent_shape(image_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 latent_channels: int = 4) -> tuple[int, int, int]:
  """(h, w, latent_channels) of the latent of an image of `image_shape` (H, W, C)."""
  f = downsample_factor(channels)
  h, w, _ = image_shape
  check(h % f == 0 and w % f == 0,
        f"image_shape: expected H, W multiples of {f}, got {tuple(image_shape)}")
  return (h // f, w // f, int(latent_channels))


def init_autoencoder(key: chex.PRNGKey, image_shape: tuple[int, int, int],
                     channels: tuple[int, ...] = (32, 64), latent_channels: int = 4) -> dict:
  """{'encoder': params, 'decoder': params}: the 'params' collections of both modules."""
  autoencoder_modules(image_shape, channels, latent_channels)  # checks the arguments
  latent_shape(image_shape, channels, latent_channels)
  return _init(key, tuple(int(v) for v in image_shape), tuple(int(c) for c in channels),
               int(latent_channels))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init(key: chex.PRNGKey, image_shape: tuple[int, int, int], channels: tuple[int, ...],
          latent_channels: int) -> dict:
  # Jitted: initialised op by op, the modules would compile every op on its own. The weights
  # are drawn from an 'rbg' key derived from `key`: XLA:CPU compiles one threefry sampler per
  # initializer call, slowly (12 s for this tiny model), RngBitGenerator in a fraction of it.
  # Deterministic for a key on one backend (init only: trained params are what is saved).
  encoder, decoder = autoencoder_modules(image_shape, channels, latent_channels)
  rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  k_enc, k_dec = jax.random.split(rbg)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  z = jnp.zeros((1, *latent_shape(image_shape, channels, latent_channels)), jnp.float32)
  return {"encoder": encoder.init(k_enc, x)["params"],
          "decoder": decoder.init(k_dec, z)["params"]}


def kl_to_standard_normal(mean: Array, logvar: Array) -> Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) per element, same shape as `mean`."""
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def autoencoder_loss(encoder: Encoder, decoder: Decoder, params: dict, x: Array,
                     key: chex.PRNGKey, kl_weight: float = 1e-6
                     ) -> tuple[Array, dict[str, Array]]:
  """L1 + MSE reconstruction of a posterior sample + kl_weight * KL(q || N(0, I)), each a
  mean per element.

  Args:
    encoder, decoder: the modules.
    params: {'encoder': ..., 'decoder': ...}.
    x: [B, H, W, C] images in [-1, 1].
    key: PRNG key of the posterior sample.
    kl_weight: weight of the KL term.

  Returns:
    (loss, {'loss', 'l1', 'mse', 'kl'}), scalars.
  """
  mean, logvar = encoder.apply({"params": params["encoder"]}, x)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  recon = decoder.apply({"params": params["decoder"]}, z)
  l1 = jnp.mean(jnp.abs(recon - x))
  mse = jnp.mean(jnp.square(recon - x))
  kl = jnp.mean(kl_to_standard_normal(mean, logvar))
  loss = l1 + mse + kl_weight * kl
  return loss, {"loss": loss, "l1": l1, "mse": mse, "kl": kl}
