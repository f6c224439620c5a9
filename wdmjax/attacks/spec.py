"""Model attacks named `NAME:STRENGTH`, applied in order to a trained workdir.

  prune:F            global magnitude pruning of the kernels to a share F of zeros
  prune_layer:F      the same per kernel
  noise:S            Gaussian weight noise of std S
  noise_rel:S        ... of std S times each tensor's own std
  quantize:MODE      round trip through fp16, bf16 or int8 (per output channel)
  finetune:N         N steps of full fine-tuning on the config's clean data (lr 1e-4)
  finetune_difffit:N N steps of DiffFit on clean data (lr 1e-3)
  finetune_lora:N    N steps of LoRA (rank 4) on clean data (lr 1e-3)
  steps:N            sample with N steps (a sampling option kept in the config)
  dropout:P          sample with dropout at rate P in every block (kept in the config)
  raw                the raw weights instead of the EMA (first attack only)

`apply_attacks` runs them on (config, params); the fine-tuning attacks are done by the
caller's `finetune` function (`wdmjax.runs.attack` trains them with `wdmjax.peft`).
`wdmjax.runs.attack` writes the attacked model as an ordinary workdir.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import chex
import jax
import ml_collections
import numpy as np

from wdmjax.attacks.model import QUANT_MODES, prune, quantize, weight_noise
from wdmjax.errors import check

FINETUNE_LR = {"full": 1e-4, "difffit": 1e-3, "lora": 1e-3}
_FLOAT = ("prune", "prune_layer", "noise", "noise_rel", "dropout")
_INT = ("finetune", "finetune_difffit", "finetune_lora", "steps")
ATTACKS = (*_FLOAT, "quantize", *_INT, "raw")

_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Attack:
  name: str
  strength: float | int | str | None = None

  def __str__(self) -> str:
    return self.name if self.strength is None else f"{self.name}:{self.strength}"


def parse_attack(text: str) -> Attack:
  """'prune:0.3' -> Attack('prune', 0.3), with clear errors for unknown names and strengths."""
  check(isinstance(text, str) and text, f"attack: expected NAME:STRENGTH, got {text!r}")
  name, _, value = text.partition(":")
  check(name in ATTACKS, f"attack: expected a name in {list(ATTACKS)}, got {name!r}")
  if name == "raw":
    check(not value, f"attack: 'raw' takes no strength, got {text!r}")
    return Attack("raw")
  check(value, f"attack: expected {name}:STRENGTH, got {text!r}")
  if name == "quantize":
    check(value in QUANT_MODES,
          f"attack: expected quantize:MODE with MODE in {list(QUANT_MODES)}, got {text!r}")
    return Attack(name, value)
  if name in _INT:
    check(value.isascii() and value.isdigit() and int(value) >= 1,
          f"attack: expected {name}:N with N a positive integer, got {text!r}")
    return Attack(name, int(value))
  try:
    x = float(value)
  except ValueError:
    x = float("nan")
  # Finite in float32 (the weights' type) only: `inf >= 0` holds, but infinite noise leaves
  # nothing to attack, and 1e39 is finite in float64 but not in the float32 it is cast to.
  if name.startswith("prune") or name == "dropout":
    check(0.0 <= x < 1.0, f"attack: expected {name}:F with F in [0, 1), got {text!r}")
  else:
    check(math.isfinite(x) and 0.0 <= x <= _FLOAT32_MAX,
          f"attack: expected {name}:STD with STD in [0, {_FLOAT32_MAX:.3g}] (finite in "
          f"float32), got {text!r}")
  return Attack(name, x)


def apply_weight_attack(attack: Attack, params: chex.ArrayTree, key: chex.PRNGKey
                        ) -> chex.ArrayTree:
  """The attacks that need only the weights."""
  if attack.name in ("prune", "prune_layer"):
    return prune(params, attack.strength, "global" if attack.name == "prune" else "layer")
  if attack.name in ("noise", "noise_rel"):
    return weight_noise(params, key, attack.strength, relative=attack.name == "noise_rel")
  if attack.name == "quantize":
    return quantize(params, attack.strength)
  raise ValueError(attack.name)


FinetuneFn = Callable[[ml_collections.ConfigDict, chex.ArrayTree, Attack, int],
                     chex.ArrayTree]


def apply_attacks(cfg: ml_collections.ConfigDict, params: chex.ArrayTree,
                  attacks: list[Attack], seed: int = 0, finetune: FinetuneFn | None = None
                  ) -> tuple[ml_collections.ConfigDict, chex.ArrayTree]:
  """(config, params) after `attacks` in order. Sampling attacks change the config's
  `sample` and `model` sections; fine-tuning attacks call `finetune(cfg, params, attack,
  seed)`. A raw-weights attack must already have been honoured by the caller (it chooses
  which weights to load)."""
  cfg = cfg.copy_and_resolve_references()
  for i, a in enumerate(attacks):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    if a.name == "raw":
      continue
    if a.name == "steps":
      check(a.strength <= cfg.diffusion.num_timesteps,
            f"attack: expected steps:N with N <= {cfg.diffusion.num_timesteps}, got {a}")
      cfg.sample.steps = int(a.strength)
    elif a.name == "dropout":
      with cfg.unlocked():  # the model may not have the key yet
        cfg.model.dropout = float(a.strength)
      cfg.sample.dropout = True
    elif a.name.startswith("finetune"):
      check(finetune is not None, f"attack: {a} needs a finetune function")
      params = finetune(cfg, params, a, seed + i)
    else:
      params = apply_weight_attack(a, params, key)
  return cfg, params
