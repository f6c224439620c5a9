"""`wdmjax embed | extract | verify`: WDM on workdirs (see `wdmjax.runs.watermark`)."""

from __future__ import annotations

import json
import sys

import jax

from wdmjax import runs
from wdmjax.cli.multihost import add_distributed_args
from wdmjax.cli.peft import peft_args, spec_from_args
from wdmjax.errors import check
from wdmjax.runs.watermark import (
  DECOY_FRACTION,
  DECOY_T_MIN,
  EMBED_STEPS,
  FINETUNE_LR,
  NUM_DECOYS,
  TESTS,
)
from wdmjax.watermark import ALPHA, BEST_TEST, GAMMA1, GAMMA2, SOFT_TEST, Secret
from wdmjax.watermark.robust import KINDS, ORDERS, RobustSpec
from wdmjax.workdir import Workdir


def cmd_embed(args) -> int:
  secret = Secret(trigger=args.trigger, watermark=args.watermark,
                  key=runs.read_key(args.key, args.key_file), gamma1=args.gamma1,
                  gamma2=args.gamma2, block=args.block)
  r = runs.embed(args.workdir, secret, base=args.base, config=args.config, steps=args.steps,
                 lr=args.lr, overrides=args.set, decoy_fraction=args.decoy_fraction,
                 decoy_t_min=args.decoy_t_min, progress=not args.no_progress,
                 peft=None if args.peft is None else spec_from_args(args),
                 robust=robust_from_args(args), log=print)
  if jax.process_index() == 0:
    print(f"watermarked workdir: {r.workdir} (step {r.step}, {r.seconds:.0f} s); secret in "
          f"{Workdir.SECRET}")
  return 0


def robust_from_args(args) -> RobustSpec | None:
  if args.robust is None:
    given = [n for n in ("robust_steps", "robust_lr", "robust_weight")
             if getattr(args, n) is not None]
    check(not given, f"{given[0] if given else ''}: expected --robust with it")
    return None
  defaults = RobustSpec()
  return RobustSpec(
    kind=args.robust, order=args.robust_order,
    steps=defaults.steps if args.robust_steps is None else args.robust_steps,
    lr=defaults.lr if args.robust_lr is None else args.robust_lr,
    weight=defaults.weight if args.robust_weight is None else args.robust_weight)


def _secret_parts(args) -> dict:
  # WDMJAX_KEY completes only a secret typed in full: a stored secret keeps its own key
  # unless --key or --key-file replaces it.
  typed = args.secret is None and args.trigger is not None
  return dict(trigger=args.trigger, watermark=args.watermark, gamma1=args.gamma1,
              block=args.block, key=runs.read_key(args.key, args.key_file, env=typed))


def cmd_extract(args) -> int:
  r = runs.extract(args.workdir, args.secret, num=args.num, sampler=args.sampler,
                   steps=args.steps, seed=args.seed, raw=args.raw, out=args.out,
                   **_secret_parts(args))
  print(f"{args.num} extracted samples ({args.sampler}, {args.steps} steps, "
        f"{r.seconds:.1f} s), then the block vote and the expected bits -> {r.path} "
        f"(secret: {r.secret_source})")
  return 0


def cmd_verify(args) -> int:
  report = runs.verify(args.workdir, args.secret, num=args.num, sampler=args.sampler,
                       steps=args.steps, seed=args.seed, alpha=args.alpha, decoys=args.decoys,
                       test=args.test, **_secret_parts(args))
  if report.get("warning"):
    print(f"wdmjax: warning: {report['warning']}", file=sys.stderr)
  print(json.dumps(report) if args.json else format_report(report))
  return 0


def format_report(r: dict) -> str:
  verdict = "VERIFIED" if r["verified"] else "not verified"
  what = {SOFT_TEST: "sample-block votes", BEST_TEST: "bits of the best sample"}.get(
    r["test"], "bits")
  return (f"{verdict}: {r['agreeing_bits']}/{r['bits']} {what} agree "
          f"({100 * r['bit_agreement']:.1f}%, null {100 * r['null_agreement']:.1f}%), "
          f"log10 p = {r['log10_p_value']:.2f} (alpha {r['alpha']:g}, {r['test']} test, "
          f"{r['num_samples']} samples, {r['sampler']}-{r['steps']}); secret: "
          f"{r.get('secret_source', 'explicit')}")


def add_parsers(sub) -> None:
  """Adds embed, extract and verify to the `wdmjax` subcommand parser."""

  def secret_args(p, required: bool):
    p.add_argument("--trigger", required=required, default=None,
                   help="random:SEED, stripes:SEED or an image file")
    p.add_argument("--watermark", required=required, default=None,
                   help="keyed:SEED, class:DATA:LABEL or an image file")
    if not required:
      p.add_argument("--secret", default=None, metavar="PATH",
                     help="the owner's secret.json, or the owner's watermarked workdir (e.g. "
                          "the original of an attacked copy); --trigger, --watermark, "
                          "--key, --gamma1, --block then replace its fields. Without it "
                          "the secret is --trigger and --watermark (nothing is read from "
                          "--workdir) or, with neither, --workdir's own secret.json")
    p.add_argument("--key", type=int, default=None,
                   help="the owner's integer key (keyed bits give an exact test); visible "
                        "to other local users: prefer --key-file or $WDMJAX_KEY")
    p.add_argument("--key-file", default=None, metavar="PATH",
                   help="a file holding the key, read when --key is not given; without "
                        "either, $WDMJAX_KEY" + ("" if required else " (for a secret given "
                                                "by --trigger and --watermark)"))
    p.add_argument("--gamma1", type=float, default=GAMMA1 if required else None,
                   help="trigger mix of the watermark process")
    p.add_argument("--block", type=int, default=4 if required else None,
                   help="bit block size in pixels (must divide the resolution)")

  def sampling_args(p, num: int):
    p.add_argument("--num", type=int, default=num, help="extracted samples")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    p.add_argument("--seed", type=int, default=0)

  e = sub.add_parser("embed", help="train a watermark into a model (WDM)")
  src = e.add_mutually_exclusive_group(required=True)
  src.add_argument("--base", help="a trained workdir to fine-tune")
  src.add_argument("--config", help="a config to train from scratch with the watermark")
  e.add_argument("--workdir", required=True, help="the watermarked model goes here")
  secret_args(e, required=True)
  e.add_argument("--gamma2", type=float, default=GAMMA2, help="watermark loss weight")
  e.add_argument("--steps", type=int, default=EMBED_STEPS)
  e.add_argument("--lr", type=float, default=None,
                 help=f"learning rate (default {FINETUNE_LR:g} when fine-tuning)")
  e.add_argument("--decoy-fraction", type=float, default=DECOY_FRACTION,
                 help="share of the watermark half-batch given to decoy triggers (task images "
                      "behind random triggers, ordinary target), which makes the watermark "
                      "answer only to the secret trigger (0: the paper's loss)")
  peft_args(e, required=False)
  e.add_argument("--decoy-t-min", type=float, default=DECOY_T_MIN,
                 help="decoys only at timesteps t >= this fraction of the chain (low-noise "
                      "decoys leak speckle into ordinary samples)")
  e.add_argument("--robust", choices=list(KINDS), default=None,
                 help="guard the watermark against a thief's clean fine-tuning: 'finetune' "
                      "simulates the thief's first updates inside the loss (about "
                      "1 + (robust-steps + 1) / 2 times the embedding time; with --gamma1 "
                      "0.5 it is the measured best against fine-tuning), 'surgery' "
                      "projects the watermark's gradient off the task's where they conflict "
                      "(no extra time), 'fisher' anchors the weights the clean task moves "
                      "most")
  e.add_argument("--robust-steps", type=int, default=None,
                 help=f"simulated fine-tuning updates per step (default {RobustSpec().steps})")
  e.add_argument("--robust-lr", type=float, default=None,
                 help=f"the simulated thief's learning rate (default {RobustSpec().lr:g})")
  e.add_argument("--robust-weight", type=float, default=None,
                 help=f"weight of the guard's loss term (default {RobustSpec().weight:g})")
  e.add_argument("--robust-order", choices=list(ORDERS), default=RobustSpec().order,
                 help="differentiate through the simulated updates to first order or fully")
  e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value (repeatable)")
  e.add_argument("--no-progress", action="store_true")
  add_distributed_args(e)
  e.set_defaults(func=cmd_embed)

  x = sub.add_parser("extract", help="sample a watermarked model with its trigger")
  x.add_argument("--workdir", required=True)
  secret_args(x, required=False)
  sampling_args(x, 16)
  x.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA")
  x.add_argument("--out", default="watermark.png")
  x.set_defaults(func=cmd_extract)

  v = sub.add_parser("verify", help="test whether a model carries a watermark")
  v.add_argument("--workdir", required=True)
  secret_args(v, required=False)
  sampling_args(v, 16)
  v.add_argument("--alpha", type=float, default=ALPHA, help="false-positive level")
  v.add_argument("--decoys", type=int, default=NUM_DECOYS,
                 help="decoy triggers (of the secret trigger's kind) for an unkeyed "
                      "watermark: a permutation test over triggers, whose p-value is at "
                      "least 1/(decoys + 1), so it cannot reach a small --alpha; embed with "
                      "--key for an exact test")
  v.add_argument("--test", choices=list(TESTS), default="vote",
                 help="keyed watermark: 'vote' tests the block majority votes of the samples, "
                      "'soft' every sample's block votes (exact too), 'best' the best-agreeing "
                      "sample (Bonferroni over the samples; for a watermark that fine-tuning "
                      "left whole in a few samples). Use --num 64 or more with soft and best")
  v.add_argument("--json", action="store_true", help="print one JSON object")
  v.set_defaults(func=cmd_verify)
