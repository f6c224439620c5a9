"""Classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax.numpy as jnp

# The largest |scale| a sampler accepts: beyond it guidance only saturates every pixel (DiT
# samples at 1.5 to 4; few papers go past 20).
MAX_GUIDANCE = 100.0


def guided_model_fn(model_fn: Callable, params: chex.ArrayTree, y: chex.Array,
                    scale: chex.Numeric, null_label: chex.Numeric
                    ) -> Callable[[chex.Array, chex.Array], chex.Array]:
  """A denoise function that mixes conditional and unconditional outputs in one batch.

  out = u + scale * (c - u) on the first C channels (scale = 1: plain conditional sampling,
  scale = 0: unconditional); extra channels (a learned variance) come from the conditional
  half. `model_fn(params, x [B,H,W,C], t [B], y [B]) -> [B,H,W,C']`.
  """
  chex.assert_rank(y, 1)

  def denoise(x, t):
    b, c = x.shape[0], x.shape[-1]
    y_null = jnp.full_like(y, null_label)
    out = model_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([y, y_null]))
    cond, uncond = out[:b], out[b:]
    mixed = uncond[..., :c] + scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([mixed, cond[..., c:]], axis=-1)

  return denoise
