"""`attack`: a trained (watermarked) workdir's model after weight, fine-tuning and sampling
attacks, written as a new workdir that `sample`, `extract` and `verify` accept."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import chex
import jax
import ml_collections
import numpy as np

from wdmjax.attacks import FINETUNE_LR, Attack, apply_attacks, parse_attack
from wdmjax.configs import apply_override, validate
from wdmjax.errors import check, check_seed
from wdmjax.files import check_dir_path
from wdmjax.peft import PeftSpec, finetune
from wdmjax.runs.model import load_model
from wdmjax.train.export import workdir_from_params
from wdmjax.workdir import Workdir


def finetune_attack(scratch: str, progress: bool = False):
  """The fine-tuning attacks as `apply_attacks` calls them: `finetune:N` (full, lr 1e-4),
  `finetune_difffit:N` and `finetune_lora:N` (lr 1e-3) on the config's clean data, in
  `scratch`."""

  def run(cfg: ml_collections.ConfigDict, params: chex.ArrayTree, attack: Attack,
          seed: int) -> chex.ArrayTree:
    strategy = {"finetune_difffit": "difffit", "finetune_lora": "lora"}.get(attack.name, "full")
    base = workdir_from_params(cfg, params, os.path.join(scratch, f"base_{seed}"), 0)
    ft_cfg = cfg.copy_and_resolve_references()
    for o in (f"train.steps={attack.strength}", f"train.lr={FINETUNE_LR[strategy]}",
              "train.warmup_steps=0", "train.sample_every=0", f"train.seed={seed}"):
      apply_override(ft_cfg, o)
    workdir = os.path.join(scratch, f"finetune_{seed}")
    finetune(validate(ft_cfg), workdir, base.path, params, PeftSpec(strategy),
             progress=progress)
    return load_model(workdir).params

  return run


def attack_model(cfg: ml_collections.ConfigDict, params: chex.ArrayTree,
                 attacks: Sequence[str | Attack], seed: int = 0, progress: bool = False
                 ) -> tuple[ml_collections.ConfigDict, chex.ArrayTree]:
  """(config, params) after `attacks` ('NAME:STRENGTH' or `Attack`s, in order), fine-tuning
  attacks included. A leading `raw` must already have been honoured by the caller."""
  parsed = [a if isinstance(a, Attack) else parse_attack(a) for a in attacks]
  with tempfile.TemporaryDirectory(prefix="wdmjax_attack_") as scratch:
    return apply_attacks(cfg, params, parsed, seed, finetune_attack(scratch, progress))


@dataclasses.dataclass(frozen=True)
class AttackResult:
  out: str
  attacks: list[str]
  seconds: float


def attack(workdir: str | Workdir, out: str | Workdir, attacks: Sequence[str], *,
           seed: int = 0, progress: bool = True) -> AttackResult:
  """Writes `out`, the model of `workdir` after `attacks` ('NAME:STRENGTH', in order; see
  `wdmjax.attacks.spec`), as an ordinary workdir plus attacks.json. `out` is written whole
  or not at all. The owner's secret.json is never copied (an attacked copy is a model to
  ship or hand over): verify it with the original's secret, `verify(out, secret=workdir)`
  (`wdmjax verify --workdir OUT --secret WORKDIR`)."""
  t0 = time.time()
  check_dir_path(out, "out", writable=True)
  check_seed(seed)
  src, dst = Workdir(workdir), Workdir(out)
  parsed = [parse_attack(a) for a in attacks]
  check(parsed, "attack: expected at least one attack")
  check(all(a.name != "raw" for a in parsed[1:]),
        "attack: 'raw' chooses the weights to start from; give it first")
  check(not dst.exists() or not os.listdir(dst.path),
        f"out: expected a new or empty directory, got {dst.path!r}")
  check(dst.abspath != src.abspath, "out: expected a new directory, not the workdir itself")
  cfg, params = load_model(src, ema=parsed[0].name != "raw")
  cfg, params = attack_model(cfg, params, parsed, seed, progress)
  check(all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(params)),
        f"attack: {', '.join(map(str, parsed))} leaves non-finite weights (a strength beyond "
        f"float32's range?); nothing was written")
  parent = os.path.dirname(dst.abspath)
  os.makedirs(parent, exist_ok=True)
  tmp = Workdir(tempfile.mkdtemp(prefix=".attack_", dir=parent))
  try:
    workdir_from_params(validate(cfg), params, tmp, 0)
    tmp.write_json(Workdir.ATTACKS, {"source": src.abspath, "attacks": [str(a) for a in parsed],
                                     "seed": seed})
    if dst.exists():
      os.rmdir(dst.path)
    os.replace(tmp.path, dst.path)
  except BaseException:
    shutil.rmtree(tmp.path, ignore_errors=True)
    raise
  return AttackResult(dst.abspath, [str(a) for a in parsed], time.time() - t0)
