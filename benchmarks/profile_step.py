"""Where the time of wdmjax's JAX train step goes on CPU (companion of train_step.py).

Five views of one model's train step (same configs as train_step.py):
  phases  forward (loss), forward + backward (grad), full step (+ AdamW + EMA), alternated;
  ops     an XLA trace of full steps, op time grouped by kind (conv forward / input grad /
          weight grad, dot forward / backward, layout copies, elementwise), top ops;
  convs   every distinct convolution of the model timed alone: forward, input gradient,
          weight gradient (XLA's own), and the weight gradient as 9 shifted matmuls;
  variants  the full step with one layer swapped for another implementation of the same
          maths (flax method interceptor; the package is untouched), gradients checked;
  flags   train_step.py --skip-torch in fresh processes under several XLA_FLAGS, run in
          alternating rounds (flags must be set before jax starts).

  python benchmarks/profile_step.py --model unet
  python benchmarks/profile_step.py --model dit --views phases,ops,variants
  python benchmarks/profile_step.py --model unet --views flags \\
      --flag=--xla_cpu_use_onednn=true --flag="--xla_cpu_multi_thread_eigen=false"
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from train_step import CpuMonitor, JaxBench, alternate, median, model_configs

from wdmjax.models import SelfAttention, attention

VIEWS = ("phases", "ops", "convs", "variants", "flags")


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


def shifted_wgrad(x: jax.Array, g: jax.Array, w: jax.Array, padding: Any) -> jax.Array:
  """Weight gradient of a stride-1 NHWC/HWIO conv as kh*kw matmuls of shifted inputs.

  x: [B, H, W, Cin], g: [B, Ho, Wo, Cout] output gradient, w: [kh, kw, Cin, Cout] (for its
  shape), padding: ((top, bottom), (left, right)) -> dL/dw [kh, kw, Cin, Cout].
  """
  kh, kw, ci, co = w.shape
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  h, wd = g.shape[1], g.shape[2]
  g2 = g.reshape(-1, co)
  dims = (((0,), (0,)), ((), ()))
  rows = [lax.dot_general(xp[:, i:i + h, j:j + wd].reshape(-1, ci), g2, dims)
          for i in range(kh) for j in range(kw)]
  return jnp.stack(rows).reshape(kh, kw, ci, co)


def conv_table(jx: JaxBench, repeats: int) -> list[dict[str, Any]]:
  """Times each distinct conv alone: forward, input grad, weight grad (native and shifted)."""
  rows = []
  for (xs, ws), params, count in model_convs(jx):
    conv = lambda x, w, params=params: lax.conv_general_dilated_p.bind(x, w, **params)
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, xs, jnp.float32)
    w = 0.05 * jax.random.normal(kw, ws, jnp.float32)
    g = jax.random.normal(kx, jax.eval_shape(conv, x, w).shape, jnp.float32)
    flops = 2.0 * math.prod(g.shape) * math.prod(ws[:-1])
    fns = {
      "forward": jax.jit(conv),
      "input grad": jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)),
      "weight grad": jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)),
    }
    args = {"forward": (x, w), "input grad": (x, w, g), "weight grad": (x, w, g)}
    simple = (params["window_strides"] == (1, 1) and params["feature_group_count"] == 1
              and params["lhs_dilation"] == (1, 1) and params["rhs_dilation"] == (1, 1)
              and params["dimension_numbers"].lhs_spec == (0, 3, 1, 2))
    if simple:
      shifted = jax.jit(functools.partial(shifted_wgrad, padding=params["padding"]))
      ref = fns["weight grad"](x, w, g)[0]
      assert np.allclose(shifted(x, g, w), ref, rtol=1e-3, atol=1e-2 * float(jnp.abs(ref).max()))
      fns["wgrad shifted"], args["wgrad shifted"] = shifted, (x, g, w)
    calls = {k: (lambda f=f, a=args[k]: jax.block_until_ready(f(*a))) for k, f in fns.items()}
    alternate(calls, 1)
    times = {k: median(v) for k, v in alternate(calls, repeats).items()}
    rows.append(dict(x=xs, w=ws, stride=params["window_strides"], count=count, flops=flops,
                     times=times))
  return rows


def print_convs(rows: list[dict[str, Any]], step_s: float) -> None:
  cols = ["forward", "input grad", "weight grad", "wgrad shifted"]
  print(f"{'input':<18} {'kernel':<15} {'s':>2} {'n':>2}  " + "  ".join(
    f"{c + ' ms (GF/s)':>22}" for c in cols))
  totals = collections.Counter()
  for r in rows:
    cells = []
    for c in cols:
      t = r["times"].get(c)
      if t is None:
        cells.append(f"{'-':>22}")
        continue
      cells.append(f"{1e3 * t:10.1f} ({r['flops'] / t / 1e9:5.0f})".rjust(22))
      totals[c] += r["count"] * t
    print(f"{str(r['x']):<18} {str(r['w']):<15} {r['stride'][0]:>2} {r['count']:>2}  "
          + "  ".join(cells))
  print("sum over the model's convs (alone, x count): " + ", ".join(
    f"{c} {totals[c]:.3f} s" for c in cols[:3]) + f"; train step {step_s:.3f} s")


# ----------------------------------------------------------------------------- variants
# Other implementations of one layer, swapped in with a flax method interceptor (same
# parameters, same maths), to measure what a change to the package would buy end to end.


def _conv_nhwc(x: jax.Array, w: jax.Array, padding: Any) -> jax.Array:
  return lax.conv_general_dilated(x, w, (1, 1), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_shifted_wgrad(x: jax.Array, w: jax.Array, padding: Any) -> jax.Array:
  """A stride-1 conv whose forward and input gradient are XLA's, its weight gradient
  `shifted_wgrad`'s."""
  return _conv_nhwc(x, w, padding)


def _conv_fwd(x, w, padding):
  return _conv_nhwc(x, w, padding), (x, w)


def _conv_bwd(padding, res, g):
  x, w = res
  dx = jax.vjp(lambda x: _conv_nhwc(x, w, padding), x)[1](g)[0]
  return dx, shifted_wgrad(x, g, w, padding)


conv_shifted_wgrad.defvjp(_conv_fwd, _conv_bwd)


def prefer_shifted(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
  """Where `shifted_wgrad` beat XLA's weight gradient in the convs view on the 2-core CPU:
  1x1 kernels, and 3x3 kernels on >= 32x32 maps with >= 64 channels in and out."""
  kh, kw, ci, co = w_shape
  if (kh, kw) == (1, 1):
    return True
  return x_shape[1] * x_shape[2] >= 1024 and min(ci, co) >= 64


def _pair(v: Any) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def conv_wgrad_interceptor(next_fun, args, kwargs, context):
  """Routes eligible nn.Conv calls (stride 1, undilated, ungrouped) to conv_shifted_wgrad."""
  mod = context.module
  if not isinstance(mod, nn.Conv) or context.method_name != "__call__" or mod.is_initializing():
    return next_fun(*args, **kwargs)
  x = args[0]
  kernel = mod.get_variable("params", "kernel")
  plain = (_pair(mod.strides or 1) == (1, 1) and _pair(mod.kernel_dilation or 1) == (1, 1)
           and mod.input_dilation in (None, 1, (1, 1)) and mod.feature_group_count == 1
           and isinstance(mod.padding, (tuple, list)) and x.ndim == 4)
  if not plain or not prefer_shifted(x.shape, kernel.shape):
    return next_fun(*args, **kwargs)
  padding = tuple(tuple(p) for p in mod.padding)
  y = conv_shifted_wgrad(x.astype(mod.dtype or x.dtype), kernel.astype(mod.dtype or x.dtype),
                         padding)
  if mod.use_bias:
    y = y + mod.get_variable("params", "bias")
  return y


def qkv_split_interceptor(next_fun, args, kwargs, context):
  """SelfAttention with q, k, v taken by jnp.split (whose gradient is one concatenate)
  instead of three index slices (whose gradient is three pads and two adds)."""
  mod = context.module
  if (not isinstance(mod, SelfAttention) or context.method_name != "__call__"
      or mod.is_initializing()):
    return next_fun(*args, **kwargs)
  x = args[0]
  b, length, c = x.shape
  p = mod.variables["params"]
  qkv = jnp.dot(x, p["qkv"]["kernel"]) + p["qkv"]["bias"]
  qkv = qkv.reshape(b, length, 3, mod.num_heads, c // mod.num_heads)
  q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
  h = attention(q, k, v).reshape(b, length, c)
  return jnp.dot(h, p["proj"]["kernel"]) + p["proj"]["bias"]


INTERCEPTORS = {"conv-shifted-wgrad": conv_wgrad_interceptor, "qkv-split": qkv_split_interceptor}


def compare_variants(cfg: dict[str, Any], batch: int, names: list[str], repeats: int
                     ) -> dict[str, Any]:
  """Full train step of wdmjax as it is and with each interceptor, alternated; checks that
  every variant gives the same loss gradient."""
  benches = {"as is": JaxBench(cfg, batch, batch, 0)}
  for name in names:
    benches[name] = JaxBench(cfg, batch, batch, 0, interceptor=INTERCEPTORS[name])
  rng = jax.random.PRNGKey(5)
  # Perturbed: at init the zero-initialised output layers make most gradients exactly zero.
  leaves, tree = jax.tree.flatten(benches["as is"].state.params)
  keys = jax.random.split(jax.random.PRNGKey(6), len(leaves))
  params = jax.tree.unflatten(tree, [a + 0.02 * jax.random.normal(k, a.shape, a.dtype)
                                     for a, k in zip(leaves, keys, strict=True)])
  grad = lambda jx: jax.jit(jax.grad(lambda p: jx.loss_fn(p, jx.batch, rng)[0]))(params)
  ref = grad(benches["as is"])
  errors = {}
  for name in names:
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b))
                                                                         + 1e-12)),
                        grad(benches[name]), ref)
    errors[name] = max(jax.tree.leaves(diff))
  calls = {k: jx.train_once for k, jx in benches.items()}
  alternate(calls, 1)
  times = {k: median(v) for k, v in alternate(calls, repeats).items()}
  return dict(times=times, max_rel_grad_error=errors)


def print_variants(res: dict[str, Any]) -> None:
  base = res["times"]["as is"]
  for name, t in res["times"].items():
    err = res["max_rel_grad_error"].get(name)
    extra = "" if err is None else f"   max rel. grad difference {err:.1e}"
    print(f"  {name:<22} {t:7.3f} s  (speed-up {base / t:.2f}x){extra}")


# ----------------------------------------------------------------------------- flags


def flag_sweep(model: str, flag_sets: list[str], rounds: int, steps: int,
               extra: list[str]) -> dict[str, list[float]]:
  """Median train step of `train_step.py --skip-torch` per XLA_FLAGS value, in fresh
  processes, the flag sets taking turns for `rounds` rounds."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
  out: dict[str, list[float]] = {f: [] for f in flag_sets}
  for r in range(rounds):
    for flags in flag_sets if r % 2 == 0 else flag_sets[::-1]:
      with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        env = dict(os.environ, XLA_FLAGS=flags)
        cmd = [sys.executable, script, "--skip-torch", "--model", model, "--sample-steps", "0",
               "--steps", str(steps), "--json", tmp.name, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
          print(f"  XLA_FLAGS={flags!r} failed: {proc.stderr.strip().splitlines()[-1:]}")
          out[flags].append(math.nan)
          continue
        with open(tmp.name) as f:
          out[flags].append(json.load(f)["results"][model]["train_s_jax"])
      print(f"  round {r}: XLA_FLAGS={flags!r}: {out[flags][-1]:.3f} s", flush=True)
  return out


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=("dit", "unet"), default="unet")
  ap.add_argument("--batch", type=int, default=None, help="default 32; quick 4")
  ap.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
  ap.add_argument("--views", default="phases,ops,convs", help=f"comma list of {VIEWS}")
  ap.add_argument("--repeats", type=int, default=5, help="timed repeats per phase / conv")
  ap.add_argument("--trace-steps", type=int, default=3)
  ap.add_argument("--flag", action="append", default=[],
                  help="an XLA_FLAGS value for the flags view, compared with the defaults; "
                       "repeat for more (write --flag=--xla_...)")
  ap.add_argument("--variant", action="append", choices=sorted(INTERCEPTORS), default=[],
                  help="layer variant(s) for the variants view (default: the model's one)")
  ap.add_argument("--rounds", type=int, default=2, help="rounds of the flags view")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)
  batch = args.batch or (4 if args.quick else 32)
  views = [v for v in args.views.split(",") if v]
  unknown = set(views) - set(VIEWS)
  if unknown:
    ap.error(f"unknown views {sorted(unknown)}; expected some of {VIEWS}")
  cfg = model_configs(args.quick)[args.model]
  print(f"{args.model} batch {batch}, jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  report: dict[str, Any] = dict(model=args.model, batch=batch, config=cfg)
  monitor = CpuMonitor()
  if set(views) - {"flags", "variants"}:
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
  if "variants" in views:
    names = args.variant or (["conv-shifted-wgrad"] if args.model == "unet" else ["qkv-split"])
    print(f"\n== variants (full train step, alternated): {names}")
    report["variants"] = compare_variants(cfg, batch, names, args.repeats)
    print_variants(report["variants"])
  if "flags" in views:
    print("\n== flags (train step s, fresh process per run)")
    extra = ["--quick"] if args.quick else []
    extra += ["--batch", str(batch)]
    sweep = flag_sweep(args.model, ["", *args.flag], args.rounds, args.repeats, extra)
    report["flags"] = sweep
    base = median(sweep[""])
    for flags, ts in sweep.items():
      print(f"  {flags or '(defaults)':<60} median {median(ts):.3f} s  "
            f"(speed-up {base / median(ts):.2f}x)")
  report["other_cpu_cores"] = monitor.other_cores()
  print(f"\nother processes' CPU use during the profile: {report['other_cpu_cores']:.2f} cores")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2, default=str)
  return report


if __name__ == "__main__":
  main()
