"""`wdmjax demo`: the whole WDM story on the embedded MNIST digits (see `wdmjax.runs.demo`)."""

from __future__ import annotations

from wdmjax import runs
from wdmjax.runs.demo import EMBED_STEPS


def summary_table(report: dict) -> str:
  alpha = next(iter(report.values()))["alpha"]
  rows = [("model", "bits agreeing", "log10 p", f"verified (alpha {alpha:g})")]
  for name, r in report.items():
    rows.append((name, f"{r['agreeing_bits']}/{r['bits']} ({100 * r['bit_agreement']:.0f}%)",
                 f"{r['log10_p_value']:.2f}", "yes" if r["verified"] else "no"))
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
  sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(rows[0]), sep, *map(line, rows[1:])])


def phase_table(phases: dict) -> str:
  """Where the time went: wall seconds per phase, and the part spent compiling."""
  lines = ["phase     seconds  compiling  programs (from cache)"]
  for name, p in phases.items():
    lines.append(f"{name:<8} {p['seconds']:8.1f} {p['compile_seconds']:10.1f}  "
                 f"{p['programs']:>8} ({p['cache_hits']})")
  return "\n".join(lines)


def cmd_demo(args) -> int:
  r = runs.demo(args.out, steps=args.steps, train_base=args.train_base,
                base_steps=args.base_steps, progress=not args.no_progress, log=print)
  print(summary_table(r.report))
  print(phase_table(r.phases))
  print(f"picture: {r.picture}\nreport:  {r.report_file}\n"
        f"workdirs: {r.base} (clean), {r.watermarked} (watermarked)"
        f"\ndone in {r.seconds:.0f} s ({r.seconds / 60:.1f} min)")
  return 0


def add_parser(sub) -> None:
  d = sub.add_parser("demo", help="the whole WDM story on the embedded MNIST digits: base "
                     "model, watermark embedding, extraction, verification")
  d.add_argument("--out", default="wdmjax_demo")
  d.add_argument("--steps", type=int, default=EMBED_STEPS, help="watermark fine-tuning steps")
  d.add_argument("--train-base", action="store_true",
                 help="train the base model here (about 27 min) instead of using the shipped one")
  d.add_argument("--base-steps", type=int, default=None,
                 help="with --train-base: base training steps (default: the config's, 4000)")
  d.add_argument("--no-progress", action="store_true")
  d.set_defaults(func=cmd_demo)
