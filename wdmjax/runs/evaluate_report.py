"""The report of `wdmjax evaluate` as text: the summary lines it prints and benchmark.md
(`wdmjax.runs.evaluate` computes the report)."""

from __future__ import annotations

LEGACY_THRESHOLD_NOTE = (
  "**Void where the null has ties.** This report predates the tie-safe threshold: it "
  "flagged p <= the k-th smallest unwatermarked p-value, which flags every unwatermarked "
  "image tied with it. A test whose clean p-values are all 1 (Tree-Ring on the latents: "
  "median log10 p 0.00) then 'detects' everything, which the 'none' row of the false "
  "positives under attack shows (its threshold columns flag the unwatermarked images too); "
  "for the discrete tests (binomial p-values) these TPRs are upper bounds. The nominal-FPR "
  "tables are not affected.")


def _rate(r: dict) -> str:
  return f"{r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def summary(report: dict) -> list[str]:
  """One line per test: calibrated or not, unattacked TPR, how many attacks it survives."""
  fprs = [f"{f:g}" for f in report["settings"]["fprs"]]
  f = min(fprs, key=float)
  out = []
  for t in dict.fromkeys(r["method"] for r in report["rows"]):
    rows = [r for r in report["rows"] if r["method"] == t]
    cal = report["calibration"].get(t, {})
    above = [g for g in fprs if g in cal and cal[g]["low"] > float(g)]
    verdict = ("empirical FPR at or below nominal at every level" if not above else
               f"empirical FPR above nominal at {', '.join(above)} (e.g. "
               f"{cal[above[-1]]['rate']:.3g} at {above[-1]}): its nominal TPRs do not mean "
               "what they say")
    none = next((r for r in rows if r["attack"] == "none"), None)
    image = [r for r in rows if not r["attack"].startswith("model ")]
    model = [r for r in rows if r["attack"].startswith("model ")]
    kept = sum(r["tpr"][f]["rate"] >= 0.9 for r in image)
    line = f"- **{t}**: {verdict}; "
    if none is not None:
      line += f"unattacked TPR {none['tpr'][f]['rate']:.2f} at nominal FPR {f}; "
    line += f"TPR >= 0.9 under {kept} of {len(image)} image attacks"
    if model:
      line += (f" and {sum(r['tpr'][f]['rate'] >= 0.9 for r in model)} of {len(model)} model "
               "attacks")
    emp = [g for g in fprs if none is not None and none["tpr_empirical"][g] is not None
           and "empirical_threshold" in report["settings"]]  # legacy: LEGACY_THRESHOLD_NOTE
    if emp:
      g = min(emp, key=float)
      line += (f"; at a threshold set on the unwatermarked images (FPR <= {g}) its unattacked "
               f"TPR is {none['tpr_empirical'][g]['rate']:.2f}")
    fooled = [r["attack"] for r in image if "fpr_attacked" in r and r["attack"] != "none"
              and r["fpr_attacked"][f]["low"] > float(f)]
    if fooled:
      line += (f"; attacked unwatermarked images pass its test at nominal FPR {f} too under "
               f"{', '.join(fooled)}")
    out.append(line + ".")
  return out


def markdown(report: dict) -> str:
  """The report as Markdown tables: applicability, calibration, detection, quality, cost."""
  fprs = [f"{f:g}" for f in report["settings"]["fprs"]]
  s = report["settings"]
  lines = ["# Watermark benchmark", "",
           f"Model: {report['model']['workdir']} "
           f"({'x'.join(map(str, report['model']['image_shape']))}, guidance "
           f"{report['model']['guidance_scale']}); {s['steps']} DDIM steps, inversion "
           f"with {s['inversion_iters']} fixed-point refinements; {s['num']} watermarked and "
           f"{s['num_null']} unwatermarked images; {report['seconds']:.0f} s.", "",
           "## Which threat each method addresses", ""]
  threats = list(next(iter(report["applicability"].values())))
  lines += ["| method | " + " | ".join(threats) + " |", "|---" * (len(threats) + 1) + "|"]
  for m, a in report["applicability"].items():
    lines.append(f"| {m} | " + " | ".join(a[t] for t in threats) + " |")
  lines += ["", "## Summary", ""] + summary(report)
  lines += ["", "## Calibration: empirical FPR on unwatermarked images (95% Clopper-Pearson)", "",
            "| test | " + " | ".join(f"FPR at {f}" for f in fprs) + " |",
            "|---" * (len(fprs) + 1) + "|"]
  for m, c in report["calibration"].items():
    lines.append(f"| {m} | " + " | ".join(f"{c[f]['k']}/{c[f]['n']} = {_rate(c[f])}"
                                        for f in fprs) + " |")
  lines += ["", "## Detection: TPR at nominal FPR (95% Clopper-Pearson)", "",
            "| test | attack | " + " | ".join(f"TPR at {f}" for f in fprs)
            + " | median log10 p | bit accuracy |", "|---" * (len(fprs) + 4) + "|"]
  for r in report["rows"]:
    bits = f"{r['bit_accuracy']:.3f}" if "bit_accuracy" in r else "-"
    lines.append(f"| {r['method']} | {r['attack']} | "
                 + " | ".join(_rate(r["tpr"][f]) for f in fprs)
                 + f" | {r['median_log10_p']:.2f} | {bits} |")
  lines += ["", "## Detection at thresholds set on the unwatermarked images (empirical FPR <= "
            "nominal; '-' where the null set is too small)", "",
            "| test | attack | " + " | ".join(f"TPR at {f}" for f in fprs) + " |",
            "|---" * (len(fprs) + 2) + "|"]
  if "empirical_threshold" not in s:
    lines += [LEGACY_THRESHOLD_NOTE, ""]
  for r in report["rows"]:
    lines.append(f"| {r['method']} | {r['attack']} | " + " | ".join(
        "-" if r["tpr_empirical"][f] is None else _rate(r["tpr_empirical"][f]) for f in fprs)
        + " |")
  attacked = [r for r in report["rows"] if "fpr_attacked" in r]
  if attacked:
    lines += ["", "## False positives under attack: the same attack on unwatermarked images "
              "(k of n flagged; at the nominal FPR, and at the threshold set on the unattacked "
              "unwatermarked images)", "",
              "| test | attack | " + " | ".join(f"nominal {f}" for f in fprs) + " | "
              + " | ".join(f"threshold {f}" for f in fprs) + " |",
              "|---" * (2 * len(fprs) + 2) + "|"]
    kn = lambda v: "-" if v is None else f"{v['k']}/{v['n']}"
    for r in attacked:
      lines.append(f"| {r['method']} | {r['attack']} | "
                   + " | ".join(kn(r["fpr_attacked"][f]) for f in fprs) + " | "
                   + " | ".join(kn(r["fpr_attacked_empirical"][f]) for f in fprs) + " |")
  same_n = any("fd_clean_same_n" in q for q in report["quality"].values())
  floor_name = "FD of as many clean images" if same_n else "FD between clean halves"
  lines += ["", "## Quality and cost", "",
            f"| method | FD to clean | {floor_name} | PSNR / SSIM to clean | embed | "
            "generate s/img | detect s/img |", "|---|---|---|---|---|---|---|"]
  fmt = lambda v, f=".3g": "-" if v is None else format(v, f)
  for m, q in report["quality"].items():
    c = report["cost"][m]
    embed = (f"{c['embed_seconds_per_image']:.2g} s/img" if "embed_seconds_per_image" in c
             else f"{fmt(c.get('embed_seconds'), '.0f')} s (fine-tuning)")
    quality = ("-" if q["psnr"] is None else f"{q['psnr']:.1f} dB / {q['ssim']:.3f}")
    floor = q.get("fd_clean_same_n", q.get("fd_clean_halves"))
    lines.append(f"| {m} | {fmt(q['fd_to_clean'])} | {fmt(floor)} | {quality} | "
                 f"{embed} | {c['generate_seconds_per_image']:.2g} | "
                 f"{c['detect_seconds_per_image']:.2g} |")
  if report["quality"] and not same_n:
    lines += ["", f"The methods' FDs come from {report['settings']['num']} images against "
              f"{report['settings']['num_null']} and carry FD's small-sample bias; the floor "
              "here compares two halves of the clean images and is not at the same n (this "
              "report predates the same-n floor), so the FD column does not rank the methods."]
  return "\n".join(lines) + "\n"
