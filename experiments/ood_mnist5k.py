"""Diffusion reconstruction as an out-of-distribution detector on mnist5k, against classic
detectors measured in the same run.

  python experiments/ood_mnist5k.py [--runs runs/ood_mnist5k] [--steps 2500]
                                    [--finetune-steps 500] [--n 1000]

1. An unconditional DiT (the mnist5k_dit config) trained on digits 0-8 only, 350 of each
   (`wdmjax.ood.class_split`); 50 of each validate, the other 100 of each are the
   in-distribution (ID) test set. LeNet-5 (the shipped recipe) is trained on the same
   3,150 digits for the classifier baselines.
2. OOD sets: near = the held-out class (all 500 nines), scikit-learn's 8x8 digits
   upsampled; far = the ID test digits inverted, Gaussian and uniform noise, crops of
   scikit-image's grayscale photographs, the photos32 RGB crops in gray.
3. Scores: the reconstruction loss (the study's one t = 600 and one draw; the package's
   default of 5 steps x 2 draws with its aggregation chosen on ID validation data only;
   a 10-step DDIM reconstruction from t = 500), the ELBO-style likelihood, and LeNet's
   maximum softmax probability, energy and Mahalanobis distance. AUROC / FAR95 per set.
4. Reconstruction loss against t for every set (figure), and the throughput of scoring
   10,000 images at 5 steps x 2 draws in one jitted call.
5. The study's second claim: fine-tune the base on digits 0-4 (full and DiffFit); does the
   reconstruction loss rise on the digits it no longer sees (5-8), and by how much?
Writes experiments/results/ood_mnist5k.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from wdm_mnist5k import device_info, write_json_and_markdown  # noqa: E402

from wdmjax import ood, runs  # noqa: E402
from wdmjax.metrics.classifier import classifier_accuracy, train_classifier  # noqa: E402
from wdmjax.models import LeNet  # noqa: E402
from wdmjax.ood.reconstruction import DEFAULT_BATCH, reconstruction_losses, reconstruction_losses_at  # noqa: E402
from wdmjax.peft import PeftSpec  # noqa: E402
from wdmjax.runs.ood import DEFAULT_T, unconditional_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ID_CLASSES = tuple(range(9))
GRID = (50, 100, 200, 300, 400, 500, 600, 700, 800, 900)  # the loss-vs-t curve
DRAWS = 2
STUDY_T = 600
DDIM_T, DDIM_STEPS = 500, 10
KEPT, DROPPED = (0, 1, 2, 3, 4), (5, 6, 7, 8)
SHAPE = (28, 28, 1)
NEAR = ("mnist5k_9", "digits28")


def base_model(runs_dir: str, split: str, steps: int) -> str:
  """The base DiT (trained, or resumed, in runs_dir/base; a finished one is kept)."""
  wd = os.path.join(runs_dir, "base")
  runs.train("mnist5k_dit", wd, [f"data.split={split}", "model.num_classes=0",
                                 "model.class_dropout_prob=0.0", f"train.steps={steps}",
                                 "train.sample_every=0"], samples=False, log=print)
  return wd


def to01(x: np.ndarray) -> np.ndarray:
  return (np.asarray(x, np.float32) + 1.0) / 2.0


def ood_sets(split: dict, n: int) -> dict[str, np.ndarray]:
  test = ood.fit_images(split["test"][0], SHAPE)
  sets = {"mnist5k_9": ood.load_images("mnist5k@9", SHAPE),
          "digits28": ood.load_images("digits28", SHAPE, n=n),
          "inverted": -test,
          "gaussian": ood.load_images("gaussian", SHAPE, n=n),
          "uniform": ood.load_images("uniform", SHAPE, n=n, seed=1),
          "gray_crops": ood.load_images("gray_crops", SHAPE, n=n),
          "photos32_gray": ood.load_images("photos32_gray", SHAPE, n=n)}
  return sets


def lenet_baselines(split: dict, sets: dict, key) -> tuple[dict, dict]:
  """MSP, energy and Mahalanobis scores of a LeNet trained on the detector's digits."""
  from wdmjax.data import load_arrays
  images, labels = load_arrays("mnist5k", split["split"])
  x = to01(ood.fit_images(images, SHAPE))
  t0 = time.time()
  model, params = train_classifier(x, labels, key, steps=3000, model=LeNet(num_classes=9))
  info = {"seconds": time.time() - t0,
          "id_test_accuracy": classifier_accuracy(model, params, to01(sets["id"]),
                                                  split["test"][1])}
  _, feats = ood.lenet_outputs(model, params, x)
  maha = ood.fit_mahalanobis(feats, labels)
  out = {}
  for name, imgs in sets.items():
    logits, f = ood.lenet_outputs(model, params, to01(imgs))
    out[name] = {"MSP (LeNet)": ood.msp_score(logits), "energy (LeNet)": ood.energy_score(logits),
                 "Mahalanobis (LeNet)": ood.mahalanobis_score(f, maha)}
  return out, info


def throughput(scorer, key) -> dict:
  """Scoring 10,000 images at the default 5 steps x 2 draws: one jitted computation, its
  compilation timed on its own."""
  x = ood.load_images("mnist5k", SHAPE)
  x = np.concatenate([x, x])[:10_000]
  fn = unconditional_model(scorer.setup)
  kw = dict(t=DEFAULT_T, draws=DRAWS, objective=scorer.setup.cfg.diffusion.objective)
  # Compile first, ahead of time (the call below then finds the executable in jit's cache).
  t0 = time.time()
  padded = jnp.zeros((-(-len(x) // DEFAULT_BATCH) * DEFAULT_BATCH,) + SHAPE)  # as scored
  reconstruction_losses_at.lower(fn, scorer.params, scorer.setup.schedule, padded, key,
                jnp.asarray(DEFAULT_T, jnp.int32) - 1, objective=kw["objective"], metric="x0",
                draws=DRAWS, ddim_steps=1, clip=True, batch_size=DEFAULT_BATCH).compile()
  compile_s = time.time() - t0
  t0 = time.time()
  losses = reconstruction_losses(fn, scorer.params, scorer.setup.schedule, x, key, **kw)
  losses.block_until_ready()
  run = time.time() - t0
  total = compile_s + run
  evals = 10_000 * len(DEFAULT_T) * DRAWS
  return {"images": 10_000, "t": list(DEFAULT_T), "draws": DRAWS, "seconds": total,
          "compile_seconds": compile_s, "run_seconds": run,
          "images_per_second": 10_000 / run, "network_evals_per_second": evals / run}


def finetune_claim(runs_dir: str, base: str, steps: int, split: dict, sets: dict, key) -> dict:
  """Recon loss (mean over the default steps, 2 draws) on kept / dropped digits, before and
  after fine-tuning on digits 0-4 only."""
  test_x, test_y = ood.fit_images(split["test"][0], SHAPE), split["test"][1]
  groups = {"kept 0-4": test_x[np.isin(test_y, KEPT)],
            "dropped 5-8": test_x[np.isin(test_y, DROPPED)],
            "never seen 9": sets["mnist5k_9"], "gaussian": sets["gaussian"],
            "photos32_gray": sets["photos32_gray"]}
  models = {"base (0-8)": base}
  for strategy, lr_mult in (("full", 1.0), ("difffit", 10.0)):
    wd = os.path.join(runs_dir, f"finetune_{strategy}")
    runs.finetune(base, wd, PeftSpec(strategy=strategy), steps=steps, lr_mult=lr_mult,
                  overrides=[f"data.labels={list(KEPT)}", "train.sample_every=0"], log=print)
    models[f"{strategy} on 0-4"] = wd
  out = {}
  for name, wd in models.items():
    sc = runs.load_scorer(wd)
    out[name] = {}
    per_image = {}
    for g, x in groups.items():
      losses = sc.losses(x, key, t=DEFAULT_T, draws=DRAWS)
      per_image[g] = losses.mean(axis=(1, 2))
      out[name][g] = {"loss": float(losses.mean()),
                      f"loss_t{STUDY_T}": float(sc.losses(x, key, t=STUDY_T, draws=1).mean())}
    out[name]["auroc dropped vs kept"] = ood.auroc(per_image["kept 0-4"],
                                                   per_image["dropped 5-8"])
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--runs", default="runs/ood_mnist5k")
  ap.add_argument("--steps", type=int, default=2500)
  ap.add_argument("--finetune-steps", type=int, default=500)
  ap.add_argument("--n", type=int, default=1000, help="images per generated OOD set")
  ap.add_argument("--results", default=RESULTS)
  ap.add_argument("--replot", action="store_true", help="redraw the figure and the Markdown "
                  "from the committed JSON (no scoring)")
  ap.add_argument("--throughput", action="store_true", help="measure only the throughput "
                  "again, into the committed JSON, and redraw")
  args = ap.parse_args()
  if args.replot or args.throughput:
    import json
    stem = os.path.join(args.results, "ood_mnist5k")
    with open(stem + ".json") as f:
      res = json.load(f)
    if args.throughput:
      res["throughput"] = throughput(runs.load_scorer(os.path.join(args.runs, "base")),
                                     jax.random.fold_in(jax.random.PRNGKey(0), 500))
    split = ood.class_split("mnist5k", ID_CLASSES, train=350, val=50)
    sets = {"id": ood.fit_images(split["test"][0], SHAPE), **ood_sets(split, args.n)}
    write_json_and_markdown(stem, res, markdown(res))
    figure(res, sets, stem + ".png")
    return
  t_start = time.time()
  key = jax.random.PRNGKey(0)
  split = ood.class_split("mnist5k", ID_CLASSES, train=350, val=50)
  base = base_model(args.runs, split["split"], args.steps)
  scorer = runs.load_scorer(base)
  val = ood.fit_images(split["val"][0], SHAPE)
  sets = {"id": ood.fit_images(split["test"][0], SHAPE), **ood_sets(split, args.n)}
  print({k: len(v) for k, v in sets.items()})

  # Per-step losses on the grid (the curve, the study's t = 600) and at the default steps.
  t0 = time.time()
  grid = {k: scorer.losses(v, jax.random.fold_in(key, i), t=GRID, draws=DRAWS)
          for i, (k, v) in enumerate(sets.items())}
  print(f"grid losses: {time.time() - t0:.0f} s")
  idx = [GRID.index(t) for t in DEFAULT_T]
  default = {k: v[:, idx] for k, v in grid.items()}
  # The detector, from ID validation data only (runs.ood.build_detector's procedure).
  built = runs.ood.build_detector(scorer, val, jax.random.fold_in(key, 100), t=DEFAULT_T,
                                  draws=DRAWS, ddim_steps=1, fpr=0.05)
  det, selection = built.detector, built.selection
  fitted = {d.name: d for d in built.candidates}  # the candidates the selection compared
  t0 = time.time()
  ddim = {k: scorer.losses(v, jax.random.fold_in(key, 200 + i), t=DDIM_T, draws=1,
                           ddim_steps=DDIM_STEPS)[:, 0, 0]
          for i, (k, v) in enumerate(sets.items())}
  print(f"DDIM reconstructions: {time.time() - t0:.0f} s")
  t0 = time.time()
  fn = unconditional_model(scorer.setup)
  elbo = {k: np.asarray(ood.elbo_score(fn, scorer.params, scorer.setup.schedule, v,
                                       jax.random.fold_in(key, 300 + i), num_t=20,
                                       objective=scorer.setup.cfg.diffusion.objective))
          for i, (k, v) in enumerate(sets.items())}
  print(f"ELBO: {time.time() - t0:.0f} s")
  lenet, lenet_info = lenet_baselines(split, sets, jax.random.fold_in(key, 400))

  si = GRID.index(STUDY_T)
  methods: dict[str, dict[str, np.ndarray]] = {}
  for k in sets:
    methods.setdefault(f"recon t={STUDY_T}, 1 draw (study)", {})[k] = grid[k][:, si, 0]
    methods.setdefault(f"recon selected on ID: {det.name}", {})[k] = det.score(default[k])
    methods.setdefault("recon mean of 5 t", {})[k] = fitted["mean"].score(default[k])
    methods.setdefault("recon Gaussian of 5 t", {})[k] = fitted["gaussian"].score(default[k])
    methods.setdefault(f"recon DDIM {DDIM_STEPS} steps from t={DDIM_T}", {})[k] = ddim[k]
    methods.setdefault("ELBO (likelihood)", {})[k] = elbo[k]
    for m, s in lenet[k].items():
      methods.setdefault(m, {})[k] = s
  table = {}
  for m, scores in methods.items():
    table[m] = {k: ood.detection_report(scores["id"], scores[k]) for k in sets if k != "id"}
  flagged = {k: float(np.mean(det.score(default[k]) > det.threshold)) for k in sets}
  curve = {k: {"mean": grid[k].mean(axis=(0, 2)).tolist(),
               "auroc": [ood.auroc(grid["id"][:, j].mean(1), grid[k][:, j].mean(1))
                         for j in range(len(GRID))] if k != "id" else None}
           for k in sets}
  tp = throughput(scorer, jax.random.fold_in(key, 500))
  print(f"throughput: {tp['images_per_second']:.1f} images/s")
  ft = finetune_claim(args.runs, base, args.finetune_steps, split, sets,
                      jax.random.fold_in(key, 600))

  res = {"config": {"base_steps": args.steps, "train_split": split["split"],
                    "num_timesteps": scorer.num_timesteps,
                    "id_classes": list(ID_CLASSES), "val_images": len(val),
                    "grid": list(GRID), "default_t": list(DEFAULT_T), "draws": DRAWS,
                    "finetune_steps": args.finetune_steps},
         "sizes": {k: len(v) for k, v in sets.items()},
         "detector": {"name": det.name, "threshold": det.threshold, "fpr": det.fpr,
                      "selection": selection, "flagged": flagged},
         "table": table, "curve": curve, "lenet": lenet_info, "throughput": tp,
         "finetune": ft, "device": device_info(), "seconds": time.time() - t_start}
  write_json_and_markdown(os.path.join(args.results, "ood_mnist5k"), res, markdown(res))
  figure(res, sets, os.path.join(args.results, "ood_mnist5k.png"))
  print(markdown(res))


def _winner(table: dict, k: str) -> str:
  return max(table, key=lambda m: table[m][k]["auroc"])


def markdown(res: dict) -> str:
  table, sets = res["table"], [k for k in res["sizes"] if k != "id"]
  c = res["config"]
  lines = [
      "# Diffusion reconstruction as an OOD detector (mnist5k)", "",
      "`python experiments/ood_mnist5k.py` "
      f"({res['device']['backend']}, {res['seconds'] / 60:.0f} min). An unconditional DiT "
      f"trained {c['base_steps']} steps on digits 0-8 (350 of each); in-distribution test: "
      f"the other {res['sizes']['id']} digits 0-8 it never saw. Scores are higher for "
      "more OOD; AUROC (FAR95 in brackets: false alarms on ID digits when 95% of the OOD "
      f"set is detected). Reconstruction steps t of {c['num_timesteps']}; the detector's "
      f"aggregation and threshold were chosen on {c['val_images']} ID validation digits and "
      "a patch-shuffled proxy of them, without OOD data.", "",
      "| method | " + " | ".join(f"{k} ({'near' if k in NEAR else 'far'})" for k in sets)
      + " |",
      "|---|" + "---|" * len(sets)]
  for m, row in table.items():
    cells = []
    for k in sets:
      v = row[k]
      best = m == _winner(table, k)
      cell = f"{v['auroc']:.3f} ({v['far95']:.2f})"
      cells.append(f"**{cell}**" if best else cell)
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += ["", "Best reconstruction score per set against the best LeNet detector and the "
            "model's own likelihood (ELBO); verdicts within 0.001 AUROC are ties. The best "
            "variant is picked per set after the fact, an oracle over five; what a user gets "
            "without OOD data is the row 'selected on ID' above:", "",
            "| set | best reconstruction | best LeNet | ELBO | against LeNet | against ELBO |",
            "|---|---|---|---|---|---|"]

  def verdict(a: float, b: float) -> str:
    return "tie" if abs(a - b) < 1e-3 else ("**better**" if a > b else "worse")

  for k in sets:
    rec = max((m for m in table if m.startswith("recon")), key=lambda m: table[m][k]["auroc"])
    cls = max((m for m in table if "LeNet" in m), key=lambda m: table[m][k]["auroc"])
    a, b, e = (table[rec][k]["auroc"], table[cls][k]["auroc"],
               table["ELBO (likelihood)"][k]["auroc"])
    lines.append(f"| {k} | {a:.3f} ({rec}) | {b:.3f} ({cls}) | {e:.3f} | {verdict(a, b)} | "
                 f"{verdict(a, e)} |")
  d = res["detector"]
  lines += ["", "Selection on ID validation data (AUROC against the proxy): "
            + ", ".join(f"{r['detector']} {r['proxy_auroc']:.3f}" for r in d["selection"])
            + f". Chosen: **{d['name']}**, threshold {d['threshold']:.4g} at "
            f"{d['fpr']:g} false alarms; share flagged: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in d["flagged"].items()) + ".", ""]
  tp = res["throughput"]
  lines += [f"Throughput: {tp['images']:,} images x {len(tp['t'])} steps x {tp['draws']} "
            f"draws in one jitted call: {tp['run_seconds']:.1f} s, after "
            f"{tp['compile_seconds']:.1f} s of compilation: "
            f"**{tp['images_per_second']:.0f} images/s** "
            f"({tp['network_evals_per_second']:.0f} network evaluations/s).", "",
            f"LeNet-5 on the same 3,150 digits: {100 * res['lenet']['id_test_accuracy']:.1f}% "
            f"on the ID test digits.", "",
            f"## Fine-tuning on digits 0-4 ({c['finetune_steps']} steps)", "",
            "Mean reconstruction loss (5 steps x 2 draws; t = 600 alone in brackets), and "
            "the AUROC of telling the dropped digits 5-8 from the kept 0-4 by it:", ""]
  ft = res["finetune"]
  groups = [g for g in next(iter(ft.values())) if g != "auroc dropped vs kept"]
  lines += ["| model | " + " | ".join(groups) + " | AUROC dropped vs kept |",
            "|---|" + "---|" * (len(groups) + 1)]
  for name, row in ft.items():
    lines.append(f"| {name} | " + " | ".join(
        f"{row[g]['loss']:.4f} ({row[g][f'loss_t{STUDY_T}']:.4f})" for g in groups)
        + f" | {row['auroc dropped vs kept']:.3f} |")
  base = ft["base (0-8)"]
  for name, row in ft.items():
    if name == "base (0-8)":
      continue
    r_k = row["kept 0-4"]["loss"] / base["kept 0-4"]["loss"]
    r_d = row["dropped 5-8"]["loss"] / base["dropped 5-8"]["loss"]
    lines.append(f"\n{name}: loss on kept digits x{r_k:.2f}, on dropped digits x{r_d:.2f}.")
  return "\n".join(lines) + "\n"


def figure(res: dict, sets: dict, path: str) -> None:
  names = list(sets)
  fig = plt.figure(figsize=(15, 9))
  gs = fig.add_gridspec(3, len(names), height_ratios=[0.45, 2, 2.3])
  for i, k in enumerate(names):
    ax = fig.add_subplot(gs[0, i])
    pick = np.linspace(0, len(sets[k]) - 1, 6).astype(int)  # a spread: mnist5k is class-sorted
    ax.imshow(np.concatenate(list(sets[k][pick, ..., 0]), axis=1), cmap="gray", vmin=-1,
              vmax=1)
    ax.set_title(k, fontsize=8)
    ax.axis("off")
  grid = res["config"]["grid"]
  ax = fig.add_subplot(gs[1, : len(names) // 2])
  for k in names:
    ax.plot(grid, res["curve"][k]["mean"], marker="o", lw=2.5 if k == "id" else 1.2,
            color="k" if k == "id" else None, label=k)
  ax.set_yscale("log")
  ax.set_xlabel("noising step t")
  ax.set_ylabel("reconstruction MSE (x0)")
  ax.set_title("reconstruction loss against t")
  ax.legend(fontsize=7)
  ax = fig.add_subplot(gs[1, len(names) // 2:])
  for k in names[1:]:
    ax.plot(grid, res["curve"][k]["auroc"], marker="o", label=k)
  ax.set_ylim(0, 1.02)
  ax.axhline(0.5, color="gray", lw=0.5)
  ax.set_xlabel("noising step t")
  ax.set_ylabel("AUROC vs ID digits")
  ax.set_title("detection by one step's loss (2 draws)")
  ax.legend(fontsize=7)
  ax = fig.add_subplot(gs[2, : len(names) // 2])
  table = res["table"]
  ood_names = names[1:]
  width = 0.8 / len(table)
  for j, (m, row) in enumerate(table.items()):
    ax.bar(np.arange(len(ood_names)) + j * width, [row[k]["auroc"] for k in ood_names],
           width, label=m)
  ax.set_xticks(np.arange(len(ood_names)) + 0.4 - width / 2, ood_names, fontsize=7)
  ax.set_ylim(0.3, 1.02)
  ax.set_ylabel("AUROC")
  ax.set_title("every method on every OOD set")
  ax.legend(fontsize=6, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
  ax = fig.add_subplot(gs[2, len(names) // 2:])
  ft = res["finetune"]
  base = ft["base (0-8)"]
  groups = [g for g in base if g != "auroc dropped vs kept"]
  tuned = [m for m in ft if m != "base (0-8)"]
  width = 0.8 / len(tuned)
  for j, name in enumerate(tuned):
    ax.bar(np.arange(len(groups)) + j * width,
           [ft[name][g]["loss"] / base[g]["loss"] for g in groups], width, label=name)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, fontsize=7)
  ax.set_ylim(0.9, 1.1)
  ax.set_ylabel("reconstruction loss / base model's")
  ax.set_title("after fine-tuning on digits 0-4 only")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
