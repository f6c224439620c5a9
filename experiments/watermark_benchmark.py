"""Tree-Ring, Gaussian Shading and WDM on the shipped demo DiT under the same image attacks
(and, for WDM, the model attacks), with calibrated detection rates (`wdmjax.runs.evaluate`),
plus DDIM inversion's reconstruction error at 10, 50 and 100 steps.

    python experiments/watermark_benchmark.py [--num 128 --num-null 10000 --steps 20]

About 75 minutes on 2 CPU cores (the 10,000 null images and the four fine-tuning attacks
take most of it); the workdirs (base, WDM model) are kept in --workdir for a rerun.

Writes experiments/results/watermark_benchmark.{json,md,png} and _samples.png.
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
from wdmjax.runs.evaluate import evaluate, markdown  # noqa: E402
from wdmjax.runs.model import load_model  # noqa: E402
from wdmjax.train import setup  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def figure(report: dict, path: str) -> None:
  """TPR at the smallest nominal FPR per image attack (bars per test), per model attack (WDM),
  and the calibration on unwatermarked images."""
  f = f"{min(report['settings']['fprs']):g}"
  tests = list(dict.fromkeys(r["method"] for r in report["rows"]))
  model_attacks = [f"model {a}" for a in report["model_attacks"]]
  fig, axes = plt.subplots(1, 3, figsize=(20, 4.8), gridspec_kw={"width_ratios": [4, 2, 1.3]})

  def bars(ax, attacks, title):
    shown = [t for t in tests if any(r["method"] == t and r["attack"] in attacks
                                     for r in report["rows"])]
    w = 0.8 / max(1, len(shown))
    for i, t in enumerate(shown):
      rows = {r["attack"]: r for r in report["rows"] if r["method"] == t}
      x = [a for a in attacks if a in rows]
      pos = np.array([attacks.index(a) for a in x]) + i * w
      v = np.array([rows[a]["tpr"][f]["rate"] for a in x])
      err = np.array([v - [rows[a]["tpr"][f]["low"] for a in x],
                      [rows[a]["tpr"][f]["high"] for a in x] - v])
      ax.bar(pos, v, w, yerr=err, label=t, capsize=2)
    ax.set_xticks(np.arange(len(attacks)) + 0.4 - w / 2, attacks, rotation=40, ha="right")
    ax.set_ylabel(f"TPR at nominal FPR {f}")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7)

  bars(axes[0], report["attacks"], "image attacks (95% Clopper-Pearson)")
  if model_attacks:
    bars(axes[1], model_attacks, "model attacks (WDM only: the others do not apply)")
  fprs = report["settings"]["fprs"]
  for t, c in report["calibration"].items():
    emp = [max(c[f"{x:g}"]["rate"], 1e-7) for x in fprs]
    axes[2].loglog(fprs, emp, "o-", label=t)
  axes[2].loglog(fprs, fprs, "k--", label="nominal")
  axes[2].set_xlabel("nominal FPR")
  axes[2].set_ylabel("empirical FPR (unwatermarked; 1e-7 = none)")
  axes[2].set_title("calibration")
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--num", type=int, default=128)
  ap.add_argument("--num-null", type=int, default=10000)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--workdir", default="runs/benchmark")
  args = ap.parse_args()
  t0 = time.time()
  out = args.workdir
  base = base_workdir(os.path.join(out, "base"))
  inv = inversion_errors(base.path)
  r = evaluate(out, workdir=base.path, num=args.num, num_null=args.num_null, steps=args.steps,
               log=print)
  report = dict(r.report, inversion=inv, wall_seconds=time.time() - t0)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "watermark_benchmark.json"), "w") as fh:
    json.dump(report, fh, indent=1)
  md = markdown(report) + "\n## DDIM inversion (unguided chain, 64 samples of the demo DiT)\n\n"
  md += ("| steps | refinements | image RMSE | x_T RMSE | x_T sign agreement | x_T corr | "
         "s/image |\n|---|---|---|---|---|---|---|\n")
  for row in inv:
    md += (f"| {row['steps']} | {row['fixed_point_iters']} | {row['image_rmse']:.4f} | "
           f"{row['x_T_rmse']:.3f} | {row['x_T_sign_agreement']:.3f} | "
           f"{row['x_T_correlation']:.3f} | {row['seconds_per_image']:.3f} |\n")
  md += f"\nWall time of the whole script on this CPU: {report['wall_seconds']:.0f} s.\n"
  with open(os.path.join(RESULTS, "watermark_benchmark.md"), "w") as fh:
    fh.write(md)
  figure(report, os.path.join(RESULTS, "watermark_benchmark.png"))
  shutil.copy(r.files["samples"], os.path.join(RESULTS, "watermark_benchmark_samples.png"))
  print(md)


if __name__ == "__main__":
  main()
