"""UNet score network in the DDPM / improved-diffusion style (Flax linen, NHWC)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from wdmjax.errors import check, check_number
from wdmjax.models.layers import (
  Array,
  Dtype,
  LabelAndOutputMixin,
  LabelEmbedder,
  SelfAttention,
  TimestepEmbedder,
  check_inputs,
  check_int_sequence,
  check_positive_int,
)

# DDPM initialises every conv / dense with fan-avg uniform variance scaling.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros


def _conv(features: int, name: str, dtype: Dtype, *, kernel: int = 3, stride: int = 1,
          kernel_init=default_init) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, kernel_init=kernel_init,
                 name=name)


class ResBlock(nn.Module):
  """GroupNorm-SiLU-Conv, + time-embedding projection, GroupNorm-SiLU-Dropout-Conv, skip.

  The second conv starts at zero, so the block starts as its (1x1-conv) skip path.
  """
  out_ch: int
  dropout: float
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    """x: [B, H, W, Cin], temb: [B, E] -> [B, H, W, out_ch]."""
    h = nn.silu(nn.GroupNorm(self.num_groups, epsilon=1e-6, dtype=self.dtype, name="norm1")(x))
    h = _conv(self.out_ch, "conv1", self.dtype)(h)
    emb = nn.Dense(self.out_ch, dtype=self.dtype, kernel_init=default_init,
                   name="temb_proj")(nn.silu(temb))
    h = h + emb[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.num_groups, epsilon=1e-6, dtype=self.dtype, name="norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.out_ch, "conv2", self.dtype, kernel_init=zeros_init)(h)
    if x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, "skip", self.dtype, kernel=1)(x)
    return x + h


class AttnBlock(nn.Module):
  """Residual self-attention over the H*W positions (output projection starts at zero)."""
  num_heads: int
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, H, W, C] -> [B, H, W, C]."""
    b, hh, ww, c = x.shape
    h = nn.GroupNorm(self.num_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    h = SelfAttention(self.num_heads, kernel_init=default_init, proj_init=zeros_init,
                      dtype=self.dtype, name="attn")(h.reshape(b, hh * ww, c))
    return x + h.reshape(b, hh, ww, c)


class UNet(LabelAndOutputMixin, nn.Module):
  """DDPM / improved-diffusion UNet.

  With the DDPM CIFAR-10 settings (resolution 32, ch 128, ch_mult (1, 2, 2, 2),
  num_res_blocks 2, attn_resolutions (16,), dropout 0.1) it has 35.75M parameters.

  Attributes:
    resolution: input height = width; divisible by 2 ** (len(ch_mult) - 1).
    in_channels: input channels C.
    ch: base width; the time embedding is 4 * ch wide.
    ch_mult: width multiplier per level; one stride-2 downsampling between levels.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attn_resolutions: feature-map sizes after which self-attention is applied.
    dropout: dropout rate inside the ResBlocks (active only with train=True).
    num_classes: 0 for an unconditional model, else the number of classes.
    class_dropout_prob: > 0 adds a null class for classifier-free guidance; the training
      loss drops labels at this rate with `drop_labels` (the model itself does not).
    learn_sigma: also output the variance interpolation (doubles the output channels).
    num_groups: GroupNorm groups; must divide ch * m for every m and ch.
    num_heads: attention heads (DDPM: 1).
    out_channels: output channels before learn_sigma doubling (default: in_channels).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, output is float32.
  """
  resolution: int
  in_channels: int
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_classes: int = 0
  class_dropout_prob: float = 0.0
  learn_sigma: bool = False
  num_groups: int = 32
  num_heads: int = 1
  out_channels: int | None = None
  dtype: Dtype = jnp.float32

  def check_config(self) -> None:
    """Raises WdmjaxError on inconsistent hyper-parameters."""
    check_positive_int("resolution", self.resolution)
    check_positive_int("in_channels", self.in_channels)
    check_positive_int("ch", self.ch)
    check_int_sequence("ch_mult", self.ch_mult, allow_empty=False)
    check_int_sequence("attn_resolutions", self.attn_resolutions)
    check(isinstance(self.num_res_blocks, int) and self.num_res_blocks >= 0,
          f"num_res_blocks: expected an int >= 0, got {self.num_res_blocks!r}")
    factor = 2 ** (len(self.ch_mult) - 1)
    check(self.resolution % factor == 0,
          f"resolution: expected a multiple of 2**(len(ch_mult)-1) = {factor}, "
          f"got {self.resolution}")
    check_number(self.dropout, "dropout", 0, 1, high_open=True)
    check(isinstance(self.num_classes, int) and self.num_classes >= 0,
          f"num_classes: expected an int >= 0, got {self.num_classes!r}")
    check_number(self.class_dropout_prob, "class_dropout_prob", 0, 1)
    check_positive_int("num_groups", self.num_groups)
    check_positive_int("num_heads", self.num_heads)
    if self.out_channels is not None:
      check_positive_int("out_channels", self.out_channels)
    widths = sorted({self.ch, *(self.ch * m for m in self.ch_mult)})
    check(all(w % self.num_groups == 0 for w in widths),
          f"num_groups: expected a divisor of every width {widths}, got {self.num_groups}")
    if self.attn_resolutions:
      for m in self.ch_mult:
        check((self.ch * m) % self.num_heads == 0,
              f"num_heads: expected a divisor of every width ch*ch_mult, got {self.num_heads} "
              f"for width {self.ch * m}")

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *,
               train: bool = False) -> Array:
    """Predicts the network output for noisy images.

    Args:
      x: [B, H, W, C] float noisy images, H = W = resolution, C = in_channels.
      t: [B] int or float timesteps in 0..T-1.
      y: [B] int32 class labels (negative or num_classes = null class), or None.
      train: enables dropout (uses the 'dropout' rng).

    Returns:
      [B, H, W, output_channels] float32.
    """
    self.check_config()
    check_inputs(x, t, y, resolution=self.resolution, in_channels=self.in_channels,
                 num_classes=self.num_classes, use_null_class=self.use_null_class)
    dt = self.dtype
    temb = TimestepEmbedder(4 * self.ch, frequency_dim=self.ch, kernel_init=default_init,
                            dtype=dt, name="time_embed")(t)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full(t.shape, self.num_classes, jnp.int32)
      temb = temb + LabelEmbedder(self.num_classes, 4 * self.ch, self.use_null_class,
                                  dtype=dt, name="label_embed")(y)

    def res(h, out_ch, name):
      return ResBlock(out_ch, self.dropout, self.num_groups, dt, name=name)(h, temb, train)

    def attn(h, name):
      return AttnBlock(self.num_heads, self.num_groups, dt, name=name)(h)

    # Down path: remember every activation for the skip connections.
    h = _conv(self.ch, "conv_in", dt)(x.astype(dt))
    skips = [h]
    n_levels = len(self.ch_mult)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res(h, self.ch * mult, f"down_{level}_res_{i}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"down_{level}_attn_{i}")
        skips.append(h)
      if level != n_levels - 1:
        h = _conv(h.shape[-1], f"down_{level}_downsample", dt, stride=2)(h)
        skips.append(h)

    h = res(h, h.shape[-1], "mid_res_0")
    h = attn(h, "mid_attn")
    h = res(h, h.shape[-1], "mid_res_1")

    # Up path: num_res_blocks + 1 blocks per level, each eats one skip.
    for level in reversed(range(n_levels)):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(h, self.ch * self.ch_mult[level], f"up_{level}_res_{i}")
        if h.shape[1] in self.attn_resolutions:
          h = attn(h, f"up_{level}_attn_{i}")
      if level != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour
        h = _conv(h.shape[-1], f"up_{level}_upsample", dt)(h)

    h = nn.silu(nn.GroupNorm(self.num_groups, epsilon=1e-6, dtype=dt, name="norm_out")(h))
    h = _conv(self.output_channels, "conv_out", dt, kernel_init=zeros_init)(h)
    return h.astype(jnp.float32)
