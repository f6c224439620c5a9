"""Linear augmentations in over-parametrized ridge regression: the theory half of Wu, Zhang,
Valiant, Re (ICML 2020), checked in closed form.

  python experiments/augment_ridge.py [--problems 500] [--sigma 0.5] [--seed 0] [--results DIR]

The setting of `wdmjax.augment.ridge`: x = an 8 x 8 image flattened (p = 64) with N(0, 1)
pixels, beta of unit norm and invariant under the horizontal flip H (H beta = beta, so H
preserves labels), y = x^T beta + N(0, sigma^2), ridge with the penalty N lam ||b||^2 over
the N training points (augmented ones included), error ||beta_hat - beta||^2, averaged over
random problems (the same problems for every method: paired comparisons).

(a) Label-preserving transforms help by enlarging the span. For n = 4 ... 56 points:
    none       the data alone;
    hflip      every point also flipped (label-preserving, adds span);
    duplicate  every point twice (label-preserving, adds no span);
    vflip      every point also flipped vertically, with its label (NOT label-preserving:
               beta is not invariant under it, so the added labels are wrong).
    Noise-free at lam = 0, against the closed forms 1 - n/p (none, duplicate) and
    1 - 2n/p (hflip: the data's projections span n dimensions of the p/2-dimensional space
    beta lives in); noisy (sigma) at the best lam of the grid, per method. Plus the exact
    one-point statement: the ridgeless error drops by <z, beta>^2 / ||z||^2,
    z = P_X^perp H x, measured against predicted over many problems.
(b) Mixup acts as a regulariser. At n = 32, for m mixed points (lam ~ Beta(alpha, alpha)):
    error against lam of ridge, ridge + mixup, and ridge at the matching strength
    lam (n + m) / (n + c m), c = (alpha + 1) / (2 alpha + 1).
Writes experiments/results/augment_ridge.{json,md,png}. Runs in about a minute on 2 CPU cores
(float64; 36-80 s measured on a shared machine, most of it compilation).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.augment.ridge import (
  augment_label_preserving,
  augment_mixup,
  error_curves,
  flip_matrix,
  label_preserving_drop,
  matching_ridge_strength,
  mixup_norm_factor,
  random_problem,
)
from wdmjax.files import atomic_open, atomic_write, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
H = W = 8
P = H * W
NS = [4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56]
LAMS = np.concatenate([[0.0], np.logspace(-3, 1, 33)])
N_MIX = 32
MIX = [(2 * N_MIX, 1.0), (8 * N_MIX, 1.0), (8 * N_MIX, 0.2)]  # (m, alpha)
METHODS = ("none", "hflip", "duplicate", "vflip")


def device_info() -> dict:
  return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "jax": jax.__version__}


def transforms() -> dict:
  hflip, vflip = flip_matrix(H, W), flip_matrix(H, W, "vertical")
  eye = jnp.eye(P)
  return {"none": None,
          "hflip": lambda k, X, y: augment_label_preserving(X, y, hflip),
          "duplicate": lambda k, X, y: augment_label_preserving(X, y, eye),
          "vflip": lambda k, X, y: augment_label_preserving(X, y, vflip)}


def part_a(key, sigma: float, problems: int) -> dict:
  hflip = flip_matrix(H, W)
  augs = transforms()
  # sigma is traced: the noise-free and the noisy run share their compilations
  clean = error_curves(key, NS, P, 0.0, LAMS, augs, invariant=hflip, num_problems=problems)
  noisy = error_curves(key, NS, P, sigma, LAMS, augs, invariant=hflip, num_problems=problems)
  rows = []
  for j, n in enumerate(NS):
    row = {"n": n, "theory_none": 1 - n / P, "theory_hflip": max(0.0, 1 - 2 * n / P)}
    for name in METHODS:
      c, z = clean[name], noisy[name]
      best = int(np.argmin(np.asarray(z.mean[j])))
      row[name] = {"clean": float(c.mean[j, 0]), "clean_sem": float(c.sem[j, 0]),
                   "noisy_lam0": float(z.mean[j, 0]), "noisy_best": float(z.mean[j, best]),
                   "noisy_best_sem": float(z.sem[j, best]), "best_lam": float(LAMS[best])}
    rows.append(row)
    print(f"n={n:2d} clean " + " ".join(f"{m} {row[m]['clean']:.4f}" for m in METHODS)
          + " | noisy best " + " ".join(f"{m} {row[m]['noisy_best']:.4f}" for m in METHODS),
          flush=True)
  return {"rows": rows}


def drop_check(key, problems: int, n: int = 16) -> dict:
  """The one-point identity over many problems (noise-free, lam = 0)."""
  hflip, vflip = flip_matrix(H, W), flip_matrix(H, W, "vertical")
  eye = jnp.eye(P)

  @jax.jit
  def one(k):
    X, _, beta = random_problem(k, n, P, 0.0, invariant=hflip)
    return [label_preserving_drop(X, beta, F, 0) for F in (hflip, eye, vflip)]

  out = {}
  for name, d in zip(("hflip", "duplicate", "vflip"),
                     jax.vmap(one)(jax.random.split(key, problems)), strict=True):
    meas, pred = np.asarray(d.measured), np.asarray(d.predicted)
    out[name] = {"mean_before": float(np.mean(d.before)), "mean_measured": float(meas.mean()),
                 "mean_predicted": float(pred.mean()),
                 "max_abs_diff": float(np.max(np.abs(meas - pred))),
                 "max_rel_diff": float(np.max(np.abs(meas - pred)
                                              / np.maximum(np.abs(pred), 1e-300)))
                 if np.all(pred > 0) else None}
  return {"n": n, "problems": problems, **out}


def matched_strength(grid: np.ndarray, ridge_mean: np.ndarray, lam: float,
                     target: float) -> float | None:
  """The lam' < the optimum at which plain ridge's mean error equals `target` (log-linear
  interpolation on the grid), or None when lam = 0 or target is off that branch."""
  order = np.argsort(grid)
  g, e = grid[order], ridge_mean[order]
  g, e = g[g > 0], e[g > 0]
  opt = int(np.argmin(e))
  g, e = g[:opt + 1], e[:opt + 1]  # the decreasing branch
  if lam <= 0 or not e[-1] <= target <= e[0]:
    return None
  return float(np.exp(np.interp(target, e[::-1], np.log(g[::-1]))))


def part_b(key, sigma: float, problems: int) -> dict:
  configs = []
  for m, alpha in MIX:
    r = float(matching_ridge_strength(1.0, N_MIX, m, alpha))
    augs = {"ridge": None, "mixup": lambda k, X, y, m=m, a=alpha: augment_mixup(k, X, y, m, a)}
    # ridge at lam and at lam_eff = r lam in one call: the same problems, one compilation
    lams = np.concatenate([LAMS, r * LAMS])
    cur = error_curves(key, N_MIX, P, sigma, lams, augs, num_problems=problems)
    L = len(LAMS)
    ridge_e = np.asarray(cur["ridge"].errors[:, :L])
    mix_e = np.asarray(cur["mixup"].errors[:, :L])
    match_e = np.asarray(cur["ridge"].errors[:, L:])
    se = lambda d: d.std(0, ddof=1) / np.sqrt(problems)
    rows = [{"lam": float(LAMS[i]), "lam_eff": float(r * LAMS[i]),
             "ridge": float(ridge_e[:, i].mean()), "mixup": float(mix_e[:, i].mean()),
             "matched": float(match_e[:, i].mean()),
             "ridge_minus_mixup": float((ridge_e - mix_e)[:, i].mean()),
             "ridge_minus_mixup_sem": float(se(ridge_e - mix_e)[i]),
             "mixup_minus_matched": float((mix_e - match_e)[:, i].mean()),
             "mixup_minus_matched_sem": float(se(mix_e - match_e)[i])} for i in range(L)]
    grid, ridge_mean = np.concatenate([LAMS, r * LAMS]), np.asarray(cur["ridge"].mean)
    for row in rows:
      row["lam_match"] = matched_strength(grid, ridge_mean, row["lam"], row["mixup"])
      row["lam_match_over_lam"] = (row["lam_match"] / row["lam"]
                                   if row["lam_match"] is not None else None)
    best = int(np.argmin(ridge_e.mean(0)))
    configs.append({"m": m, "alpha": alpha, "c": float(mixup_norm_factor(alpha)),
                    "lam_eff_over_lam": r, "ridge_best_lam": float(LAMS[best]),
                    "ridge_best": float(ridge_e.mean(0)[best]),
                    "mixup_best": float(mix_e.mean(0).min()), "rows": rows})
    print(f"m={m} alpha={alpha}: lam_eff/lam {r:.3f}, best ridge {configs[-1]['ridge_best']:.4f}"
          f" at lam {LAMS[best]:g}, best mixup {configs[-1]['mixup_best']:.4f}", flush=True)
  return {"n": N_MIX, "configs": configs}


def markdown(res: dict) -> str:
  a, b, d = res["a"], res["b"], res["drop"]
  s = res["sigma"]
  lines = [
    "# Linear augmentations in over-parametrized ridge regression",
    "",
    f"`{res['command']}` ({res['backend']}, jax {res['jax']}, float64, "
    f"{res['seconds']:.0f} s). p = {P} (an {H} x {W} image), beta of unit norm with "
    f"H beta = beta (H: horizontal flip), N(0, 1) pixels, penalty N lam ||b||^2 over the N "
    f"training points, error ||beta_hat - beta||^2 averaged over {res['problems']} random "
    "problems (the same ones for every method); +- is one standard error.",
    "",
    "## (a) Label-preserving transforms enlarge the span",
    "",
    f"One-point identity (n = {d['n']}, noise-free, lam = 0, {d['problems']} problems): "
    f"adding H x_0 lowers the error from {d['hflip']['mean_before']:.4f} by "
    f"{d['hflip']['mean_measured']:.5f} on average; the closed form <z, beta>^2 / ||z||^2 "
    f"matches every problem to {d['hflip']['max_abs_diff']:.1e} absolute "
    f"({d['hflip']['max_rel_diff']:.1e} relative). Duplicating x_0 (in the span): measured "
    f"drop at most {d['duplicate']['max_abs_diff']:.1e}, predicted 0. The vertical flip "
    f"(labels wrong) breaks it: mean measured drop {d['vflip']['mean_measured']:+.5f} "
    f"against a 'predicted' {d['vflip']['mean_predicted']:.5f}.",
    "",
    f"Errors against n. Noise-free at lam = 0 (theory: 1 - n/p without augmentation or "
    f"with duplicates, 1 - 2n/p with H); noisy (sigma = {s}) at the best lam of the grid "
    "(0 and 33 values from 1e-3 to 10), per method.",
    "",
    "| n | none | duplicate | 1 - n/p | hflip | 1 - 2n/p | vflip | noisy: none | duplicate "
    "| hflip | vflip |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in a["rows"]:
    lines.append(
      f"| {r['n']} | {r['none']['clean']:.4f} | {r['duplicate']['clean']:.4f} | "
      f"{r['theory_none']:.4f} | {r['hflip']['clean']:.4f} | {r['theory_hflip']:.4f} | "
      f"{r['vflip']['clean']:.3g} | "
      + " | ".join(f"{r[m]['noisy_best']:.4f} (lam {r[m]['best_lam']:.2g})"
                   for m in ("none", "duplicate", "hflip", "vflip")) + " |")
  lines += ["", res["reading_a"], "",
            "## (b) Mixup acts as a regulariser", "",
            f"n = {b['n']}, sigma = {s}; for each (m, alpha): ridge at lam, ridge on the data "
            "plus m mixed points at lam, ridge at lam_eff = lam (n + m) / (n + c m). "
            "Differences are paired (same problems). lam' / lam: the strength at which plain "
            "ridge has mixup's mean error (interpolated on the grid, below the optimum only), "
            "over lam: the measured counterpart of lam_eff / lam.", ""]
  for c in b["configs"]:
    lines += [f"### m = {c['m']}, alpha = {c['alpha']:g}: c = {c['c']:.4f}, "
              f"lam_eff / lam = {c['lam_eff_over_lam']:.4f}", "",
              "| lam | ridge | ridge + mixup | ridge at lam_eff | ridge - mixup | "
              "mixup - matched | lam' / lam |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(c["rows"]):
      if i % 2 == 0 and i > 0:
        continue  # every other strength of the grid; the JSON has them all
      ratio = "-" if r["lam_match_over_lam"] is None else f"{r['lam_match_over_lam']:.2f}"
      lines.append(f"| {r['lam']:.3g} | {r['ridge']:.4f} | {r['mixup']:.4f} | "
                   f"{r['matched']:.4f} | {r['ridge_minus_mixup']:+.4f} +- "
                   f"{r['ridge_minus_mixup_sem']:.4f} | {r['mixup_minus_matched']:+.4f} +- "
                   f"{r['mixup_minus_matched_sem']:.4f} | {ratio} |")
    lines += ["", f"Best ridge {c['ridge_best']:.4f} (lam {c['ridge_best_lam']:.3g}), best "
              f"ridge + mixup {c['mixup_best']:.4f}.", ""]
  lines += [res["reading_b"], "",
            "Figure `augment_ridge.png`: (a) noise-free ridgeless error against n with the "
            "closed forms (dotted); (a') the same with noise at the best lam; (b) error against "
            f"lam for m = {b['configs'][0]['m']}, alpha = {b['configs'][0]['alpha']:g} (lam = 0 "
            "is not on the log axis; see the table).", ""]
  return "\n".join(lines)


def reading(res: dict) -> tuple[str, str]:
  """The honest reading of the numbers, written from them."""
  rows = res["a"]["rows"]
  dev_none = max(abs(r["none"]["clean"] - r["theory_none"]) / max(r["theory_none"], 1e-9)
                 for r in rows)
  dev_h = max(abs(r["hflip"]["clean"] - r["theory_hflip"]) for r in rows)
  z = max(abs(r[m]["clean"] - r[t]) / r[m]["clean_sem"] for r in rows
          for m, t in (("none", "theory_none"), ("hflip", "theory_hflip"))
          if r[t] > 0)  # where the theory is 0 the error is rounding, with a tiny sem
  dup_same = max(abs(r["duplicate"]["clean"] - r["none"]["clean"]) for r in rows)
  dup_noisy = max(abs(r["duplicate"]["noisy_best"] - r["none"]["noisy_best"]) for r in rows)
  v_worse = all(r["vflip"]["noisy_best"] > r["none"]["noisy_best"] for r in rows)
  h_better = all(r["hflip"]["noisy_best"] < r["none"]["noisy_best"] for r in rows)
  h_zero = max([r["hflip"]["clean"] for r in rows if r["n"] >= P // 2], default=0.0)
  ra = ("Reading: without noise the errors follow the closed forms (none within "
        f"{100 * dev_none:.1f}% relative, hflip within {dev_h:.4f} absolute and at most "
        f"{h_zero:.0e} from n = p/2 = {P // 2} on; at most {z:.1f} standard errors off, and "
        "the sizes share their problems, so the deviations are correlated across n). "
        "Duplicates add no span and change nothing (largest difference to none "
        f"{dup_same:.1e} noise-free, {dup_noisy:.1e} with noise: with the penalty scaled by N, "
        "duplicating every point leaves the estimator exactly as it was). The flip doubles "
        "what the data remove from the ridgeless error (1 - 2n/p against 1 - n/p), and with "
        f"noise it {'beats' if h_better else 'does not always beat'} no augmentation at the "
        f"tuned lam{', at every n' if h_better else ''}. The vertical flip, not "
        "label-preserving, "
        f"{'is worse than no augmentation at every n' if v_worse else 'is not always worse'}"
        " once lam is tuned (noisy columns): its wrong labels bias the estimate; noise-free "
        "and ridgeless, fitting them exactly blows up near 2n = p.")
  c0 = res["b"]["configs"]
  parts, under = [], []
  for c in c0:
    opt = c["ridge_best_lam"]
    below = [r for r in c["rows"] if 0 < r["lam"] < opt]
    helped = sum(r["ridge_minus_mixup"] > 2 * r["ridge_minus_mixup_sem"] for r in below)
    small = [r["lam_match_over_lam"] for r in below
             if r["lam"] <= opt / 10 and r["lam_match_over_lam"] is not None]
    top = max(below, key=lambda r: r["ridge_minus_mixup"])
    above = [r for r in c["rows"] if r["lam"] > opt]
    worse = sum(r["mixup_minus_matched"] > 2 * r["mixup_minus_matched_sem"] for r in above)
    span = f"{min(small):.2f}-{max(small):.2f}" if small else "n/a"
    under += [100 * (v / c["lam_eff_over_lam"] - 1) for v in small]
    parts.append(
      f"m = {c['m']}, alpha = {c['alpha']:g}: predicted lam_eff = {c['lam_eff_over_lam']:.2f} "
      f"lam, measured lam' = {span} lam for lam <= lam_opt / 10 (lam_opt = {opt:.3g}); mixup "
      f"beats plain ridge (by > 2 se) at {helped} of the {len(below)} lam below the optimum "
      f"(largest gain {top['ridge_minus_mixup']:.4f} at lam = {top['lam']:.3g}, where ridge at "
      f"lam_eff gains {top['ridge'] - top['matched']:.4f}); above the optimum it is worse than "
      f"ridge at lam_eff at {worse} of {len(above)} lam, and its best error "
      f"{c['mixup_best']:.4f} is {c['mixup_best'] - c['ridge_best']:+.4f} from plain ridge's "
      f"best {c['ridge_best']:.4f}")
  zero = all(abs(c["rows"][0]["ridge_minus_mixup"]) < 1e-9 for c in c0)
  excess = f"{min(under):.0f}-{max(under):.0f}%" if under else "n/a"
  rb = ("Reading: " + "; ".join(parts) + ". At lam = 0 mixup changes nothing "
        f"({'identical errors' if zero else 'NOT identical: check'}): the mixed points lie in "
        "the span with consistent labels, so the minimum-norm interpolator is the same; mixup "
        "helps as a regulariser, not by adding span. The matching strength gets the direction "
        "and the size roughly right but underestimates mixup's regularisation (lam' exceeds "
        f"lam_eff by {excess} at small lam): "
        "mixup behaves like ridge at a somewhat larger strength than lam_eff, so below the "
        "optimum it helps more than predicted and above it hurts more; near the optimum no "
        "single strength matches it (its random weights add variance). A likely reason: "
        "exactly, the "
        "mixed data give ridge with residuals weighted by W = I + A^T A (A [m, n]: the mixing "
        "weights), X^T (X X^T + N lam W^{-1})^{-1} y, and lam_eff replaces W by about its mean "
        "(1 + c m / n) I; W fluctuates (m random mixes of n points), and the penalty enters "
        "through W^{-1}, whose mean exceeds the inverse of W's mean (Jensen). Either way the "
        "effect is small: lam_eff / lam < 1/c <= 2, so mixup cannot bring a far too small "
        "lam to the optimum, and the best mixup error is no better than the best plain ridge.")
  return ra, rb


def plot(path: str, res: dict) -> None:
  import matplotlib  # the figure only: the experiment runs without it

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = res["a"]["rows"]
  ns = [r["n"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = {"none": "k", "duplicate": "tab:green", "hflip": "tab:blue", "vflip": "tab:red"}
  labels = {"none": "no augmentation", "duplicate": "duplicate (no new span)",
            "hflip": "horizontal flip (label-preserving)",
            "vflip": "vertical flip (not label-preserving)"}
  for ax, key, title in ((axes[0], "clean", "(a) noise-free, lam = 0"),
                         (axes[1], "noisy_best", f"(a') sigma = {res['sigma']}, best lam")):
    for m in ("none", "duplicate", "hflip", "vflip"):
      ls = "--" if m == "duplicate" else "-"
      ax.plot(ns, [r[m][key] for r in rows], ls, marker="o", ms=3, c=colors[m], label=labels[m])
    if key == "clean":
      ax.plot(ns, [r["theory_none"] for r in rows], ":", c="gray", label="1 - n/p")
      ax.plot(ns, [r["theory_hflip"] for r in rows], ":", c="tab:blue", alpha=0.6,
              label="1 - 2n/p")
    ax.set_ylim(0, 1.5)
    ax.set_xlabel("n (training points)")
    ax.set_ylabel("||beta_hat - beta||^2")
    ax.set_title(title)
  axes[0].legend(fontsize=7)
  c = res["b"]["configs"][0]
  lam = np.array([r["lam"] for r in c["rows"]])
  ok = lam > 0
  ax = axes[2]
  for k, lab, st in (("ridge", "ridge at lam", "k-"),
                     ("mixup", f"ridge + mixup (m = {c['m']}, alpha = {c['alpha']:g})", "r-"),
                     ("matched", f"ridge at lam_eff = {c['lam_eff_over_lam']:.3f} lam", "b--")):
    ax.plot(lam[ok], np.array([r[k] for r in c["rows"]])[ok], st, marker="o", ms=3, label=lab)
  ax.set_xscale("log")
  ax.set_xlabel("lam")
  ax.set_ylabel("||beta_hat - beta||^2")
  ax.set_title(f"(b) n = {res['b']['n']}, p = {P}, sigma = {res['sigma']}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  with atomic_open(path) as f:
    fig.savefig(f, format="png", dpi=90)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--problems", type=int, default=500, help="random problems per point")
  ap.add_argument("--sigma", type=float, default=0.5, help="label noise")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--results", default=RESULTS, help="where the JSON, table and figure go")
  args = ap.parse_args()
  jax.config.update("jax_enable_x64", True)  # the exact identities hold to ~1e-12
  t0 = time.time()
  key = jax.random.key(args.seed)
  k_a, k_d, k_b = jax.random.split(key, 3)
  cmd = "python experiments/augment_ridge.py"
  if (args.problems, args.sigma, args.seed) != (500, 0.5, 0):
    cmd += f" --problems {args.problems} --sigma {args.sigma} --seed {args.seed}"
  res = {"command": cmd, **device_info(), "problems": args.problems, "sigma": args.sigma,
         "seed": args.seed, "p": P, "image": [H, W], "lams": LAMS.tolist()}
  res["drop"] = drop_check(k_d, args.problems)
  print("drop:", res["drop"], flush=True)
  t1 = time.time()
  res["a"] = part_a(k_a, args.sigma, args.problems)
  t2 = time.time()
  res["b"] = part_b(k_b, args.sigma, args.problems)
  res["seconds"] = time.time() - t0
  # compilation included: most of it on CPU
  res["seconds_parts"] = {"drop": t1 - t0, "a": t2 - t1, "b": time.time() - t2}
  res["reading_a"], res["reading_b"] = reading(res)
  os.makedirs(args.results, exist_ok=True)
  stem = os.path.join(args.results, "augment_ridge")
  write_json(stem + ".json", res)
  atomic_write(stem + ".md", markdown(res))
  plot(stem + ".png", res)
  print(markdown(res))


if __name__ == "__main__":
  main()
