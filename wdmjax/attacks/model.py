"""Attacks on a model's weights: pure functions params -> params, composable in any order.

  prune          magnitude pruning of the kernels (global or per layer) to a fraction of zeros;
  weight_noise   Gaussian noise on every weight, absolute or relative to each tensor's std;
  quantize       round trip through fp16, bf16 or int8 (symmetric, per output channel).

Sampling-time attacks (a different step count, dropout while sampling, raw instead of EMA
weights) and fine-tuning on clean data need the config and the data; `wdmjax.attacks.spec`
parses all of them from `NAME:STRENGTH` and applies them to a workdir.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wdmjax.errors import check

QUANT_MODES = ("fp16", "bf16", "int8")


def is_kernel(path: tuple[str, ...], leaf: chex.Array) -> bool:
  """The weights pruning acts on: matrices and conv kernels (biases, norms, gammas and
  position tables stay)."""
  return path[-1] in ("kernel", "embedding") and leaf.ndim >= 2


def _map_kernels(params: chex.ArrayTree, fn) -> chex.ArrayTree:
  flat = traverse_util.flatten_dict(params)
  out = {k: fn(k, v) if is_kernel(k, v) else v for k, v in flat.items()}
  return traverse_util.unflatten_dict(out)


def prune(params: chex.ArrayTree, fraction: float, scope: str = "global") -> chex.ArrayTree:
  """Zeroes the `fraction` of kernel weights with the smallest magnitude.

  Args:
    params: parameter tree.
    fraction: share of the kernel weights to zero, in [0, 1).
    scope: 'global' (one magnitude threshold over all kernels) or 'layer' (each kernel
      loses `fraction` of its own weights).

  Returns:
    A tree like params; kernels pruned, every other leaf unchanged.
  """
  check(0.0 <= fraction < 1.0, f"prune: expected a fraction in [0, 1), got {fraction!r}")
  check(scope in ("global", "layer"), f"scope: expected 'global' or 'layer', got {scope!r}")
  if fraction == 0.0:
    return params

  def keep_top(x, count):  # zero the `count` smallest |x| exactly (ties broken by position)
    order = jnp.argsort(jnp.abs(x).ravel())
    mask = jnp.ones(x.size, bool).at[order[:count]].set(False)
    return jnp.where(mask.reshape(x.shape), x, 0).astype(x.dtype)

  if scope == "layer":
    return _map_kernels(params, lambda _, v: keep_top(v, int(round(fraction * v.size))))
  flat = traverse_util.flatten_dict(params)
  kernels = {k: v for k, v in flat.items() if is_kernel(k, v)}
  check(kernels, "params: expected at least one kernel to prune, found none")
  mags = jnp.concatenate([jnp.abs(v).ravel() for v in kernels.values()])
  count = int(round(fraction * mags.size))
  threshold = jnp.sort(mags)[count - 1] if count else -1.0
  # Global: zero |w| <= the count-th smallest magnitude (ties at it are rare in floats).
  return _map_kernels(params, lambda _, v: jnp.where(jnp.abs(v) > threshold, v, 0).astype(v.dtype))


def weight_noise(params: chex.ArrayTree, key: chex.PRNGKey, std: float, relative: bool = False
                 ) -> chex.ArrayTree:
  """Adds N(0, std^2) to every weight (relative: std times each tensor's own std)."""
  check(std >= 0.0, f"noise: expected a non-negative std, got {std!r}")
  return _weight_noise(params, key, jnp.float32(std), relative)


@functools.partial(jax.jit, static_argnames="relative")  # one compile, not one per leaf shape
def _weight_noise(params: chex.ArrayTree, key: chex.PRNGKey, std: chex.Array, relative: bool
                  ) -> chex.ArrayTree:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for k, v in zip(keys, leaves, strict=True):
    scale = std * (jnp.std(v) if relative and v.size > 1 else 1.0)
    out.append((v + scale * jax.random.normal(k, v.shape, jnp.float32)).astype(v.dtype))
  return jax.tree.unflatten(treedef, out)


def quantize_int8(x: chex.Array) -> tuple[chex.Array, chex.Array]:
  """Symmetric int8 with one scale per output channel (the last axis; one scale for vectors).

  Returns (q int8 with x's shape, scale broadcasting against q): x ~ q * scale, and the
  round-trip error is at most scale / 2.
  """
  x = jnp.asarray(x, jnp.float32)
  axes = tuple(range(x.ndim - 1)) if x.ndim >= 2 else tuple(range(x.ndim))
  amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
  return q, scale


def quantize(params: chex.ArrayTree, mode: str) -> chex.ArrayTree:
  """The weights after a round trip through `mode` ('fp16', 'bf16', 'int8'), as float32."""
  check(mode in QUANT_MODES, f"quantize: expected one of {list(QUANT_MODES)}, got {mode!r}")
  if mode in ("fp16", "bf16"):
    dtype = jnp.float16 if mode == "fp16" else jnp.bfloat16
    return jax.tree.map(lambda v: v.astype(dtype).astype(v.dtype), params)

  def roundtrip(v):
    q, scale = quantize_int8(v)
    return (q.astype(jnp.float32) * scale).astype(v.dtype)

  return jax.tree.map(roundtrip, params)


def kernel_sparsity(params: chex.ArrayTree) -> float:
  """Share of zero kernel weights (what `prune` reaches)."""
  flat = traverse_util.flatten_dict(params)
  sizes = [(int(np.sum(np.asarray(v) == 0)), v.size) for k, v in flat.items() if is_kernel(k, v)]
  return sum(z for z, _ in sizes) / max(sum(n for _, n in sizes), 1)
