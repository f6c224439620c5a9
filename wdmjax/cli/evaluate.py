"""`wdmjax evaluate`: watermarks (Tree-Ring, Gaussian Shading, WDM, Stable Signature)
benchmarked under the same attacks, with calibrated detection rates (`wdmjax.runs.evaluate`;
this module only parses and prints)."""

from __future__ import annotations

import argparse
import json

from wdmjax.runs.evaluate import (
  DEFAULT_ATTACKS,
  DEFAULT_MODEL_ATTACKS,
  FPRS,
  METHODS,
  PIXEL_DEFAULT,
  evaluate,
)


def _names(text: str) -> list[str]:
  return [v.strip() for v in text.split(",") if v.strip()]


def _fprs(text: str) -> list[float]:
  try:
    return [float(v) for v in _names(text)]
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected comma-separated rates such as 1e-2,1e-4, got {text!r}") from None


def cmd_evaluate(args) -> int:
  r = evaluate(args.out, _names(args.methods), _names(args.attacks), workdir=args.workdir,
               num=args.num, num_null=args.num_null, steps=args.steps,
               inversion_iters=args.inversion_iters, fprs=args.fprs, seed=args.seed,
               batch_size=args.batch_size, wdm_workdir=args.wdm_workdir,
               wdm_secret=args.wdm_secret, model_attacks=_names(args.model_attacks),
               wdm_group=args.wdm_group, wdm_null=args.wdm_null,
               regen_workdir=args.regen_workdir, regen_steps=args.regen_steps,
               signature_workdir=args.signature_workdir, signature_user=args.signature_user,
               signature_key_file=args.signature_key_file, progress=not args.json)
  if args.json:
    print(json.dumps(r.report))
    return 0
  rep, f = r.report, f"{min(args.fprs):g}"
  print("calibration (empirical FPR on unwatermarked images at each nominal FPR):")
  for m, c in rep["calibration"].items():
    print(f"  {m}: " + ", ".join(f"{k}: {v['rate']:.4f} ({v['k']}/{v['n']})"
                                 for k, v in c.items()))
  print(f"| test | attack | TPR at FPR {f} | FPR of attacked unwatermarked | median log10 p "
        "| bit accuracy |")
  print("|---|---|---|---|---|---|")
  for row in rep["rows"]:
    bits = f"{row['bit_accuracy']:.3f}" if "bit_accuracy" in row else "-"
    fa = row.get("fpr_attacked", {}).get(f)
    fa = "-" if fa is None else f"{fa['rate']:.3f}"
    print(f"| {row['method']} | {row['attack']} | {row['tpr'][f]['rate']:.3f} | {fa} | "
          f"{row['median_log10_p']:.2f} | {bits} |")
  print(f"wrote {r.files['json']}, {r.files['markdown']}, {r.files['samples']} "
        f"({r.seconds:.0f} s)")
  return 0


def add_parser(sub) -> None:
  e = sub.add_parser("evaluate", help="benchmark watermarks (Tree-Ring, Gaussian Shading, "
                     "WDM, Stable Signature) under the same attacks with calibrated rates",
                     description="With wdm among the methods, the demo's secret is embedded "
                     "(600 steps) and every model attack runs, fine-tuning included: about an "
                     "hour on 2 CPU cores with the defaults; --methods tree_ring,"
                     "gaussian_shading takes minutes.")
  e.add_argument("--methods", default=",".join(PIXEL_DEFAULT),
                 help=f"comma-separated, of {', '.join(METHODS)} (default: those of a "
                 "pixel-space model; a latent model takes tree_ring, gaussian_shading and "
                 "stable_signature)")
  e.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS),
                 help="comma-separated image attacks NAME:STRENGTH, chained with '+' "
                 "(none, crop:A, resize:A, jpeg:Q, blur:S, noise:S, rotate:D, brightness:D, "
                 "contrast:F, regen:T with --regen-workdir)")
  e.add_argument("--model-attacks", default=",".join(DEFAULT_MODEL_ATTACKS),
                 help="comma-separated attacks on the weights of the WDM model (as `wdmjax "
                 "attack`: prune:F, quantize:MODE, noise_rel:S, finetune:N, "
                 "finetune_difffit:N, finetune_lora:N); '' for none")
  e.add_argument("--wdm-workdir", default=None,
                 help="a WDM-watermarked workdir (default: embed the demo secret into the "
                 "base, 600 steps, kept in OUT/wdm)")
  e.add_argument("--wdm-secret", default=None,
                 help="the owner's secret.json (default: the WDM workdir's own)")
  e.add_argument("--wdm-group", type=int, default=16,
                 help="samples per majority-vote test of WDM")
  e.add_argument("--wdm-null", type=int, default=1024,
                 help="samples of the clean base queried with the trigger (WDM's null)")
  e.add_argument("--regen-workdir", default=None,
                 help="a second clean model for the regeneration attack regen:T (noise to "
                 "step T, denoise with it)")
  e.add_argument("--regen-steps", type=int, default=20, help="DDIM steps of regeneration")
  e.add_argument("--signature-workdir", default=None,
                 help="a Stable Signature workdir signed for --workdir (a latent model): "
                 "needed for the method stable_signature")
  e.add_argument("--signature-key-file", default=None,
                 help="the owner key of --signature-workdir's registry (default "
                 "$WDMJAX_OWNER_KEY_FILE, or the key in $WDMJAX_OWNER_KEY)")
  e.add_argument("--signature-user", type=int, default=0,
                 help="whose decoder generates the signed images")
  e.add_argument("--out", required=True, help="directory for benchmark.json/.md, samples.png "
                 "(each finished row is saved there as it goes: rerun the same command after "
                 "an interruption to resume; a finished report is never overwritten)")
  e.add_argument("--workdir", default=None,
                 help="a trained pixel-space diffusion workdir (default: the shipped demo DiT)")
  e.add_argument("--num", type=int, default=64, help="watermarked images per method")
  e.add_argument("--num-null", type=int, default=256, help="unwatermarked images")
  e.add_argument("--steps", type=int, default=20, help="DDIM steps (generation and inversion)")
  e.add_argument("--inversion-iters", type=int, default=2,
                 help="fixed-point refinements per inversion step")
  e.add_argument("--fprs", type=_fprs, default=list(FPRS), help="nominal FPRs, comma-separated")
  e.add_argument("--seed", type=int, default=0)
  e.add_argument("--batch-size", type=int, default=64)
  e.add_argument("--json", action="store_true")
  e.set_defaults(func=cmd_evaluate)
