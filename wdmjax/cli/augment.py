"""`wdmjax augment preview` and `wdmjax classifier`: uncertainty-based augmentation from the
shell (Wu, Zhang, Valiant, Re 2020)."""

from __future__ import annotations

import json

from wdmjax import runs
from wdmjax.augment import FAMILY, POLICIES


def _ops(text: str | None) -> list[str] | None:
  return None if text is None else [o.strip() for o in text.split(",") if o.strip()]


def cmd_preview(args) -> int:
  r = runs.preview(args.data, args.policy, args.out, num=args.num, L=args.L, C=args.C,
                   S=args.S, magnitude=args.magnitude, ops=_ops(args.ops),
                   selection=args.selection, seed=args.seed, data_dir=args.data_dir)
  print(f"{args.policy}: {r.num} images x {args.C} candidates -> {r.path}")
  return 0


def cmd_classifier(args) -> int:
  r = runs.classifier(args.data, args.augment, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, L=args.L, C=args.C, S=args.S, magnitude=args.magnitude,
                      ops=_ops(args.ops), selection=args.selection, seed=args.seed,
                      shift=args.shift, out=args.out,
                      data_dir=args.data_dir, progress=not args.no_progress)
  if args.json:
    print(json.dumps({"accuracy": r.accuracy, "shifted_accuracy": r.shifted_accuracy,
                      "seconds": r.seconds, "steps": r.steps, "augment": r.augment,
                      "path": r.path, "report": r.report}))
    return 0
  print(f"{args.data}, augment {args.augment}: held-out accuracy {100 * r.accuracy:.2f}%, "
        f"shifted {100 * r.shifted_accuracy:.2f}% ({r.steps} steps, {r.seconds:.1f} s)")
  if r.path:
    print(f"classifier: {r.path} (report {r.report})")
  return 0


def _policy_args(p) -> None:
  p.add_argument("--L", type=int, default=2, help="transformations per composition (2)")
  p.add_argument("--C", type=int, default=4, help="candidates per image (4)")
  p.add_argument("--S", type=int, default=1, help="highest-loss candidates kept (1)")
  p.add_argument("--magnitude", type=float, default=1.0,
                 help="upper end of the random magnitudes, in [0, 1]")
  p.add_argument("--ops", default=None, metavar="A,B,...",
                 help="the transformation family (default: all but flip); from "
                 + ", ".join(FAMILY))
  p.add_argument("--selection", default="top", help="top (the S highest losses) or "
                 "proportional (S drawn with probability proportional to the loss)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None, help="TFDS data dir")


def add_parsers(sub) -> None:
  a = sub.add_parser("augment", help="uncertainty-based augmentation: see the candidates")
  asub = a.add_subparsers(dest="augment_command", required=True)
  p = asub.add_parser("preview", help="a picture of the policy on real digits: each image, "
                      "its C candidates, the kept ones framed with their losses")
  p.add_argument("--data", default="mnist5k", help="mnist5k, digits, or a TFDS set")
  p.add_argument("--policy", default="uncertainty", help="random or uncertainty")
  p.add_argument("--out", default="grid.png", help="the PNG to write")
  p.add_argument("--num", type=int, default=8, help="images (rows)")
  _policy_args(p)
  p.set_defaults(func=cmd_preview)

  c = sub.add_parser("classifier", help="train the small digit classifier with an "
                     "augmentation policy; held-out accuracy, clean and shifted")
  c.add_argument("--data", default="mnist5k", help="mnist5k, digits, or a TFDS set")
  c.add_argument("--augment", default="uncertainty", help=f"{', '.join(POLICIES)}")
  c.add_argument("--steps", type=int, default=1000)
  c.add_argument("--batch-size", type=int, default=64)
  c.add_argument("--lr", type=float, default=3e-3)
  c.add_argument("--shift", type=float, default=0.5,
                 help="rotation and translation of the shifted held-out set, in [0, 1]")
  c.add_argument("--out", default=None, help="save the parameters (.npz) and a report (.json)")
  c.add_argument("--json", action="store_true")
  c.add_argument("--no-progress", action="store_true")
  _policy_args(c)
  c.set_defaults(func=cmd_classifier)
