"""The training loop: data -> jitted step -> metrics, sample grids and Orbax checkpoints.

`train(cfg, workdir)` resumes automatically from the newest checkpoint in `workdir`, saves
every `train.ckpt_every` steps and at the end, and on SIGTERM or Ctrl-C saves the current
step before it returns, so no finished step is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable

import chex
import jax
import ml_collections
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from wdmjax.data import InputPipeline, load_source, shard_batch
from wdmjax.diffusion import diffusion_loss
from wdmjax.errors import WdmjaxError, check
from wdmjax.models import init_params
from wdmjax.train.checkpoint import Checkpointer
from wdmjax.train.config import from_json, to_json
from wdmjax.train.images import save_grid
from wdmjax.train.metrics import MetricsWriter
from wdmjax.train.sampling import (
  apply_fn_for,
  model_from_config,
  num_classes,
  sample_images,
  schedule_from_config,
)
from wdmjax.train.sharding import (
  batch_axes,
  local_mesh,
  make_mesh,
  process_batch_rows,
  state_shardings,
  to_host,
)
from wdmjax.train.state import TrainState, create_train_state, make_optimizer
from wdmjax.train.step import LossFn, make_train_step


class StopRequest:
  """Turns SIGTERM and SIGINT (or the given `signals`) into a flag that the loop checks
  between steps."""

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
    self.signum: int | None = None
    self.signals = signals

  def __call__(self, signum, frame):
    self.signum = signum

  @contextlib.contextmanager
  def installed(self):
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    old = {s: signal.signal(s, self) for s in self.signals}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json (atomically); refuses a workdir trained with another model."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      old = from_json(f.read())
    for section in ("model", "diffusion", "data"):
      keys = ("resolution", "channels") if section == "data" else None
      a, b = old[section].to_dict(), cfg[section].to_dict()
      if keys:
        a, b = {k: a[k] for k in keys}, {k: b[k] for k in keys}
      check(a == b, f"workdir: {workdir!r} holds a run with a different {section} config "
                    f"({a} != {b}); use a new --workdir")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(to_json(cfg))
  os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  check(os.path.isfile(path), f"--workdir: no trained run in {workdir!r} (no config.json)")
  with open(path) as f:
    return from_json(f.read())


def init_state(cfg: ml_collections.ConfigDict, model, tx, mesh,
               params: chex.ArrayTree | None = None) -> TrainState:
  """A step-0 state laid out on the mesh (FSDP-sharded where the mesh has an `fsdp` axis,
  replicated otherwise): `params` (e.g. a base model's, for fine-tuning) with a fresh
  optimizer and EMA, or new parameters from `train.seed`. Fresh parameters, the EMA and
  the optimizer state are created in place on their devices, so they never exist whole on
  one device; given `params` pass through each host's memory once."""
  res, ch = cfg.data.resolution, cfg.data.channels
  rng = jax.random.PRNGKey(cfg.train.seed)
  init_rng, state_rng = jax.random.split(rng)

  def init(given):
    if given is not None:
      return create_train_state(given, tx, state_rng)
    x = jax.numpy.zeros((1, res, res, ch), jax.numpy.float32)
    t = jax.numpy.zeros((1,), jax.numpy.int32)
    y = jax.numpy.zeros((1,), jax.numpy.int32) if num_classes(cfg) else None
    fresh = model.init({"params": init_rng, "dropout": init_rng}, x, t, y)["params"]
    return create_train_state(fresh, tx, state_rng)

  if params is not None:  # may live on other devices (a base loaded on one): the jit places
    params = jax.device_get(params)  # this process's copy onto the mesh
  shardings = state_shardings(jax.eval_shape(init, params), mesh, cfg.mesh.fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(params)


def default_loss(cfg: ml_collections.ConfigDict, model) -> LossFn:
  """The plain diffusion loss of the configured objective (with label dropout for CFG)."""
  k = num_classes(cfg)
  p = float(cfg.model.get("class_dropout_prob", 0.0) or 0.0) if k else 0.0
  loss = diffusion_loss(apply_fn_for(model), schedule_from_config(cfg), cfg.diffusion.objective,
                        class_dropout_prob=p, null_label=-1 if p > 0 else None)
  if k:
    return loss

  def unconditional(params, batch, rng):  # never feed labels to an unconditional model
    return loss(params, {"image": batch["image"]}, rng)

  return unconditional


def train(cfg: ml_collections.ConfigDict, workdir: str, *, loss_fn: LossFn | None = None,
          init_params: chex.ArrayTree | None = None,
          frozen_params: chex.ArrayTree | None = None,
          combine: Callable[[chex.ArrayTree, chex.ArrayTree], chex.ArrayTree] | None = None,
          progress: bool = True, log=print) -> TrainState:
  """Trains (or resumes) the configured model in `workdir`; returns the final state.

  Args:
    cfg: a validated config (see `train.config`).
    workdir: checkpoints, metrics.jsonl, samples/ and config.json; resumed if it has a
      checkpoint.
    loss_fn: `(params, batch, rng) -> (loss, metrics)`; default: the configured diffusion
      loss. Methods (WDM, ...) pass their own.
    init_params: start from these parameters (fine-tuning a base model) instead of a fresh
      initialisation; ignored when the workdir already has a checkpoint.
    frozen_params, combine: parameter-efficient fine-tuning (see `wdmjax.peft.finetune`):
      `init_params` is then the trainable part only, the state (optimizer, EMA, checkpoints)
      holds nothing else, and the network runs on `combine(trainable, frozen_params)`.
    progress: show a progress bar.
    log: where one-line messages go.
  """
  t0 = time.time()
  tc = cfg.train
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  check(tc.batch_size % mesh.size == 0,
        f"train.batch_size: expected a multiple of the {mesh.size} devices of the mesh, got "
        f"{tc.batch_size}")
  multi = jax.process_count() > 1
  is_main = jax.process_index() == 0
  log_main = log if is_main else (lambda *a, **k: None)
  model = model_from_config(cfg)
  rows = process_batch_rows(mesh, tc.batch_size)
  if multi:  # embedded sets are built on first use: process 0 first, then the others find
    # it built (shared data dir) or build their own (a host's local disk), never racing
    if is_main:
      load_source(cfg.data.name, cfg.data.split, cfg.data.data_dir)
    multihost_utils.sync_global_devices("wdmjax: data set prepared")
  data = InputPipeline(cfg.data.name, batch_size=tc.batch_size, resolution=cfg.data.resolution,
                       channels=cfg.data.channels, seed=tc.seed, labels=cfg.data.labels,
                       split=cfg.data.split, data_dir=cfg.data.data_dir,
                       process_index=0, process_count=1, in_memory=cfg.data.in_memory)
  k = num_classes(cfg)
  check(k == 0 or data.num_classes <= k,
        f"model.num_classes: expected at least the {data.num_classes} classes of "
        f"{cfg.data.name!r}, got {k}")
  if is_main:  # only after the model and the data were accepted: no half-made workdir
    write_config(cfg, workdir)
  tx = make_optimizer(tc.lr, tc.warmup_steps, tc.weight_decay, tc.grad_clip)
  partial = frozen_params is not None
  check(not partial or (init_params is not None and combine is not None),
        "frozen_params: expected init_params (the trainable part) and combine with it")
  loss_fn = loss_fn or default_loss(cfg, model)
  state = init_state(cfg, model, tx, mesh, init_params)
  step_fn = make_train_step(loss_fn, tx, tc.ema_decay, mesh, frozen=frozen_params,
                            combine=combine,
                            state_sharding=jax.tree.map(lambda x: x.sharding, state),
                            fsdp_min_size=cfg.mesh.fsdp_min_size)
  full = (lambda p: combine(p, frozen_params)) if partial else (lambda p: p)
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(state, start)
    log_main(f"resumed from {ckpt.directory}/{start}")
  start = int(state.step)
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), enabled=is_main)
  bar = tqdm(total=tc.steps, initial=start, disable=not (progress and is_main),
             desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
  # One process alone must never stop: the others would wait for it in the next collective.
  # With several processes a SIGTERM (a preemption notice) goes to JAX's preemption service,
  # which agrees on a step at which all of them save and stop.
  stop = StopRequest(signals=() if multi else (signal.SIGTERM, signal.SIGINT))
  step = start
  try:
    with stop.installed():
      for step in range(start, tc.steps):
        if stop.signum is not None or (multi and _preempted(step)):
          stop.signum = stop.signum or signal.SIGTERM
          break
        batch = shard_batch(data.batch(step, rows), mesh, batch_axes(mesh))
        state, metrics = step_fn(state, batch)
        done = step + 1
        bar.update(1)
        if tc.log_every and (done % tc.log_every == 0 or done == tc.steps):
          m = jax.device_get(metrics)
          writer.write(done, m)
          bar.set_postfix(loss=f"{float(m['loss']):.4f}")
          check(bool(jax.numpy.isfinite(m["loss"])),
                f"train: loss became {float(m['loss'])} at step {done}; lower train.lr")
        if tc.ckpt_every and done % tc.ckpt_every == 0:
          ckpt.save(done, state)
        if tc.sample_every and done % tc.sample_every == 0:
          _write_samples(cfg, model, state, os.path.join(workdir, "samples", f"{done:07d}.png"),
                         full)
      step = int(state.step)
      ckpt.save(step, state)
      if stop.signum is not None:
        log_main(f"stopped by signal {stop.signum} at step {step}; checkpoint saved, "
                 f"rerun the same command to resume")
  except WdmjaxError:
    raise
  except jax.errors.JaxRuntimeError as e:
    if not multi:
      raise
    raise WdmjaxError(
      f"train: a collective with the other {jax.process_count() - 1} processes failed near "
      f"step {step} ({str(e).splitlines()[0][:200]}); another process of this run has "
      f"probably died, see its log. Restart every process with the same command to resume "
      f"from the last checkpoint in {ckpt.directory}") from e
  finally:
    bar.close()
    ckpt.close()
  if is_main:
    with open(os.path.join(workdir, "train_summary.json"), "w") as f:
      json.dump({"step": step, "seconds": time.time() - t0, "processes": jax.process_count(),
                 "mesh": dict(mesh.shape)}, f)
  return state


def _preempted(step: int) -> bool:
  """Whether every process has reached the step agreed on after a preemption notice."""
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
    return False


def _write_samples(cfg, model, state: TrainState, path: str, full=lambda p: p) -> str | None:
  """Samples a grid into `path` on process 0. Every process must call it: with several
  processes the (possibly sharded) weights are first gathered to each host. Latent models
  (4 channels) get no grid: a picture needs the VAE's decoder, which is not part of wdmjax."""
  if cfg.data.channels not in (1, 3):
    return None
  params = state.ema_params if cfg.sample.ema else state.params
  if jax.process_count() > 1:
    params = to_host(params)
    if jax.process_index() != 0:
      return None
  params = full(params)
  imgs = sample_images(cfg, model, params, jax.random.PRNGKey(cfg.sample.seed), cfg.sample.num)
  k = num_classes(cfg)
  return save_grid(imgs, path, nrow=k if k and cfg.sample.num % k == 0 else None, upscale=2)


def write_final_samples(cfg, model, state: TrainState, workdir: str) -> str | None:
  """workdir/samples/final.png; reuses the periodic grid of the last step when there is one.
  Every process calls it (see `_write_samples`); process 0 writes."""
  final = os.path.join(workdir, "samples", "final.png")
  step = int(state.step)
  periodic = os.path.join(workdir, "samples", f"{step:07d}.png")
  made = bool(cfg.train.sample_every) and step % cfg.train.sample_every == 0
  if jax.process_count() > 1 and made:  # decided alike on every process: no lone collective
    if jax.process_index() == 0:
      shutil.copyfile(periodic, final)
    return final
  if os.path.exists(periodic):
    shutil.copyfile(periodic, final)
    return final
  return _write_samples(cfg, model, state, final)


def load_trained(workdir: str, ema: bool = True) -> tuple[ml_collections.ConfigDict, object,
                                                          chex.ArrayTree]:
  """(config, model, params) of the newest checkpoint in `workdir` (EMA weights by default).

  A parameter-efficient fine-tune (a workdir with peft.json) is applied onto its base.
  """
  if os.path.exists(os.path.join(workdir, "peft.json")):
    from wdmjax.peft.finetune import load_finetuned  # peft builds on this module

    return load_finetuned(workdir, ema)
  cfg = read_config(workdir)
  model = model_from_config(cfg)
  # Only the wanted weights are read, onto this process's first device: the optimizer
  # state and the other copy (3/4 of a checkpoint) are never allocated.
  shapes = jax.eval_shape(lambda r: init_params(model, r), jax.random.PRNGKey(0))
  device = jax.sharding.SingleDeviceSharding(local_mesh().devices.flat[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        shapes)
  part = "ema_params" if ema else "params"
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    params = ckpt.restore_part({part: target})[part]
  finally:
    ckpt.close()
  return cfg, model, params
