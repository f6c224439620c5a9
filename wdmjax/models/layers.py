"""Building blocks shared by the score networks: embeddings, attention, input checks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import WdmjaxError, check

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

# Any negative label means "no class" (the null class of classifier-free guidance); the
# models also accept the index `num_classes` itself, which is the null row of the table.
NULL_LABEL = -1

xavier_uniform = nn.initializers.xavier_uniform()
zeros_init = nn.initializers.zeros


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep features (as in DDPM / improved-diffusion / DiT).

  Args:
    t: [B] integer or float timesteps (may be fractional).
    dim: width of the embedding.
    max_period: the lowest frequency is 1 / max_period.

  Returns:
    [B, dim] float32 features, `[cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})]` with h = dim // 2
    and f_i = max_period ** (-i / h); an odd `dim` gets a zero last column.
  """
  check(isinstance(dim, int) and dim >= 2, f"dim: expected an int >= 2, got {dim!r}")
  check(jnp.ndim(t) == 1, f"t: expected shape [B], got {jnp.shape(t)}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """Sinusoidal features -> Dense -> SiLU -> Dense.

  Attributes:
    width: output width.
    frequency_dim: width of the sinusoidal features (256 in DiT, `ch` in DDPM).
    kernel_init: initialiser of both Dense kernels (DiT: normal(0.02)).
  """
  width: int
  frequency_dim: int = 256
  kernel_init: Initializer = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array) -> Array:
    """t: [B] timesteps -> [B, width]."""
    h = timestep_embedding(t, self.frequency_dim)
    h = nn.Dense(self.width, dtype=self.dtype, kernel_init=self.kernel_init, name="mlp_0")(h)
    h = nn.silu(h)
    return nn.Dense(self.width, dtype=self.dtype, kernel_init=self.kernel_init, name="mlp_2")(h)


def drop_labels(y: Array, rng: Array, p: float, null_label: int = NULL_LABEL) -> Array:
  """Replaces each label by `null_label` with probability `p` (classifier-free guidance).

  Args:
    y: [B] int class labels.
    rng: PRNG key.
    p: drop probability in [0, 1].
    null_label: the label that means "no class"; the default NULL_LABEL (-1) is the one
      every wdmjax model understands.

  Returns:
    [B] labels, same dtype as `y`.
  """
  check(0.0 <= p <= 1.0, f"p: expected a probability in [0, 1], got {p!r}")
  check(jnp.ndim(y) == 1, f"y: expected shape [B], got {jnp.shape(y)}")
  drop = jax.random.bernoulli(rng, p, jnp.shape(y))
  return jnp.where(drop, jnp.asarray(null_label, y.dtype), y)


class LabelEmbedder(nn.Module):
  """Class-label embedding table, with a null-class row when guidance is enabled.

  Labels are not dropped here: the training loss drops them with `drop_labels` (at the
  model's `class_dropout_prob`) so that the rate is applied exactly once.

  Attributes:
    num_classes: number of real classes.
    width: embedding width.
    use_null_class: add row `num_classes` for "no class"; negative labels map to it too.
  """
  num_classes: int
  width: int
  use_null_class: bool = False
  embedding_init: Initializer = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: Array) -> Array:
    """y: [B] int labels in [0, num_classes) (or null) -> [B, width]."""
    rows = self.num_classes + int(self.use_null_class)
    if self.use_null_class:
      y = jnp.where(y < 0, self.num_classes, y)
    table = nn.Embed(rows, self.width, embedding_init=self.embedding_init, dtype=self.dtype,
                     name="embedding_table")
    return table(y)


def _sincos_1d(width: int, pos: np.ndarray) -> np.ndarray:
  """pos: [M] -> [M, width] as [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-2i/width)."""
  omega = 1.0 / 10000 ** (np.arange(width // 2, dtype=np.float64) / (width / 2.0))
  out = np.outer(pos, omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(width: int, grid_size: int, coord_scale: float = 1.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding (MAE / DiT), not a parameter.

  Token (i, j) (row-major) sits at coordinates (i / coord_scale, j / coord_scale). A model
  trained at grid g and evaluated at grid 2g with coord_scale=2 thus sees the same
  coordinate range [0, g) (the DiffFit resolution-transfer trick).

  Args:
    width: embedding width, divisible by 4 (half for each axis, sin and cos).
    grid_size: tokens per side.
    coord_scale: positive divisor of the coordinates.

  Returns:
    [grid_size * grid_size, width] float32 numpy array; the first half of the channels
    encodes the column coordinate, the second half the row coordinate.
  """
  check(isinstance(width, int) and width > 0 and width % 4 == 0,
        f"width: expected a positive multiple of 4, got {width!r}")
  check(isinstance(grid_size, int) and grid_size > 0,
        f"grid_size: expected a positive int, got {grid_size!r}")
  check(coord_scale > 0, f"coord_scale: expected > 0, got {coord_scale!r}")
  coords = np.arange(grid_size, dtype=np.float64) / coord_scale
  rows, cols = np.meshgrid(coords, coords, indexing="ij")
  emb = np.concatenate([_sincos_1d(width // 2, cols.reshape(-1)),
                        _sincos_1d(width // 2, rows.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention, scaled by 1/sqrt(head_dim).

  q: [B, Lq, H, D], k: [B, Lk, H, D], v: [B, Lk, H, D] -> [B, Lq, H, D].
  """
  return jax.nn.dot_product_attention(q, k, v)


def token_dense(x: Array, features: int, *, name: str, kernel_init: Initializer = xavier_uniform,
                dtype: Dtype = jnp.float32) -> Array:
  """`nn.Dense(features)` on the tokens flattened to one matrix: x [..., C] -> [..., features].

  Same parameters (`kernel` [C, features], `bias`) and values as the Dense on [B, L, C]; call
  it inside a compact module. Autodiff of the 3-D form contracts the weight gradient over two
  axes, for which XLA:CPU copies a transposed activation (1.3 to 3 ms each at width 384,
  batch 32); the 2-D form feeds the same matmuls straight (`benchmarks/profile_step.py`).
  """
  lead = x.shape[:-1]
  flat = x.reshape(-1, x.shape[-1])
  out = nn.Dense(features, dtype=dtype, kernel_init=kernel_init, name=name)(flat)
  return out.reshape(*lead, features)


class QKVDense(nn.Module):
  """The fused q/k/v projection of `SelfAttention`, emitted heads-first.

  Its parameters are those of `nn.Dense(3 * C)` (`kernel` [C, 3C], `bias` [3C]), so
  checkpoints and parameter counts are unchanged. The projection is one [B*L, C] x [C, 3C]
  matmul (see `token_dense`) followed by a transpose of the heads to the front, which keeps
  the head dimension minor: the attention einsums then read contiguous [B, H, L, D] blocks.
  """
  num_heads: int
  kernel_init: Initializer = xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, C] -> [3, B, H, L, C // H] (q, k, v stacked on the leading axis)."""
    b, length, c = x.shape
    h, d = self.num_heads, c // self.num_heads
    kernel = self.param("kernel", self.kernel_init, (c, 3 * c)).astype(self.dtype)
    bias = self.param("bias", zeros_init, (3 * c,)).astype(self.dtype)
    qkv = x.astype(self.dtype).reshape(b * length, c) @ kernel + bias
    return qkv.reshape(b, length, 3, h, d).transpose(2, 0, 3, 1, 4)


class SelfAttention(nn.Module):
  """Multi-head self-attention on tokens: fused qkv projection, attention, output Dense.

  Attributes:
    num_heads: heads; the token width must be divisible by it.
    kernel_init: qkv kernel initialiser.
    proj_init: output kernel initialiser (zeros makes a residual branch start as identity).
  """
  num_heads: int
  kernel_init: Initializer = xavier_uniform
  proj_init: Initializer = xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, C] -> [B, L, C]."""
    b, length, c = x.shape
    check(c % self.num_heads == 0,
          f"num_heads: expected a divisor of the width {c}, got {self.num_heads}")
    q, k, v = QKVDense(self.num_heads, kernel_init=self.kernel_init, dtype=self.dtype,
                       name="qkv")(x)
    # Heads-first einsums: batch dimensions lead, so XLA's dots need no layout copies.
    scale = (c // self.num_heads) ** -0.5
    logits = jnp.einsum("bhld,bhmd->bhlm", q * scale, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bhlm,bhmd->bhld", weights, v).transpose(0, 2, 1, 3).reshape(b, length, c)
    return token_dense(h, c, name="proj", kernel_init=self.proj_init, dtype=self.dtype)


class LabelAndOutputMixin:
  """What UNet and DiT derive alike from their fields num_classes, class_dropout_prob,
  in_channels, out_channels and learn_sigma: the null class and the output width."""

  @property
  def use_null_class(self) -> bool:
    return self.num_classes > 0 and self.class_dropout_prob > 0

  @property
  def null_label(self) -> int | None:
    """The label that means "no class" (NULL_LABEL, -1; None when there is no null class):
    the one value the losses, the samplers and guidance use for it."""
    return NULL_LABEL if self.use_null_class else None

  @property
  def output_channels(self) -> int:
    out = self.in_channels if self.out_channels is None else self.out_channels
    return 2 * out if self.learn_sigma else out


def check_inputs(x: Array, t: Array, y: Array | None, *, resolution: int, in_channels: int,
                 num_classes: int, use_null_class: bool) -> None:
  """Checks the static shapes of a score network's inputs; raises WdmjaxError.

  x: [B, resolution, resolution, in_channels], t: [B], y: [B] int or None.
  A conditional model accepts y=None only when it has a null class.
  """
  expected = f"[B, {resolution}, {resolution}, {in_channels}]"
  shape = tuple(jnp.shape(x))
  if len(shape) != 4 or shape[1:] != (resolution, resolution, in_channels):
    raise WdmjaxError(f"x: expected shape {expected}, got {shape}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise WdmjaxError(f"x: expected a float array, got dtype {jnp.result_type(x)}")
  b = shape[0]
  if tuple(jnp.shape(t)) != (b,):
    raise WdmjaxError(f"t: expected shape [B] = ({b},), got {tuple(jnp.shape(t))}")
  if y is None:
    if num_classes > 0 and not use_null_class:
      raise WdmjaxError(f"y: expected [B] class labels for num_classes={num_classes} "
                        "without a null class, got None")
    return
  if num_classes == 0:
    raise WdmjaxError(f"y: expected None for an unconditional model (num_classes=0), "
                      f"got an array of shape {tuple(jnp.shape(y))}")
  if tuple(jnp.shape(y)) != (b,):
    raise WdmjaxError(f"y: expected shape [B] = ({b},), got {tuple(jnp.shape(y))}")
  if not jnp.issubdtype(jnp.result_type(y), jnp.integer):
    raise WdmjaxError(f"y: expected integer class labels, got dtype {jnp.result_type(y)}")


def max_pool_2x2(x: Array) -> Array:
  """x: [B, H, W, C] -> [B, H // 2, W // 2, C]; an odd last row / column is dropped.

  Reshape + max rather than `nn.max_pool`, whose select-and-scatter backward is slow on
  XLA:CPU.
  """
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def check_positive_int(name: str, value: Any) -> None:
  """Raises WdmjaxError unless `value` is an int > 0."""
  ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value > 0
  check(ok, f"{name}: expected a positive int, got {value!r}")


def check_int_sequence(name: str, value: Sequence[Any], *, allow_empty: bool = True) -> None:
  """Raises WdmjaxError unless `value` is a sequence of positive ints."""
  ok = isinstance(value, Sequence) and not isinstance(value, str) and (allow_empty or value)
  ok = ok and all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0
                  for v in value)
  check(bool(ok), f"{name}: expected a sequence of positive ints, got {value!r}")
