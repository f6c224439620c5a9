"""Diffusion Transformer (DiT, Peebles & Xie) with adaLN-Zero blocks and DiffFit gammas."""

from __future__ import annotations

import flax.linen as nn
import jax
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
  check_positive_int,
  get_2d_sincos_pos_embed,
  token_dense,
  zeros_init,
)

# Published configurations (Table 1 of the DiT paper); the patch size is in the name.
_DIT_SIZES = {
  "S": dict(width=384, depth=12, num_heads=6),
  "B": dict(width=768, depth=12, num_heads=12),
  "L": dict(width=1024, depth=24, num_heads=16),
  "XL": dict(width=1152, depth=28, num_heads=16),
}
DIT_PRESETS: dict[str, dict[str, int]] = {
  f"{size}/{p}": dict(cfg, patch_size=p) for size, cfg in _DIT_SIZES.items() for p in (2, 4, 8)
}

# DiT flattens the patch-embedding kernel to [p*p*C, width] before Xavier initialisation.
patch_embed_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                    in_axis=(0, 1, 2), out_axis=-1)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """x: [B, L, D], shift, scale: [B, D] -> x * (1 + scale) + shift."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


@jax.checkpoint
def bias_gelu(y: Array, bias: Array) -> Array:
  """GELU (tanh approximation) of y + bias; y: [N, F], bias: [F].

  Checkpointed: the forward pass is one fused pass that keeps only its inputs, and the
  backward pass recomputes the GELU where its derivative is needed. Plain autodiff makes
  XLA store the tanh and the sum as well (two more [N, F] passes per block).
  """
  return nn.gelu(y + bias, approximate=True)


@jax.checkpoint
def gated_residual(x: Array, h: Array, gate: Array) -> Array:
  """x + gate * h; x, h: [B, L, D], gate: [B, D]. Checkpointed like `bias_gelu`: one pass
  forward, no [B, L, D] product kept for the backward pass."""
  return x + gate[:, None, :] * h


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  # No affine parameters: adaLN supplies shift and scale.
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class Mlp(nn.Module):
  """Dense -> GELU (tanh approximation) -> Dense."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, D] -> [B, L, D]."""
    h = token_dense(x, self.hidden, name="fc1", dtype=self.dtype, epilogue=bias_gelu)
    return token_dense(h, x.shape[-1], name="fc2", dtype=self.dtype)


class DiTBlock(nn.Module):
  """Transformer block with adaLN-Zero conditioning.

  x = x + gate_msa * gamma_attn * Attn(modulate(LN(x), shift_msa, scale_msa))
  x = x + gate_mlp * gamma_mlp * Mlp(modulate(LN(x), shift_mlp, scale_mlp))

  `gamma_attn` and `gamma_mlp` ([width], init 1) are the DiffFit scale factors: inert
  until fine-tuned. Blocks with use_gamma=False have no such parameters. `dropout` drops
  attention and MLP outputs when not deterministic (0 by default, as in DiT; the attack
  suite samples with it).
  """
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  use_gamma: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array, deterministic: bool = True) -> Array:
    """x: [B, L, width] tokens, c: [B, width] conditioning -> [B, L, width]."""
    mod = nn.Dense(6 * self.width, dtype=self.dtype, kernel_init=zeros_init,
                   name="adaLN_modulation")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

    h = modulate(_layer_norm("norm1", self.dtype)(x), shift_msa, scale_msa)
    h = SelfAttention(self.num_heads, dtype=self.dtype, name="attn")(h)
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    # The gamma scales the gate ([B, D]) rather than h ([B, L, D]): the same product.
    if self.use_gamma:
      gate_msa = gate_msa * self.param("gamma_attn", nn.initializers.ones,
                                       (self.width,)).astype(self.dtype)
    x = gated_residual(x, h, gate_msa)

    h = modulate(_layer_norm("norm2", self.dtype)(x), shift_mlp, scale_mlp)
    h = Mlp(int(self.width * self.mlp_ratio), dtype=self.dtype, name="mlp")(h)
    h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
    if self.use_gamma:
      gate_mlp = gate_mlp * self.param("gamma_mlp", nn.initializers.ones,
                                       (self.width,)).astype(self.dtype)
    return gated_residual(x, h, gate_mlp)


class FinalLayer(nn.Module):
  """LN (no affine) + adaLN shift/scale + Dense to p*p*out_channels, all zero-initialised."""
  width: int
  out_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    """x: [B, L, width], c: [B, width] -> [B, L, out_dim]."""
    mod = nn.Dense(2 * self.width, dtype=self.dtype, kernel_init=zeros_init,
                   name="adaLN_modulation")(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = modulate(_layer_norm("norm_final", self.dtype)(x), shift, scale)
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=zeros_init, name="linear")(x)


class DiT(LabelAndOutputMixin, nn.Module):
  """Diffusion Transformer with adaLN-Zero (Peebles & Xie 2023).

  DiT-XL/2 at 256 px (resolution 32 latents, in_channels 4, 1000 classes, learn_sigma)
  has 675M parameters; see `DIT_PRESETS` for the S/B/L/XL sizes.

  Attributes:
    resolution: input height = width, divisible by patch_size.
    in_channels: input channels C.
    patch_size: p; the model sees (resolution / p)^2 tokens.
    width: hidden size, divisible by num_heads and by 4.
    depth: number of DiTBlocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / width.
    num_classes: 0 for an unconditional model, else the number of classes.
    class_dropout_prob: > 0 adds a null class for classifier-free guidance; the training
      loss drops labels at this rate with `drop_labels` (the model itself does not).
    learn_sigma: also output the variance interpolation (doubles the output channels).
    out_channels: output channels before learn_sigma doubling (default: in_channels).
    pos_coord_scale: the position embedding uses coordinates index / pos_coord_scale
      (use 2 to evaluate at twice the training resolution, as in DiffFit).
    gamma_blocks: the first gamma_blocks blocks carry DiffFit gammas (None: all).
    dropout: dropout on each block's attention and MLP outputs when train=True (0: none;
      no parameters, so any rate loads the same checkpoint).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, output is float32.
  """
  resolution: int
  in_channels: int
  patch_size: int = 2
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  learn_sigma: bool = False
  out_channels: int | None = None
  pos_coord_scale: float = 1.0
  gamma_blocks: int | None = None
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def check_config(self) -> None:
    """Raises WdmjaxError on inconsistent hyper-parameters."""
    for name in ("resolution", "in_channels", "patch_size", "width", "num_heads"):
      check_positive_int(name, getattr(self, name))
    check(isinstance(self.depth, int) and self.depth >= 0,
          f"depth: expected an int >= 0, got {self.depth!r}")
    check(self.resolution % self.patch_size == 0,
          f"resolution: expected a multiple of patch_size={self.patch_size}, "
          f"got {self.resolution}")
    check(self.width % self.num_heads == 0,
          f"width: expected a multiple of num_heads={self.num_heads}, got {self.width}")
    check(self.width % 4 == 0,
          f"width: expected a multiple of 4 (2-D sin-cos position embedding), got {self.width}")
    # Finite numbers only (NaN and inf pass `x > 0`; inf * width overflows below).
    check_number(self.mlp_ratio, "mlp_ratio", 0, 1e6, low_open=True)
    check(int(self.width * self.mlp_ratio) > 0, f"mlp_ratio: expected width * mlp_ratio >= 1, "
                                                f"got {self.mlp_ratio!r}")
    check(isinstance(self.num_classes, int) and self.num_classes >= 0,
          f"num_classes: expected an int >= 0, got {self.num_classes!r}")
    check_number(self.class_dropout_prob, "class_dropout_prob", 0, 1)
    if self.out_channels is not None:
      check_positive_int("out_channels", self.out_channels)
    check_number(self.dropout, "dropout", 0, 1, high_open=True)
    check_number(self.pos_coord_scale, "pos_coord_scale", 0, low_open=True)
    check(self.gamma_blocks is None
          or (isinstance(self.gamma_blocks, int) and 0 <= self.gamma_blocks <= self.depth),
          f"gamma_blocks: expected None or an int in [0, depth={self.depth}], "
          f"got {self.gamma_blocks!r}")

  @nn.compact
  def __call__(self, x: Array, t: Array, y: Array | None = None, *,
               train: bool = False) -> Array:
    """Predicts the network output for noisy images (or latents).

    Args:
      x: [B, H, W, C] float, H = W = resolution, C = in_channels.
      t: [B] int or float timesteps in 0..T-1.
      y: [B] int32 class labels (negative or num_classes = null class), or None.
      train: applies `dropout` (a 'dropout' rng is then needed when dropout > 0); labels
        are dropped by the loss, not here.

    Returns:
      [B, H, W, output_channels] float32.
    """
    self.check_config()
    check_inputs(x, t, y, resolution=self.resolution, in_channels=self.in_channels,
                 num_classes=self.num_classes, use_null_class=self.use_null_class)
    dt, p, b = self.dtype, self.patch_size, x.shape[0]
    grid = self.resolution // p

    h = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=dt,
                kernel_init=patch_embed_init, name="x_embedder")(x.astype(dt))
    h = h.reshape(b, grid * grid, self.width)
    pos = get_2d_sincos_pos_embed(self.width, grid, self.pos_coord_scale)
    h = h + jnp.asarray(pos, dt)[None]

    c = TimestepEmbedder(self.width, dtype=dt, name="t_embedder")(t)
    if self.num_classes > 0:
      if y is None:
        y = jnp.full(t.shape, self.num_classes, jnp.int32)
      c = c + LabelEmbedder(self.num_classes, self.width, self.use_null_class, dtype=dt,
                            name="y_embedder")(y)

    n_gamma = self.depth if self.gamma_blocks is None else self.gamma_blocks
    for i in range(self.depth):
      h = DiTBlock(self.width, self.num_heads, self.mlp_ratio, use_gamma=i < n_gamma,
                   dropout=self.dropout, dtype=dt, name=f"DiTBlock_{i}")(h, c, not train)

    h = FinalLayer(self.width, p * p * self.output_channels, dtype=dt, name="final_layer")(h, c)
    # Unpatchify: [B, g*g, p*p*C] -> [B, g*p, g*p, C].
    out = self.output_channels
    h = h.reshape(b, grid, grid, p, p, out).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, grid * p, grid * p, out).astype(jnp.float32)
