"""LoRA (Hu et al., 2022): rank-r adapters on the attention and MLP kernels, the DiffFit
paper's main baseline.

The adapters live beside the parameters under a top-level 'lora' key, one {'a': [in, r],
'b': [r, out]} pair per adapted kernel (keyed by the kernel's path, '.'-joined, so that a
'/'-flattened delta file keeps one level per adapter); 'b' starts
at zero, so a fresh adapter changes nothing. `apply_lora` folds them in, W + (alpha / r) a b,
before the network runs: simple and exact, though the weight-sized gradient of W + a b is
still formed (a fused LoRA layer would avoid it).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import traverse_util

from wdmjax.errors import check

LORA = "lora"
# Dense layers that get adapters: attention in and out, MLP in and out.
TARGETS = ("qkv", "proj", "fc1", "fc2")


def lora_targets(params: chex.ArrayTree) -> list[tuple[str, ...]]:
  """Paths of the 2-D kernels of the attention and MLP layers."""
  flat = traverse_util.flatten_dict(params)
  return sorted(k for k, v in flat.items()
                if k[-1] == "kernel" and len(k) >= 2 and k[-2] in TARGETS and v.ndim == 2)


def init_lora(rng: chex.PRNGKey, params: chex.ArrayTree, rank: int) -> dict:
  """{'lora': {path: {'a', 'b'}}} for every target kernel; a ~ N(0, 1/in), b = 0."""
  check(isinstance(rank, int) and rank >= 1, f"lora_rank: expected a positive int, got {rank!r}")
  flat = traverse_util.flatten_dict(params)
  targets = lora_targets(params)
  check(len(targets) > 0, "lora: this model has no attention or MLP kernels to adapt")
  out = {}
  for key, k in zip(jax.random.split(rng, len(targets)), targets, strict=True):
    d_in, d_out = flat[k].shape
    out[".".join(k)] = {"a": jax.random.normal(key, (d_in, rank), jnp.float32) / jnp.sqrt(d_in),
                        "b": jnp.zeros((rank, d_out), jnp.float32)}
  return {LORA: out}


def apply_lora(params: chex.ArrayTree, alpha: float | None = None) -> chex.ArrayTree:
  """The network's parameters with the adapters folded in (no 'lora' key left).

  alpha: the LoRA scale numerator (default: the rank, i.e. a scale of 1).
  """
  if LORA not in params:
    return params
  adapters = params[LORA]
  flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != LORA})
  for name, ab in adapters.items():
    k = tuple(name.split("."))
    check(k in flat, f"lora: no kernel {name!r} in the parameters")
    r = ab["a"].shape[1]
    scale = (r if alpha is None else alpha) / r
    flat[k] = flat[k] + scale * (ab["a"] @ ab["b"]).astype(flat[k].dtype)
  return traverse_util.unflatten_dict(flat)
