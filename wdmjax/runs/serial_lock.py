"""A diffusion model locked by a Deep Serial Number (`wdmjax serial lock` / `serial sample`):
fine-tuned from a base so that it generates only with its serial number's stamp in the
network's input at every step (blank images otherwise). Its workdir is a training workdir
plus `lock.json` (sealed by the owner key, owner-only: the nonce, the serial number, the
stamp, the base, the lock weight); the serial comes from the owner key, as a student's does
(`wdmjax.runs.serial`).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check, check_number, check_seed, show
from wdmjax.files import check_file_path, write_json
from wdmjax.keys import key_id, owner_key, seal
from wdmjax.records import field, read_json_file
from wdmjax.runs.model import load_model
from wdmjax.runs.serial import (
  DEFAULT_STAMP,
  LOCK_JSON,
  LOCK_METHOD,
  MAX_SAMPLES,
  PRIVATE,
  _check_nonce,
  _foreign,
  _hex,
  _sealed_record,
  _stamp_field,
)
from wdmjax.serial import (
  StampSpec,
  derive_serials,
  format_serial,
  locked_loss,
  new_nonce,
  parse_serial,
  serial_input,
  stamp_overlay,
)
from wdmjax.train import sample_images, save_grid, setup
from wdmjax.train import train as _train
from wdmjax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class LockReport:
  workdir: str
  serial: str
  step: int
  seconds: float
  key_id: str


def _lock_stamp(wd: Workdir, rec: dict | None = None) -> StampSpec:
  """The stamp in lock.json (or its record `rec`), checked; no key needed: the stamp's
  place and size are not secret."""
  what = wd.file(LOCK_JSON)
  rec = read_json_file(what) if rec is None else rec
  field(rec, "method", "str", what, choices=[LOCK_METHOD])
  return _stamp_field(rec, what)


def _read_lock(wd: Workdir, key: bytes) -> dict:
  rec, what = _sealed_record(wd, LOCK_JSON, key, f"workdir: {wd.path!r} is not a locked model "
                                                 f"(no {LOCK_JSON})")
  stamp = _lock_stamp(wd, rec)
  nonce = _hex(rec, "nonce", what, 32)
  serial = field(rec, "serial", "str", what)
  check(serial == format_serial(derive_serials(key, nonce, 1, stamp.bits)[0]),
        f"{what}: field 'serial': expected the serial number the owner key derives, got "
        f"another")
  return {"method": LOCK_METHOD, "nonce": nonce, "serial": serial, "stamp": stamp.to_json(),
          "base": field(rec, "base", "str", what, low=1),
          "lock_weight": check_number(field(rec, "lock_weight", "float", what), "lock_weight",
                                      0.0, low_open=True),
          "key_id": rec["key_id"]}


def read_lock(workdir: str | Workdir, key_file: str | os.PathLike | None = None) -> dict:
  """A locked model's lock.json, its seal checked with the owner key: {"serial", "stamp",
  "base", "lock_weight", "nonce", ...}."""
  wd = Workdir(workdir)
  return _read_lock(wd, owner_key(key_file))


def lock(workdir: str | Workdir, base: str | Workdir, *, steps: int = 600, lr: float = 3e-4,
         lock_weight: float | None = None, stamp: StampSpec | None = None,
         key_file: str | os.PathLike | None = None, nonce: str | None = None,
         progress: bool = True, log=None) -> LockReport:
  """Fine-tunes the base diffusion workdir's EMA weights with `serial.locked_loss`: the model
  then generates the task's images only with the serial number's stamp in its input, and
  blank images otherwise. The serial is derived from the owner key (`key_file`, else the
  environment) and a nonce, and kept in lock.json (sealed, owner-only) with the stamp and
  `lock_weight` (defaults: `StampSpec()`, 64 bits, and 1). Pixel-space models only (a latent
  model's stamp would sit in its latents). Resumes an interrupted `workdir` with what its
  lock.json says, with the same key only; other values given are refused. `nonce`: as in
  `issue`."""
  from wdmjax.runs.watermark import embedding_config  # the same fine-tuning config as WDM

  t0 = time.time()
  wd, bwd = Workdir(workdir), Workdir(base)
  check(bwd.has_config(), f"base: expected a trained workdir, got {bwd.path!r}")
  check(bwd.abspath != wd.abspath, "workdir: expected a new directory, not the base itself")
  check_number(lr, "lr", 0.0, low_open=True)
  check(stamp is None or isinstance(stamp, StampSpec),
        f"stamp: expected a StampSpec, got {stamp!r}")
  if lock_weight is not None:
    check_number(lock_weight, "lock_weight", 0.0, low_open=True)
  _check_nonce(nonce)
  resuming = os.path.lexists(wd.file(LOCK_JSON))
  other = _foreign(wd)
  check(resuming or not other,
        f"workdir: expected a new or empty directory (or one being locked), got {wd.path!r}, "
        f"which holds {show(other, 80)} (a model that is not being locked); use a new "
        f"directory")
  bcfg = bwd.read_config()
  check(int(bcfg.data.channels) != 4 and "latents" not in str(bcfg.data.name),
        f"base: expected a pixel-space diffusion model, got a latent one ({bcfg.data.name}, "
        f"{bcfg.data.channels} channels): its stamp would sit in the latents, which no user "
        f"types; lock a pixel-space model")
  key = owner_key(key_file)
  if resuming:
    old = _read_lock(wd, key)
    given = {"lock_weight": lock_weight, "base": bwd.abspath, "nonce": nonce,
             "stamp": None if stamp is None else stamp.to_json()}
    for name, value in given.items():
      check(value is None or value == old[name],
            f"{name}: this workdir is locked with {name} {old[name]!r}; resume it with that "
            f"or use a new workdir")
    nonce, lock_weight, stamp = old["nonce"], old["lock_weight"], StampSpec(**old["stamp"])
  else:
    nonce = nonce or new_nonce()
  stamp = DEFAULT_STAMP if stamp is None else stamp
  lock_weight = 1.0 if lock_weight is None else lock_weight
  cfg = embedding_config(base=base, steps=steps, lr=lr)
  res = int(cfg.data.resolution)
  stamp.check_small(res, res)
  bits = derive_serials(key, nonce, 1, stamp.bits)[0]
  su = setup(cfg)
  loss = locked_loss(su.apply_fn, su.schedule, cfg.diffusion.objective, serial_bits=bits,
                     spec=stamp, class_dropout_prob=su.class_dropout_prob,
                     null_label=su.null_label, lock_weight=lock_weight)
  base_params = None if wd.has_checkpoint() else load_model(base, ema=True).params
  with wd.undo_on_failure():
    write_json(wd.file(LOCK_JSON), seal({
      "method": LOCK_METHOD, "nonce": nonce, "serial": format_serial(bits),
      "stamp": stamp.to_json(), "base": bwd.abspath, "lock_weight": lock_weight}, key),
      PRIVATE)
    state = _train(cfg, wd, loss_fn=loss, init_params=base_params, progress=progress,
                   log=log)
  return LockReport(wd.abspath, format_serial(bits), int(state.step), time.time() - t0,
                    key_id(key))


def locked_samples(workdir: str | Workdir, serial: str | None, num: int, *, seed: int = 0,
                   steps: int | None = None, guidance: float | None = None,
                   labels: np.ndarray | None = None, model=None) -> np.ndarray:
  """`num` samples [num, R, R, C] in [-1, 1] of a diffusion workdir (EMA weights), with the
  stamp of `serial` (hex) in the network's input at every step, or plain when None. The
  stamp's size and corner come from the owner's lock.json when the workdir has one, else the
  default `StampSpec`. `model`: an already loaded `runs.Model` of the workdir."""
  wd = Workdir(workdir)
  spec = _lock_stamp(wd) if os.path.lexists(wd.file(LOCK_JSON)) else StampSpec()
  check(isinstance(num, int) and not isinstance(num, bool) and 1 <= num <= MAX_SAMPLES,
        f"num: expected an integer in [1, {MAX_SAMPLES}], got {num!r}")
  cfg, params = model if model is not None else load_model(wd, ema=True)
  shape = (int(cfg.data.resolution),) * 2 + (int(cfg.data.channels),)
  kw = {}
  if serial is not None:
    overlay, mask = stamp_overlay(parse_serial(serial, spec.bits), spec, shape)
    kw = {"input_transform": serial_input, "transform_args": (overlay, mask)}
  return sample_images(cfg, params, jax.random.PRNGKey(check_seed(seed)), num, steps=steps,
                       guidance_scale=guidance,
                       labels=None if labels is None else jnp.asarray(labels), **kw)


@dataclasses.dataclass(frozen=True)
class LockedSampleResult:
  images: np.ndarray  # [num, R, R, C] in [-1, 1]
  path: str | None
  serial: str | None


def sample(workdir: str | Workdir, num: int = 64, *, serial: str | None = None,
           seed: int = 0, out: str | None = None) -> LockedSampleResult:
  """Samples a (locked) diffusion workdir with `serial`'s stamp, or without one (None);
  written as a grid to `out` (.png) when given. Classes cycle 0, 1, ... as in `runs.sample`."""
  check(out is None or str(out).lower().endswith(".png"),
        f"out: expected a .png path, got {out!r}")
  if out is not None:
    check_file_path(out, "out")
  images = locked_samples(workdir, serial, num, seed=seed)
  if out is not None:
    save_grid(images, out, nrow=10 if num % 10 == 0 else None, upscale=2)
  return LockedSampleResult(images, out, serial)

