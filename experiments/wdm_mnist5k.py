"""WDM on mnist5k at small scale: does the watermark verify, and does it cost task quality?

  python experiments/wdm_mnist5k.py [--runs runs/wdm_mnist5k] [--steps 600]

Starts from the base DiT that `wdmjax demo` ships (experiments/make_demo_base.py), and
fine-tunes it for the same number of steps in each run:
  clean        the plain diffusion loss (the control for task quality);
  random       trigger random:1, watermark keyed:7 with key 42 (single image, keyed bits);
  stripes      trigger stripes:1, same watermark;
  image        trigger = a photograph (scikit-learn's china.jpg, written as a real JPEG);
  multi_keyed  watermark = every digit 5 of mnist5k (multi-image), keyed;
  multi_plain  the same without a key: the decoy-calibrated test;
  paper_gamma2 the random run with the paper's gamma2 = 0.1;
  no_decoys    the random run without decoy triggers (the paper's loss);
  paper_lr     paper_gamma2 at the paper's learning rate 1e-4 (added with --only paper_lr).
For each watermarked model: bit agreement and log10 p after DDIM-50 and DDPM-1000
extraction, with a wrong trigger of the same kind, and for the clean base with the secret.
Task quality: the Frechet distance between 1,000 generated digits and the 5,000 real ones in
the feature space of a small classifier trained on mnist5k (wdmjax.metrics).
Writes experiments/results/wdm_mnist5k.{json,md,png}. Workdirs are resumed, so a stopped
run continues where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_image

from wdmjax.cli.demo import base_workdir
from wdmjax.cli.watermark import embed, evidence_images, extract_samples, image_shape, verify_model
from wdmjax.data import load_arrays
from wdmjax.data.pipeline import preprocess
from wdmjax.metrics import classifier_features, frechet_distance_from_features, train_classifier
from wdmjax.train import load_trained, make_grid, sample_images, train
from wdmjax.train.config import apply_override
from wdmjax.train.loop import read_config
from wdmjax.watermark import Secret

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR = 3e-4
PAPER_LR = 1e-4  # the paper's rate, run paper_lr
NUM_FD = 1000
NUM_EXTRACT = 16


def runs_table(images_dir: str) -> dict[str, tuple[Secret, float, str]]:
  """name -> (secret, decoy fraction, wrong trigger)."""
  china = os.path.join(images_dir, "china.jpg")
  flower = os.path.join(images_dir, "flower.jpg")
  keyed = dict(watermark="keyed:7", key=42, gamma1=0.8, gamma2=1.0, block=4)
  return {
    "random": (Secret(trigger="random:1", **keyed), 0.5, "random:999"),
    "stripes": (Secret(trigger="stripes:1", **keyed), 0.5, "stripes:999"),
    "image": (Secret(trigger=china, **keyed), 0.5, flower),
    "multi_keyed": (Secret(trigger="random:1", watermark="class:mnist5k:5", key=42,
                           gamma2=1.0, block=4), 0.5, "random:999"),
    "multi_plain": (Secret(trigger="random:1", watermark="class:mnist5k:5", key=None,
                           gamma2=1.0, block=4), 0.5, "random:999"),
    "paper_gamma2": (Secret(trigger="random:1", **{**keyed, "gamma2": 0.1}), 0.5,
                     "random:999"),
    "no_decoys": (Secret(trigger="random:1", **keyed), 0.0, "random:999"),
    "paper_lr": (Secret(trigger="random:1", **{**keyed, "gamma2": 0.1}), 0.5, "random:999"),
  }


def write_photos(images_dir: str) -> None:
  os.makedirs(images_dir, exist_ok=True)
  for name in ("china.jpg", "flower.jpg"):
    path = os.path.join(images_dir, name)
    if not os.path.exists(path):
      Image.fromarray(load_sample_image(name)).save(path, format="JPEG", quality=90)


def clean_finetune(base: str, workdir: str, steps: int) -> float:
  cfg = read_config(base)
  for o in (f"train.steps={steps}", f"train.lr={LR}", "train.warmup_steps=0",
            "train.sample_every=0"):
    apply_override(cfg, o)
  if not os.path.exists(os.path.join(workdir, "train_summary.json")):
    _, _, params = load_trained(base)
    t0 = time.time()
    train(cfg, workdir, init_params=params)
    return time.time() - t0
  return float("nan")


class TaskQuality:
  """Frechet distance of generated digits to the real mnist5k in a classifier's features."""

  def __init__(self, cfg):
    images, labels = load_arrays("mnist5k", "train")
    x = preprocess(np.asarray(images), cfg.data.resolution, cfg.data.channels)
    t0 = time.time()
    self.clf = train_classifier(x, np.asarray(labels), jax.random.PRNGKey(0), progress=True)
    print(f"classifier trained in {time.time() - t0:.0f} s")
    self.real = classifier_features(self.clf.model, self.clf.params, x)

  def fd(self, cfg, model, params, guidance: float | None = None) -> tuple[float, np.ndarray]:
    """FD of NUM_FD class-cycling samples (the config's guidance unless given; 1.0: none)."""
    samples = sample_images(cfg, model, params, jax.random.PRNGKey(123), NUM_FD,
                            guidance_scale=guidance)
    feats = classifier_features(self.clf.model, self.clf.params, samples)
    return frechet_distance_from_features(feats, self.real), samples


def evaluate(cfg, model, params, secret: Secret, wrong: str) -> dict:
  out = {}
  for sampler, steps in (("ddim", 50), ("ddpm", 1000)):
    out[f"{sampler}{steps}"] = verify_model(cfg, model, params, secret, num=NUM_EXTRACT,
                                            sampler=sampler, steps=steps)
  wrong_secret = Secret(**{**secret.__dict__, "trigger": wrong})
  out["wrong_trigger"] = verify_model(cfg, model, params, wrong_secret, num=NUM_EXTRACT)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/wdm_mnist5k")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--only", nargs="*", default=None, help="run names (default: all)")
  ap.add_argument("--unguided-fd", action="store_true",
                  help="only add the FD without guidance to the existing results")
  args = ap.parse_args()
  if args.unguided_fd:
    return add_unguided_fd(args.runs)
  os.makedirs(args.runs, exist_ok=True)
  images_dir = os.path.join(args.runs, "images")
  write_photos(images_dir)
  base = base_workdir(os.path.join(args.runs, "base"), False, None)
  cfg, model, base_params = load_trained(base)
  quality = TaskQuality(cfg)
  results: dict = {"steps": args.steps, "lr": LR, "num_fd": NUM_FD,
                   "num_extract": NUM_EXTRACT, "runs": {}}
  path = os.path.join(RESULTS, "wdm_mnist5k.json")
  if args.only and os.path.exists(path):  # add runs to the existing results
    with open(path) as f:
      results = json.load(f)
  fd_base, base_samples = quality.fd(cfg, model, base_params)
  results["fd_base"] = fd_base
  secs = clean_finetune(base, os.path.join(args.runs, "clean"), args.steps)
  _, _, clean_params = load_trained(os.path.join(args.runs, "clean"))
  results["fd_clean"], _ = quality.fd(cfg, model, clean_params)
  results.setdefault("clean_seconds", secs)
  print(f"FD base {fd_base:.2f}, clean fine-tune {results['fd_clean']:.2f}")
  rows = []
  for name, (secret, decoys, wrong) in runs_table(images_dir).items():
    if args.only and name not in args.only:
      continue
    workdir = os.path.join(args.runs, name)
    lr = PAPER_LR if name == "paper_lr" else LR
    t0 = time.time()
    embed(workdir, secret, base=base, steps=args.steps, lr=lr, decoy_fraction=decoys,
          overrides=["train.sample_every=0"])
    seconds = time.time() - t0
    _, _, params = load_trained(workdir)
    fd, samples = quality.fd(cfg, model, params)
    r = evaluate(cfg, model, params, secret, wrong)
    r["clean_base"] = verify_model(cfg, model, base_params, secret, num=NUM_EXTRACT)
    trigger, watermark, _ = secret.images(image_shape(cfg))
    extracted = extract_samples(cfg, model, params, trigger, secret.gamma1, 8)
    rows.append((name, samples[:10], extracted, evidence_images(extracted, secret, watermark)))
    results["runs"][name] = {"fd": fd, "fd_ratio_to_clean": fd / results["fd_clean"],
                             "embed_seconds": seconds, "decoy_fraction": decoys,
                             "gamma2": secret.gamma2, "keyed": secret.key is not None,
                             "lr": lr,
                             "trigger_kind": name if name in ("stripes", "image") else "random",
                             **r}
    print(f"{name}: FD {fd:.2f}, DDIM log10 p {r['ddim50']['log10_p_value']:.2f}, "
          f"wrong trigger {r['wrong_trigger']['log10_p_value']:.2f}")
    write_results(results, rows if not args.only else None, base_samples)


def total_variation(images: np.ndarray) -> float:
  """Mean absolute difference of neighbouring pixels: speckle and stripes raise it."""
  return float(np.mean(np.abs(np.diff(images, axis=1))) + np.mean(np.abs(np.diff(images, axis=2))))


def add_unguided_fd(runs: str) -> None:
  """FD without classifier-free guidance (the conditional model alone) for every model, and
  the samples' total variation against the real digits' (a pixel-level artifact measure)."""
  with open(os.path.join(RESULTS, "wdm_mnist5k.json")) as f:
    results = json.load(f)
  cfg, model, base_params = load_trained(os.path.join(runs, "base"))
  quality = TaskQuality(cfg)
  images, _ = load_arrays("mnist5k", "train")
  results["tv_real"] = total_variation(preprocess(np.asarray(images), cfg.data.resolution,
                                                  cfg.data.channels))
  if "fd_base_unguided" not in results:
    results["fd_base_unguided"], s = quality.fd(cfg, model, base_params, 1.0)
    results["tv_base"] = total_variation(s)
    _, _, clean = load_trained(os.path.join(runs, "clean"))
    results["fd_clean_unguided"], s = quality.fd(cfg, model, clean, 1.0)
    results["tv_clean"] = total_variation(s)
  for name, r in results["runs"].items():
    if "fd_unguided" in r:  # computed by an earlier pass
      continue
    _, _, params = load_trained(os.path.join(runs, name))
    r["fd_unguided"], s = quality.fd(cfg, model, params, 1.0)
    r["tv"] = total_variation(s)
    r["fd_unguided_ratio_to_clean"] = r["fd_unguided"] / results["fd_clean_unguided"]
    print(f"{name}: unguided FD {r['fd_unguided']:.2f}, total variation {r['tv']:.3f}")
  write_results(results, None, None)


def write_results(results: dict, rows, base_samples) -> None:
  os.makedirs(RESULTS, exist_ok=True)
  stem = os.path.join(RESULTS, "wdm_mnist5k")
  with open(stem + ".json.tmp", "w") as f:
    json.dump(results, f, indent=2)
  os.replace(stem + ".json.tmp", stem + ".json")
  with open(stem + ".md.tmp", "w") as f:
    f.write(markdown(results))
  os.replace(stem + ".md.tmp", stem + ".md")
  if rows is not None:
    figure(rows, base_samples, stem + ".png")


def markdown(res: dict) -> str:
  fmt = lambda r: f"{r['agreeing_bits']}/{r['bits']}, {r['log10_p_value']:.2f}"
  lines = [
    "# WDM on mnist5k",
    "",
    "`python experiments/wdm_mnist5k.py` (every number below is written by it). Each model is "
    f"the shipped base DiT fine-tuned {res['steps']} steps (learning rate in the table); "
    f"task FD is the Frechet distance of {res['num_fd']} generated digits (DDIM-50, "
    "guidance 2) to the 5,000 real ones in a small classifier's features. Verification: "
    f"{res['num_extract']} extracted samples, cells are `agreeing bits/bits, log10 p`; "
    "verified means log10 p <= -6.",
    "",
    f"Task FD (guidance 2): base model {res['fd_base']:.2f}, clean fine-tune (plain loss, "
    f"same steps) {res['fd_clean']:.2f}."
    + (f" Without guidance: base {res['fd_base_unguided']:.2f}, clean fine-tune "
       f"{res['fd_clean_unguided']:.2f}. Total variation of unguided samples (mean absolute "
       f"neighbour difference; speckle and stripes raise it): real digits "
       f"{res['tv_real']:.3f}, base {res['tv_base']:.3f}, clean fine-tune "
       f"{res['tv_clean']:.3f}." if "fd_base_unguided" in res else ""),
    "",
    "| run | lr | gamma2 | decoys | test | DDIM-50 | DDPM-1000 | wrong trigger | clean base | "
    "task FD | FD / clean | FD unguided / clean | TV unguided | embed s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in res["runs"].items():
    lines.append(
      f"| {name} | {r.get('lr', res['lr']):g} | {r['gamma2']:g} | {r['decoy_fraction']:g} | "
      f"{r['ddim50']['test']} | "
      f"{fmt(r['ddim50'])} | {fmt(r['ddpm1000'])} | {fmt(r['wrong_trigger'])} | "
      f"{fmt(r['clean_base'])} | {r['fd']:.2f} | {r['fd_ratio_to_clean']:.2f} | "
      f"{r.get('fd_unguided_ratio_to_clean', float('nan')):.2f} | "
      f"{r.get('tv', float('nan')):.3f} | {r['embed_seconds']:.0f} |")
  lines += ["", "Figure `wdm_mnist5k.png`: per run, task samples, 8 extracted samples (DDIM-50), "
            "then the block vote and the expected bits.", ""]
  return "\n".join(lines)


def figure(rows, base_samples, path: str) -> None:
  from wdmjax.train.images import save_panels

  blank = np.full((10, 8), 255, np.uint8)[..., None]
  panels = [("base: task samples", make_grid(base_samples[:10], nrow=5, upscale=2)),
            ("", blank)]
  for name, task, extracted, ev in rows:
    both = np.concatenate([extracted, ev])
    panels.append((f"{name}: task samples", make_grid(task, nrow=5, upscale=2)))
    panels.append((f"{name}: extracted, vote, expected", make_grid(both, nrow=10, upscale=2)))
  save_panels(panels, path, per_row=4)


if __name__ == "__main__":
  main()
