"""Which parameters a parameter-efficient fine-tune trains: DiffFit, BitFit, LoRA or all.

DiffFit (Xie et al., 2023) trains the bias terms, the norm scales and biases, the class
(label) embedding and per-block scale factors gamma (the DiT's `gamma_attn`/`gamma_mlp`,
initialised to 1), in the first half of the blocks by default (the paper's ablation: the
first 14 of DiT-XL/2's 28). BitFit (Ben Zaken et al., 2022) trains the biases; here also the
class embedding, without which a model cannot learn new classes (on DiT-XL/2 with 101
classes that is the 0.61M of the DiffFit paper). LoRA trains rank-r adapters (see
`wdmjax.peft.lora`) and the class embedding; `full` trains everything.

Labels are a pytree like the parameters with leaves TRAIN or FREEZE, decided from each leaf's
path, so they work on abstract shapes (`jax.eval_shape`) without allocating a model.
"""

from __future__ import annotations

import re

import chex
import numpy as np
from flax import traverse_util

from wdmjax.errors import check

TRAIN, FREEZE = "train", "freeze"
STRATEGIES = ("full", "bitfit", "difffit", "lora")
# Module names that hold a class/label embedding (DiT's y_embedder, the UNet's label_embed).
_LABEL_MODULES = ("y_embedder", "label_embed")
_BLOCK = re.compile(r"^DiTBlock_(\d+)$")


def check_strategy(strategy: str) -> None:
  check(strategy in STRATEGIES,
        f"strategy: expected one of {list(STRATEGIES)}, got {strategy!r}")


def _is_norm(path: tuple[str, ...]) -> bool:
  return path[-1] in ("scale", "bias") and any("norm" in p.lower() for p in path[:-1])


def _gamma_block(path: tuple[str, ...]) -> int | None:
  """The block index of a DiffFit gamma leaf, else None."""
  if not path[-1].startswith("gamma"):
    return None
  for p in path:
    m = _BLOCK.match(p)
    if m:
      return int(m.group(1))
  return -1  # a gamma outside a numbered block: always trainable


def _num_blocks(flat: dict) -> int:
  blocks = {int(m.group(1)) for k in flat for p in k if (m := _BLOCK.match(p))}
  return max(blocks) + 1 if blocks else 0


def label_leaf(path: tuple[str, ...], strategy: str, gamma_blocks: int) -> str:
  """TRAIN or FREEZE for the parameter at `path` (a tuple of module and leaf names)."""
  if strategy == "full":
    return TRAIN
  if any(p in _LABEL_MODULES for p in path):
    return TRAIN
  if strategy == "lora":
    return TRAIN if path[0] == "lora" else FREEZE
  if path[-1] == "bias":
    return TRAIN
  if strategy == "bitfit":
    return FREEZE
  if _is_norm(path):
    return TRAIN
  block = _gamma_block(path)
  if block is not None:
    return TRAIN if block < gamma_blocks else FREEZE
  return FREEZE


def param_labels(params: chex.ArrayTree, strategy: str, gamma_blocks: int | None = None
                 ) -> chex.ArrayTree:
  """A pytree like `params` with TRAIN or FREEZE leaves (see the module docstring).

  gamma_blocks: DiffFit trains the gammas of the first `gamma_blocks` DiT blocks; default
    half the blocks (rounded up). Other gammas stay frozen at 1.
  """
  check_strategy(strategy)
  flat = traverse_util.flatten_dict(params)
  n = _num_blocks(flat)
  gamma_blocks = (n + 1) // 2 if gamma_blocks is None else gamma_blocks
  check(isinstance(gamma_blocks, int) and not isinstance(gamma_blocks, bool)
        and 0 <= gamma_blocks <= max(n, 0 if strategy == "difffit" else gamma_blocks),
        f"gamma_blocks: expected an int in [0, {n}] (the model's DiT blocks), "
        f"got {gamma_blocks!r}")
  labels = {k: label_leaf(k, strategy, gamma_blocks) for k in flat}
  return traverse_util.unflatten_dict(labels)


def count_trainable(params: chex.ArrayTree, labels: chex.ArrayTree) -> dict:
  """{'trainable', 'total', 'fraction'} parameter counts (works on abstract shapes)."""
  sizes = traverse_util.flatten_dict(params)
  flat_labels = traverse_util.flatten_dict(labels)
  total = sum(int(np.prod(v.shape)) for v in sizes.values())
  trainable = sum(int(np.prod(v.shape)) for k, v in sizes.items() if flat_labels[k] == TRAIN)
  return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}
