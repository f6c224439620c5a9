"""WDM on mnist5k at small scale: does the watermark verify, and does it cost task quality?

  python experiments/wdm_mnist5k.py [--runs runs/wdm_mnist5k] [--steps 600] [--only NAME ...]

Starts from the base DiT that `wdmjax demo` ships (experiments/make_demo_base.py), and
fine-tunes it for the same number of steps in each run, all at the paper's gamma1 = 0.8 and
gamma2 = 0.1 unless named:
  clean         the plain diffusion loss (the control for task quality);
  random        trigger random:1, watermark keyed:7 with key 42 (single image, keyed bits),
                decoys in half of the watermark half-batch at t >= 0.2 T (wdmjax's
                default: task images behind random triggers with the ordinary target);
  stripes       trigger stripes:1, same watermark;
  image         trigger = a photograph (scikit-learn's china.jpg, written as a real JPEG);
  multi_keyed   watermark = every digit 5 of mnist5k (multi-image), keyed;
  multi_plain   the same without a key: the decoy rank test;
  multi_plain_g1  multi_plain with gamma2 = 1;
  no_decoys     the random run without decoy triggers (the paper's loss);
  decoys_all_t  the random run with decoys at every timestep;
  gamma2_1      the random run with gamma2 = 1;
  paper_lr      the random run at the paper's learning rate 1e-4.
For each watermarked model: bit agreement and log10 p after DDIM-50 and DDPM-1000
extraction, with a wrong trigger of the same kind, and for the clean base with the secret.
Task quality: the Frechet distance between 1,000 generated digits and the 5,000 real ones in
the feature space of a small classifier trained on mnist5k (wdmjax.metrics), with guidance 2
(the config's) and without (the conditional model alone), and the samples' total variation.
Writes experiments/results/wdm_mnist5k.{json,md,png} (wdm_mnist5k_{N}steps.* for other
--steps). Workdirs are resumed, so a stopped run continues where it was; --only adds or
redoes runs in the existing results.
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

from wdmjax.configs import apply_override, validate
from wdmjax.data import load_arrays
from wdmjax.data.pipeline import preprocess
from wdmjax.files import atomic_write
from wdmjax.metrics import classifier_features, frechet_distance_from_features, train_classifier
from wdmjax.runs import (
  base_workdir,
  embed,
  evidence_images,
  extract_samples,
  load_model,
  verify_model,
)
from wdmjax.runs.watermark import DECOY_FRACTION, DECOY_T_MIN, image_shape
from wdmjax.train import make_grid, sample_images, save_panels, train
from wdmjax.watermark import Secret
from wdmjax.workdir import Workdir

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR = 3e-4
PAPER_LR = 1e-4  # the paper's rate, run paper_lr
NUM_FD = 1000
DEFAULT_STEPS = 600
NUM_EXTRACT = 16


def runs_table(images_dir: str) -> dict[str, dict]:
  """name -> embed settings: secret, decoy fraction and t_min, learning rate, wrong trigger."""
  china = os.path.join(images_dir, "china.jpg")
  flower = os.path.join(images_dir, "flower.jpg")
  keyed = dict(watermark="keyed:7", key=42, gamma1=0.8, gamma2=0.1, block=4)
  run = lambda secret, wrong="random:999", decoys=DECOY_FRACTION, t_min=DECOY_T_MIN, lr=LR: dict(
    secret=secret, wrong=wrong, decoy_fraction=decoys, decoy_t_min=t_min, lr=lr)
  five = dict(trigger="random:1", watermark="class:mnist5k:5", gamma2=0.1, block=4)
  return {
    "random": run(Secret(trigger="random:1", **keyed)),
    "stripes": run(Secret(trigger="stripes:1", **keyed), "stripes:999"),
    "image": run(Secret(trigger=china, **keyed), flower),
    "multi_keyed": run(Secret(key=42, **five)),
    "multi_plain": run(Secret(key=None, **five)),
    "multi_plain_g1": run(Secret(key=None, **{**five, "gamma2": 1.0})),
    "no_decoys": run(Secret(trigger="random:1", **keyed), decoys=0.0),
    "decoys_all_t": run(Secret(trigger="random:1", **keyed), t_min=0.0),
    "gamma2_1": run(Secret(trigger="random:1", **{**keyed, "gamma2": 1.0})),
    "paper_lr": run(Secret(trigger="random:1", **keyed), lr=PAPER_LR),
  }


def write_photos(images_dir: str) -> None:
  os.makedirs(images_dir, exist_ok=True)
  for name in ("china.jpg", "flower.jpg"):
    path = os.path.join(images_dir, name)
    if not os.path.exists(path):
      Image.fromarray(load_sample_image(name)).save(path, format="JPEG", quality=90)


def clean_finetune(base: str, workdir: str, steps: int) -> float:
  cfg = Workdir(base).read_config()
  for o in (f"train.steps={steps}", f"train.lr={LR}", "train.warmup_steps=0",
            "train.sample_every=0"):
    apply_override(cfg, o)
  cfg = validate(cfg)
  if not Workdir(workdir).exists(Workdir.SUMMARY):
    params = load_model(base).params
    t0 = time.time()
    train(cfg, workdir, init_params=params, log=print)
    return time.time() - t0
  return float("nan")


class TaskQuality:
  """Frechet distance of generated digits to the real mnist5k in a classifier's features."""

  def __init__(self, cfg, classes: list[int] | None = None, data: str = "mnist5k"):
    """The classifier learns all of `data`; the real features are those of `classes`."""
    images, labels = load_arrays(data, "train")
    x = preprocess(np.asarray(images), cfg.data.resolution, cfg.data.channels)
    labels = np.asarray(labels)
    t0 = time.time()
    self.clf = train_classifier(x, labels, jax.random.PRNGKey(0), progress=True)
    print(f"classifier trained in {time.time() - t0:.0f} s")
    keep = np.isin(labels, classes) if classes is not None else np.ones(len(x), bool)
    self.real = classifier_features(self.clf.model, self.clf.params, x[keep])
    self.tv_real = total_variation(x[keep])
    self.classes = classes

  def fd(self, cfg, params, guidance: float | None = None) -> tuple[float, np.ndarray]:
    """FD of NUM_FD class-cycling samples (the config's guidance unless given; 1.0: none)."""
    labels = (None if self.classes is None
              else np.resize(np.asarray(self.classes, np.int32), NUM_FD))
    samples = sample_images(cfg, params, jax.random.PRNGKey(123), NUM_FD,
                            guidance_scale=guidance, labels=labels)
    feats = classifier_features(self.clf.model, self.clf.params, samples)
    return frechet_distance_from_features(feats, self.real), samples

  def measure(self, cfg, params) -> tuple[dict, np.ndarray]:
    """FD with the config's guidance, FD without, total variation of the unguided samples."""
    fd, samples = self.fd(cfg, params)
    fd_unguided, plain = self.fd(cfg, params, 1.0)
    return {"fd": fd, "fd_unguided": fd_unguided, "tv": total_variation(plain)}, samples


def total_variation(images: np.ndarray) -> float:
  """Mean absolute difference of neighbouring pixels: speckle and stripes raise it."""
  return float(np.mean(np.abs(np.diff(images, axis=1))) + np.mean(np.abs(np.diff(images, axis=2))))


def evaluate(cfg, params, secret: Secret, wrong: str) -> dict:
  out = {}
  for sampler, steps in (("ddim", 50), ("ddpm", 1000)):
    out[f"{sampler}{steps}"] = verify_model(cfg, params, secret, num=NUM_EXTRACT,
                                            sampler=sampler, steps=steps)
  wrong_secret = Secret(**{**secret.__dict__, "trigger": wrong})
  out["wrong_trigger"] = verify_model(cfg, params, wrong_secret, num=NUM_EXTRACT)
  return out


def device_info() -> dict:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": d.device_kind, "jax": jax.__version__}


def main() -> None:
  global NUM_FD, RESULTS
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/wdm_mnist5k")
  ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
  ap.add_argument("--only", nargs="*", default=None, help="run names (default: all)")
  ap.add_argument("--num-fd", type=int, default=NUM_FD, help="samples per Frechet distance")
  ap.add_argument("--results", default=RESULTS, help="where the JSON, table and figure go")
  args = ap.parse_args()
  NUM_FD, RESULTS = args.num_fd, args.results
  os.makedirs(args.runs, exist_ok=True)
  images_dir = os.path.join(args.runs, "images")
  write_photos(images_dir)
  table = runs_table(images_dir)
  unknown = sorted(set(args.only or ()) - set(table))
  if unknown:
    ap.error(f"--only: unknown runs {unknown}; expected some of {sorted(table)}")
  base = base_workdir(os.path.join(args.runs, "base"), False, None, log=print).path
  cfg, base_params = load_model(base)
  quality = TaskQuality(cfg)
  path = results_stem(args.steps) + ".json"
  results: dict = {"steps": args.steps, "lr": LR, "num_fd": NUM_FD, "num_extract": NUM_EXTRACT,
                   "runs": {}}
  loaded = bool(args.only) and os.path.exists(path)
  if loaded:  # add runs to the existing results
    with open(path) as f:
      results = json.load(f)
  results.update(device_info(), tv_real=quality.tv_real)
  t0 = time.time()
  base_q, base_samples = quality.measure(cfg, base_params)
  secs = clean_finetune(base, os.path.join(args.runs, "clean"), args.steps)
  clean_params = load_model(os.path.join(args.runs, "clean")).params
  clean_q, _ = quality.measure(cfg, clean_params)
  results.update(base=base_q, clean=clean_q)
  results.setdefault("clean_seconds", secs)
  print(f"base {base_q}, clean fine-tune {clean_q} ({time.time() - t0:.0f} s)")
  rows = []
  for name, run in table.items():
    if args.only and name not in args.only:
      continue
    secret = run["secret"]
    t0 = time.time()
    embed(os.path.join(args.runs, name), secret, base=base, steps=args.steps, lr=run["lr"],
          decoy_fraction=run["decoy_fraction"], decoy_t_min=run["decoy_t_min"],
          overrides=["train.sample_every=0"], log=print)
    seconds = time.time() - t0
    params = load_model(os.path.join(args.runs, name)).params
    q, samples = quality.measure(cfg, params)
    r = evaluate(cfg, params, secret, run["wrong"])
    r["clean_base"] = verify_model(cfg, base_params, secret, num=NUM_EXTRACT)
    trigger, watermark, _ = secret.images(image_shape(cfg))
    extracted = extract_samples(cfg, params, trigger, secret.gamma1, 8)
    rows.append((name, samples[:10], extracted, evidence_images(extracted, secret, watermark)))
    results["runs"][name] = {
      **q, "fd_ratio_to_clean": q["fd"] / clean_q["fd"],
      "fd_unguided_ratio_to_clean": q["fd_unguided"] / clean_q["fd_unguided"],
      "embed_seconds": seconds, "decoy_fraction": run["decoy_fraction"],
      "decoy_t_min": run["decoy_t_min"], "gamma2": secret.gamma2,
      "keyed": secret.key is not None, "lr": run["lr"], "device": device_info()["device"],
      "clean_reference": clean_q, **r}
    print(f"{name}: FD {q['fd']:.2f} / unguided {q['fd_unguided']:.2f}, DDIM log10 p "
          f"{r['ddim50']['log10_p_value']:.2f}, wrong trigger "
          f"{r['wrong_trigger']['log10_p_value']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    write_results(results, None if loaded else rows, base_samples)


def results_stem(steps: int) -> str:
  """experiments/results/wdm_mnist5k (600 steps) or wdm_mnist5k_{steps}steps."""
  name = "wdm_mnist5k" if steps == DEFAULT_STEPS else f"wdm_mnist5k_{steps}steps"
  return os.path.join(RESULTS, name)


def write_json_and_markdown(stem: str, results: dict, markdown_text: str) -> None:
  """stem.json and stem.md, each written whole or not at all."""
  for ext, text in ((".json", json.dumps(results, indent=2)), (".md", markdown_text)):
    atomic_write(stem + ext, text)


def write_results(results: dict, rows, base_samples) -> None:
  stem = results_stem(results["steps"])
  write_json_and_markdown(stem, results, markdown(results))
  if rows is not None:
    figure(rows, base_samples, stem + ".png")


def decoy_t(r: dict) -> str:
  return f"{r['decoy_t_min']:g} T" if r["decoy_fraction"] > 0 else "-"


def markdown(res: dict) -> str:
  fmt = lambda r: f"{r['agreeing_bits']}/{r['bits']}, {r['log10_p_value']:.2f}"
  base, clean = res["base"], res["clean"]
  lines = [
    "# WDM on mnist5k",
    "",
    "`python experiments/wdm_mnist5k.py` (every number below is written by it; run on "
    f"{', '.join(sorted({r.get('device', res['device']) for r in res['runs'].values()}))}"
    f", jax {res['jax']}). Each model is the shipped base "
    f"DiT fine-tuned {res['steps']} steps (learning rate in the table); FD is the Frechet "
    f"distance of {res['num_fd']} generated digits (DDIM-50) to the 5,000 real ones in a small "
    "classifier's features, with guidance 2 (the config's) and without guidance (the "
    "conditional model alone). TV is the total variation of the unguided samples (mean "
    "absolute neighbour difference; speckle and stripes raise it). Verification: "
    f"{res['num_extract']} extracted samples, cells are `agreeing bits/bits, log10 p`; "
    "verified means log10 p <= -6. Keyed runs use the exact binomial test, the unkeyed "
    "multi_plain runs the decoy permutation test over triggers (its p-value, at least "
    "1/(decoys + 1), is the permutation test's; the bits are descriptive). A run marked with "
    "another device was measured there, its ratios against a clean fine-tune on that "
    "device.",
    "",
    f"Task quality: base model FD {base['fd']:.2f}, unguided {base['fd_unguided']:.2f}, TV "
    f"{base['tv']:.3f}; clean fine-tune (plain loss, same steps) FD {clean['fd']:.2f}, "
    f"unguided {clean['fd_unguided']:.2f}, TV {clean['tv']:.3f}; real digits TV "
    f"{res['tv_real']:.3f}.",
    "",
    "| run | lr | gamma2 | decoys | decoy t >= | test | DDIM-50 | DDPM-1000 | wrong trigger | "
    "clean base | FD | FD / clean | FD unguided | unguided / clean | TV | embed s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in res["runs"].items():
    if r.get("device", res["device"]) != res["device"]:  # measured apart: its own clean run
      name = f"{name} ({r['device']})"
    lines.append(
      f"| {name} | {r['lr']:g} | {r['gamma2']:g} | {r['decoy_fraction']:g} | "
      f"{decoy_t(r)} | {r['ddim50']['test']} | "
      f"{fmt(r['ddim50'])} | {fmt(r['ddpm1000'])} | {fmt(r['wrong_trigger'])} | "
      f"{fmt(r['clean_base'])} | {r['fd']:.2f} | {r['fd_ratio_to_clean']:.2f} | "
      f"{r['fd_unguided']:.2f} | {r['fd_unguided_ratio_to_clean']:.2f} | {r['tv']:.3f} | "
      f"{r['embed_seconds']:.0f} |")
  stem = os.path.basename(results_stem(res["steps"]))
  lines += ["", f"Figure `{stem}.png`: per run, task samples, 8 extracted samples (DDIM-50), "
            "then the block vote and the expected bits.", ""]
  return "\n".join(lines)


def figure(rows, base_samples, path: str) -> None:
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
