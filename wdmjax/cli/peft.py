"""`wdmjax finetune` and `wdmjax params`: parameter-efficient fine-tuning from the shell."""

from __future__ import annotations

import json

import jax

from wdmjax import runs
from wdmjax.cli.multihost import add_distributed_args
from wdmjax.peft import STRATEGIES, PeftSpec


def spec_from_args(args) -> PeftSpec:
  return PeftSpec(strategy=args.peft, gamma_blocks=args.gamma_blocks,
                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha)


def cmd_finetune(args) -> int:
  r = runs.finetune(args.base, args.workdir, spec_from_args(args), config=args.config,
                    overrides=args.set, steps=args.steps, lr=args.lr, lr_mult=args.lr_mult,
                    progress=not args.no_progress, log=print)
  if jax.process_index() == 0:
    print(f"{r.strategy} fine-tune: {r.workdir} (step {r.step}, {r.seconds:.0f} s); delta "
          f"{r.delta_bytes / 1024:.1f} KiB")
  return 0


def cmd_params(args) -> int:
  out = runs.params(args.config, spec_from_args(args), args.set)
  if args.json:
    print(json.dumps(out))
  else:
    print(f"{args.peft}: {out['trainable']:,} of {out['total']:,} parameters trainable "
          f"({100 * out['fraction']:.4f}%)")
  return 0


def peft_args(p, required: bool = True) -> None:
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
