"""`wdmjax demo`: the whole WDM story on the embedded MNIST digits, in about 6 minutes on CPU.

1. base model: the small DiT shipped in wdmjax/assets (trained by
   experiments/make_demo_base.py), or one trained here with --train-base;
2. embed a keyed watermark by fine-tuning it with the Watermark Diffusion Process;
3. task samples of both models and the extracted watermark, side by side in demo.png;
4. verify the watermarked model (verified) and the clean base with the same secret (not);
5. report.json and a summary table.
`DIR/base` and `DIR/watermarked` are ordinary workdirs for train / sample / extract / verify.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import time

import jax

from wdmjax.cli.watermark import (
  embed,
  evidence_images,
  extract_samples,
  image_shape,
  verify_model,
)
from wdmjax.watermark import Secret

# The demo's secret, with the paper's gamma1 = 0.8 and gamma2 = 0.1: at lr 3e-4 a 600-step
# fine-tune learns 49 block bits with either gamma2 = 0.1 or 1 (experiments/results/
# wdm_mnist5k.md, runs random and paper_gamma2).
DEMO_SECRET = Secret(trigger="random:2026", watermark="keyed:11", key=424242, gamma1=0.8,
                     gamma2=0.1, block=4)
EMBED_STEPS = 600
EMBED_LR = 3e-4


def base_workdir(path: str, train_base: bool, base_steps: int | None) -> str:
  from wdmjax.train import train
  from wdmjax.train.checkpoint import Checkpointer
  from wdmjax.train.config import apply_override, validate
  from wdmjax.train.export import load_config_json, load_params_npz, workdir_from_params
  from wdmjax.train.presets import mnist5k_dit

  if train_base:
    cfg = mnist5k_dit()
    if base_steps is not None:
      apply_override(cfg, f"train.steps={base_steps}")
    validate(cfg)
    print(f"[1/4] training the base DiT for {cfg.train.steps} steps (resumes if interrupted)")
    train(cfg, path)
    return path
  ckpt_dir = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpt_dir):
    ckpt = Checkpointer(path)
    done = ckpt.latest_step() is not None
    ckpt.close()
    if done:
      print(f"[1/4] base model: {path} (already there)")
      return path
  assets = importlib.resources.files("wdmjax") / "assets"
  cfg = load_config_json(str(assets / "demo_base.json"))
  params = load_params_npz(str(assets / "demo_base.npz"))
  workdir_from_params(cfg, params, path, int(cfg.train.steps))
  print(f"[1/4] base model: the shipped {cfg.model.depth}-block DiT trained for "
        f"{cfg.train.steps} steps on mnist5k -> {path}")
  return path


def run_demo(out: str, *, steps: int = EMBED_STEPS, train_base: bool = False,
             base_steps: int | None = None, num: int = 16) -> dict:
  """Runs the demo into `out`; returns the report {"watermarked": ..., "clean": ...}."""
  from wdmjax.train import load_trained, make_grid, sample_images
  from wdmjax.train.images import save_panels

  t0 = time.time()
  os.makedirs(out, exist_ok=True)
  base = base_workdir(os.path.join(out, "base"), train_base, base_steps)
  wm_dir = os.path.join(out, "watermarked")
  print(f"[2/4] embedding the watermark: {steps} fine-tuning steps with the watermark "
        f"diffusion process (gamma1 {DEMO_SECRET.gamma1}, gamma2 {DEMO_SECRET.gamma2})")
  embed(wm_dir, DEMO_SECRET, base=base, steps=steps, lr=EMBED_LR,
        overrides=["train.sample_every=0"])

  print("[3/4] sampling both models and extracting the watermark")
  cfg, model, base_params = load_trained(base)
  _, _, wm_params = load_trained(wm_dir)
  rng = jax.random.PRNGKey(0)
  task_base = sample_images(cfg, model, base_params, rng, 40)
  task_wm = sample_images(cfg, model, wm_params, rng, 40)
  trigger, watermark, _ = DEMO_SECRET.images(image_shape(cfg))
  extracted = extract_samples(cfg, model, wm_params, trigger, DEMO_SECRET.gamma1, num)
  extracted_clean = extract_samples(cfg, model, base_params, trigger, DEMO_SECRET.gamma1, num)
  ev = evidence_images(extracted, DEMO_SECRET, watermark)
  picture = save_panels([
    ("base model: task samples", make_grid(task_base, nrow=10, upscale=2)),
    ("watermarked: task samples", make_grid(task_wm, nrow=10, upscale=2)),
    ("watermarked + trigger", make_grid(extracted, nrow=4, upscale=2)),
    ("vote / expected bits", make_grid(ev, nrow=1, upscale=2)),
    ("base + trigger", make_grid(extracted_clean, nrow=4, upscale=2)),
  ], os.path.join(out, "demo.png"))

  print("[4/4] verifying both models with the same secret")
  report = {
    "watermarked": verify_model(cfg, model, wm_params, DEMO_SECRET, num=num),
    "clean": verify_model(cfg, model, base_params, DEMO_SECRET, num=num),
  }
  tmp = os.path.join(out, "report.json.tmp")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, os.path.join(out, "report.json"))
  print(summary_table(report))
  print(f"picture: {os.path.abspath(picture)}\nreport:  {os.path.abspath(out)}/report.json\n"
        f"workdirs: {os.path.abspath(base)} (clean), {os.path.abspath(wm_dir)} (watermarked)"
        f"\ndone in {(time.time() - t0) / 60:.1f} min")
  return report


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


def cmd_demo(args) -> int:
  run_demo(args.out, steps=args.steps, train_base=args.train_base, base_steps=args.base_steps)
  return 0


def add_parser(sub) -> None:
  d = sub.add_parser("demo", help="the whole WDM story on the embedded MNIST digits: base "
                     "model, watermark embedding, extraction, verification")
  d.add_argument("--out", default="wdmjax_demo")
  d.add_argument("--steps", type=int, default=EMBED_STEPS, help="watermark fine-tuning steps")
  d.add_argument("--train-base", action="store_true",
                 help="train the base model here (about 27 min) instead of using the shipped one")
  d.add_argument("--base-steps", type=int, default=None,
                 help="with --train-base: base training steps (default 4000)")
  d.set_defaults(func=cmd_demo)
