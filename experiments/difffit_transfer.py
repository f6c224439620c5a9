"""DiffFit against full fine-tuning, BitFit and LoRA on a domain shift, at small scale.

  python experiments/difffit_transfer.py [--runs runs/difffit_transfer] [--pre-steps 2000]
                                         [--steps 600] [--parts shift style sweep]

1. Pre-trains the mnist5k DiT (the shipped config mnist5k_dit, wdmjax/configs/mnist5k_dit.py)
   on digits 0-4 only.
2. Adapts it to digits 5-9 (classes it never saw: their label embeddings are untrained) with
   full fine-tuning (the base's learning rate) and with bitfit, difffit and lora (10x the
   base's rate, the DiffFit paper's recipe), the same number of steps each. Reported per
   strategy: the Frechet distance of 1,000 generated 5-9 digits to the real ones (features
   of a small classifier trained on mnist5k; guidance 2 and none), the trainable share, the
   delta's size on disk, the step time, the optimizer-state bytes.
3. Embeds a WDM watermark into the pre-trained model with DiffFit (`wdmjax embed --peft
   difffit`): verification after DDIM-50, a wrong trigger, and task quality on 0-4 against
   a clean DiffFit fine-tune of the same steps.
4. Resolution transfer (the paper's 256 -> 512 trick at 8 -> 16 px): the DiT (patch 2)
   pre-trained on 0-4 at 8 px, then DiffFit-tuned at 16 px with the position embedding's
   coordinates scaled (pos_coord_scale 2: the 8 px range) and without (1); FD at 16 px.
5. Style shift (part 'style'): the shipped base (every mnist5k digit) adapted to scikit-learn's
   8x8 digits upsampled to 28 px by each strategy: the same classes drawn another way, the
   kind of transfer the paper makes (its base knows the concepts); FD in the features of a
   classifier trained on those digits.
6. Sweep (part 'sweep'): on the style shift, DiffFit at two learning rates (3x and 10x the
   base's) against full fine-tuning, each measured after 600 and after 2000 steps, to see
   whether DiffFit's gap to full fine-tuning is one of learning rate or of training length.
Parts 1-4 are 'shift'. Writes experiments/results/difffit_transfer.{json,md,png}. Workdirs
are resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
from wdm_mnist5k import TaskQuality, write_json_and_markdown

from wdmjax import peft
from wdmjax.configs import load_config
from wdmjax.peft import PeftSpec
from wdmjax.runs import base_workdir, embed, finetune, finetune_config, load_model, verify_model
from wdmjax.train import make_grid, save_panels, train
from wdmjax.watermark import Secret
from wdmjax.workdir import Workdir

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CONFIG = "mnist5k_dit"  # the shipped config, wdmjax/configs/mnist5k_dit.py
DOMAIN_A, DOMAIN_B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
STRATEGIES = ("full", "bitfit", "difffit", "lora")
PARTS = ("shift", "style", "sweep")
# (strategy, lr) pairs of the sweep and the step counts at which each is measured.
SWEEP = (("difffit", 3e-3), ("difffit", 1e-2), ("full", 1e-3))
SWEEP_STEPS = (600, 2000)


def labels_override(classes: list[int]) -> str:
  return "data.labels=[" + ",".join(map(str, classes)) + "]"


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def timed_finetune(cfg, workdir: str, base: str, spec: PeftSpec) -> tuple[dict, float]:
  t0 = time.time()
  state = peft.finetune(cfg, workdir, base, load_model(base).params, spec)
  seconds = time.time() - t0
  ref = Workdir(workdir).read_json(Workdir.PEFT)
  return {"trainable": ref["trainable"], "total": ref["total"], "fraction": ref["fraction"],
          "delta_bytes": os.path.getsize(Workdir(workdir).file(Workdir.DELTA)),
          "optimizer_state_bytes": tree_bytes(state.opt_state)}, seconds


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/difffit_transfer")
  ap.add_argument("--pre-steps", type=int, default=2000)
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--results", default=RESULTS)
  ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS,
                  help="what to run; parts not run keep their earlier results")
  args = ap.parse_args()
  os.makedirs(args.runs, exist_ok=True)
  results: dict = {}
  path = os.path.join(args.results, "difffit_transfer.json")
  if set(args.parts) != set(PARTS) and os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results.update(pre_steps=args.pre_steps, steps=args.steps, backend=jax.default_backend(),
                 device=jax.devices()[0].device_kind)
  if "style" in args.parts:
    style_shift(args, results)
    write(args.results, results, None)
  if "sweep" in args.parts:
    style_sweep(args, results)
    write(args.results, results, None)
  if "shift" not in args.parts:
    return

  # 1. Pre-train on domain A.
  base = os.path.join(args.runs, "base_0to4")
  cfg_a = load_config(CONFIG, [labels_override(DOMAIN_A), f"train.steps={args.pre_steps}",
                               "train.sample_every=0"])
  t0 = time.time()
  train(cfg_a, base, log=print)
  results["pre_seconds"] = time.time() - t0

  # 2. Adapt to domain B.
  base_params = load_model(base).params
  quality = TaskQuality(cfg_a, DOMAIN_B)
  fd, _ = quality.fd(cfg_a, base_params)
  results["base_fd_on_b"] = fd
  rows, panels = {}, []
  for strategy in STRATEGIES:
    cfg_b = finetune_config(base, None, [labels_override(DOMAIN_B), "train.sample_every=0"],
                            args.steps, None, None, strategy)
    workdir = os.path.join(args.runs, f"b_{strategy}")
    info, seconds = timed_finetune(cfg_b, workdir, base, PeftSpec(strategy))
    cfg, params = load_model(workdir)
    q, samples = quality.measure(cfg, params)
    panels.append((strategy, samples[:10]))
    rows[strategy] = {**info, **q, "lr": float(cfg.train.lr), "seconds": seconds,
                      "step_s": seconds / args.steps}
    print(f"{strategy}: FD {q['fd']:.2f} / unguided {q['fd_unguided']:.2f}, "
          f"{100 * info['fraction']:.2f}% trainable, {seconds:.0f} s", flush=True)
    results["transfer"] = rows
    write(args.results, results, None)
  for r in rows.values():
    r["fd_ratio_to_full"] = r["fd"] / rows["full"]["fd"]
    r["fd_unguided_ratio_to_full"] = r["fd_unguided"] / rows["full"]["fd_unguided"]

  # 3. A WDM watermark embedded with DiffFit, against a clean DiffFit fine-tune on domain A.
  secret = Secret(trigger="random:1", watermark="keyed:7", key=42, gamma1=0.8, gamma2=0.1,
                  block=4)
  quality_a = TaskQuality(cfg_a, DOMAIN_A)
  clean_a = os.path.join(args.runs, "a_difffit_clean")
  timed_finetune(finetune_config(base, None, ["train.sample_every=0"], args.steps, None, None,
                                 "difffit"), clean_a, base, PeftSpec("difffit"))
  cfg, params = load_model(clean_a)
  clean_q = quality_a.measure(cfg, params)[0]
  wm = os.path.join(args.runs, "a_difffit_wdm")
  t0 = time.time()
  embed(wm, secret, base=base, steps=args.steps, peft=PeftSpec("difffit"),
        overrides=["train.sample_every=0"], log=print)
  seconds = time.time() - t0
  cfg, params = load_model(wm)
  wm_q = quality_a.measure(cfg, params)[0]
  v = verify_model(cfg, params, secret, num=16)
  w = verify_model(cfg, params, Secret(**{**secret.__dict__, "trigger": "random:999"}),
                   num=16)
  ref = Workdir(wm).read_json(Workdir.PEFT)
  results["wdm_difffit"] = {
    "verify": v, "wrong_trigger": w, "clean": clean_q, **wm_q, "seconds": seconds,
    "fd_ratio_to_clean": wm_q["fd"] / clean_q["fd"],
    "fd_unguided_ratio_to_clean": wm_q["fd_unguided"] / clean_q["fd_unguided"],
    "delta_bytes": os.path.getsize(Workdir(wm).file(Workdir.DELTA)),
    "fraction": ref["fraction"]}
  print(f"WDM with DiffFit: log10 p {v['log10_p_value']:.2f}, wrong trigger "
        f"{w['log10_p_value']:.2f}, FD {wm_q['fd']:.2f} vs clean {clean_q['fd']:.2f}",
        flush=True)
  write(args.results, results, None)

  # 4. Resolution transfer 8 -> 16 px (patch 2: 16 -> 64 tokens), trained from scratch at 8.
  low = os.path.join(args.runs, "a_8px")
  low_set = [labels_override(DOMAIN_A), "data.resolution=8", "model.patch_size=2",
             "train.sample_every=0"]
  train(load_config(CONFIG, [*low_set, f"train.steps={args.pre_steps}"]), low, log=print)
  res_rows = {}
  quality_hi = None
  for scale in (2.0, 1.0):
    workdir = os.path.join(args.runs, f"a_16px_scale{scale:g}")
    cfg_hi = finetune_config(low, None, ["data.resolution=16", f"model.pos_coord_scale={scale}",
                                         "train.sample_every=0"], args.steps, None, None,
                             "difffit")
    quality_hi = quality_hi or TaskQuality(cfg_hi, DOMAIN_A)
    info, seconds = timed_finetune(cfg_hi, workdir, low, PeftSpec("difffit"))
    cfg, params = load_model(workdir)
    q = quality_hi.measure(cfg, params)[0]
    res_rows[f"scale_{scale:g}"] = {**info, **q, "seconds": seconds}
    print(f"16 px, pos_coord_scale {scale:g}: FD {q['fd']:.2f}", flush=True)
  results["resolution"] = res_rows
  write(args.results, results, panels)


def style_base(args):
  """The shipped base, its style-shift config and the FD measure on the upsampled digits."""
  base = base_workdir(os.path.join(args.runs, "mnist5k_base"), False, None, log=print).path
  cfg0 = finetune_config(base, None, ["data.name=digits", "train.sample_every=0"], args.steps,
                         None, None, "full")
  return base, cfg0, TaskQuality(cfg0, None, data="digits")


def style_sweep(args, results: dict) -> None:
  """DiffFit's learning rate and training length against full fine-tuning (style shift)."""
  base, _, quality = style_base(args)
  rows = []
  for strategy, lr in SWEEP:
    workdir = os.path.join(args.runs, f"sweep_{strategy}_{lr:g}")
    for steps in SWEEP_STEPS:  # the second run resumes the first: a constant learning rate
      finetune(base, workdir, PeftSpec(strategy),
               overrides=["data.name=digits", "train.sample_every=0"], steps=steps, lr=lr)
      cfg, params = load_model(workdir)
      q = quality.measure(cfg, params)[0]
      rows.append({"strategy": strategy, "lr": lr, "steps": steps, **q})
      print(f"sweep {strategy} lr {lr:g} {steps} steps: FD {q['fd']:.2f} / unguided "
            f"{q['fd_unguided']:.2f}", flush=True)
  results["sweep"] = rows


def style_shift(args, results: dict) -> None:
  """The shipped base (every mnist5k digit) adapted to scikit-learn's 8x8 digits upsampled
  to 28 px: the same classes in another style, as the paper's transfers keep the concepts."""
  base, cfg0, quality = style_base(args)
  base_params = load_model(base).params
  results["style_base_fd"] = quality.fd(cfg0, base_params)[0]
  rows = {}
  for strategy in STRATEGIES:
    cfg = finetune_config(base, None, ["data.name=digits", "train.sample_every=0"],
                          args.steps, None, None, strategy)
    workdir = os.path.join(args.runs, f"style_{strategy}")
    info, seconds = timed_finetune(cfg, workdir, base, PeftSpec(strategy))
    cfg, params = load_model(workdir)
    q = quality.measure(cfg, params)[0]
    rows[strategy] = {**info, **q, "lr": float(cfg.train.lr), "seconds": seconds,
                      "step_s": seconds / args.steps}
    print(f"style {strategy}: FD {q['fd']:.2f} / unguided {q['fd_unguided']:.2f}", flush=True)
  for r in rows.values():
    r["fd_ratio_to_full"] = r["fd"] / rows["full"]["fd"]
    r["fd_unguided_ratio_to_full"] = r["fd_unguided"] / rows["full"]["fd_unguided"]
  results["style"] = rows


def write(directory: str, results: dict, panels) -> None:
  stem = os.path.join(directory, "difffit_transfer")
  write_json_and_markdown(stem, results, markdown(results))
  if panels:
    save_panels([(f"{name}: digits 5-9", make_grid(s, nrow=5, upscale=2))
                 for name, s in panels], stem + ".png", per_row=4)


def markdown(res: dict) -> str:
  lines = [
    "# DiffFit on a domain shift (mnist5k digits 0-4 -> 5-9)",
    "",
    f"`python experiments/difffit_transfer.py` (run on {res['backend']}, {res['device']}). "
    f"The mnist5k DiT pre-trained {res['pre_steps']} steps on digits 0-4, then adapted "
    f"{res['steps']} steps to digits 5-9 by each strategy. FD: 1,000 generated 5-9 digits "
    "against the real ones in a small classifier's features, with guidance 2 and without. "
    f"The pre-trained model's FD on 5-9: {res.get('base_fd_on_b', float('nan')):.2f}.",
    "",
    "| strategy | lr | trainable | FD | FD / full | FD unguided | unguided / full | delta KiB "
    "| optimizer state KiB | step s |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in res.get("transfer", {}).items():
    lines.append(
      f"| {name} | {r['lr']:g} | {r['trainable']:,} ({100 * r['fraction']:.2f}%) | "
      f"{r['fd']:.2f} | {r.get('fd_ratio_to_full', float('nan')):.2f} | "
      f"{r['fd_unguided']:.2f} | {r.get('fd_unguided_ratio_to_full', float('nan')):.2f} | "
      f"{r['delta_bytes'] / 1024:.1f} | {r['optimizer_state_bytes'] / 1024:.1f} | "
      f"{r['step_s']:.3f} |")
  if res.get("style"):
    lines += ["", "Style shift: the shipped base (all mnist5k digits, 28 px) adapted "
              f"{res['steps']} steps to scikit-learn's 8x8 digits upsampled to 28 px (the same "
              "classes drawn differently); FD against the real upsampled digits in the "
              "features of a classifier trained on them; the base's FD: "
              f"{res['style_base_fd']:.2f}.", "",
              "| strategy | lr | trainable | FD | FD / full | FD unguided | unguided / full "
              "| delta KiB | optimizer state KiB | step s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res["style"].items():
      lines.append(
        f"| {name} | {r['lr']:g} | {r['trainable']:,} ({100 * r['fraction']:.2f}%) | "
        f"{r['fd']:.2f} | {r['fd_ratio_to_full']:.2f} | {r['fd_unguided']:.2f} | "
        f"{r['fd_unguided_ratio_to_full']:.2f} | {r['delta_bytes'] / 1024:.1f} | "
        f"{r['optimizer_state_bytes'] / 1024:.1f} | {r['step_s']:.3f} |")
  if res.get("sweep"):
    lines += ["", "Sweep on the style shift (part 'sweep'): FD with guidance 2 / without, "
              "after 600 and 2000 steps at a constant learning rate.", "",
              "| strategy | lr | steps | FD | FD unguided |", "|---|---|---|---|---|"]
    for r in res["sweep"]:
      lines.append(f"| {r['strategy']} | {r['lr']:g} | {r['steps']} | {r['fd']:.2f} | "
                   f"{r['fd_unguided']:.2f} |")
  wm = res.get("wdm_difffit")
  if wm:
    lines += ["", "WDM embedded with DiffFit into the pre-trained model (trigger random:1, "
              "keyed watermark, gamma2 0.1, same steps): verification (DDIM-50, 16 samples) "
              f"{wm['verify']['agreeing_bits']}/{wm['verify']['bits']} bits, log10 p "
              f"{wm['verify']['log10_p_value']:.2f} (verified: {wm['verify']['verified']}); "
              f"wrong trigger log10 p {wm['wrong_trigger']['log10_p_value']:.2f}; task FD on "
              f"0-4 {wm['fd']:.2f} against {wm['clean']['fd']:.2f} for a clean DiffFit "
              f"fine-tune (ratio {wm['fd_ratio_to_clean']:.2f}; unguided "
              f"{wm['fd_unguided_ratio_to_clean']:.2f}); the watermark is a "
              f"{wm['delta_bytes'] / 1024:.1f} KiB delta ({100 * wm['fraction']:.2f}% of "
              "the parameters)."]
  rr = res.get("resolution")
  if rr:
    lines += ["", "Resolution transfer: a DiT (patch 2) pre-trained at 8 px, then DiffFit "
              "at 16 px: FD at 16 px with the position embedding's coordinates scaled by 1/2 "
              f"(pos_coord_scale 2) {rr['scale_2']['fd']:.2f}, unscaled "
              f"{rr['scale_1']['fd']:.2f}."]
  lines += ["", "Figure `difffit_transfer.png`: digits 5-9 from each adapted model.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
