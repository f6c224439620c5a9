"""`finetune` and `params`: parameter-efficient fine-tuning (DiffFit, BitFit, LoRA, full) of
a trained workdir, and the parameter counts of each strategy."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import ml_collections

from wdmjax.configs import BASE_SECTIONS, apply_override, apply_overrides, load_config, validate
from wdmjax.errors import check, check_number
from wdmjax.peft import LR_MULT, PeftSpec, count
from wdmjax.peft import finetune as _finetune
from wdmjax.runs.model import load_model
from wdmjax.train.derived import model_kwargs
from wdmjax.workdir import Workdir


def finetune_config(base: str | Workdir, config: str | None = None,
                    overrides: Sequence[str] = (), steps: int | None = None,
                    lr: float | None = None, lr_mult: float | None = None,
                    strategy: str = "difffit") -> ml_collections.ConfigDict:
  """The fine-tune's config: `config` (or the base's own), with the learning rate set to
  `lr`, or the base's rate times `lr_mult` (default 10 for PEFT, as the DiffFit paper; 1 for
  full fine-tuning), no warm-up, and `overrides` applied last."""
  base_cfg = Workdir(base).read_config()
  cfg = load_config(config, []) if config else Workdir(base).read_config()
  if lr is None:
    mult = (1.0 if strategy == "full" else LR_MULT) if lr_mult is None else lr_mult
    check_number(mult, "lr_mult", 0, low_open=True)
    lr = float(base_cfg.train.lr) * mult
  check_number(lr, "lr", 0, low_open=True)
  apply_override(cfg, f"train.lr={lr}")
  apply_override(cfg, "train.warmup_steps=0")
  if steps is not None:
    check(isinstance(steps, int) and steps >= 1,
          f"steps: expected a positive integer, got {steps!r}")
    apply_override(cfg, f"train.steps={steps}")
  apply_overrides(cfg, overrides, keep=BASE_SECTIONS)
  return validate(cfg)


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
  workdir: str
  strategy: str
  step: int
  seconds: float
  delta: str | None  # delta.npz (written by process 0)
  delta_bytes: int


def finetune(base: str | Workdir, workdir: str | Workdir, spec: PeftSpec | None = None, *,
             config: str | None = None, overrides: Sequence[str] = (),
             steps: int | None = None, lr: float | None = None, lr_mult: float | None = None,
             progress: bool = True, log=None) -> FinetuneResult:
  """Fine-tunes the EMA weights of the trained workdir `base` by `spec` (default DiffFit)
  into `workdir` (resumed if interrupted); see `finetune_config` for the learning rate."""
  t0 = time.time()
  spec = spec or PeftSpec()
  check(Workdir(base).abspath != Workdir(workdir).abspath,
        "workdir: expected a new directory, not the base workdir itself")
  cfg = finetune_config(base, config, overrides, steps, lr, lr_mult, spec.strategy)
  base_params = load_model(base, ema=True).params
  state = _finetune(cfg, workdir, Workdir(base).path, base_params, spec, progress=progress,
                    log=log)
  wd = Workdir(workdir)
  delta = wd.file(Workdir.DELTA) if wd.exists(Workdir.DELTA) else None
  return FinetuneResult(wd.abspath, spec.strategy, int(state.step), time.time() - t0, delta,
                        os.path.getsize(delta) if delta else 0)


def params(config: str, spec: PeftSpec | None = None, overrides: Sequence[str] = ()) -> dict:
  """{'trainable', 'total', 'fraction'}: what `spec` (default DiffFit) trains of the model of
  `config`, from abstract shapes (nothing is allocated)."""
  cfg = load_config(config, overrides)
  return count(model_kwargs(cfg), spec or PeftSpec())
