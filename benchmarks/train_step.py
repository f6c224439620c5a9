"""Train-step and DDIM sampling time of wdmjax against the same networks in PyTorch/diffusers.

For a DiT and a UNet config this measures, in one run and with the two frameworks' repeats
alternated (the machine is noisy, compare only inside one run):
  * one AdamW train step (eps-MSE loss, random t and noise, EMA, grad norm), median seconds;
  * one DDIM sampling pass (default 50 steps, x0 clipped) of a batch, median seconds;
  * model FLOPs per train step, from XLA's cost analysis and from the forward jaxpr's matmuls
    (`wdmjax.train.plan.matmul_flops`, times 3), the achieved FLOP/s and the MFU against an
    fp32 2048x2048 matmul peak measured in this run.

  pip install -e ".[bench]"
  python benchmarks/train_step.py                     # both models, full sizes (~10 min)
  python benchmarks/train_step.py --quick --model dit  # tiny smoke test
  python benchmarks/train_step.py --model dit --device cuda --dtype bfloat16  # GPU, bf16
XLA flags to try go in the environment: XLA_FLAGS=... python benchmarks/train_step.py
The run keeps freed host memory for reuse (`wdmjax.train.host_memory`, as the CLI does), for
both frameworks alike; WDMJAX_HOST_MEMORY=off measures glibc's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wdmjax.diffusion import ddim_sample, diffusion_loss, make_schedule, respaced_timesteps
from wdmjax.models import build_model, count_params, init_params
from wdmjax.train import create_train_state, make_optimizer, make_train_step
from wdmjax.train.host_memory import keep_host_memory
from wdmjax.train.plan import matmul_flops
from wdmjax.train.sharding import make_mesh

try:  # the peer is optional: --skip-torch runs without it
  import torch
except ImportError:  # pragma: no cover
  torch = None

NUM_TIMESTEPS = 1000
TORCH_DEVICE = "cpu"  # --device; "cuda" puts the peer on the GPU
LR, EMA_DECAY = 1e-4, 0.9999
# diffusers' DiT is class-conditional by construction (adaLN-Zero embeds a label), so both
# DiTs are; the UNets are unconditional.
NUM_CLASSES_DIT = 10


def model_configs(quick: bool) -> dict[str, dict[str, Any]]:
  """wdmjax model configs by name; `quick` gives tiny versions of the same shapes."""
  if quick:
    return {
      "dit": dict(name="dit", resolution=16, in_channels=3, patch_size=4, width=64, depth=2,
                  num_heads=2, num_classes=NUM_CLASSES_DIT, learn_sigma=False),
      "unet": dict(name="unet", resolution=16, in_channels=3, ch=32, ch_mult=(1, 2),
                   num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, num_classes=0,
                   num_groups=8),
    }
  return {
    "dit": dict(name="dit", resolution=32, in_channels=3, patch_size=4, width=384, depth=6,
                num_heads=6, num_classes=NUM_CLASSES_DIT, learn_sigma=False),
    "unet": dict(name="unet", resolution=32, in_channels=3, ch=64, ch_mult=(1, 2, 2),
                 num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, num_classes=0,
                 num_groups=32),
  }


# ----------------------------------------------------------------------------- timing


def alternate(fns: dict[str, Callable[[], None]], repeats: int,
              busy: dict[str, list[float]] | None = None,
              extra_rounds: int = 0) -> dict[str, list[float]]:
  """Runs each (synchronous) fn `repeats` times, alternating frameworks and their order.

  Returns the wall-clock seconds of every call, by name. `busy`, if given, receives by name
  the cores other processes used during each call (see CpuMonitor); then up to
  `extra_rounds` more rounds run until every fn has `repeats` undisturbed calls.
  """
  times: dict[str, list[float]] = {k: [] for k in fns}
  names = list(fns)
  for i in range(repeats + (extra_rounds if busy is not None else 0)):
    if i >= repeats and all(sum(b < BUSY_CORES for b in busy[k]) >= repeats for k in names):
      break  # enough calls that no other process disturbed
    for name in names if i % 2 == 0 else names[::-1]:
      monitor = CpuMonitor()
      t0 = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - t0)
      if busy is not None:
        busy.setdefault(name, []).append(monitor.other_cores())
  return times


def clean_median(times: list[float], busy: list[float]) -> tuple[float, int]:
  """Median over the calls during which other processes used < BUSY_CORES cores, when at
  least half of them were; else over all calls. Returns (median, calls it is over)."""
  clean = [t for t, b in zip(times, busy, strict=True) if not b >= BUSY_CORES]
  use = clean if 2 * len(clean) >= len(times) else times
  return median(use), len(use)


# Calls during which other processes used this many cores or more are left out of medians.
BUSY_CORES = 0.15


class CpuMonitor:
  """CPU the rest of the machine used (in cores) since start, from /proc/stat (Linux).

  A busy co-tenant ruins 2-thread timings, PyTorch's OpenMP ones most: each parallel region
  waits for its slowest thread. The benchmark reports this so a reader can discard a run.
  """

  def __init__(self) -> None:
    self.start = self._read()

  @staticmethod
  def _read() -> tuple[float, float, float]:
    try:
      with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
      busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
      busy = math.nan
    own = os.times()  # this process and its finished children
    return time.perf_counter(), busy, own.user + own.system + own.children_user + \
      own.children_system

  def other_cores(self) -> float:
    (w0, b0, o0), (w1, b1, o1) = self.start, self._read()
    return max(0.0, (b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9)


def median(xs: list[float]) -> float:
  return statistics.median(xs) if xs else float("nan")


def jax_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best fp32 n x n matmul rate of XLA:CPU, GFLOP/s."""
  ka, kb = jax.random.split(jax.random.PRNGKey(1))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


def torch_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best fp32 n x n matmul rate of PyTorch, GFLOP/s."""
  a = torch.randn(n, n, device=TORCH_DEVICE)
  b = torch.randn(n, n, device=TORCH_DEVICE)
  torch.mm(a, b).sum().item()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    torch.mm(a, b).sum().item()  # .item() waits for the GPU
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best / 1e9


# ----------------------------------------------------------------------------- FLOPs


def xla_flops(compiled: Any) -> float:
  """'flops' of a compiled executable's cost analysis (a dict, or a list of dicts)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    return float(sum(c.get("flops", 0.0) for c in cost))
  return float(cost.get("flops", 0.0))


def dit_analytic_flops(cfg: dict[str, Any], batch: int) -> float:
  """Closed-form forward FLOPs of the DiT: 2 * matmul params * rows + attention.

  Per block: qkv (3 d^2), proj (d^2) and MLP (8 d^2) act on every token, adaLN (6 d^2) once
  per image; attention adds QK^T and AV, 2 * 2 * L^2 * d. Patch embedding, final layer and
  timestep MLP (256 -> d -> d) complete it.
  """
  d, p, c = cfg["width"], cfg["patch_size"], cfg["in_channels"]
  tokens = (cfg["resolution"] // p) ** 2
  per_token = cfg["depth"] * 12 * d * d + 2 * (p * p * c * d)  # blocks + embed + final
  per_image = cfg["depth"] * 6 * d * d + 2 * d * d + 256 * d + d * d
  attention = cfg["depth"] * 2 * tokens * tokens * d
  return 2.0 * batch * (per_token * tokens + per_image + attention)


# ----------------------------------------------------------------------------- wdmjax side


class JaxBench:
  """wdmjax's own train step (make_train_step, donated state) and a jitted DDIM sampler."""

  def __init__(self, cfg: dict[str, Any], batch: int, sample_batch: int, sample_steps: int):
    self.cfg = cfg
    self.model = build_model(cfg)
    model = self.model
    key = jax.random.PRNGKey(0)
    k_init, k_x, k_y, k_s = jax.random.split(key, 4)
    params = init_params(model, k_init)
    self.num_params = count_params(params)
    schedule = make_schedule("linear", NUM_TIMESTEPS)

    def apply_fn(params, x, t, y, rng, train):
      return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": rng})

    conditional = model.num_classes > 0
    # Label dropout at the DiT's class_dropout_prob, as diffusers' LabelEmbedding does.
    drop = model.class_dropout_prob if model.use_null_class else 0.0
    loss_fn = diffusion_loss(apply_fn, schedule, "eps", class_dropout_prob=drop,
                             null_label=model.null_label)
    tx = make_optimizer(lr=LR, warmup_steps=0, weight_decay=0.0, grad_clip=None)
    mesh = make_mesh()
    step = make_train_step(loss_fn, tx, ema_decay=EMA_DECAY, mesh=mesh)
    res, ch = cfg["resolution"], cfg["in_channels"]
    batch_dict = {"image": jax.random.uniform(k_x, (batch, res, res, ch), jnp.float32, -1, 1)}
    if conditional:
      batch_dict["label"] = jax.random.randint(k_y, (batch,), 0, model.num_classes)
    self.batch = jax.device_put(batch_dict, NamedSharding(mesh, P("data")))
    self.loss_fn = loss_fn
    self.state = create_train_state(params, tx, jax.random.PRNGKey(0))

    t0 = time.perf_counter()
    self.step = step.lower(self.state, self.batch).compile()
    self.compile_train_s = time.perf_counter() - t0
    self.xla_flops = xla_flops(self.step)

    x1, t1 = self.batch["image"][:1], jnp.zeros((1,), jnp.int32)
    y1 = self.batch["label"][:1] if conditional else None
    fwd = jax.make_jaxpr(lambda p: model.apply({"params": p}, x1, t1, y1))(params)
    self.fwd_matmul_flops_per_image = matmul_flops(fwd.jaxpr)

    def sample(params, x_T, y):
      denoise = lambda x, t: model.apply({"params": params}, x, t, y)
      return ddim_sample(denoise, schedule, x_T, steps=sample_steps)

    self.x_T = jax.random.normal(k_s, (sample_batch, res, res, ch), jnp.float32)
    self.y_sample = (jax.random.randint(k_y, (sample_batch,), 0, model.num_classes)
                     if conditional else None)
    self.compile_sample_s = 0.0
    if sample_steps > 0:
      t0 = time.perf_counter()
      self.sample = jax.jit(sample).lower(self.state.params, self.x_T, self.y_sample).compile()
      self.compile_sample_s = time.perf_counter() - t0

  def train_once(self) -> None:
    self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def sample_once(self) -> None:
    jax.block_until_ready(self.sample(self.state.params, self.x_T, self.y_sample))


# ----------------------------------------------------------------------------- PyTorch side


def torch_model(cfg: dict[str, Any]) -> Any:
  """The diffusers network with the widths, depths, heads and patch of a wdmjax config."""
  from diffusers import DiTTransformer2DModel, UNet2DModel

  if cfg["name"] == "dit":
    return DiTTransformer2DModel(
      num_attention_heads=cfg["num_heads"], attention_head_dim=cfg["width"] // cfg["num_heads"],
      in_channels=cfg["in_channels"], num_layers=cfg["depth"], sample_size=cfg["resolution"],
      patch_size=cfg["patch_size"], num_embeds_ada_norm=cfg["num_classes"], norm_eps=1e-6)
  res = [cfg["resolution"] // 2**i for i in range(len(cfg["ch_mult"]))]
  attn = [r in cfg["attn_resolutions"] for r in res]
  return UNet2DModel(
    sample_size=cfg["resolution"], in_channels=cfg["in_channels"],
    out_channels=cfg["in_channels"], block_out_channels=[cfg["ch"] * m for m in cfg["ch_mult"]],
    layers_per_block=cfg["num_res_blocks"],
    down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
    up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
    attention_head_dim=None,  # one head of the full width, as wdmjax's num_heads=1
    norm_num_groups=cfg["num_groups"], dropout=cfg["dropout"])


class TorchBench:
  """The same work in PyTorch: eps-MSE AdamW step with EMA and grad norm, DDIM loop."""

  def __init__(self, cfg: dict[str, Any], batch: int, sample_batch: int, sample_steps: int,
               alphas_cumprod: np.ndarray):
    torch.manual_seed(0)
    dev = self.dev = torch.device(TORCH_DEVICE)
    self.net = torch_model(cfg).to(dev)
    # bf16: the peer runs under autocast, as wdmjax computes in bf16 with fp32 parameters.
    self.autocast = (torch.autocast(dev.type, dtype=torch.bfloat16)
                     if cfg.get("dtype") == "bfloat16" else contextlib.nullcontext())
    self.conditional = cfg["name"] == "dit"
    self.params = [p for p in self.net.parameters() if p.requires_grad]
    self.num_params = sum(p.numel() for p in self.params)
    self.opt = torch.optim.AdamW(self.params, lr=LR, weight_decay=0.0, foreach=True)
    self.ema = [p.detach().clone() for p in self.params]
    self.ac = torch.tensor(alphas_cumprod, dtype=torch.float32, device=dev)
    res, ch = cfg["resolution"], cfg["in_channels"]
    self.x0 = torch.rand(batch, ch, res, res, device=dev) * 2 - 1
    self.y = (torch.randint(0, NUM_CLASSES_DIT, (batch,), device=dev)
              if self.conditional else None)
    self.x_T = torch.randn(sample_batch, ch, res, res, device=dev)
    self.y_sample = (torch.randint(0, NUM_CLASSES_DIT, (sample_batch,), device=dev)
                     if self.conditional else None)
    self.ts = [int(t) for t in respaced_timesteps(NUM_TIMESTEPS, sample_steps)[::-1]]

  def forward(self, x: Any, t: Any, y: Any) -> Any:
    with self.autocast:
      if self.conditional:
        out = self.net(x, timestep=t, class_labels=y, return_dict=False)[0]
      else:
        out = self.net(x, t, return_dict=False)[0]
    return out.float()

  def train_once(self) -> None:
    self.net.train()
    b = self.x0.shape[0]
    t = torch.randint(0, NUM_TIMESTEPS, (b,), device=self.dev)
    noise = torch.randn_like(self.x0)
    a = self.ac[t].view(b, 1, 1, 1)
    xt = a.sqrt() * self.x0 + (1 - a).sqrt() * noise
    loss = torch.nn.functional.mse_loss(self.forward(xt, t, self.y), noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - EMA_DECAY)
    loss.item(), grad_norm.item()

  def sample_once(self) -> None:
    """Deterministic DDIM (eta = 0) with x0 clipped to [-1, 1], as wdmjax's ddim_sample."""
    self.net.eval()
    x = self.x_T.clone()
    b = x.shape[0]
    with torch.inference_mode():
      for i, t in enumerate(self.ts):
        a = self.ac[t]
        a_prev = (self.ac[self.ts[i + 1]] if i + 1 < len(self.ts)
                  else torch.tensor(1.0, device=self.dev))
        eps = self.forward(x, torch.full((b,), t, dtype=torch.long, device=self.dev),
                           self.y_sample)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
      x.sum().item()  # waits for the GPU


# ----------------------------------------------------------------------------- driver


def bench_model(name: str, cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
  """Builds both sides of one model, times them alternately, returns every number."""
  print(f"[{name}] building and compiling ...", flush=True)
  jx = JaxBench(cfg, args.batch, args.sample_batch, args.sample_steps)
  out: dict[str, Any] = dict(
    config=cfg, batch=args.batch, sample_batch=args.sample_batch,
    sample_steps=args.sample_steps, params_jax=jx.num_params,
    compile_train_s=jx.compile_train_s, compile_sample_s=jx.compile_sample_s,
    flops_xla=jx.xla_flops,
    flops_matmul_analytic=3.0 * args.batch * jx.fwd_matmul_flops_per_image)
  if name == "dit":
    out["flops_dit_closed_form"] = 3.0 * dit_analytic_flops(cfg, args.batch)

  train_fns: dict[str, Callable[[], None]] = {"jax": jx.train_once}
  sample_fns: dict[str, Callable[[], None]] = {"jax": jx.sample_once}
  if args.sample_steps == 0:  # train step only
    sample_fns, args.sample_repeats = {}, 0
  if not args.skip_torch:
    sched = make_schedule("linear", NUM_TIMESTEPS)
    tb = TorchBench(cfg, args.batch, args.sample_batch, args.sample_steps,
                    np.asarray(sched.alphas_cumprod))
    out["params_torch"] = tb.num_params
    if name == "dit":
      per_block = tb.num_params - jx.num_params + 2 * cfg["width"] * cfg["depth"]  # gammas
      out["params_note"] = (
        f"diffusers' DiT gives each block its own timestep + label embedder "
        f"(AdaLayerNormZero.emb), {per_block // max(cfg['depth'] - 1, 1):,} parameters per "
        "extra copy; wdmjax shares one and adds DiffFit gammas (2 x width per block). Those "
        "embedders act on [B, width] vectors: ~0.2% of the FLOPs at the default size.")
    train_fns["torch"] = tb.train_once
    if sample_fns:
      sample_fns["torch"] = tb.sample_once

  print(f"[{name}] warm-up ...", flush=True)
  alternate(train_fns, args.warmup)
  alternate(sample_fns, min(1, args.sample_repeats))
  print(f"[{name}] timing {args.steps} train steps, {args.sample_repeats} samplings "
        "(alternating) ...", flush=True)
  monitor = CpuMonitor()
  train_busy: dict[str, list[float]] = {}
  sample_busy: dict[str, list[float]] = {}
  train = alternate(train_fns, args.steps, train_busy, extra_rounds=args.steps)
  sample = alternate(sample_fns, args.sample_repeats, sample_busy,
                     extra_rounds=args.sample_repeats)
  out["other_cpu_cores"] = monitor.other_cores()
  for fw in train_fns:
    out[f"train_s_{fw}"], out[f"train_n_{fw}"] = clean_median(train[fw], train_busy[fw])
    out[f"train_all_s_{fw}"], out[f"train_busy_{fw}"] = train[fw], train_busy[fw]
    out[f"sample_s_{fw}"], out[f"sample_n_{fw}"] = clean_median(
      sample.get(fw, []), sample_busy.get(fw, []))
    out[f"sample_all_s_{fw}"], out[f"sample_busy_{fw}"] = sample.get(fw, []), sample_busy.get(
      fw, [])
  if not args.skip_torch:
    out["train_ratio"] = out["train_s_torch"] / out["train_s_jax"]
    out["sample_ratio"] = out["sample_s_torch"] / out["sample_s_jax"]
  return out


def _fmt_params(n: float) -> str:
  return f"{n / 1e6:.2f}M"


def _pair(r: dict[str, Any], key: str, fmt: str) -> str:
  a, b = r.get(f"{key}_jax"), r.get(f"{key}_torch")
  return " / ".join("-" if v is None else format(v, fmt) for v in (a, b))


def print_table(results: dict[str, dict[str, Any]], peak: dict[str, float]) -> None:
  """One column per model, one row per quantity."""
  rows: list[tuple[str, list[str]]] = []
  get = lambda key, fmt: [format(r[key], fmt) if key in r else "-" for r in results.values()]
  rows.append(("params (jax / torch)", [
    " / ".join(_fmt_params(r[k]) if k in r else "-" for k in ("params_jax", "params_torch"))
    for r in results.values()]))
  rows.append(("batch / sample batch", [f"{r['batch']} / {r['sample_batch']}"
                                        for r in results.values()]))
  rows.append(("train step s (jax / torch)", [_pair(r, "train_s", ".3f")
                                              for r in results.values()]))
  rows.append(("  ratio torch/jax (>1: wdmjax faster)", get("train_ratio", ".2f")))
  rows.append((f"DDIM-{next(iter(results.values()))['sample_steps']} s (jax / torch)",
               [_pair(r, "sample_s", ".2f") for r in results.values()]))
  rows.append(("  ratio torch/jax", get("sample_ratio", ".2f")))
  gflop = lambda r, key: f"{r[key] / 1e9:.1f}" if r[key] >= 1e10 else f"{r[key] / 1e9:.3g}"
  rows.append(("GFLOP / train step (XLA cost)", [gflop(r, "flops_xla")
                                                 for r in results.values()]))
  rows.append(("GFLOP / train step (3x fwd matmul)",
               [gflop(r, "flops_matmul_analytic") for r in results.values()]))
  rows.append(("GFLOP / train step (DiT closed form)",
               [gflop(r, "flops_dit_closed_form") if "flops_dit_closed_form" in r else "-"
                for r in results.values()]))
  for fw in ("jax", "torch"):
    if not all(f"train_s_{fw}" in r for r in results.values()):
      continue
    rates = [r["flops_matmul_analytic"] / r[f"train_s_{fw}"] / 1e9 for r in results.values()]
    rows.append((f"{fw}: model GFLOP/s, MFU", [
      f"{g:.1f}, {100 * g / peak[fw]:.0f}%" for g in rates]))
    if fw == "jax":
      rows.append(("jax: XLA-cost GFLOP/s", [
        f"{r['flops_xla'] / r['train_s_jax'] / 1e9:.1f}" for r in results.values()]))
  rows.append(("other processes' CPU use, cores", get("other_cpu_cores", ".2f")))
  rows.append(("calls in medians (train; sample)", [
    "; ".join(" / ".join(str(r[f"{k}_n_{fw}"]) for fw in ("jax", "torch") if f"{k}_n_{fw}" in r)
              for k in ("train", "sample")) for r in results.values()]))
  rows.append(("jax compile s (train / sample)", [
    f"{r['compile_train_s']:.1f} / {r['compile_sample_s']:.1f}" for r in results.values()]))

  w0 = max(len(label) for label, _ in rows)
  widths = [max(len(name), *(len(v[i]) for _, v in rows)) for i, name in enumerate(results)]

  def line(label: str, vals: list[str]) -> str:
    cells = (v.rjust(w) for v, w in zip(vals, widths, strict=True))
    return "  ".join([label.ljust(w0), *cells])

  print(line("", list(results)))
  for label, vals in rows:
    print(line(label, vals))
  print("peak fp32 matmul 2048^2, GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in peak.items())
        + "   (MFU = model FLOPs, 3x forward matmul/conv, per second / this run's jax or "
          "torch peak)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", choices=("dit", "unet", "both"), default="both")
  ap.add_argument("--batch", type=int, default=None, help="train batch (default 32; quick 4)")
  ap.add_argument("--steps", type=int, default=None,
                  help="timed train steps per framework after warm-up (default 10; quick 3)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed train steps per framework")
  ap.add_argument("--sample-steps", type=int, default=None,
                  help="DDIM steps (default 50; 0 skips sampling)")
  ap.add_argument("--sample-batch", type=int, default=None, help="default 32; quick 4")
  ap.add_argument("--sample-repeats", type=int, default=None,
                  help="timed sampling passes per framework (default 3; quick 2)")
  ap.add_argument("--quick", action="store_true", help="tiny models and sizes (smoke test)")
  ap.add_argument("--json", default=None, help="write every number to this path")
  ap.add_argument("--skip-torch", action="store_true", help="time wdmjax alone")
  ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                  help="the peer's device (wdmjax uses JAX's default backend); cuda also "
                       "lets PyTorch use TF32 matmuls, as JAX does on GPUs by default")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                  help="compute dtype of both networks (parameters stay float32)")
  args = ap.parse_args(argv)
  defaults = dict(batch=(4, 32), steps=(3, 10), sample_steps=(5, 50), sample_batch=(4, 32),
                  sample_repeats=(2, 3))
  for key, (quick, full) in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, quick if args.quick else full)
  if torch is None and not args.skip_torch:
    ap.error("PyTorch is not installed: pip install -e '.[bench]' or pass --skip-torch")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  global TORCH_DEVICE
  args = parse_args(argv)
  # Process-wide, so both frameworks run with it; WDMJAX_HOST_MEMORY=off runs without.
  host_memory = keep_host_memory()
  TORCH_DEVICE = args.device
  if torch is not None and args.device == "cpu":
    torch.set_num_threads(2)
  elif torch is not None:
    torch.set_float32_matmul_precision("high")
  env = dict(platform=platform.platform(), cpu_count=os.cpu_count(), jax=jax.__version__,
             backend=jax.default_backend(), xla_flags=os.environ.get("XLA_FLAGS", ""),
             torch=None if torch is None else torch.__version__,
             torch_threads=None if torch is None else torch.get_num_threads(),
             host_memory=host_memory)
  print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)

  def measure_peak() -> dict[str, float]:
    peak = {"jax": jax_matmul_gflops()}
    if not args.skip_torch:
      peak["torch"] = torch_matmul_gflops()
    return peak

  peaks = [measure_peak()]
  cfgs = model_configs(args.quick)
  if args.dtype != "float32":
    cfgs = {k: {**v, "dtype": args.dtype} for k, v in cfgs.items()}
  names = ["dit", "unet"] if args.model == "both" else [args.model]
  results = {name: bench_model(name, cfgs[name], args) for name in names}
  peaks.append(measure_peak())
  # The best rate seen in this run (start and end) is the peak MFU is measured against.
  peak = {k: max(p[k] for p in peaks) for k in peaks[0]}

  print()
  print_table(results, peak)
  summary = "; ".join(
    f"{n}: train torch/jax {r['train_ratio']:.2f}x, DDIM torch/jax {r['sample_ratio']:.2f}x"
    if "train_ratio" in r else f"{n}: train {r['train_s_jax']:.3f} s, DDIM "
    f"{r['sample_s_jax']:.2f} s (jax only)" for n, r in results.items())
  for n, r in results.items():
    if "params_note" in r:
      print(f"note ({n} params): {r['params_note']}")
  print(f"summary (>1: wdmjax faster): {summary}")
  busy = max(r["other_cpu_cores"] for r in results.values())
  if busy >= BUSY_CORES:
    print(f"WARNING: other processes used up to {busy:.2f} of {os.cpu_count()} cores during "
          f"the timings. Medians leave out calls with >= {BUSY_CORES} busy cores while at "
          "least half are left; 2-thread numbers (PyTorch's above all) from busy calls are "
          "not meaningful. Rerun when idle.")

  report = dict(env=env, peak_gflops=peak, peak_gflops_runs=peaks, args=vars(args),
                results=results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2, default=str)
  return report


if __name__ == "__main__":
  main()
