"""How much attack does the mnist5k WDM watermark survive, and what does the attack cost?

  python experiments/robustness_wdm.py [--runs runs/robustness_wdm] [--num-fd 500]
                                       [--only prune noise ...]

Embeds the watermark of experiments/wdm_mnist5k.py's `random` run (trigger random:1, keyed
watermark, key 42, gamma1 0.8, gamma2 0.1, 600 steps at lr 3e-4 from the shipped base), then applies
each attack of `SWEEP` at each strength (`wdmjax.runs.attack_model`, the same code as
`wdmjax attack`) and reports for every attacked model: the verification (DDIM at the config's
step count, 16 samples: bit agreement, log10 p, verified at 1e-6) and the task Frechet
distance (guided samples against the real mnist5k in a small classifier's features), so one
sees whether an attack ruins the model before it removes the watermark. Writes
experiments/results/robustness_wdm.{json,md,png} (the figure: bit agreement and FD against
strength per attack).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
from wdm_mnist5k import LR, TaskQuality, device_info, write_json_and_markdown

from wdmjax.files import atomic_open
from wdmjax.runs import attack_model, base_workdir, embed, load_model, verify_model
from wdmjax.watermark import Secret

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SECRET = Secret(trigger="random:1", watermark="keyed:7", key=42, gamma1=0.8, gamma2=0.1,
                block=4)
EMBED_STEPS = 600
# attack family -> strengths; the acceptance points are finetune:1000, prune:0.3,
# noise:0.01, quantize fp16 and int8, dropout:0.3, steps 25 and 100 (the config samples 50).
SWEEP = {
  "finetune": [250, 1000],
  "prune": [0.1, 0.3, 0.5, 0.7],
  "prune_layer": [0.3, 0.5],
  "noise": [0.003, 0.01, 0.03],
  "quantize": ["fp16", "bf16", "int8"],
  "dropout": [0.1, 0.3, 0.5],
  "steps": [10, 25, 100],
  "raw": [None],
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/robustness_wdm")
  ap.add_argument("--num-fd", type=int, default=500, help="samples per Frechet distance")
  ap.add_argument("--only", nargs="*", default=None, choices=list(SWEEP),
                  help="attack families to run (others keep their earlier results)")
  ap.add_argument("--results", default=RESULTS)
  args = ap.parse_args()
  import wdm_mnist5k

  wdm_mnist5k.NUM_FD = args.num_fd
  stem = os.path.join(args.results, "robustness_wdm")
  results = {"rows": []}
  if args.only and os.path.exists(stem + ".json"):
    with open(stem + ".json") as f:
      results = json.load(f)
    results["rows"] = [r for r in results["rows"] if r["family"] not in args.only]
  results.update(device_info(), num_fd=args.num_fd, embed_steps=EMBED_STEPS,
                 secret={"trigger": SECRET.trigger, "watermark": SECRET.watermark,
                         "gamma1": SECRET.gamma1, "gamma2": SECRET.gamma2})

  base = base_workdir(os.path.join(args.runs, "mnist5k_base"), False, None, log=print).path
  wm = os.path.join(args.runs, "watermarked")
  embed(wm, SECRET, base=base, steps=EMBED_STEPS, lr=LR, overrides=["train.sample_every=0"],
        log=print)
  cfg, params = load_model(wm)
  quality = TaskQuality(cfg)
  clean = measure(quality, cfg, params)
  results["unattacked"] = clean
  print(f"unattacked: {summary(clean)}", flush=True)
  raw_params = None
  for family, strengths in SWEEP.items():
    if args.only and family not in args.only:
      continue
    for strength in strengths:
      spec = family if strength is None else f"{family}:{strength}"
      t0 = time.time()
      start = params
      if family == "raw":
        raw_params = raw_params or load_model(wm, ema=False).params
        start = raw_params
      a_cfg, a_params = attack_model(cfg, start, [spec], seed=0, progress=True)
      attack_s = time.time() - t0
      row = {"family": family, "strength": strength, "attack": spec, "attack_seconds": attack_s,
             **measure(quality, a_cfg, a_params)}
      results["rows"].append(row)
      print(f"{spec}: {summary(row)}", flush=True)
      write(stem, results)
  write(stem, results)


def measure(quality: TaskQuality, cfg, params) -> dict:
  v = verify_model(cfg, params, SECRET, num=16, steps=int(cfg.sample.steps))
  fd, _ = quality.fd(cfg, params)
  return {"bit_agreement": v["bit_agreement"], "agreeing_bits": v["agreeing_bits"],
          "bits": v["bits"], "log10_p": v["log10_p_value"], "verified": v["verified"],
          "sample_steps": int(cfg.sample.steps), "fd": fd}


def summary(r: dict) -> str:
  return (f"{r['agreeing_bits']}/{r['bits']} bits, log10 p {r['log10_p']:.2f}, "
          f"verified {r['verified']}, FD {r['fd']:.2f}")


def write(stem: str, results: dict) -> None:
  write_json_and_markdown(stem, results, markdown(results))
  plot(stem + ".png", results)


def markdown(res: dict) -> str:
  u = res["unattacked"]
  lines = [
    "# Attacks on the mnist5k WDM watermark",
    "",
    f"`python experiments/robustness_wdm.py` ({res['backend']}, {res['device']}, jax "
    f"{res['jax']}). The watermark of the `random` run of wdm_mnist5k ({EMBED_STEPS} steps "
    "from the shipped base); each attack applied alone to its EMA weights. Verification: "
    "DDIM at the config's step count (50 unless the attack changes it), 16 samples, "
    f"verified at p < 1e-6. FD: {res['num_fd']} guided samples against mnist5k.",
    "",
    f"Unattacked: {u['agreeing_bits']}/{u['bits']} bits, log10 p {u['log10_p']:.2f}, "
    f"FD {u['fd']:.2f}.",
    "",
    "| attack | bits agreeing | log10 p | verified | FD | FD / unattacked |",
    "|---|---|---|---|---|---|",
  ]
  for r in res["rows"]:
    lines.append(f"| {r['attack']} | {r['agreeing_bits']}/{r['bits']} | {r['log10_p']:.2f} | "
                 f"{'yes' if r['verified'] else '**no**'} | {r['fd']:.2f} | "
                 f"{r['fd'] / u['fd']:.2f} |")
  lines += ["", "Figure `robustness_wdm.png`: bit agreement (top) and FD (bottom) against "
            "strength, per attack; the dashed line is the agreement p = 1e-6 needs.", ""]
  return "\n".join(lines)


def plot(path: str, res: dict) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from wdmjax.stats.binomial import threshold_for_fpr

  fams = [f for f in SWEEP if any(r["family"] == f for r in res["rows"])]
  if not fams:
    return
  cols = min(4, len(fams))
  rows = math.ceil(len(fams) / cols)
  fig, axes = plt.subplots(2 * rows, cols, figsize=(3.2 * cols, 4.4 * rows), squeeze=False)
  with jax.enable_x64(True):
    need = int(threshold_for_fpr(res["unattacked"]["bits"], 1e-6)) / res["unattacked"]["bits"]
  for i, fam in enumerate(fams):
    rs = [r for r in res["rows"] if r["family"] == fam]
    labels = ["none"] + [fam if r["strength"] is None else str(r["strength"]) for r in rs]
    agree = [res["unattacked"]["bit_agreement"]] + [r["bit_agreement"] for r in rs]
    fd = [res["unattacked"]["fd"]] + [r["fd"] for r in rs]
    top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
    top.plot(labels, agree, "o-")
    top.axhline(need, ls="--", c="gray")
    top.set_ylim(0.3, 1.02)
    top.set_title(fam)
    top.set_ylabel("bit agreement")
    bottom.plot(labels, fd, "s-", c="tab:red")
    bottom.set_ylabel("FD")
  for j in range(len(fams), rows * cols):
    axes[2 * (j // cols), j % cols].axis("off")
    axes[2 * (j // cols) + 1, j % cols].axis("off")
  fig.tight_layout()
  with atomic_open(path) as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)


if __name__ == "__main__":
  main()
