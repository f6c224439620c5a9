"""Tree-Ring, Gaussian Shading and WDM on the shipped demo DiT under the same image attacks
(and, for WDM, the model attacks), with calibrated detection rates (`wdmjax.runs.evaluate`),
plus DDIM inversion's reconstruction error at 10, 50 and 100 steps.

    cd experiments && python watermark_benchmark.py [--num 128 --num-null 10000 --steps 20]
    cd experiments && python watermark_benchmark.py --latent   # LDM + Stable Signature
    cd experiments && python watermark_benchmark.py --unet --num 64 --num-null 1000

The regeneration attack (`regen:T`) noises an image to step T and denoises it with a second
clean model: a UNet trained here on the same digits (`regen_model`, kept in --workdir).
Every image attack also runs on unwatermarked images, so the tables show its false positives.

About 75 minutes on 2 CPU cores (the 10,000 null images and the four fine-tuning attacks
take most of it), plus the UNet's training the first time; the workdirs (base, UNet, WDM
model) are kept in --workdir for a rerun.

Writes experiments/results/watermark_benchmark.{json,md,png} and _samples.png; with
--latent, the latent model of experiments/stable_signature.py (autoencoder, latent DiT, the
4x4-pooled extractor and 4 users' decoders, built or reused in --ldm-runs) with Tree-Ring and
Gaussian Shading on its latents and Stable Signature on its decoder, into
watermark_benchmark_latent.*; with --unet, Tree-Ring and Gaussian Shading on the UNet, with
the demo DiT as the regeneration model, into watermark_benchmark_unet.*.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wdmjax.diffusion.inversion import generate, invert  # noqa: E402
from wdmjax.runs.demo import base_workdir  # noqa: E402
from wdmjax.runs.evaluate import DEFAULT_MODEL_ATTACKS, evaluate  # noqa: E402
from wdmjax.runs.evaluate_report import markdown  # noqa: E402
from wdmjax.runs.model import load_model  # noqa: E402
from wdmjax.train import setup  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Each family at several strengths (weakest first), so the figure shows TPR against strength.
FAMILIES = {
  "jpeg": ["jpeg:90", "jpeg:70", "jpeg:50", "jpeg:30", "jpeg:10"],
  "crop (area kept)": ["crop:0.9", "crop:0.7", "crop:0.5"],
  "resize (area)": ["resize:0.7", "resize:0.5", "resize:0.3"],
  "blur (sigma)": ["blur:0.5", "blur:1", "blur:2"],
  "noise (std)": ["noise:0.05", "noise:0.1", "noise:0.2"],
  "rotate (degrees)": ["rotate:5", "rotate:10", "rotate:20"],
  "brightness": ["brightness:0.1", "brightness:0.3", "brightness:0.5"],
  "contrast": ["contrast:0.8", "contrast:0.6", "contrast:0.4"],
  "combined": ["jpeg:50+crop:0.8", "jpeg:50+noise:0.05+blur:1"],
  "regeneration (t)": ["regen:100", "regen:300", "regen:600"],
}
ATTACKS = ["none", *(a for f in FAMILIES.values() for a in f)]
# The regeneration attack's second clean model: a UNet (another architecture, another seed,
# the same digits), trained here for REGEN_STEPS (about 18 minutes on 2 CPU cores).
REGEN_CONFIG, REGEN_STEPS = "mnist5k_unet", 1000


def regen_model(path: str) -> str:
  """The clean UNet of the regeneration attack in `path` (trained, or resumed, when missing)."""
  from wdmjax.runs.train import train

  train(REGEN_CONFIG, path, [f"train.steps={REGEN_STEPS}", "train.ckpt_every=250",
                             "train.sample_every=100000"], samples=False, log=print)
  return path


def inversion_errors(workdir: str, n: int = 64, iters=(0, 2, 5)) -> list[dict]:
  """image -> x_T -> image and x_T -> image -> x_T errors of DDIM inversion (unguided chain,
  the demo DiT) at 10, 50 and 100 steps."""
  m = load_model(workdir)
  su = setup(m.cfg)
  y = jnp.full((n,), su.null_label, jnp.int32)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (n, *su.image_shape))
  rows = []
  for steps in (10, 50, 100):
    kw = dict(steps=steps, objective=m.cfg.diffusion.objective, y=y)
    x0 = generate(su.model_fn, m.params, su.schedule, x_T, **kw)
    for k in iters:
      t0 = time.time()
      z = invert(su.model_fn, m.params, su.schedule, x0, fixed_point_iters=k, **kw)
      z.block_until_ready()
      sec = time.time() - t0
      x1 = generate(su.model_fn, m.params, su.schedule, z, **kw)
      rows.append({"steps": steps, "fixed_point_iters": k,
                   "image_rmse": float(jnp.sqrt(((x1 - x0) ** 2).mean())),
                   "x_T_rmse": float(jnp.sqrt(((z - x_T) ** 2).mean())),
                   "x_T_sign_agreement": float(((z > 0) == (x_T > 0)).mean()),
                   "x_T_correlation": float(jnp.corrcoef(z.ravel(), x_T.ravel())[0, 1]),
                   "seconds_per_image": sec / n})
      print(rows[-1], flush=True)
  return rows


def _calibrated(report: dict, test: str, f: str) -> bool:
  """Whether the test's empirical FPR at nominal f is compatible with f (CP lower bound)."""
  c = report["calibration"].get(test, {}).get(f)
  return c is None or c["low"] <= float(f)


def figure(report: dict, path: str) -> None:
  """TPR against attack strength per family (nominal FPR 1e-6; a test whose empirical FPR is
  above nominal drawn dashed; dotted: at a threshold set on the unwatermarked images), TPR
  under model attacks (WDM), and the calibration."""
  f = f"{min(report['settings']['fprs']):g}"
  tests = list(dict.fromkeys(r["method"] for r in report["rows"]))
  rows = {(r["method"], r["attack"]): r for r in report["rows"]}
  fams = {k: [a for a in v if a in report["attacks"]] for k, v in FAMILIES.items()}
  fams = {k: v for k, v in fams.items() if v}
  ncol = 4
  nrow = -(-(len(fams) + 2) // ncol)
  fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow))
  axes = axes.ravel()
  colors = {t: f"C{i}" for i, t in enumerate(tests)}
  # Dotted: at the smallest FPR that the test's unwatermarked images can set a threshold for.
  # (Not for reports from before the tie-safe threshold: see evaluate_report.LEGACY_THRESHOLD_NOTE.)
  strict = "empirical_threshold" in report["settings"]
  emp = {t: next((f"{g:g}" for g in sorted(report["settings"]["fprs"])
                  if strict and rows.get((t, "none"), {}).get("tpr_empirical", {}).get(f"{g:g}")),
                 None) for t in tests}
  for ax, (fam, attacks) in zip(axes, fams.items(), strict=False):
    x = ["none", *attacks]
    for t in tests:
      if (t, "none") not in rows:
        continue
      y = [rows[(t, a)]["tpr"][f]["rate"] for a in x]
      ok = _calibrated(report, t, f)
      ax.plot(range(len(x)), y, "o-" if ok else "o--", color=colors[t],
              label=t if ok else f"{t} (FPR above nominal)")
      if emp[t] is not None:
        ye = [rows[(t, a)]["tpr_empirical"][emp[t]]["rate"] for a in x]
        ax.plot(range(len(x)), ye, ":", color=colors[t], lw=1.2)
    ax.set_xticks(range(len(x)), [a.split("+")[0] if fam != "combined" else a for a in x],
                  rotation=30, ha="right", fontsize=7)
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(fam, fontsize=9)
  levels = sorted({g for g in emp.values() if g is not None}, key=float)
  axes[0].set_ylabel(f"TPR at nominal FPR {f}" + (
      f"\n(dotted: threshold set on the null, FPR {', '.join(levels)})" if levels else ""),
      fontsize=8)
  axes[0].legend(fontsize=6)
  k = len(fams)
  model_attacks = [f"model {a}" for a in report["model_attacks"]]
  if ("stable_signature", "model decoder swap") in rows:
    model_attacks.append("model decoder swap")
  ax = axes[k]
  mt = [t for t in tests if any((t, a) in rows for a in model_attacks)]
  w = 0.8 / max(1, len(mt))
  for i, t in enumerate(mt):
    v = [rows[(t, a)]["tpr"][f]["rate"] for a in model_attacks]
    ax.bar(np.arange(len(model_attacks)) + i * w, v, w, label=t, color=colors[t])
  ax.set_xticks(np.arange(len(model_attacks)) + 0.4 - w / 2,
                [a.removeprefix("model ") for a in model_attacks], rotation=35, ha="right",
                fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_title("model attacks (model watermarks only)", fontsize=9)
  if mt:
    ax.legend(fontsize=6)
  else:
    ax.text(0.5, 0.5, "no model watermark benchmarked", ha="center", fontsize=8)
  ax = axes[k + 1]
  fprs = report["settings"]["fprs"]
  for t, c in report["calibration"].items():
    emp = [max(c[f"{x:g}"]["rate"], 1e-7) for x in fprs]
    ax.loglog(fprs, emp, "o-", label=t, color=colors.get(t))
  ax.loglog(fprs, fprs, "k--", label="nominal")
  ax.set_xlabel("nominal FPR")
  ax.set_ylabel("empirical FPR (1e-7: none)")
  ax.set_title("calibration on unwatermarked images", fontsize=9)
  ax.legend(fontsize=6)
  for ax in axes[k + 2:]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--num", type=int, default=128)
  ap.add_argument("--num-null", type=int, default=10000)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--attacks", default=",".join(ATTACKS),
                  help="comma-separated image attacks (default: all of FAMILIES)")
  ap.add_argument("--workdir", default="runs/benchmark")
  ap.add_argument("--replot", action="store_true",
                  help="rewrite the Markdown and the figure from the committed JSON")
  ap.add_argument("--latent", action="store_true",
                  help="the latent model with Stable Signature instead of the pixel DiT")
  ap.add_argument("--ldm-runs", default="runs/stable_signature")
  ap.add_argument("--unet", action="store_true",
                  help="Tree-Ring and Gaussian Shading on the UNet (the regeneration model), "
                       "regenerated by the demo DiT")
  args = ap.parse_args()
  stem = ("watermark_benchmark_latent" if args.latent else
          "watermark_benchmark_unet" if args.unet else "watermark_benchmark")
  if args.replot:
    with open(os.path.join(RESULTS, stem + ".json")) as fh:
      print(write_results(json.load(fh), stem))
    return
  if args.latent:
    latent(args, stem)
    return
  t0 = time.time()
  out = args.workdir
  attacks = args.attacks.split(",")
  base = base_workdir(os.path.join(out, "base"))
  unet = regen_model(os.path.join(out, "unet"))
  if args.unet:
    r = evaluate(os.path.join(out, "on_unet"), ["tree_ring", "gaussian_shading"], attacks,
                 workdir=unet, regen_workdir=base.path, num=args.num,
                 num_null=args.num_null, steps=args.steps, log=print)
    save(dict(r.report, inversion=[], wall_seconds=time.time() - t0), r.files["samples"], stem)
    return
  inv = inversion_errors(base.path)
  r = evaluate(out, attacks=attacks, workdir=base.path, num=args.num, num_null=args.num_null,
               steps=args.steps, regen_workdir=unet, log=print)
  report = dict(r.report, inversion=inv, wall_seconds=time.time() - t0)
  os.makedirs(RESULTS, exist_ok=True)
  save(report, r.files["samples"], "watermark_benchmark")


def latent(args, stem: str) -> None:
  """Tree-Ring and Gaussian Shading on the latents, Stable Signature on the decoder."""
  from stable_signature import build  # the LDM pipeline of that experiment, reused

  t0 = time.time()
  extractor = "uncertainty, 4x4 pooling"  # its best extractor (stable_signature.md)
  w = build(args.ldm_runs, "mnist5k", 4, 3000, 1500, 1500, [extractor],
            {"steps": 500, "lr": 1e-3, "image_weight": 1.0})
  unet = regen_model(os.path.join(args.workdir, "unet"))
  r = evaluate(os.path.join(args.workdir, "latent"),
               ["tree_ring", "gaussian_shading", "stable_signature"], args.attacks.split(","),
               workdir=w["ldm"], signature_workdir=w["sigs"][extractor], regen_workdir=unet,
               model_attacks=DEFAULT_MODEL_ATTACKS,
               num=args.num, num_null=args.num_null, steps=args.steps, log=print)
  save(dict(r.report, inversion=[], wall_seconds=time.time() - t0), r.files["samples"], stem)


def save(report: dict, samples: str, stem: str) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, stem + ".json"), "w") as fh:
    json.dump(report, fh, indent=1)
  shutil.copy(samples, os.path.join(RESULTS, stem + "_samples.png"))
  print(write_results(report, stem))


def write_results(report: dict, stem: str) -> str:
  """The Markdown and the figure of a report (also `--replot` from the committed JSON)."""
  md = markdown(report)
  if report["inversion"]:
    md += "\n## DDIM inversion (unguided chain, 64 samples of the demo DiT)\n\n"
    md += ("| steps | refinements | image RMSE | x_T RMSE | x_T sign agreement | x_T corr | "
           "s/image |\n|---|---|---|---|---|---|---|\n")
  for row in report["inversion"]:
    md += (f"| {row['steps']} | {row['fixed_point_iters']} | {row['image_rmse']:.4f} | "
           f"{row['x_T_rmse']:.3f} | {row['x_T_sign_agreement']:.3f} | "
           f"{row['x_T_correlation']:.3f} | {row['seconds_per_image']:.3f} |\n")
  md += f"\nWall time of the whole script on this CPU: {report['wall_seconds']:.0f} s"
  md += f" ({report['wall_note']}).\n" if report.get("wall_note") else ".\n"
  with open(os.path.join(RESULTS, stem + ".md"), "w") as fh:
    fh.write(md)
  figure(report, os.path.join(RESULTS, stem + ".png"))
  return md


if __name__ == "__main__":
  main()
