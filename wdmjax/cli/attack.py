"""`wdmjax attack`: a watermarked model after weight and sampling attacks, as a workdir."""

from __future__ import annotations

import argparse

from wdmjax import runs
from wdmjax.attacks.spec import __doc__ as ATTACKS_DOC


def cmd_attack(args) -> int:
  r = runs.attack(args.workdir, args.out, args.attack, seed=args.seed,
                  progress=not args.no_progress)
  print(f"{' then '.join(r.attacks)} -> {r.out} ({r.seconds:.1f} s)")
  return 0


def add_parsers(sub) -> None:
  a = sub.add_parser("attack", help="attack a trained workdir's weights or sampling; writes "
                     "a workdir that sample and verify accept",
                     description=ATTACKS_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
  a.add_argument("--workdir", required=True, help="the trained (watermarked) workdir")
  a.add_argument("--out", required=True, help="the attacked workdir (new)")
  a.add_argument("--attack", action="append", required=True, metavar="NAME:STRENGTH",
                 help="e.g. prune:0.3, noise:0.01, quantize:int8, finetune:1000 (repeatable, "
                 "applied in order)")
  a.add_argument("--seed", type=int, default=0, help="for noise and fine-tuning")
  a.add_argument("--no-progress", action="store_true")
  a.set_defaults(func=cmd_attack)
