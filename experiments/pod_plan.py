"""What the pod configs need on each chip: `wdmjax plan` for the scenarios of tpu/README.md.

  python experiments/pod_plan.py [--mfu 0.15 0.4]

For DiT-XL/2 on ImageNet-256 latents (the DiT recipe) and its DiffFit fine-tune to 512 px,
on 16-chip slices (v4-32, v5litepod-16, v5p-32) and 32 GPUs (4 nodes x 8), this writes the
parameters, the train-state bytes per chip under the chosen FSDP size, the model FLOPs per
step (counted from the train step's own jaxpr) and the step time, throughput and run length
they imply at two assumed MFUs (a low and a well-tuned one). Also, as the one measured
anchor, the MFU of our H100 train-step benchmark (benchmarks/results/train_step_dit_h100_*).
Writes
experiments/results/pod_plan.{json,md,png}. Runs in about a minute on a laptop: shapes only.
"""

from __future__ import annotations

import argparse
import json
import os

from wdmjax.configs import load_config
from wdmjax.peft import PeftSpec, prepare
from wdmjax.train.plan import CHIPS, plan_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
# (scenario, config, overrides, PEFT strategy, chip, devices, fsdp)
SCENARIOS = [
    ("XL/2 256, v4-32", "dit_xl2_imagenet256", [], None, "v4", 16, 1),
    ("XL/2 256, v5litepod-16", "dit_xl2_imagenet256", [], None, "v5e", 16, 4),
    ("XL/2 256, v5p-32", "dit_xl2_imagenet256", [], None, "v5p", 16, 1),
    ("XL/2 256, 4 x 8 H100", "dit_xl2_imagenet256", [], None, "h100", 32, 1),
    ("DiffFit 512, v4-32", "difffit_dit_xl2_512", [], "difffit", "v4", 16, 4),
    ("DiffFit 512, v5litepod-16", "difffit_dit_xl2_512", [], "difffit", "v5e", 16, 4),
    ("Full 512, v5litepod-16", "difffit_dit_xl2_512", [], None, "v5e", 16, 4),
]


def measured_anchor() -> list[dict]:
  """MFU of the measured H100 train-step benchmark runs: model FLOPs / time / bf16 peak."""
  out = []
  for dtype in ("fp32", "bf16"):
    path = os.path.join(ROOT, "benchmarks", "results", f"train_step_dit_h100_{dtype}.json")
    if not os.path.exists(path):
      continue
    with open(path) as f:
      r = json.load(f)["results"]["dit"]
    flops, t = r["flops_dit_closed_form"], r["train_s_jax"]
    out.append({"dtype": dtype, "params": r["params_jax"], "batch": r["batch"],
                "step_s": t, "tflops": flops / t / 1e12,
                "mfu_vs_bf16_peak": flops / t / (CHIPS["h100"][0] * 1e12)})
  return out


def peft_split(strategy: str | None):
  """The `plan_step` split of a fine-tune by `strategy` (None: full training)."""
  if strategy is None:
    return None
  spec = PeftSpec(strategy)

  def split(params):
    trainable, frozen, _, combine = prepare(spec, params)
    return trainable, frozen, combine

  return split


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--mfu", type=float, nargs="+", default=[0.15, 0.4])
  args = ap.parse_args()
  rows = []
  for name, config, overrides, peft, chip, devices, fsdp in SCENARIOS:
    cfg = load_config(config, overrides)
    p = plan_step(cfg, devices, fsdp, peft_split(peft))
    times = {str(m): p.step_seconds(chip, m) for m in args.mfu}
    rows.append({"scenario": name, "config": config, "peft": peft, "chip": chip,
                 "devices": devices, "mesh": p.mesh, "params": p.params,
                 "trainable": p.trainable, "batch": p.batch,
                 "state_gib_per_chip": (p.state_bytes_per_device + p.frozen_bytes_per_device)
                 / 2**30, "chip_gib": CHIPS[chip][1],
                 "tflop_per_step": p.flops_per_step / 1e12, "step_s": times,
                 "images_per_s": {m: p.batch / t for m, t in times.items()},
                 "steps": cfg.train.steps,
                 "hours": {m: t * cfg.train.steps / 3600 for m, t in times.items()}})
    print(f"{name}: {rows[-1]['tflop_per_step']:.1f} TFLOP/step, "
          f"{rows[-1]['state_gib_per_chip']:.2f} GiB state per chip")
  anchor = measured_anchor()
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "pod_plan.json"), "w") as f:
    json.dump({"mfu": args.mfu, "chips": CHIPS, "rows": rows, "measured": anchor}, f, indent=2)
  pct = [f"{100 * m:.0f}%" for m in args.mfu]
  lines = ["# Pod plan (`python experiments/pod_plan.py`): step time at assumed MFUs "
           + " and ".join(pct), "",
           "| scenario | mesh (data x fsdp) | trained params | state per chip (GiB) | "
           "chip memory (GiB) | TFLOP per step | "
           + " | ".join(f"step (s) at {p}" for p in pct) + " | steps | "
           + " | ".join(f"run (h) at {p}" for p in pct) + " |",
           "|---" * (7 + 2 * len(pct)) + "|"]
  for r in rows:
    lines.append(f"| {r['scenario']} | {r['mesh']['data']} x {r['mesh']['fsdp']} | "
                 f"{r['trainable']:,} | {r['state_gib_per_chip']:.2f} | {r['chip_gib']:.0f} | "
                 f"{r['tflop_per_step']:.1f} | "
                 + " | ".join(f"{t:.3f}" for t in r["step_s"].values())
                 + f" | {r['steps']:,} | "
                 + " | ".join(f"{h:.1f}" for h in r["hours"].values()) + " |")
  lines += ["", "Measured anchor (our H100 train-step benchmark, a 16.5M-parameter DiT):", "",
            "| dtype | batch | step (ms) | TFLOP/s | MFU of the bf16 peak |",
            "|---|---|---|---|---|"]
  for a in anchor:
    lines.append(f"| {a['dtype']} | {a['batch']} | {1e3 * a['step_s']:.2f} | {a['tflops']:.1f} | "
                 f"{100 * a['mfu_vs_bf16_peak']:.1f}% |")
  with open(os.path.join(RESULTS, "pod_plan.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _figure(rows, args.mfu)
  print("\n".join(lines))


def _figure(rows: list[dict], mfus: list[float]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
  names = [r["scenario"] for r in rows]
  lo, hi = str(min(mfus)), str(max(mfus))
  a.barh(names, [r["hours"][lo] for r in rows], color="tab:blue", alpha=0.4,
         label=f"{100 * float(lo):.0f}% MFU")
  a.barh(names, [r["hours"][hi] for r in rows], color="tab:blue",
         label=f"{100 * float(hi):.0f}% MFU")
  a.set_xlabel("run length (hours)")
  a.legend(loc="lower right")
  a.invert_yaxis()
  b.barh(names, [r["state_gib_per_chip"] for r in rows], color="tab:orange", label="state")
  b.scatter([r["chip_gib"] for r in rows], names, color="k", marker="|", s=200,
            label="chip memory")
  b.set_xlabel("GiB per chip (train state; activations come on top)")
  b.set_yticks([])
  b.invert_yaxis()
  b.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS, "pod_plan.png"), dpi=110)


if __name__ == "__main__":
  main()
