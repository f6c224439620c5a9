"""Analytic local-robustness estimators against Monte Carlo, and JAX's MVN CDF against scipy.

  python benchmarks/robustness_estimators.py [--num 100] [--mc-samples 10000] [--json]

On the shipped LeNet-5 (mnist5k, pixels in [0, 1]; experiments/train_lenet.py) and `--num`
held-out digits, for sigma in {0.05, 0.1, 0.2, 0.4}: each estimator's mean absolute error
against Monte Carlo with `--mc-samples` noisy copies per digit, and its speedup (Monte
Carlo's wall time over its own), measured in the same run after compilation (median of
`--repeats` calls). Then `wdmjax.stats.mvn_cdf` (one vmapped call) against a loop of
`scipy.stats.multivariate_normal.cdf` on the Taylor estimator's own (z, Sigma) pairs at
sigma 0.2 (dimension 9): time and agreement. With --json the last line is
{"sigma_0.05": {"taylor": {"mae": .., "speedup": ..}, ...}, ..., "mvn_cdf": {...}}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import multivariate_normal

from wdmjax.data import mnist5k_split
from wdmjax.models import pretrained_lenet
from wdmjax.robustness import p_robust, taylor_z_and_cov
from wdmjax.stats import mvn_cdf

SIGMAS = (0.05, 0.1, 0.2, 0.4)
ESTIMATORS = ("taylor", "mmse", "mv_sigmoid")


def timed(fn, repeats: int) -> tuple[np.ndarray, float]:
  """(result, median seconds of `repeats` calls after a compiling call)."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return np.asarray(out), statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--num", type=int, default=100, help="held-out digits")
  ap.add_argument("--mc-samples", type=int, default=10_000)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", action="store_true", help="end with one JSON line")
  args = ap.parse_args()
  model, params = pretrained_lenet()

  def apply(p, x):
    return model.apply({"params": p}, x)

  x = jnp.asarray(mnist5k_split()[2][: args.num])
  key = jax.random.PRNGKey(0)
  print(f"LeNet-5 on {args.num} held-out digits, {jax.default_backend()} "
        f"({platform.processor() or platform.machine()}, {jax.device_count()} device(s))")
  print("| sigma | MC mean p | MC s | method | MAE | s | speedup |")
  print("|---|---|---|---|---|---|---|")
  out: dict = {}
  for sigma in SIGMAS:
    mc, t_mc = timed(lambda s=sigma: p_robust(apply, params, x, s, "monte_carlo", key,
                                              num_samples=args.mc_samples), 1)
    row = {"monte_carlo": {"mean_p": float(mc.mean()), "seconds": t_mc}}
    for method in ESTIMATORS:
      p, t = timed(lambda s=sigma, m=method: p_robust(apply, params, x, s, m, key),
                   args.repeats)
      row[method] = {"mae": float(np.abs(p - mc).mean()), "speedup": t_mc / t, "seconds": t}
      print(f"| {sigma:g} | {mc.mean():.3f} | {t_mc:.1f} | {method} | "
            f"{row[method]['mae']:.4f} | {t:.3f} | {t_mc / t:.0f}x |", flush=True)
    out[f"sigma_{sigma:g}"] = row

  # The MVN CDF alone, on the Taylor estimator's problems at sigma 0.2.
  z, cov = jax.jit(taylor_z_and_cov, static_argnums=0)(apply, params, x, 0.2)
  z64, cov64 = np.asarray(z, np.float64), np.asarray(cov, np.float64)
  ours, t_ours = timed(lambda: mvn_cdf(z, cov, key).p, args.repeats)
  t0 = time.perf_counter()
  ref = np.array([multivariate_normal(np.zeros(len(a)), b).cdf(a) for a, b in zip(z64, cov64,
                                                                                  strict=True)])
  t_ref = time.perf_counter() - t0
  out["mvn_cdf"] = {"dim": int(z.shape[1]), "count": int(z.shape[0]),
                    "max_abs_diff": float(np.abs(ours - ref).max()),
                    "mean_abs_diff": float(np.abs(ours - ref).mean()),
                    "seconds": t_ours, "scipy_seconds": t_ref, "speedup": t_ref / t_ours}
  m = out["mvn_cdf"]
  print(f"mvn_cdf: {m['count']} CDFs of dimension {m['dim']}: {t_ours:.3f} s against scipy's "
        f"{t_ref:.2f} s ({m['speedup']:.0f}x); max |difference| {m['max_abs_diff']:.2e}")
  if args.json:
    print(json.dumps(out))


if __name__ == "__main__":
  main()
