"""Summarises a finished `wdmjax train` workdir into experiments/results/NAME.{json,md,png}.

    python experiments/summarize_run.py WORKDIR NAME --command "wdmjax train ..."

Copies the final sample grid to NAME_samples.png and plots the loss curve to NAME_loss.png.
Every number comes from the workdir's own files (metrics.jsonl, train_summary.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from wdmjax.workdir import Workdir

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdir")
  p.add_argument("name")
  p.add_argument("--command", default="", help="the command that produced the workdir")
  p.add_argument("--note", default="", help="a sentence on the conditions of the run")
  args = p.parse_args()
  wd = Workdir(args.workdir)
  cfg = wd.read_config()
  rows = wd.read_metrics()
  if not rows:
    p.error(f"{wd.file(Workdir.METRICS)}: no metrics logged")
  steps = np.array([r["step"] for r in rows])
  loss = np.array([r["loss"] for r in rows])
  times = np.array([r["time"] for r in rows])
  # Wall time of training: sum of gaps between consecutive log rows, leaving out the gaps
  # where the run was stopped and resumed (a gap over 10x the median).
  gaps = np.diff(times)
  wall = float(gaps[gaps < 10 * np.median(gaps)].sum()) if gaps.size else 0.0
  minutes_at = {int(s): round(float(t - times[0]) / 60, 1)
                for s, t in zip(steps, times, strict=True) if s % 1000 == 0}
  summary = {
      "name": args.name, "command": args.command, "note": args.note, "steps": int(steps[-1]),
      "minutes_at_step": minutes_at,
      "batch_size": cfg.train.batch_size, "train_minutes": round(wall / 60, 1),
      "seconds_per_step": round(wall / max(int(steps[-1] - steps[0]), 1), 3),
      "loss_first_100": float(loss[steps <= 100].mean()),
      "loss_last_100": float(loss[steps > steps[-1] - 100].mean()),
      "model": cfg.model.to_dict(), "sampler": cfg.sample.to_dict(),
  }
  os.makedirs(RESULTS, exist_ok=True)
  base = os.path.join(RESULTS, args.name)
  with open(base + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  grid = wd.sample_grid("final")
  if os.path.exists(grid):
    shutil.copy(grid, base + "_samples.png")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.plot(steps, loss, lw=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("eps MSE")
  ax.set_yscale("log")
  ax.set_title(args.name)
  fig.tight_layout()
  fig.savefig(base + "_loss.png", dpi=100)
  with open(base + ".md", "w") as f:
    f.write(f"# {args.name}\n\n`{args.command}`\n\n| what | value |\n|---|---|\n")
    for k in ("steps", "batch_size", "train_minutes", "seconds_per_step", "loss_first_100",
              "loss_last_100"):
      v = summary[k]
      f.write(f"| {k} | {v:.4f} |\n" if isinstance(v, float) else f"| {k} | {v} |\n")
    f.write(f"| minutes at step | {minutes_at} |\n")
    if args.note:
      f.write(f"\n{args.note}\n")
    f.write(f"\nSamples: `{args.name}_samples.png` (DDIM-{cfg.sample.steps}, guidance "
            f"{cfg.sample.guidance_scale}, EMA weights); loss curve: `{args.name}_loss.png`.\n")
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
