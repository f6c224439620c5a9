"""DiffFit (and BitFit, LoRA) train step time over the full fine-tuning step, same run.

  python benchmarks/peft_step.py [--batch 32] [--steps 10] [--strategies bitfit lora]
  python benchmarks/peft_step.py --json        # the last line is one JSON object

Both steps are wdmjax's own `make_train_step` on the DiT of `train_step.py` (6 blocks, width
384, 32x32x3, 10 classes): the full step differentiates every parameter; the PEFT step
differentiates the trainable part only (`frozen=`, `combine=`), so the frozen kernels'
weight gradients are never computed and AdamW keeps state for the trainable leaves alone.
Repeats alternate between the steps; medians leave out calls during which other processes
were busy (see train_step.py). Also reported: optimizer-state bytes and XLA's memory
analysis of each compiled step (arguments + temporaries: the peak a step adds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from train_step import NUM_CLASSES_DIT, CpuMonitor, alternate, clean_median, model_configs

from wdmjax.diffusion import diffusion_loss, make_schedule
from wdmjax.models import build_model, init_params
from wdmjax.peft import PeftSpec, prepare
from wdmjax.train import create_train_state, make_optimizer, make_train_step
from wdmjax.train.sharding import make_mesh


def tree_bytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def build(strategy: str, model, params, loss, tx, batch, mesh):
  """(run-one-step fn, stats) for 'full' or a PEFT strategy; compiled before it returns."""
  if strategy == "full":
    trainable, frozen, combine = params, None, None
  else:
    trainable, frozen, _, combine = prepare(PeftSpec(strategy), params)
  step = make_train_step(loss, tx, 0.9999, mesh, frozen=frozen, combine=combine)
  state = create_train_state(trainable, tx, jax.random.PRNGKey(1))
  jitted = step if frozen is None else step.jitted
  args = (state, batch) if frozen is None else (state, batch, step.frozen)
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  holder = {"state": state}

  def once() -> None:
    holder["state"], m = compiled(holder["state"], *args[1:])
    jax.block_until_ready(m)

  stats = {
    "trainable": int(sum(x.size for x in jax.tree.leaves(trainable))),
    "optimizer_state_bytes": tree_bytes(state.opt_state),
    "ema_bytes": tree_bytes(state.ema_params),
    "compile_s": compile_s,
    "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
    "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
  }
  return once, stats


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10, help="timed steps of each")
  ap.add_argument("--strategies", nargs="*", default=["bitfit", "lora"],
                  help="PEFT strategies timed besides difffit and full")
  ap.add_argument("--quick", action="store_true", help="the tiny DiT (smoke test)")
  ap.add_argument("--json", action="store_true", help="end with one JSON line")
  args = ap.parse_args(argv)
  cfg = model_configs(args.quick)["dit"]
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0))

  def apply_fn(params, x, t, y, rng, train):
    return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": rng})

  loss = diffusion_loss(apply_fn, make_schedule("linear", 1000), "eps", 0.1, model.null_label)
  tx = make_optimizer(1e-4, 0, 0.0, 1.0)
  mesh = make_mesh(1)
  res, ch = cfg["resolution"], cfg["in_channels"]
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  batch = {"image": jax.random.uniform(k1, (args.batch, res, res, ch), jnp.float32, -1, 1),
           "label": jax.random.randint(k2, (args.batch,), 0, NUM_CLASSES_DIT)}
  print(f"env: {platform.platform()}, jax {jax.__version__}, {jax.default_backend()}, "
        f"{os.cpu_count()} cores; DiT {cfg}, batch {args.batch}", flush=True)
  names = ["full", "difffit", *[s for s in args.strategies if s not in ("full", "difffit")]]
  fns, stats = {}, {}
  for name in names:
    print(f"compiling {name} ...", flush=True)
    fns[name], stats[name] = build(name, model, params, loss, tx, batch, mesh)
  alternate(fns, 2)  # warm-up
  monitor = CpuMonitor()
  busy: dict[str, list[float]] = {}
  times = alternate(fns, args.steps, busy, extra_rounds=args.steps)
  other = monitor.other_cores()
  for name in names:
    stats[name]["step_s"], stats[name]["calls"] = clean_median(times[name], busy[name])
  full = stats["full"]
  print(f"\n{'':10s} {'step s':>8s} {'/ full':>7s} {'trainable':>12s} {'opt state MiB':>14s} "
        f"{'temp MiB':>9s} {'args MiB':>9s}")
  mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
  for name in names:
    s = stats[name]
    print(f"{name:10s} {s['step_s']:8.3f} {s['step_s'] / full['step_s']:7.2f} "
          f"{s['trainable']:12,d} {mib(s['optimizer_state_bytes']):>14s} "
          f"{mib(s['temp_bytes']):>9s} {mib(s['argument_bytes']):>9s}")
  print(f"other processes' CPU use: {other:.2f} cores")
  out = {"difffit_over_full": stats["difffit"]["step_s"] / full["step_s"],
         **{f"{n}_over_full": stats[n]["step_s"] / full["step_s"] for n in names[2:]},
         "other_cores": other, "batch": args.batch, "model": cfg, "stats": stats}
  if args.json:
    print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
