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


def _weight_grad(x: Array, g: Array) -> Array:
  """x: [N, C], g: [N, F] -> x^T g, [C, F]."""
  return jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))


def _weight_grad_cpu(x: Array, g: Array) -> Array:
  """x^T g as an ordinary [M, K] x [K, N] dot, after copying the smaller operand transposed.

  XLA:CPU runs a dot that contracts the leading axes of both operands as a generic Eigen
  contraction (153 to 179 GFLOP/s for most of the DiT's weight shapes on 2 cores) but an
  ordinary one on its YNNPACK path (about 200): the copy pays for itself. The barriers keep
  XLA from folding the transpose back into the dot and from recomputing the operand's
  producer inside the copy.
  """
  barrier = jax.lax.optimization_barrier
  if x.shape[1] <= g.shape[1]:
    return barrier(barrier(x).T) @ g
  return barrier(barrier(barrier(g).T) @ x).T


@jax.custom_vjp
def dense_matmul(x: Array, kernel: Array) -> Array:
  """x: [N, C] @ kernel: [C, F] -> [N, F] (same dtypes), with a faster weight gradient on CPU.

  The value and both gradients are those of `x @ kernel`; only the order of the weight
  gradient's operands differs on CPU (`_weight_grad_cpu`). A frozen kernel (or input) gets
  no gradient computed at all (parameter-efficient fine-tuning).
  """
  return x @ kernel


def _dense_matmul_fwd(x, kernel):
  need_dx, need_dkernel = x.perturbed, kernel.perturbed
  x, kernel = x.value, kernel.value
  return x @ kernel, (x if need_dkernel else None, kernel if need_dx else None)


def _dense_matmul_bwd(res, g):
  x, kernel = res
  dx = None if kernel is None else g @ kernel.T
  dkernel = None if x is None else jax.lax.platform_dependent(
    x, g, cpu=_weight_grad_cpu, default=_weight_grad)
  return dx, dkernel


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd, symbolic_zeros=True)


class TokenDense(nn.Module):
  """`nn.Dense(features)` on tokens flattened to one matrix: x [..., C] -> [..., features].

  Same parameters (`kernel` [C, features], `bias`) and values as `nn.Dense` on [B, L, C], so
  checkpoints load either way. Two things make it faster to train on XLA:CPU
  (`benchmarks/profile_step.py`):
    * the 2-D matmul: autodiff of the 3-D form contracts the weight gradient over two axes,
      for which XLA:CPU copies a transposed activation (1.3 to 3 ms each at width 384,
      batch 32);
    * `dense_matmul`'s weight gradient on the fast dot path.
  `epilogue(product [N, F], bias [F]) -> [N, F]`, when given, replaces the bias add, so a
  following elementwise op (e.g. `bias_gelu`) joins it in one pass.
  """
  features: int
  kernel_init: Initializer = xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array,
               epilogue: Callable[[Array, Array], Array] | None = None) -> Array:
    """x: [..., C] -> [..., features]."""
    c = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (c, self.features)).astype(self.dtype)
    bias = self.param("bias", zeros_init, (self.features,)).astype(self.dtype)
    y = dense_matmul(x.reshape(-1, c).astype(self.dtype), kernel)
    y = y + bias if epilogue is None else epilogue(y, bias)
    return y.reshape(*x.shape[:-1], self.features)


def token_dense(x: Array, features: int, *, name: str, kernel_init: Initializer = xavier_uniform,
                dtype: Dtype = jnp.float32,
                epilogue: Callable[[Array, Array], Array] | None = None) -> Array:
  """`TokenDense(features)(x, epilogue)`, for use inside a compact module."""
  return TokenDense(features, kernel_init=kernel_init, dtype=dtype, name=name)(x, epilogue)


class QKVDense(nn.Module):
  """The fused q/k/v projection of `SelfAttention`, emitted heads-first.

  Its parameters are those of `nn.Dense(3 * C)` (`kernel` [C, 3C], `bias` [3C]), so
  checkpoints and parameter counts are unchanged. The projection is one [B*L, C] x [C, 3C]
  `dense_matmul` (see `TokenDense`) followed by a transpose of the heads to the front, which
  keeps the head dimension minor: the attention einsums then read contiguous [B, H, L, D]
  blocks.
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
    qkv = dense_matmul(x.astype(self.dtype).reshape(b * length, c), kernel) + bias
    return qkv.reshape(b, length, 3, h, d).transpose(2, 0, 3, 1, 4)


def _attention_weights(q: Array, k: Array, v: Array) -> Array:
  """Softmax weights [B, H, L, M] of q k^T / sqrt(D) (float32 logits, v's dtype).

  The scale multiplies the logits inside the softmax's pass rather than q (one [B, H, L, D]
  pass less; exact when D is a power of 4, as at head width 64)."""
  logits = jnp.einsum("bhld,bhmd->bhlm", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
  return jax.nn.softmax(logits, axis=-1).astype(v.dtype)


@jax.custom_vjp
def attention_heads_first(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention on heads-first tensors, scaled by 1/sqrt(D).

  q: [B, H, L, D], k, v: [B, H, M, D] -> [B, H, L, D]. The backward pass is
  FlashAttention's (Dao et al. 2022, eq. 4): dS = P * (dP - rowsum(dO * O)), from the saved
  weights P and output O, which leaves XLA fewer [B, H, L, M] passes than autodiff of
  the softmax.
  """
  return jnp.einsum("bhlm,bhmd->bhld", _attention_weights(q, k, v), v)


def _attention_fwd(q, k, v):
  w = _attention_weights(q, k, v)
  o = jnp.einsum("bhlm,bhmd->bhld", w, v)
  return o, (q, k, v, w, o)


def _attention_bwd(res, do):
  q, k, v, w, o = res
  scale = q.shape[-1] ** -0.5
  dv = jnp.einsum("bhlm,bhld->bhmd", w, do)
  dw = jnp.einsum("bhld,bhmd->bhlm", do, v).astype(jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (w.astype(jnp.float32) * (dw - delta) * scale).astype(q.dtype)
  dq = jnp.einsum("bhlm,bhmd->bhld", ds, k)
  dk = jnp.einsum("bhlm,bhld->bhmd", ds, q)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


attention_heads_first.defvjp(_attention_fwd, _attention_bwd)


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
    h = attention_heads_first(q, k, v).transpose(0, 2, 1, 3).reshape(b, length, c)
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
