"""The training loop: data -> jitted step -> metrics, sample grids and Orbax checkpoints.

`train(cfg, workdir)` resumes automatically from the newest intact checkpoint in `workdir`
(metrics.jsonl is cut back to it), saves every `train.ckpt_every` steps and at the end, and
on SIGTERM or Ctrl-C saves the current step and raises `wdmjax.errors.Interrupted`, so no
finished step is lost and no caller mistakes a stopped run for a finished one.

Every step reports whether its loss, gradient norm and new weights are finite; the host
reads the flag with the step's metrics (one step late, so no step waits for it) and always
before a checkpoint or a sample grid is written. The first non-finite step stops the run
with a one-line error: nothing of it or after it is saved, and the checkpoints already
saved (all of finite states) are kept, so a rerun with a lower `train.lr` continues from
the newest of them.

The progress bar counts completed steps, not dispatched ones: the loop keeps one step in
flight (the next step is queued before the previous one's metrics are read), so the device
never waits for the host and the bar advances at the rate steps really finish. Logged
metrics are means over the steps since the previous log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable

import chex
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from wdmjax.data import InputPipeline, load_source, shard_batch
from wdmjax.errors import Interrupted, WdmjaxError, check
from wdmjax.train.checkpoint import Checkpointer
from wdmjax.train.derived import setup
from wdmjax.train.images import save_grid
from wdmjax.train.sampling import sample_images
from wdmjax.train.sharding import (
  batch_axes,
  local_mesh,
  make_mesh,
  process_batch_rows,
  state_shardings,
  to_host,
)
from wdmjax.train.state import TrainState, create_train_state
from wdmjax.train.step import LossFn, make_train_step
from wdmjax.workdir import Workdir

Log = Callable[[str], None]


def _quiet(*_args, **_kwargs) -> None:
  pass


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


def init_state(cfg: ml_collections.ConfigDict, mesh: Mesh,
               params: chex.ArrayTree | None = None) -> TrainState:
  """A step-0 state laid out on the mesh (FSDP-sharded where the mesh has an `fsdp` axis,
  replicated otherwise): `params` (e.g. a base model's, for fine-tuning, or the trainable
  part of one) with a fresh optimizer and EMA, or new parameters from `train.seed`. Fresh
  parameters, the EMA and the optimizer state are created in place on their devices, so
  they never exist whole on one device; given `params` pass through each host's memory
  once."""
  su = setup(cfg)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))

  def init(given):
    return create_train_state(su.init_params(init_rng) if given is None else given,
                              su.optimizer, state_rng)

  if params is not None:  # may live on other devices (a base loaded on one): the jit places
    params = jax.device_get(params)  # this process's copy onto the mesh
  shardings = state_shardings(jax.eval_shape(init, params), mesh, cfg.mesh.fsdp_min_size)
  return jax.jit(init, out_shardings=shardings)(params)


class _Interval:
  """Metrics of the completed steps since the last log, averaged when logged."""

  def __init__(self):
    self.rows: list[dict[str, float]] = []

  def add(self, metrics: dict) -> None:
    self.rows.append(metrics)

  def mean(self) -> dict[str, float]:
    out = {k: float(np.mean([r[k] for r in self.rows])) for k in self.rows[-1]}
    self.rows = []
    return out


def train(cfg: ml_collections.ConfigDict, workdir: str | Workdir, *,
          loss_fn: LossFn | None = None, init_params: chex.ArrayTree | None = None,
          frozen_params: chex.ArrayTree | None = None,
          combine: Callable[[chex.ArrayTree, chex.ArrayTree], chex.ArrayTree] | None = None,
          progress: bool = True, log: Log | None = None) -> TrainState:
  """Trains (or resumes) the configured model in `workdir`; returns the final state.

  Args:
    cfg: a validated config (see `wdmjax.configs`).
    workdir: checkpoints, metrics.jsonl, samples/ and config.json (see `wdmjax.workdir.Workdir`);
      resumed if it has a checkpoint.
    loss_fn: `(params, batch, rng) -> (loss, metrics)`; default: the configured diffusion
      loss. Methods (WDM, ...) pass their own.
    init_params: start from these parameters (fine-tuning a base model) instead of a fresh
      initialisation; ignored when the workdir already has a checkpoint.
    frozen_params, combine: parameter-efficient fine-tuning: `init_params` is then the
      trainable part only, the state (optimizer, EMA, checkpoints) holds nothing else, and
      the network runs on `combine(trainable, frozen_params)`.
    progress: show a progress bar of completed steps.
    log: where one-line messages go (default: nowhere).
  """
  t0 = time.time()
  wd = Workdir(workdir)
  tc = cfg.train
  mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  check(tc.batch_size % mesh.size == 0,
        f"train.batch_size: expected a multiple of the {mesh.size} devices of the mesh, got "
        f"{tc.batch_size}")
  multi = jax.process_count() > 1
  is_main = jax.process_index() == 0
  log = (log or _quiet) if is_main else _quiet
  su = setup(cfg)
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
  check(su.num_classes == 0 or data.num_classes <= su.num_classes,
        f"model.num_classes: expected at least the {data.num_classes} classes of "
        f"{cfg.data.name!r}, got {su.num_classes}")
  partial = frozen_params is not None
  check(not partial or (init_params is not None and combine is not None),
        "frozen_params: expected init_params (the trainable part) and combine with it")
  if is_main:  # only after the model and the data were accepted: no half-made workdir
    wd.write_config(cfg)
  loss_fn = loss_fn or su.loss()
  state = init_state(cfg, mesh, init_params)
  step_fn = make_train_step(loss_fn, su.optimizer, tc.ema_decay, mesh, frozen=frozen_params,
                            combine=combine,
                            state_sharding=jax.tree.map(lambda x: x.sharding, state),
                            fsdp_min_size=cfg.mesh.fsdp_min_size)
  full = (lambda p: combine(p, frozen_params)) if partial else (lambda p: p)
  ckpt = Checkpointer(wd, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint, log=log)
  if ckpt.latest_step() is not None:
    restored, state = ckpt.restore_step(state)
    log(f"resumed from {ckpt.step_dir(restored)}")
  start = int(state.step)
  if is_main:  # rows of steps after the checkpoint are replayed: drop them, never repeat
    wd.truncate_metrics(start)
  bar = tqdm(total=tc.steps, initial=start, disable=not (progress and is_main),
             desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
  interval = _Interval()

  def complete(done: int, metrics: dict) -> None:
    """Books the finished step `done` (reading its metrics waits for it); stops the run at
    a non-finite step."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not m.pop("finite"):
      if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])) and (
          ckpt.latest_step() == done - 1):
        # the loss and gradient of step `done` are those of the weights saved at done - 1
        # on a fixed batch: they are bad whatever the learning rate, so no rerun may resume
        # from them (only non-finite new weights depend on the rate)
        ckpt.move_aside(done - 1, "diverged")
      last = ckpt.latest_step()
      kept = (f"the checkpoints up to step {last} are kept; lower train.lr (now "
              f"{tc.lr:g}) and rerun to continue from step {last}" if last is not None else
              f"nothing was saved; lower train.lr (now {tc.lr:g})")
      bad = ", ".join(f"{name} {m[k]:.4g}" for k, name in (("loss", "loss"),
                      ("grad_norm", "gradient norm")) if not np.isfinite(m[k]))
      raise WdmjaxError(f"train.lr: step {done} diverged ({bad or 'the new weights'} not "
                        f"finite): {kept}")
    if tc.log_every:
      interval.add(m)
    bar.update(1)
    if tc.log_every and (done % tc.log_every == 0 or done == tc.steps):
      m = interval.mean()
      if is_main:
        wd.append_metrics(done, m, time.time())
      bar.set_postfix(loss=f"{m['loss']:.4f}")

  # One process alone must never stop: the others would wait for it in the next collective.
  # With several processes a SIGTERM (a preemption notice) goes to JAX's preemption service,
  # which agrees on a step at which all of them save and stop.
  stop = StopRequest(signals=() if multi else (signal.SIGTERM, signal.SIGINT))
  step = start
  pending = None  # (step number, metrics) of the step in flight
  try:
    with stop.installed():
      for step in range(start, tc.steps):
        if stop.signum is not None or (multi and _preempted(step)):
          stop.signum = stop.signum or signal.SIGTERM
          break
        batch = shard_batch(data.batch(step, rows), mesh, batch_axes(mesh))
        state, metrics = step_fn(state, batch)
        if pending is not None:
          complete(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        save = bool(tc.ckpt_every) and done % tc.ckpt_every == 0
        grid = bool(tc.sample_every) and done % tc.sample_every == 0
        if save or grid:  # only a state known to be finite is written
          complete(*pending)
          pending = None
        if save:
          ckpt.save(done, state)
        if grid:
          _write_samples(cfg, state, wd.sample_grid(done), full)
      if pending is not None:
        complete(*pending)
        pending = None
      step = int(state.step)
      ckpt.save(step, state)
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
    wd.write_json(Workdir.SUMMARY, {"step": step, "seconds": time.time() - t0,
                                    "processes": jax.process_count(),
                                    "mesh": dict(mesh.shape),
                                    "stopped_by_signal": stop.signum})
  if stop.signum is not None:
    raise Interrupted(stop.signum, step, ckpt.directory)
  return state


def _preempted(step: int) -> bool:
  """Whether every process has reached the step agreed on after a preemption notice."""
  try:
    return multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
    return False


def _write_samples(cfg, state: TrainState, path: str, full=lambda p: p) -> str | None:
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
  imgs = sample_images(cfg, params, jax.random.PRNGKey(cfg.sample.seed), cfg.sample.num)
  k = setup(cfg).num_classes
  return save_grid(imgs, path, nrow=k if k and cfg.sample.num % k == 0 else None, upscale=2)


def write_final_samples(cfg, state: TrainState, workdir: str | Workdir) -> str | None:
  """workdir/samples/final.png; reuses the periodic grid of the last step when there is one.
  Every process calls it (see `_write_samples`); process 0 writes."""
  wd = Workdir(workdir)
  final = wd.sample_grid("final")
  step = int(state.step)
  periodic = wd.sample_grid(step)
  made = bool(cfg.train.sample_every) and step % cfg.train.sample_every == 0
  if jax.process_count() > 1 and made:  # decided alike on every process: no lone collective
    if jax.process_index() == 0:
      shutil.copyfile(periodic, final)
    return final
  if os.path.exists(periodic):
    shutil.copyfile(periodic, final)
    return final
  return _write_samples(cfg, state, final)


def load_trained(workdir: str | Workdir, ema: bool = True
                 ) -> tuple[ml_collections.ConfigDict, chex.ArrayTree]:
  """(config, params) of the newest checkpoint of a trained workdir (EMA weights by default).

  Only the wanted weights are read, onto this process's first device: the optimizer state
  and the other copy of the weights are never allocated. A parameter-efficient fine-tune
  holds only its trainable part: load it with `wdmjax.runs.load_model`.
  """
  wd = Workdir(workdir)
  cfg = wd.read_config()
  check(not wd.exists(Workdir.PEFT),
        f"workdir: {wd.path!r} holds a fine-tune (its {Workdir.PEFT}); load it onto its base "
        f"with wdmjax.runs.load_model")
  return cfg, load_params(wd, cfg, "ema_params" if ema else "params")


def _warn(message: str) -> None:
  print(f"wdmjax: warning: {message}", file=sys.stderr)


def load_params(workdir: str | Workdir, cfg: ml_collections.ConfigDict, part: str,
                like: chex.ArrayTree | None = None, log: Log | None = None,
                step: int | None = None) -> chex.ArrayTree:
  """The `part` of the newest intact checkpoint (or of `step`) (`params` or `ema_params`),
  shaped like `like` (default: the config's model parameters), on this process's first
  device. A damaged newer checkpoint is skipped, and said so through `log` (default:
  stderr)."""
  shapes = setup(cfg).abstract_params() if like is None else like
  device = jax.sharding.SingleDeviceSharding(local_mesh().devices.flat[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        shapes)
  if not Workdir(workdir).has_checkpoint():
    raise WdmjaxError(f"workdir: no checkpoint found in {Workdir(workdir).checkpoint_dir!r}")
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, writable=False,
                      log=log or _warn)
  try:
    return ckpt.restore_part({part: target}, step)[part]
  finally:
    ckpt.close()
