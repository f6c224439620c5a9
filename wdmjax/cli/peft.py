"""`wdmjax finetune` and `wdmjax params`: parameter-efficient fine-tuning from the shell."""

from __future__ import annotations

import json
import os
import time

from wdmjax.cli.multihost import add_distributed_args
from wdmjax.errors import check


def finetune_config(base: str, config: str | None, overrides: list[str], steps: int | None,
                    lr: float | None, lr_mult: float | None, strategy: str):
  """The fine-tune's config: `config` (or the base's own), with the learning rate set to
  `lr`, or the base's rate times `lr_mult` (default 10 for PEFT, as the DiffFit paper; 1 for
  full fine-tuning), no warm-up, and `overrides` applied last."""
  from wdmjax.peft import LR_MULT
  from wdmjax.train import load_config
  from wdmjax.train.config import apply_override, validate
  from wdmjax.train.loop import read_config

  base_cfg = read_config(base)
  cfg = load_config(config, []) if config else read_config(base)
  if lr is None:
    mult = (1.0 if strategy == "full" else LR_MULT) if lr_mult is None else lr_mult
    check(mult > 0, f"--lr-mult: expected a positive factor, got {mult!r}")
    lr = float(base_cfg.train.lr) * mult
  check(lr > 0, f"--lr: expected a positive learning rate, got {lr!r}")
  apply_override(cfg, f"train.lr={lr}")
  apply_override(cfg, "train.warmup_steps=0")
  if steps is not None:
    check(steps >= 1, f"--steps: expected a positive integer, got {steps!r}")
    apply_override(cfg, f"train.steps={steps}")
  for o in overrides:
    apply_override(cfg, o)
  validate(cfg)
  return cfg


def spec_from_args(args):
  from wdmjax.peft import PeftSpec

  return PeftSpec(strategy=args.peft, gamma_blocks=args.gamma_blocks,
                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)


def cmd_finetune(args) -> int:
  import jax

  from wdmjax.peft import DELTA_FILE, finetune

  spec = spec_from_args(args)
  cfg = finetune_config(args.base, args.config, args.set, args.steps, args.lr, args.lr_mult,
                        spec.strategy)
  t0 = time.time()
  state = finetune(cfg, args.workdir, args.base, spec, progress=not args.no_progress)
  if jax.process_index() != 0:
    return 0
  delta = os.path.join(args.workdir, DELTA_FILE)
  print(f"{spec.strategy} fine-tune: {os.path.abspath(args.workdir)} (step {int(state.step)}, "
        f"{time.time() - t0:.0f} s); delta {os.path.getsize(delta) / 1024:.1f} KiB")
  return 0


def cmd_params(args) -> int:
  from wdmjax.peft import count
  from wdmjax.train import load_config
  from wdmjax.train.sampling import model_kwargs

  cfg = load_config(args.config, args.set)
  out = count(model_kwargs(cfg), spec_from_args(args))
  if args.json:
    print(json.dumps(out))
  else:
    print(f"{args.peft}: {out['trainable']:,} of {out['total']:,} parameters trainable "
          f"({100 * out['fraction']:.4f}%)")
  return 0


def peft_args(p, required: bool = True) -> None:
  from wdmjax.peft import STRATEGIES

  p.add_argument("--peft", choices=STRATEGIES, default=None, required=required,
                 help="what to train: difffit (biases, norms, gammas, class embedding), "
                      "bitfit (biases, class embedding), lora (adapters), full"
                      + ("" if required else "; default: a full fine-tune without a delta"))
  p.add_argument("--gamma-blocks", type=int, default=None,
                 help="DiffFit: train the gammas of the first N DiT blocks (default: half)")
  p.add_argument("--lora-rank", type=int, default=4)
  p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator "
                 "(default: the rank)")


def add_parsers(sub) -> None:
  f = sub.add_parser("finetune", help="parameter-efficient fine-tuning of a trained workdir "
                     "(DiffFit, BitFit, LoRA or full); writes a delta")
  f.add_argument("--base", required=True, help="the trained workdir to start from")
  f.add_argument("--workdir", required=True, help="the fine-tune goes here (resumed)")
  f.add_argument("--config", default=None, help="the fine-tune's config (data, resolution, "
                 "...); default: the base's. Its model must take the base's parameters")
  peft_args(f)
  f.add_argument("--steps", type=int, default=None)
  f.add_argument("--lr", type=float, default=None, help="learning rate (default: the base's "
                 "times --lr-mult)")
  f.add_argument("--lr-mult", type=float, default=None,
                 help="multiplier of the base's learning rate (default 10, full: 1)")
  f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value (repeatable)")
  f.add_argument("--no-progress", action="store_true")
  add_distributed_args(f)
  f.set_defaults(func=cmd_finetune)

  q = sub.add_parser("params", help="count the parameters a fine-tuning strategy trains "
                     "(abstract shapes: nothing is allocated)")
  q.add_argument("--config", required=True)
  q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  peft_args(q)
  q.add_argument("--json", action="store_true", help="print one JSON object")
  q.set_defaults(func=cmd_params)
