"""Where the time of wdmjax's JAX train step goes (companion of train_step.py).

Three views of one model's train step (same configs as train_step.py):
  phases  forward (loss), forward + backward (grad), full step (+ AdamW + EMA), alternated;
  ops     an XLA trace of full steps, op time grouped by kind (conv forward / input grad /
          weight grad, dot forward / backward, layout copies, elementwise), top ops;
  convs   every distinct convolution of the model timed alone: forward, input gradient,
          weight gradient.
XLA flags go in the environment, as for train_step.py.

  python benchmarks/profile_step.py --model unet
  python benchmarks/profile_step.py --model dit --views phases,ops
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/profile_step.py
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from train_step import CpuMonitor, JaxBench, alternate, median, model_configs

from wdmjax.train.host_memory import keep_host_memory
from wdmjax.train.plan import matmul_flops

VIEWS = ("phases", "ops", "convs")


# ----------------------------------------------------------------------------- phases


def phase_times(jx: JaxBench, repeats: int) -> dict[str, float]:
  """Median seconds of forward, forward + backward and the full step, alternated."""
  rng = jax.random.PRNGKey(3)
  loss = lambda p, b, r: jx.loss_fn(p, b, r)[0]
  fwd = jax.jit(loss).lower(jx.state.params, jx.batch, rng).compile()
  grad = jax.jit(jax.grad(loss)).lower(jx.state.params, jx.batch, rng).compile()
  fns = {
    "forward": lambda: jax.block_until_ready(fwd(jx.state.params, jx.batch, rng)),
    "forward+backward": lambda: jax.block_until_ready(grad(jx.state.params, jx.batch, rng)),
    "full step": jx.train_once,
  }
  alternate(fns, 1)
  return {k: median(v) for k, v in alternate(fns, repeats).items()}


def print_phases(times: dict[str, float], flops: float) -> None:
  step = times["full step"]
  print("phase                 seconds   share of step")
  for k, v in times.items():
    print(f"{k:<20} {v:8.3f}   {100 * v / step:5.0f}%")
  back = times["forward+backward"] - times["forward"]
  print(f"backward alone ~ {back:.3f} s = {back / max(times['forward'], 1e-9):.2f}x forward; "
        f"AdamW + EMA + grad norm ~ {step - times['forward+backward']:.3f} s; "
        f"model FLOPs at the step's rate: {flops / step / 1e9:.1f} GFLOP/s")


# ----------------------------------------------------------------------------- ops


def _hlo_computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines, from an HloModule's text."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$", line)
    if head:
      current = "ENTRY" if head.group(1) else head.group(2)
      comps[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None and "=" in line:
      comps[current].append(line.strip())
  return comps


def _kind(line: str, called: list[str]) -> str:
  """Kind of one entry instruction: which conv/dot it runs, else copy or elementwise."""
  if " while(" in line:  # jax.random's threefry is a rolled loop on CPU
    return "rng (threefry loop)" if "threefry" in line or "_uniform" in line else "while loop"
  body = called + [line]
  conv = next((s for s in body if " convolution(" in s), None)
  if conv is not None:
    size = re.search(r"window=\{size=([\dx]+)", conv)
    dims = [int(d) for d in size.group(1).split("x")] if size else [1]
    # A weight gradient convolves activations with output gradients: its window is the whole
    # feature map, while the models' kernels are at most 4x4 (the DiT's patch embedding).
    if max(dims) > 4:
      return "conv weight-grad"
    return "conv input-grad" if "transpose(" in conv + line else "conv forward"
  dot = next((s for s in body if " dot(" in s), None)
  if dot is not None:
    return "dot backward" if "transpose(" in dot + line else "dot forward"
  ops = {m.group(1) for s in body for m in [re.search(r"= \S+ ([\w-]+)\(", s)] if m}
  if ops and ops <= {"parameter", "transpose", "copy", "bitcast", "fusion", "reshape"}:
    return "layout copy/transpose"
  return "elementwise/reduce/other"


def op_kinds(hlo: str) -> dict[str, str]:
  """Entry instruction name -> kind (see `_kind`)."""
  comps = _hlo_computations(hlo)
  kinds = {}
  for line in comps.get("ENTRY", []):
    name = re.match(r"^(?:ROOT )?%?([\w.\-]+) =", line)
    if not name:
      continue
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    kinds[name.group(1)] = _kind(line, comps.get(calls.group(1), []) if calls else [])
  return kinds


def op_profile(jx: JaxBench, steps: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
  """Traces `steps` full steps; returns thread-seconds per step by kind, and the top ops."""
  from jax.profiler import ProfileData

  kinds = op_kinds(jx.step.as_text())
  jx.train_once()
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      jx.train_once()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True))[-1]
    data = ProfileData.from_file(path)
  per_op: collections.Counter[str] = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for ev in line.events:
        if ev.name in kinds:
          per_op[ev.name] += ev.duration_ns / 1e9 / steps
  by_kind: collections.Counter[str] = collections.Counter()
  for name, sec in per_op.items():
    by_kind[kinds[name]] += sec
  top = [(name, kinds[name], sec) for name, sec in per_op.most_common(12)]
  return dict(by_kind.most_common()), top


def print_ops(by_kind: dict[str, float], top: list[tuple[str, str, float]]) -> None:
  total = sum(by_kind.values())
  print(f"op time per step (summed over XLA's threads): {total:.3f} thread-s")
  for k, v in by_kind.items():
    print(f"  {k:<28} {v:7.3f}  {100 * v / total:5.1f}%")
  print("top ops:")
  for name, kind, sec in top:
    print(f"  {name:<36} {kind:<26} {sec:7.3f}")


# ----------------------------------------------------------------------------- convs


def model_convs(jx: JaxBench) -> list[tuple[Any, dict[str, Any], int]]:
  """Distinct convolutions of the model's forward at the train batch: (shapes, params, count)."""
  x = jx.batch["image"]
  t = jnp.zeros((x.shape[0],), jnp.int32)
  y = jx.batch.get("label")
  jaxpr = jax.make_jaxpr(lambda p: jx.model.apply({"params": p}, x, t, y))(jx.state.params)
  seen: dict[str, list[Any]] = {}

  def walk(jp: Any) -> None:
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        shapes = (eqn.invars[0].aval.shape, eqn.invars[1].aval.shape)
        key = repr((shapes, sorted((k, repr(v)) for k, v in eqn.params.items())))
        if key in seen:
          seen[key][2] += 1
        else:
          seen[key] = [shapes, dict(eqn.params), 1]
      for v in eqn.params.values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
          if isinstance(item, jax.extend.core.ClosedJaxpr):
            walk(item.jaxpr)
          elif isinstance(item, jax.extend.core.Jaxpr):
            walk(item)

  walk(jaxpr.jaxpr)
  return [tuple(v) for v in seen.values()]


def conv_table(jx: JaxBench, repeats: int) -> list[dict[str, Any]]:
  """Times each distinct conv alone: forward, input gradient, weight gradient."""
  rows = []
  for (xs, ws), params, count in model_convs(jx):
    conv = lambda x, w, params=params: lax.conv_general_dilated_p.bind(x, w, **params)
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, xs, jnp.float32)
    w = 0.05 * jax.random.normal(kw, ws, jnp.float32)
    g = jax.random.normal(kx, jax.eval_shape(conv, x, w).shape, jnp.float32)
    flops = matmul_flops(jax.make_jaxpr(conv)(x, w).jaxpr)
    fns = {
      "forward": jax.jit(conv),
      "input grad": jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)),
      "weight grad": jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)),
    }
    args = {"forward": (x, w), "input grad": (x, w, g), "weight grad": (x, w, g)}
    calls = {k: (lambda f=f, a=args[k]: jax.block_until_ready(f(*a))) for k, f in fns.items()}
    alternate(calls, 1)
    times = {k: median(v) for k, v in alternate(calls, repeats).items()}
    rows.append(dict(x=xs, w=ws, stride=params["window_strides"], count=count, flops=flops,
                     times=times))
  return rows


def print_convs(rows: list[dict[str, Any]], step_s: float) -> None:
  cols = ["forward", "input grad", "weight grad"]
  print(f"{'input':<18} {'kernel':<15} {'s':>2} {'n':>2}  " + "  ".join(
    f"{c + ' ms (GF/s)':>22}" for c in cols))
  totals = collections.Counter()
  for r in rows:
    cells = []
    for c in cols:
      t = r["times"][c]
      cells.append(f"{1e3 * t:10.1f} ({r['flops'] / t / 1e9:5.0f})".rjust(22))
      totals[c] += r["count"] * t
    print(f"{str(r['x']):<18} {str(r['w']):<15} {r['stride'][0]:>2} {r['count']:>2}  "
          + "  ".join(cells))
  print("sum over the model's convs (alone, x count): " + ", ".join(
    f"{c} {totals[c]:.3f} s" for c in cols) + f"; train step {step_s:.3f} s")


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=("dit", "unet"), default="unet")
  ap.add_argument("--batch", type=int, default=None, help="default 32; quick 4")
  ap.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
  ap.add_argument("--views", default="phases,ops,convs", help=f"comma list of {VIEWS}")
  ap.add_argument("--repeats", type=int, default=5, help="timed repeats per phase / conv")
  ap.add_argument("--trace-steps", type=int, default=3)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  batch = args.batch or (4 if args.quick else 32)
  views = [v for v in args.views.split(",") if v]
  unknown = set(views) - set(VIEWS)
  if unknown:
    ap.error(f"unknown views {sorted(unknown)}; expected some of {VIEWS}")
  cfg = model_configs(args.quick)[args.model]
  host_memory = keep_host_memory()  # as the CLI and train_step.py do
  print(f"{args.model} batch {batch}, jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, host memory kept: {host_memory}",
        flush=True)
  report: dict[str, Any] = dict(model=args.model, batch=batch, config=cfg)
  monitor = CpuMonitor()
  jx = JaxBench(cfg, batch, batch, sample_steps=0)
  flops = 3.0 * batch * jx.fwd_matmul_flops_per_image
  step_s = None
  if "phases" in views:
    print("\n== phases")
    report["phases"] = phase_times(jx, args.repeats)
    step_s = report["phases"]["full step"]
    print_phases(report["phases"], flops)
  if "ops" in views:
    print("\n== ops")
    by_kind, top = op_profile(jx, args.trace_steps)
    report["ops"], report["top_ops"] = by_kind, top
    print_ops(by_kind, top)
  if "convs" in views:
    print("\n== convs (each alone, median ms and GFLOP/s)")
    if step_s is None:
      step_s = median(alternate({"step": jx.train_once}, args.repeats)["step"])
    report["convs"] = conv_table(jx, args.repeats)
    print_convs(report["convs"], step_s)
  report["other_cpu_cores"] = monitor.other_cores()
  print(f"\nother processes' CPU use during the profile: {report['other_cpu_cores']:.2f} cores")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2, default=str)
  return report


if __name__ == "__main__":
  main()
