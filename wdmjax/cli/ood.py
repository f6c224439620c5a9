"""`wdmjax ood ...`: a diffusion model as an out-of-distribution screen (per-image scores
and flags; AUROC / FAR95 of OOD sets against an in-distribution set)."""

from __future__ import annotations

import argparse
import json

from wdmjax import runs
from wdmjax.errors import check
from wdmjax.ood import AGGREGATIONS, OOD_SETS
from wdmjax.runs.ood import DEFAULT_DRAWS, DEFAULT_T, DEFAULT_VAL


def _steps(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated integer steps such as 300,500,700, got {text!r}") from None


def _val_line(rep: dict) -> str:
  note = (" (the model's training data: images it never saw raise more false alarms; give "
          "--val held-out data)" if rep["val_is_training_data"] else "")
  return (f"detector: {rep['detector']} over t={','.join(map(str, rep['t']))}, threshold "
          f"{rep['threshold']:.4g} at {rep['fpr']:g} false alarms on {rep['val_images']} "
          f"images of {rep['val']}{note}")


def cmd_score(args) -> int:
  check(args.show >= 0, f"show: expected a number of rows >= 0, got {args.show}")
  rep = runs.ood_score(args.workdir, images=args.images, data=args.data, t=args.t,
                       draws=args.draws, seed=args.seed, fpr=args.fpr, val=args.val,
                       val_n=args.val_n, n=args.n, ddim_steps=args.ddim_steps,
                       aggregation=args.aggregation, data_dir=args.data_dir, out=args.out)
  if args.json:
    print(json.dumps(rep))
    return 0
  print(_val_line(rep))
  print("| image | score | flagged |")
  print("|---|---|---|")
  for r in rep["images"][:args.show]:
    print(f"| {r['image']} | {r['score']:.5g} | {'OOD' if r['flagged'] else ''} |")
  if len(rep["images"]) > args.show:
    print(f"... {len(rep['images']) - args.show} more" +
          (f" in {args.out}" if args.out else " (--out FILE.json keeps them all)"))
  print(f"flagged {rep['flagged']} of {rep['num_images']} images "
        f"({rep['images_per_second']:.1f} images/s, compilation included)")
  return 0


def cmd_eval(args) -> int:
  rep = runs.ood_eval(args.workdir, args.id_data, args.ood_data, t=args.t, draws=args.draws,
                      seed=args.seed, fpr=args.fpr, val=args.val, val_n=args.val_n, n=args.n,
                      ddim_steps=args.ddim_steps, aggregation=args.aggregation,
                      data_dir=args.data_dir)
  if args.json:
    print(json.dumps(rep))
    return 0
  print(_val_line(rep))
  print(f"in-distribution {rep['id']['data']}: {rep['id']['images']} images, "
        f"{100 * rep['id']['flagged']:.1f}% flagged")
  print("| OOD data | images | AUROC | AUPR | FAR95 | TPR at 5% FAR | flagged |")
  print("|---|---|---|---|---|---|---|")
  for r in rep["rows"]:
    print(f"| {r['data']} | {r['images']} | {r['auroc']:.4f} | {r['aupr']:.4f} | "
          f"{r['far95']:.4f} | {r['tpr_at_fpr_0.05']:.4f} | {100 * r['flagged']:.1f}% |")
  return 0


def _common(p) -> None:
  p.add_argument("--workdir", required=True, help="a trained (pixel-space) diffusion workdir")
  p.add_argument("--t", type=_steps, default=None,
                 help="noising steps in [1, T], comma-separated (default: 10%%, 30%%, ..., "
                 f"90%% of T, {','.join(map(str, DEFAULT_T))} for T = 1000)")
  p.add_argument("--draws", type=int, default=DEFAULT_DRAWS, help="noise draws per step")
  p.add_argument("--aggregation", default=None, choices=AGGREGATIONS,
                 help="default: chosen on the validation images")
  p.add_argument("--ddim-steps", type=int, default=1,
                 help="reconstruct with a DDIM chain of this many steps from t (default 1: "
                 "one prediction)")
  p.add_argument("--fpr", type=float, default=0.05,
                 help="false alarm rate of the threshold on the validation images")
  p.add_argument("--val", default=None, help="in-distribution validation images (a data "
                 "spec; default: the model's training data)")
  p.add_argument("--val-n", type=int, default=DEFAULT_VAL)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--json", action="store_true")


def add_parsers(sub) -> None:
  specs = ("a data spec: NAME[:SPLIT][@CLASSES] of an embedded or prepared set (mnist5k@9, "
           f"digits, ...) or a built-in OOD set ({', '.join(OOD_SETS)})")
  o = sub.add_parser("ood", help="out-of-distribution screening by diffusion reconstruction")
  osub = o.add_subparsers(dest="ood_command", required=True)
  s = osub.add_parser("score", help="per-image OOD scores and flags")
  src = s.add_mutually_exclusive_group(required=True)
  src.add_argument("--images", help="a directory (or file) of PNG/JPEG images at the "
                   "model's size")
  src.add_argument("--data", help=specs)
  s.add_argument("--n", type=int, default=None, help="at most this many images of --data")
  s.add_argument("--out", default=None, help="write every image's score to this .json")
  s.add_argument("--show", type=int, default=20, help="rows to print")
  _common(s)
  s.set_defaults(func=cmd_score)

  e = osub.add_parser("eval", help="AUROC, AUPR and FAR95 of OOD sets against an "
                      "in-distribution set")
  e.add_argument("--id", dest="id_data", required=True,
                 help="in-distribution test images, " + specs)
  e.add_argument("--ood", dest="ood_data", action="append", required=True,
                 help="an OOD set (repeatable), " + specs)
  e.add_argument("--n", type=int, default=1000, help="at most this many images per set")
  _common(e)
  e.set_defaults(func=cmd_eval)
