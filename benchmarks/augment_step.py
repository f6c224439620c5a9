"""The cost of uncertainty-based augmentation: its train step over a plain one, same run.

  python benchmarks/augment_step.py [--batch 64] [--repeats 30]
  python benchmarks/augment_step.py --json       # the last line is one JSON object

Every contender is `wdmjax.metrics.classifier`'s jitted train step of the `DigitClassifier`
(28x28x1 mnist5k digits, Adam): "plain" (no augmentation), "random" (L = 2 random
transformations per image: the baseline), "uncertainty" (C = 4 candidates of L = 2, one
forward pass on all B * C of them, the S = 1 highest-loss kept, one backward pass) and
"uncertainty C=8". The parts of the uncertainty step are timed alone too: drawing the B * C
candidates ("candidates"), and one forward pass on B * C images ("forward B*C"). Repeats
alternate between the contenders; medians leave out calls during which other processes were
busy (see train_step.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from train_step import CpuMonitor, alternate, clean_median

from wdmjax.augment import DIGIT_FAMILY, Augmentation, augment_candidates
from wdmjax.data import labelled_split
from wdmjax.metrics.classifier import DigitClassifier, init_classifier_params, make_classifier_step


def build(args: argparse.Namespace) -> dict:
  x, y, _, _ = labelled_split("mnist5k")
  images, labels = jnp.asarray(x), jnp.asarray(y)
  model = DigitClassifier()
  params0 = init_classifier_params(model, jax.random.key(0), tuple(x.shape[1:]))
  fns = {}
  settings = {
    "plain": None,
    "random": Augmentation("random", L=2, ops=DIGIT_FAMILY),
    "uncertainty": Augmentation("uncertainty", L=2, C=4, S=1, ops=DIGIT_FAMILY),
    "uncertainty C=8": Augmentation("uncertainty", L=2, C=8, S=1, ops=DIGIT_FAMILY),
  }
  for name, aug in settings.items():
    tx, step = make_classifier_step(model, args.batch, 3e-3, 1000, aug)
    state = {"p": jax.tree.map(jnp.copy, params0), "o": tx.init(params0), "i": 0}

    def run(state=state, step=step):
      state["p"], state["o"], loss = step(state["p"], state["o"], images, labels,
                                          jax.random.key(state["i"]))
      state["i"] += 1
      loss.block_until_ready()

    run()  # compile and warm up
    fns[name] = run

  b = args.batch
  xb, tb = images[:b], jax.nn.one_hot(labels[:b], 10)
  cand = jax.jit(functools.partial(augment_candidates, C=4, L=2, ops=DIGIT_FAMILY))
  fwd = jax.jit(lambda p, v: model.apply({"params": p}, v))
  xc = jnp.tile(xb, (4, 1, 1, 1))
  fns["candidates"] = lambda: jax.block_until_ready(cand(jax.random.key(1), xb, tb))
  fns["forward B*C"] = lambda: fwd(params0, xc).block_until_ready()
  fns["candidates"]()
  fns["forward B*C"]()
  return fns


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  fns = build(args)
  busy: dict[str, list[float]] = {}
  monitor = CpuMonitor()
  times = alternate(fns, args.repeats, busy, extra_rounds=args.repeats)
  other = monitor.other_cores()
  med = {k: clean_median(times[k], busy[k]) for k in fns}
  plain = med["plain"][0]
  out = {"batch": args.batch, "repeats": args.repeats, "machine": platform.machine(),
         "devices": [str(d) for d in jax.devices()], "other_cores_during_run": other,
         "ms": {k: 1e3 * v[0] for k, v in med.items()},
         "calls_in_median": {k: v[1] for k, v in med.items()},
         "ratio_to_plain": {k: v[0] / plain for k, v in med.items()}}
  print(f"DigitClassifier train step, batch {args.batch}, mnist5k 28x28x1; other processes "
        f"used {other:.2f} cores on average")
  print("| step | ms (median) | over plain |")
  print("|---|---|---|")
  for k in fns:
    print(f"| {k} | {out['ms'][k]:.2f} | {out['ratio_to_plain'][k]:.2f}x |")
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
