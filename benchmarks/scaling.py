"""Train-step throughput over a (data, fsdp) mesh of forced CPU devices and of processes.

  python benchmarks/scaling.py [--model dit|mnist5k] [--steps 10] [--json out.json]

Each setting runs in fresh processes (the device count is fixed when JAX starts): 1 device;
2 and 4 devices as data x fsdp meshes 2x1, 1x2, 4x1, 2x2 and 1x4; and 2 processes of 1 device
on localhost (gloo collectives), as data 2x1 and fsdp 1x2. Every one times the same global
batch through wdmjax's own sharded train step (make_train_step with the state's shardings),
after a compile and two warm-up steps, and reports images per second and the step's share of
one device's throughput. On this 2-core machine the forced devices split the same two cores:
the table says what the partitioning costs or gains, not what more chips would give.
Warnings that XLA prints while compiling (e.g. "involuntary full rematerialization") are
counted per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (processes, devices per process, data, fsdp)
SETTINGS = {
  "1 device": (1, 1, 1, 1),
  "2 devices, data 2": (1, 2, 2, 1),
  "2 devices, fsdp 2": (1, 2, 1, 2),
  "4 devices, data 4": (1, 4, 4, 1),
  "4 devices, data 2 x fsdp 2": (1, 4, 2, 2),
  "4 devices, fsdp 4": (1, 4, 1, 4),
  "2 processes, data 2": (2, 1, 2, 1),
  "2 processes, fsdp 2": (2, 1, 1, 2),
}
MODELS = {
  # the DiT of train_step.py: 6 blocks x 384, patch 4, 32x32x3, 10 classes
  "dit": dict(model=dict(name="dit", patch_size=4, width=384, depth=6, num_heads=6,
                         num_classes=10, class_dropout_prob=0.1, learn_sigma=False),
              data=dict(resolution=32, channels=3), batch=32),
  # the demo's DiT: 6 blocks x 128, patch 4, 28x28x1
  "mnist5k": dict(model=dict(name="dit", patch_size=4, width=128, depth=6, num_heads=4,
                             num_classes=10, class_dropout_prob=0.1, learn_sigma=False),
                  data=dict(resolution=28, channels=1), batch=48),
}
WARNING = re.compile(r"involuntary full rematerialization|rematerializ", re.I)


def worker(spec: dict, process_id: int) -> dict:
  """One process of one setting: times `steps` train steps; returns its numbers."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding

  from wdmjax.configs import load_config
  from wdmjax.train import setup
  from wdmjax.train.distributed import initialize
  from wdmjax.train.host_memory import keep_host_memory
  from wdmjax.train.loop import init_state
  from wdmjax.train.sharding import batch_axes, make_mesh
  from wdmjax.train.step import make_train_step

  keep_host_memory()  # as the CLI does, before JAX starts
  if spec["processes"] > 1:
    initialize(spec["coordinator"], spec["processes"], process_id, heartbeat_timeout=30)
  m = MODELS[spec["model"]]
  sets = [f"model.{k}={v!r}" for k, v in m["model"].items()]
  sets += [f"data.{k}={v!r}" for k, v in m["data"].items()]
  sets += [f"train.batch_size={m['batch']}", f"mesh.data={spec['data']}",
           f"mesh.fsdp={spec['fsdp']}", "train.warmup_steps=0"]
  cfg = load_config("mnist5k_dit", sets)
  su = setup(cfg)
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  state = init_state(cfg, mesh)
  step = make_train_step(su.loss(), su.optimizer, cfg.train.ema_decay, mesh,
                         state_sharding=jax.tree.map(lambda x: x.sharding, state),
                         fsdp_min_size=cfg.mesh.fsdp_min_size)
  b, r, c = m["batch"], m["data"]["resolution"], m["data"]["channels"]
  sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes(mesh)))
  key = jax.random.PRNGKey(0)
  host = {"image": jax.random.uniform(key, (b, r, r, c), jnp.float32, -1, 1),
          "label": jax.random.randint(key, (b,), 0, 10)}
  batch = {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
           for k, v in host.items()}
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - t0) / spec["steps"]
  return {"process": jax.process_index(), "devices": jax.device_count(),
          "step_seconds": seconds, "images_per_second": b / seconds,
          "first_step_seconds": compile_s, "loss": float(metrics["loss"])}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_setting(name: str, model: str, steps: int) -> dict:
  processes, devices, data, fsdp = SETTINGS[name]
  spec = {"model": model, "steps": steps, "processes": processes, "data": data, "fsdp": fsdp,
          "coordinator": f"localhost:{_free_port()}"}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip())
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec), str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    if p.returncode != 0:
      raise RuntimeError(f"{name}: a worker failed:\n{err[-3000:]}")
  results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  warnings = sum(len(WARNING.findall(err)) for _, err in outs)
  first = [line for _, err in outs for line in err.splitlines() if WARNING.search(line)][:1]
  slowest = max(results, key=lambda r: r["step_seconds"])
  return {"processes": processes, "devices": processes * devices, "data": data, "fsdp": fsdp,
          "step_seconds": slowest["step_seconds"],
          "images_per_second": slowest["images_per_second"],
          "first_step_seconds": slowest["first_step_seconds"], "loss": slowest["loss"],
          "remat_warnings": warnings, "first_warning": first[0][:300] if first else None}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=list(MODELS), default="dit")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--only", nargs="*", default=None, help="settings by name")
  ap.add_argument("--json", default=None)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("process_id", nargs="?", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker is not None:
    print(json.dumps(worker(json.loads(args.worker), args.process_id)), flush=True)
    if json.loads(args.worker)["processes"] > 1:
      from wdmjax.train.distributed import exit_run
      exit_run(0)
    return
  import platform
  res = {"model": args.model, "batch": MODELS[args.model]["batch"], "steps": args.steps,
         "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
         "settings": {}}
  print(f"{'setting':<28} {'step s':>8} {'img/s':>8} {'vs 1':>6} {'first s':>8}  remat warnings")
  for name in SETTINGS:
    if args.only is not None and name not in args.only:
      continue
    r = run_setting(name, args.model, args.steps)
    res["settings"][name] = r
    one = res["settings"].get("1 device")
    ratio = f"{r['images_per_second'] / one['images_per_second']:.2f}" if one else "-"
    print(f"{name:<28} {r['step_seconds']:8.3f} {r['images_per_second']:8.1f} {ratio:>6} "
          f"{r['first_step_seconds']:8.1f}  {r['remat_warnings']}", flush=True)
  for name, r in res["settings"].items():
    if r["first_warning"]:
      print(f"{name}: {r['first_warning']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
