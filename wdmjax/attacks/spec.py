"""Model attacks named `NAME:STRENGTH`, applied in order to a trained workdir.

  prune:F            global magnitude pruning of the kernels to a share F of zeros
  prune_layer:F      the same per kernel
  noise:S            Gaussian weight noise of std S
  noise_rel:S        ... of std S times each tensor's own std
  quantize:MODE      round trip through fp16, bf16 or int8 (per output channel)
  finetune:N         N steps of full fine-tuning on the config's clean data (lr 1e-4)
  finetune_difffit:N N steps of DiffFit on clean data (lr 1e-3)
  steps:N            sample with N steps (a sampling option kept in the config)
  dropout:P          sample with dropout at rate P in every block (kept in the config)
  raw                the raw weights instead of the EMA (first attack only)

`attack_workdir` writes the attacked model as an ordinary workdir (plus attacks.json), which
`wdmjax sample` and `wdmjax verify` accept (with the source's secret.json, if it has one);
it is written whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import chex
import jax

from wdmjax.attacks.model import QUANT_MODES, prune, quantize, weight_noise
from wdmjax.errors import check

FINETUNE_LR = {"full": 1e-4, "difffit": 1e-3}
_FLOAT = ("prune", "prune_layer", "noise", "noise_rel", "dropout")
_INT = ("finetune", "finetune_difffit", "steps")
ATTACKS = (*_FLOAT, "quantize", *_INT, "raw")


@dataclass(frozen=True)
class Attack:
  name: str
  strength: float | int | str | None = None

  def __str__(self) -> str:
    return self.name if self.strength is None else f"{self.name}:{self.strength}"


def parse_attack(text: str) -> Attack:
  """'prune:0.3' -> Attack('prune', 0.3), with clear errors for unknown names and strengths."""
  check(isinstance(text, str) and text, f"--attack: expected NAME:STRENGTH, got {text!r}")
  name, _, value = text.partition(":")
  check(name in ATTACKS, f"--attack: expected a name in {list(ATTACKS)}, got {name!r}")
  if name == "raw":
    check(not value, f"--attack: 'raw' takes no strength, got {text!r}")
    return Attack("raw")
  check(value, f"--attack: expected {name}:STRENGTH, got {text!r}")
  if name == "quantize":
    check(value in QUANT_MODES,
          f"--attack: expected quantize:MODE with MODE in {list(QUANT_MODES)}, got {text!r}")
    return Attack(name, value)
  if name in _INT:
    check(value.isdigit() and int(value) >= 1,
          f"--attack: expected {name}:N with N a positive integer, got {text!r}")
    return Attack(name, int(value))
  try:
    x = float(value)
  except ValueError:
    x = float("nan")
  if name.startswith("prune") or name == "dropout":
    check(0.0 <= x < 1.0, f"--attack: expected {name}:F with F in [0, 1), got {text!r}")
  else:
    check(x >= 0.0, f"--attack: expected {name}:STD with STD >= 0, got {text!r}")
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


def _finetune(cfg, params, attack: Attack, scratch: str, seed: int, progress: bool):
  from wdmjax.peft import PeftSpec, finetune
  from wdmjax.train import load_trained
  from wdmjax.train.config import apply_override
  from wdmjax.train.export import workdir_from_params

  strategy = "difffit" if attack.name == "finetune_difffit" else "full"
  base = workdir_from_params(cfg, params, os.path.join(scratch, f"base_{seed}"), 0)
  ft_cfg = cfg.copy_and_resolve_references()
  for o in (f"train.steps={attack.strength}", f"train.lr={FINETUNE_LR[strategy]}",
            "train.warmup_steps=0", "train.sample_every=0", f"train.seed={seed}"):
    apply_override(ft_cfg, o)
  workdir = os.path.join(scratch, f"finetune_{seed}")
  finetune(ft_cfg, workdir, base, PeftSpec(strategy), progress=progress, log=lambda *a: None)
  return load_trained(workdir)[2]


def apply_attacks(cfg, params, attacks: list[Attack], seed: int = 0, progress: bool = False):
  """(config, params) after `attacks` in order. A raw-weights attack must already have been
  honoured by the caller (it chooses which weights to load)."""
  cfg = cfg.copy_and_resolve_references()
  with tempfile.TemporaryDirectory(prefix="wdmjax_attack_") as scratch:
    for i, a in enumerate(attacks):
      key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
      if a.name == "raw":
        continue
      if a.name == "steps":
        check(a.strength <= cfg.diffusion.num_timesteps,
              f"--attack: expected steps:N with N <= {cfg.diffusion.num_timesteps}, got {a}")
        with cfg.unlocked():
          cfg.sample.steps = int(a.strength)
      elif a.name == "dropout":
        with cfg.unlocked():
          cfg.model.dropout = float(a.strength)
          cfg.sample.dropout = True
      elif a.name.startswith("finetune"):
        params = _finetune(cfg, params, a, scratch, seed + i, progress)
      else:
        params = apply_weight_attack(a, params, key)
  return cfg, params


def attack_workdir(workdir: str, out: str, attacks: list[str], seed: int = 0,
                   progress: bool = True) -> str:
  """Writes `out`, the model of `workdir` after `attacks` ('NAME:STRENGTH', in order)."""
  from wdmjax.train import load_trained
  from wdmjax.train.export import workdir_from_params

  parsed = [parse_attack(a) for a in attacks]
  check(parsed, "--attack: expected at least one attack")
  check(all(a.name != "raw" for a in parsed[1:]),
        "--attack: 'raw' chooses the weights to start from; give it first")
  check(not os.path.exists(out) or not os.listdir(out),
        f"--out: expected a new or empty directory, got {out!r}")
  check(os.path.abspath(out) != os.path.abspath(workdir), "--out: expected a new directory, "
        "not the --workdir itself")
  cfg, _, params = load_trained(workdir, ema=not (parsed[0].name == "raw"))
  cfg, params = apply_attacks(cfg, params, parsed, seed, progress)
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".attack_", dir=parent)
  try:
    workdir_from_params(cfg, params, tmp, 0)
    secret = os.path.join(workdir, "secret.json")
    if os.path.exists(secret):  # the owner's own attacked copy verifies without flags
      shutil.copy2(secret, os.path.join(tmp, "secret.json"))
    with open(os.path.join(tmp, "attacks.json"), "w") as f:
      json.dump({"source": os.path.abspath(workdir), "attacks": [str(a) for a in parsed],
                 "seed": seed}, f, indent=2)
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
