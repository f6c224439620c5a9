"""Deep Serial Number on mnist5k: do students work only with their serial number, against
attacks, and can a diffusion model be locked the same way?

  python experiments/serial_mnist5k.py [--runs runs/serial_mnist5k] [--customers 3]
      [--key-file KEY]   (default: $WDMJAX_OWNER_KEY_FILE or $WDMJAX_OWNER_KEY, else RUNS/owner.key,
                          made with `wdmjax keygen` when missing)

The serial numbers are derived from the owner key and each workdir's nonce: with the same key
file and runs folder the results reproduce; with another key the serials, hence the numbers,
differ within the noise. The paper's setting is measured: 16-bit serials, which exhaustive
search finds (part 4); wdmjax's default is 64 bits, too many to search.

1. `serial teacher`: the private teacher (wdmjax's DigitClassifier) on the 4,000 training
   digits, evaluated on the 1,000 held out.
2. `serial issue`: one student per customer (16-bit serial, a 4x4 px stamp in the bottom-right
   corner), each evaluated held out with its valid serial, raw, with 100 invalid serials
   drawn apart from training's (mean, max) and with its 16 near misses (one bit wrong).
3. Ablations on customer 0's serial, same seed: the domain head without reversal
   (grl_scale -1), without a domain head, without SNNL, and with only uniform invalid stamps
   in training (no near misses).
4. Attacks on customer 0's student: fine-tuning all weights on raw digits with their labels
   (10 / 20 / 40% of the training split, 300 Adam steps at 1e-3), against a classifier
   trained from scratch on the same digits and steps (what the attacker's data alone give);
   global magnitude pruning of
   5-20% of the kernels; reverse engineering of the serial (100 labelled digits, the stamp's
   place and size known, 300 Adam steps on sigmoid cells from 5 random starts); and
   exhaustive search over all 65,536 serials, scored on 20 labelled digits.
5. The locked diffusion model: the shipped base DiT fine-tuned 600 steps with
   `serial.locked_loss` (`serial lock`), against a clean fine-tune of the same steps and rate.
   FD (a digit classifier's features, to the 5,000 real digits) and that classifier's accuracy
   on class-conditional samples (the class asked for), DDIM-50 with guidance 2, with the valid
   serial, without, with invalid serials, with near misses.

Writes experiments/results/serial_mnist5k.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np
from wdm_mnist5k import TaskQuality, clean_finetune, device_info, write_json_and_markdown

from wdmjax import runs, serial
from wdmjax.attacks import prune
from wdmjax.data import labelled_split
from wdmjax.files import atomic_write, read_json
from wdmjax.keys import KEY_ENV, KEY_FILE_ENV, owner_key
from wdmjax.metrics import (
  classifier_accuracy,
  classifier_features,
  classifier_logits,
  frechet_distance_from_features,
  train_classifier,
)
from wdmjax.runs.keys import keygen
from wdmjax.runs.serial import DSN_JSON

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
STAMP = serial.StampSpec(bits=16)  # the paper's size, searchable (the default is 64 bits)
ABLATIONS = {
  "as issued (GRL 1, domain 0.1, SNNL 0.1)": {},
  "domain head not reversed (GRL -1)": {"grl_scale": -1.0},
  "no domain head": {"domain_weight": 0.0},
  "no SNNL": {"snnl_weight": 0.0},
  "no near misses in training": {"near_fraction": 0.0},
  "initialised at random, not as the teacher": {"from_teacher": False},
}


def cached(runs_dir: str, name: str, fn):
  """fn()'s JSON-able result, kept in RUNS/cache.json under `name`: a rerun (to add an attack,
  to redraw the figure) reuses what is measured already."""
  path = os.path.join(runs_dir, "cache.json")
  store = read_json(path) if os.path.exists(path) else {}
  if name not in store:
    store[name] = fn()
    atomic_write(path, json.dumps(store, indent=1))
  return store[name]


def student_row(model, params, xh, yh, valid, spec, invalid) -> dict:
  inv = [serial.accuracy(model, params, xh, yh, b, spec) for b in invalid]
  near = [serial.accuracy(model, params, xh, yh, b, spec) for b in serial.near_misses(valid)]
  return {"valid": serial.accuracy(model, params, xh, yh, valid, spec),
          "raw": serial.accuracy(model, params, xh, yh),
          "invalid_mean": float(np.mean(inv)), "invalid_max": float(np.max(inv)),
          "near_miss_mean": float(np.mean(near)), "near_miss_max": float(np.max(near))}


def classifier_part(args, wd: str) -> dict:
  t0 = time.time()
  if not os.path.exists(os.path.join(wd, DSN_JSON)):
    runs.serial_teacher(wd, steps=args.teacher_steps, stamp=STAMP)
  student = serial.StudentConfig(steps=args.student_steps)
  rep = runs.serial_issue(wd, args.customers, key_file=args.key_file, config=student)
  out = {"teacher": rep.teacher_accuracy, "customers": rep.customers,
         "issue_seconds": time.time() - t0, "student": dataclasses.asdict(student)}
  print(f"teacher {rep.teacher_accuracy:.4f}; customers {rep.customers}")

  dsn = read_json(os.path.join(wd, DSN_JSON))
  spec = serial.StampSpec.from_json(dsn["stamp"])
  x, y, xh, yh = labelled_split("mnist5k", seed=dsn["seed"])
  reg = runs.read_serials(wd, args.key_file)
  key = owner_key(args.key_file)
  valid = np.stack([serial.parse_serial(c["serial"], spec.bits) for c in reg["customers"]])
  invalid = serial.draw_invalid(serial.owner_prng(key, reg["nonce"], "invalid"), valid, 100)
  t_model, t_params = runs.load_teacher(wd)
  sn = valid[0]

  out["ablations"] = {}
  for name, change in ABLATIONS.items():
    if not change:
      out["ablations"][name] = {k: v for k, v in rep.customers[0].items()
                                if k not in ("customer", "serial", "invalid_num")}
      continue
    def ablation(change=change, name=name):
      t1 = time.time()
      cfg = dataclasses.replace(student, **change)
      st = serial.distill_student(t_model, t_params, x, y, sn, spec,
                                  serial.owner_prng(key, reg["nonce"], "student 0"), cfg,
                                  progress=True, desc=name)
      row = student_row(st.model, st.params, xh, yh, sn, spec, invalid)
      print(f"{name}: {row} ({time.time() - t1:.0f} s)")
      return row

    out["ablations"][name] = cached(args.runs, f"ablation {name} {student.steps}", ablation)

  model, params, _ = runs.load_student(wd, 0, args.key_file)
  out["attacks"] = cached(args.runs, f"attacks {student.steps}",
                          lambda: attack_student(model, params, x, y, xh, yh, sn, spec, invalid))
  out["serial_0"] = serial.format_serial(sn)
  out["invalid_examples"] = [serial.format_serial(b) for b in invalid[:4]]
  out["seconds"] = time.time() - t0
  return out


def attack_student(model, params, x, y, xh, yh, sn, spec, invalid) -> dict:
  """Fine-tuning, pruning, reverse engineering and exhaustive search on one student."""
  attacks: dict = {"finetune": [], "prune": [], "reverse": []}
  for share in (0.1, 0.2, 0.4):
    n = int(share * len(x))
    p = serial.finetune_unlocked(model, params, x[:n], y[:n], jax.random.PRNGKey(1),
                                 steps=300, lr=1e-3)
    # The control: what the attacker's labelled digits give without the stolen student.
    scratch = train_classifier(x[:n], y[:n], jax.random.PRNGKey(1), steps=300, lr=1e-3)
    row = {"share": share, "images": n, **student_row(model, p, xh, yh, sn, spec, invalid[:20]),
           "scratch": classifier_accuracy(*scratch, xh, yh)}
    attacks["finetune"].append(row)
    print("fine-tune", row)
  for frac in (0.05, 0.1, 0.15, 0.2):
    p = prune(params, frac)
    row = {"fraction": frac, **student_row(model, p, xh, yh, sn, spec, invalid[:20])}
    attacks["prune"].append(row)
    print("prune", row)
  for s in range(5):
    r = serial.reverse_engineer_serial(model, params, x[:100], y[:100], spec,
                                       jax.random.PRNGKey(100 + s), steps=300, lr=0.1)
    row = {"seed": s, "cells_accuracy": serial.accuracy(model, params, xh, yh, r.cells, spec),
           "bits_accuracy": serial.accuracy(model, params, xh, yh, r.bits, spec),
           "bits_right": int((r.bits == sn).sum()), "final_loss": float(r.losses[-1]),
           "serial": serial.format_serial(r.bits)}
    attacks["reverse"].append(row)
    print("reverse", row)
  t1 = time.time()
  found = serial.search_serials(model, params, x[:20], y[:20], spec)
  code = int("".join(map(str, sn)), 2)
  attacks["search"] = {
    "images": 20, "candidates": found.candidates, "seconds": time.time() - t1,
    "found": serial.format_serial(found.bits), "found_is_valid": bool((found.bits == sn).all()),
    "found_accuracy": serial.accuracy(model, params, xh, yh, found.bits, spec),
    "valid_rank": int((found.scores > found.scores[code]).sum()) + 1,
    "perfect_candidates": int((found.scores == 1.0).sum())}
  print("search", attacks["search"])
  return attacks


def diffusion_part(args, root: str) -> tuple[dict, dict]:
  t0 = time.time()
  base = runs.base_workdir(os.path.join(root, "base"), False, None, log=print).path
  locked_wd = os.path.join(root, "locked")
  if not os.path.exists(os.path.join(locked_wd, "train_summary.json")):
    runs.serial_lock(locked_wd, base, steps=args.lock_steps, lr=3e-4, stamp=STAMP,
                     key_file=args.key_file, log=print)
  clean_finetune(base, os.path.join(root, "clean"), args.lock_steps)
  lock = runs.read_lock(locked_wd, args.key_file)
  spec = serial.StampSpec.from_json(lock["stamp"])
  sn = serial.parse_serial(lock["serial"], spec.bits)
  invalid = serial.draw_invalid(
    serial.owner_prng(owner_key(args.key_file), lock["nonce"], "invalid"), sn[None], 5)
  near = serial.near_misses(sn)[:: max(1, spec.bits // 5)][:5]
  cfg, _ = runs.load_model(locked_wd)
  quality = TaskQuality(cfg)
  num = args.num_fd
  labels = np.arange(num) % 10
  grids = {}

  def measure(name: str, workdir: str, serials: list[str | None]) -> dict:
    model = runs.load_model(workdir)
    per = num // len(serials)
    imgs = np.concatenate([runs.locked_samples(workdir, s, per, seed=i,
                                               labels=labels[i * per:(i + 1) * per],
                                               model=model)
                           for i, s in enumerate(serials)])
    lab = labels[:len(imgs)]
    clf = quality.clf
    fd = frechet_distance_from_features(classifier_features(clf.model, clf.params, imgs),
                                        quality.real)
    acc = float((classifier_logits(clf.model, clf.params, imgs).argmax(-1) == lab).mean())
    grids[name] = imgs[:20]
    row = {"fd": float(fd), "class_accuracy": acc, "num": len(imgs),
           "mean_pixel": float(imgs.mean()), "std_pixel": float(imgs.std())}
    print(name, row)
    return row

  out = {"serial": lock["serial"], "steps": args.lock_steps, "num": num, "rows": {}}
  hexes = [serial.format_serial(b) for b in invalid]
  out["rows"]["clean fine-tune, no serial"] = measure("clean", os.path.join(root, "clean"),
                                                      [None])
  out["rows"]["clean fine-tune, the serial stamped"] = measure(
    "clean + stamp", os.path.join(root, "clean"), [lock["serial"]])
  out["rows"]["locked, valid serial"] = measure("locked, valid", locked_wd, [lock["serial"]])
  out["rows"]["locked, no serial"] = measure("locked, none", locked_wd, [None])
  out["rows"]["locked, 5 invalid serials"] = measure("locked, invalid", locked_wd, hexes)
  out["rows"]["locked, 5 near misses (1 bit)"] = measure(
    "locked, near miss", locked_wd, [serial.format_serial(b) for b in near])
  v, c = out["rows"]["locked, valid serial"], out["rows"]["clean fine-tune, no serial"]
  out["fd_ratio_valid_to_clean"] = v["fd"] / c["fd"]
  out["seconds"] = time.time() - t0
  return out, grids


def _diffusion_with_grids(args, grids_path: str) -> dict:
  out, grids = diffusion_part(args, args.runs)
  np.savez(grids_path, **grids)
  return out


def pct(v: float) -> str:
  return f"{100 * v:.1f}%"


def markdown(res: dict) -> str:
  c = res["classifier"]
  lines = [
    "# Deep Serial Number on mnist5k", "",
    f"`python experiments/serial_mnist5k.py` (every number below is written by it; "
    f"{res['device']}). Held-out accuracy on the 1,000 digits mnist5k holds out; chance "
    f"10%. Stamp: 16 bits as a 4x4 px square in the bottom-right corner (14% of the width). "
    f"Student settings: {c['student']}.", "",
    "## Students", "",
    f"Teacher: {pct(c['teacher'])}.", "",
    "| customer | serial | valid SN | no SN | invalid SN, mean of 100 | invalid max | "
    "near miss (1 bit), mean of 16 | near-miss max |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in c["customers"]:
    lines.append(f"| {r['customer']} | {r['serial']} | {pct(r['valid'])} | {pct(r['raw'])} | "
                 f"{pct(r['invalid_mean'])} | {pct(r['invalid_max'])} | "
                 f"{pct(r['near_miss_mean'])} | {pct(r['near_miss_max'])} |")
  lines += ["", "Ablations (customer 0's serial, same seed; invalid: the same 100):", "",
            "| student | valid SN | no SN | invalid mean | invalid max | near-miss mean | "
            "near-miss max |", "|---|---|---|---|---|---|---|"]
  for name, r in c["ablations"].items():
    lines.append(f"| {name} | {pct(r['valid'])} | {pct(r['raw'])} | {pct(r['invalid_mean'])}"
                 f" | {pct(r['invalid_max'])} | {pct(r['near_miss_mean'])} | "
                 f"{pct(r['near_miss_max'])} |")
  a = c["attacks"]
  a = c["attacks"]
  ft, f = a["finetune"][0], a["search"]
  lines += ["", "What the numbers say:", "",
            f"- Pruning 5-20% of the kernels leaves the lock: without a serial at most "
            f"{pct(max(r['raw'] for r in a['prune']))}. Gradient descent on the stamp finds "
            f"nothing ({pct(np.mean([r['bits_accuracy'] for r in a['reverse']]))}): its loss "
            f"ends at {np.mean([r['final_loss'] for r in a['reverse']]):.4f} (ln 10 = 2.3026, "
            f"the uniform output), the student is flat around invalid stamps.",
            f"- The lock does not hold against fine-tuning: {ft['images']} raw labelled digits "
            f"unlock the student to {pct(ft['raw'])} without a serial, "
            f"{100 * (ft['raw'] - ft['scratch']):.1f} points above what the same digits train "
            f"from scratch ({pct(ft['scratch'])}): a stolen student is worth stealing.",
            f"- Nor against exhaustive search: 16 bits are {f['candidates']:,} candidates, "
            f"tried in {f['seconds']:.0f} s on 2 CPU cores; the valid serial ranks "
            f"{f['valid_rank']}. A vendor needs serials too long to search (64 bits: an 8x8 "
            f"px stamp)."]
  lines += ["", "## Attacks on customer 0's student", "",
            "| attack | valid SN | no SN | invalid mean (20) | near-miss max | the same digits, "
            "a classifier from scratch |",
            "|---|---|---|---|---|---|"]
  for r in a["finetune"]:
    lines.append(f"| fine-tune on {pct(r['share'])} ({r['images']} digits, raw, labelled) | "
                 f"{pct(r['valid'])} | {pct(r['raw'])} | {pct(r['invalid_mean'])} | "
                 f"{pct(r['near_miss_max'])} | {pct(r['scratch'])} |")
  for r in a["prune"]:
    lines.append(f"| prune {pct(r['fraction'])} of the kernels | {pct(r['valid'])} | "
                 f"{pct(r['raw'])} | {pct(r['invalid_mean'])} | {pct(r['near_miss_max'])} | - |")
  cells = np.array([r["cells_accuracy"] for r in a["reverse"]])
  bits = np.array([r["bits_accuracy"] for r in a["reverse"]])
  right = [r["bits_right"] for r in a["reverse"]]
  f = a["search"]
  which = "the valid serial" if f["found_is_valid"] else "not the valid serial"
  lines += ["", f"Exhaustive search (every one of the {f['candidates']:,} serials stamped onto "
            f"{f['images']} labelled digits, {f['seconds']:.0f} s on this machine): the best "
            f"is {f['found']} ({which}; "
            f"the valid one ranks {f['valid_rank']}; candidates that classify all "
            f"{f['images']} right: {f['perfect_candidates']}), held-out accuracy with it "
            f"{pct(f['found_accuracy'])}."]
  lines += ["", f"Reverse engineering the serial ({len(cells)} random starts, 100 labelled "
            f"digits, 300 steps): accuracy with the optimised grey stamp "
            f"{pct(cells.mean())} +- {pct(cells.std())}, rounded to bits "
            f"{pct(bits.mean())} +- {pct(bits.std())} (paper, MNIST: 48.8 +- 25.1%); bits "
            f"right out of 16: {right}."]
  d = res.get("diffusion")
  if d:
    lines += ["", "## A locked diffusion model", "",
              f"The shipped base DiT fine-tuned {d['steps']} steps at 3e-4 with "
              f"`serial.locked_loss` ({d['locked_seconds']:.0f} s), against a clean fine-tune "
              f"of the same steps and rate ({d['clean_seconds']:.0f} s). {d['num']} "
              f"class-conditional samples per row (DDIM-50, guidance 2); FD to the real "
              f"digits in a digit classifier's features; accuracy: that classifier gives the "
              f"class asked for. FD with the valid serial / clean: "
              f"{d['fd_ratio_valid_to_clean']:.3f}.", "",
              "| model, input | FD | class accuracy | mean pixel |", "|---|---|---|---|"]
    for name, r in d["rows"].items():
      lines.append(f"| {name} | {r['fd']:.2f} | {pct(r['class_accuracy'])} | "
                   f"{r['mean_pixel']:.3f} |")
  lines += ["", "Figure `serial_mnist5k.png`: student accuracies; the attacks; samples of "
            "the locked diffusion model with and without the serial.", ""]
  return "\n".join(lines)


def figure(res: dict, grids: dict, path: str) -> None:
  import matplotlib  # the figure only: the experiment runs without it

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from wdmjax.train import make_grid

  c = res["classifier"]
  panels = 2 + (1 if grids else 0)
  fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
  ax = axes[0]
  names = list(c["ablations"])
  keys = ("valid", "raw", "invalid_mean", "near_miss_max")
  labels = ("valid SN", "no SN", "invalid (mean)", "near miss (max)")
  width = 0.8 / len(keys)
  for j, (k, lab) in enumerate(zip(keys, labels, strict=True)):
    ax.bar(np.arange(len(names)) + j * width, [100 * c["ablations"][n][k] for n in names],
           width, label=lab)
  ax.axhline(100 * c["teacher"], color="k", lw=0.8, ls="--", label="teacher")
  ax.set_xticks(np.arange(len(names)) + 0.3, [n.split(" (")[0] for n in names], rotation=25,
                ha="right", fontsize=7)
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_title("students (customer 0's serial)")
  ax.legend(fontsize=7)
  ax = axes[1]
  a = c["attacks"]
  xs = [f"ft {int(100 * r['share'])}%" for r in a["finetune"]] + \
       [f"prune {int(100 * r['fraction'])}%" for r in a["prune"]] + \
       ["gradient reverse eng.", "exhaustive search"]
  valid = [r["valid"] for r in a["finetune"] + a["prune"]] + [np.nan, np.nan]
  raw = [r["raw"] for r in a["finetune"] + a["prune"]] + \
        [np.mean([r["bits_accuracy"] for r in a["reverse"]]), a["search"]["found_accuracy"]]
  scratch = [r["scratch"] for r in a["finetune"]] + [np.nan] * (len(xs) - len(a["finetune"]))
  ax.bar(np.arange(len(xs)) - 0.27, 100 * np.array(valid), 0.27, label="valid SN")
  ax.bar(np.arange(len(xs)), 100 * np.array(raw), 0.27,
         label="no SN (attacks on the SN: the SN found)")
  ax.bar(np.arange(len(xs)) + 0.27, 100 * np.array(scratch), 0.27,
         label="the attacker's digits alone")
  ax.set_xticks(np.arange(len(xs)), xs, rotation=25, ha="right", fontsize=7)
  ax.set_title("attacks on customer 0's student")
  ax.set_ylim(0, 125)
  ax.legend(fontsize=7, loc="upper center", ncol=2)
  if grids:
    ax = axes[2]
    order = ["locked, valid", "locked, none", "locked, invalid", "clean"]
    rows = [make_grid(grids[k][:10], nrow=10) for k in order if k in grids]
    ax.imshow(np.concatenate(rows, 0).squeeze(), cmap="gray")
    ax.set_yticks([(i + 0.5) * rows[0].shape[0] for i in range(len(rows))],
                  [k for k in order if k in grids], fontsize=7)
    ax.set_xticks([])
    ax.set_title("locked DiT: samples of classes 0-9")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/serial_mnist5k")
  ap.add_argument("--customers", type=int, default=3)
  ap.add_argument("--teacher-steps", type=int, default=2000)
  ap.add_argument("--student-steps", type=int, default=serial.StudentConfig().steps)
  ap.add_argument("--lock-steps", type=int, default=600)
  ap.add_argument("--num-fd", type=int, default=500, help="samples per diffusion row")
  ap.add_argument("--skip-diffusion", action="store_true")
  ap.add_argument("--results", default=RESULTS)
  ap.add_argument("--key-file", default=None, help="the owner key (default: the environment, "
                  "else RUNS/owner.key, made when missing)")
  args = ap.parse_args()
  os.makedirs(args.runs, exist_ok=True)
  if args.key_file is None and not (os.environ.get(KEY_FILE_ENV) or os.environ.get(KEY_ENV)):
    args.key_file = os.path.join(args.runs, "owner.key")
    if not os.path.exists(args.key_file):
      print(f"owner key {keygen(args.key_file)} written to {args.key_file}")
  res = {"device": device_info()}
  res["classifier"] = classifier_part(args, os.path.join(args.runs, "students"))
  grids = {}
  if not args.skip_diffusion:
    grids_path = os.path.join(args.runs, "diffusion_grids.npz")
    res["diffusion"] = cached(args.runs, f"diffusion {args.lock_steps} {args.num_fd}",
                              lambda: _diffusion_with_grids(args, grids_path))
    with np.load(grids_path) as z:
      grids = {k: z[k] for k in z.files}
    for name in ("locked", "clean"):  # training time as the run recorded it (resumes too)
      summary = read_json(os.path.join(args.runs, name, "train_summary.json"))
      res["diffusion"][f"{name}_seconds"] = summary["seconds"]
  stem = os.path.join(args.results, "serial_mnist5k")
  write_json_and_markdown(stem, res, markdown(res))
  figure(res, grids, stem + ".png")
  print(markdown(res))


if __name__ == "__main__":
  main()
