"""Deep Serial Number on workdirs: a private `teacher`, students `issue`d to customers (one
serial number each), their `evaluate`-ion; and a serial-number-`lock`-ed diffusion model.

A serial workdir holds:
  dsn.json          the data, the stamp, the teacher's and the students' settings
  teacher.npz       the private teacher (owner-only permissions)
  serials.json      customer -> serial number, and the key they were drawn from (owner-only)
  students/customer_NNN.npz   what each customer receives
  issue.json        per customer: accuracy with the valid serial, raw, with invalid ones
A locked diffusion workdir is a training workdir (fine-tuned from a base) plus `lock.json`
(the serial number and the stamp, owner-only). Evaluation takes the serial numbers from the
owner's files or from the caller, never from anything shipped with a student.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import secrets
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.data import labelled_split
from wdmjax.errors import check, check_number, check_seed
from wdmjax.files import atomic_write, check_file_path, read_json, write_json
from wdmjax.metrics.classifier import DigitClassifier, classifier_accuracy, train_classifier
from wdmjax.models.layers import check_positive_int
from wdmjax.models.params_io import load_params_npz, save_params_npz
from wdmjax.runs.model import load_model
from wdmjax.serial import (
  StampSpec,
  StudentConfig,
  accuracy,
  distill_student,
  draw_invalid,
  draw_serials,
  format_serial,
  locked_loss,
  near_misses,
  parse_serial,
  serial_input,
  stamp_overlay,
  student_for,
)
from wdmjax.train import sample_images, save_grid, setup
from wdmjax.train import train as _train
from wdmjax.workdir import Workdir

DSN_JSON = "dsn.json"
TEACHER = "teacher.npz"
SERIALS = "serials.json"
STUDENTS = "students"
ISSUE_JSON = "issue.json"
LOCK_JSON = "lock.json"
PRIVATE = 0o600
DEFAULT_STAMP = StampSpec()
DEFAULT_STUDENT = StudentConfig()
EVAL_SALT = 7919  # invalid serials for evaluation come from another stream than training's


KEY_BITS = 62


def _new_key() -> int:
  return secrets.randbits(KEY_BITS)


def _check_key(key: int | None) -> int:
  if key is None:
    return _new_key()
  check(isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 2 ** KEY_BITS,
        f"key: expected an integer in [0, 2**{KEY_BITS}), got {key!r}")
  return key


def _max_serials(bits: int) -> int:
  """How many valid serials of `bits` bits the library issues (its own cap: half the
  patterns, so the draws stay quick; the balanced ones are fewer still for small k)."""
  return min(2 ** (bits - 1), int(sum(math.comb(bits, j)
                                      for j in range(bits // 4, 3 * bits // 4 + 1))))


def _check_invalid(invalid: int, bits: int, valid: int) -> None:
  check_positive_int("invalid", invalid)
  check(invalid <= 2 ** bits - valid,
        f"invalid: expected at most {2 ** bits - valid} invalid serials of {bits} bits "
        f"(besides the {valid} valid ones), got {invalid}")


def _prng(key: int) -> jax.Array:
  """The PRNG key of an owner's integer key, all of its bits: `PRNGKey` alone keeps only the
  low 32 without 64-bit mode, so the high ones are folded in (keys below 2**32 map to
  `PRNGKey(key)` itself)."""
  k = jax.random.PRNGKey(key & 0xFFFFFFFF)
  return k if key >> 32 == 0 else jax.random.fold_in(k, key >> 32)


# ----------------------------------------------------------------------------- teacher


@dataclasses.dataclass(frozen=True)
class TeacherReport:
  workdir: str
  accuracy: float  # held out
  seconds: float


def teacher(workdir: str | Workdir, data: str = "mnist5k", *, steps: int = 1500,
            stamp: StampSpec = DEFAULT_STAMP, seed: int = 0, data_dir: str | None = None,
            progress: bool = True) -> TeacherReport:
  """Trains the private teacher (a `DigitClassifier`) on the data's training split and
  starts a serial workdir with it; refuses a workdir that holds a teacher already."""
  t0 = time.time()
  wd = Workdir(workdir)
  check(not wd.exists(DSN_JSON), f"workdir: {wd.path!r} holds a teacher already; use a new "
                                 f"directory")
  check_positive_int("steps", steps)
  seed = check_seed(seed)
  check(isinstance(stamp, StampSpec), f"stamp: expected a StampSpec, got {stamp!r}")
  x, y, xh, yh = labelled_split(data, seed=seed, data_dir=data_dir)
  stamp.origin(*x.shape[1:3])
  with wd.undo_on_failure():
    state = train_classifier(x, y, jax.random.PRNGKey(seed), steps=steps, progress=progress,
                             num_classes=int(y.max()) + 1)
    acc = classifier_accuracy(*state, xh, yh)
    os.makedirs(wd.path, exist_ok=True)
    save_params_npz(state.params, wd.file(TEACHER), dtype=np.float32, mode=PRIVATE)
    write_json(wd.file(DSN_JSON), {
      "method": "deep_serial_number", "data": data, "data_dir": data_dir, "seed": seed,
      "stamp": stamp.to_json(), "image_shape": list(x.shape[1:]),
      "teacher": {"steps": steps, "num_classes": state.model.num_classes,
                  "conv_widths": list(state.model.conv_widths),
                  "feature_dim": state.model.feature_dim, "accuracy": acc}})
  return TeacherReport(wd.abspath, acc, time.time() - t0)


def _read_dsn(wd: Workdir) -> dict:
  check(wd.exists(DSN_JSON), f"workdir: {wd.path!r} is not a serial workdir (no {DSN_JSON}; "
                             f"start one with `wdmjax serial teacher`)")
  return read_json(wd.file(DSN_JSON))


def load_teacher(workdir: str | Workdir) -> tuple[DigitClassifier, dict]:
  """(teacher module, its params) of a serial workdir."""
  wd = Workdir(workdir)
  t = _read_dsn(wd)["teacher"]
  model = DigitClassifier(num_classes=t["num_classes"], conv_widths=tuple(t["conv_widths"]),
                          feature_dim=t["feature_dim"])
  return model, load_params_npz(wd.file(TEACHER))


def _split(dsn: dict):
  return labelled_split(dsn["data"], seed=dsn["seed"], data_dir=dsn.get("data_dir"))


# ----------------------------------------------------------------------------- students


def read_serials(workdir: str | Workdir) -> dict:
  """The owner's serials.json: {"key": int, "customers": [{"customer", "serial"}]}."""
  wd = Workdir(workdir)
  check(wd.exists(SERIALS), f"workdir: {wd.path!r} has issued no students yet")
  return read_json(wd.file(SERIALS))


def _student_path(wd: Workdir, customer: int) -> str:
  return os.path.join(wd.file(STUDENTS), f"customer_{customer:03d}.npz")


def load_student(workdir: str | Workdir, customer: int):
  """(student module, params, its StudentConfig) of one customer."""
  wd = Workdir(workdir)
  dsn = _read_dsn(wd)
  issued = dsn.get("customers", 0)
  ok = isinstance(customer, int) and not isinstance(customer, bool) and 0 <= customer < issued
  check(ok and os.path.isfile(_student_path(wd, customer)),
        f"customer: expected one of 0..{issued - 1} (the students issued), got {customer!r}")
  path = _student_path(wd, customer)
  cfg = StudentConfig(**dsn["student"])
  model, _ = load_teacher(wd)
  return student_for(model, cfg), load_params_npz(path), cfg


def _eval_student(model, params, xh, yh, valid: np.ndarray, spec: StampSpec,
                  invalid: np.ndarray) -> dict:
  inv = [accuracy(model, params, xh, yh, b, spec) for b in invalid]
  near = [accuracy(model, params, xh, yh, b, spec) for b in near_misses(valid)]
  return {"valid": accuracy(model, params, xh, yh, valid, spec),
          "raw": accuracy(model, params, xh, yh),
          "invalid_mean": float(np.mean(inv)), "invalid_max": float(np.max(inv)),
          "invalid_num": len(inv),
          "near_miss_mean": float(np.mean(near)), "near_miss_max": float(np.max(near))}


@contextlib.contextmanager
def _restore_on_failure(wd: Workdir, names: tuple[str, ...], undo: Callable[[], bool]
                        ) -> Iterator[None]:
  """Puts the files `names` back as they were when the block fails and `undo()` says no
  progress worth keeping was made (a student saved is kept: a rerun resumes from it)."""
  before = {}
  for n in names:
    before[n] = None
    if wd.exists(n):
      with open(wd.file(n), "rb") as f:
        before[n] = f.read()
  had_students = wd.exists(STUDENTS)
  try:
    yield
  except BaseException:
    if undo():
      for n, data in before.items():
        if data is None:
          wd.remove(n)
        else:
          atomic_write(wd.file(n), data, PRIVATE if n == SERIALS else 0o644)
      if not had_students and wd.exists(STUDENTS) and not os.listdir(wd.file(STUDENTS)):
        os.rmdir(wd.file(STUDENTS))
    raise


@dataclasses.dataclass(frozen=True)
class IssueReport:
  workdir: str
  customers: list[dict]  # per customer: customer, serial, valid, raw, invalid_*, near_miss_*
  teacher_accuracy: float
  seconds: float


def issue(workdir: str | Workdir, customers: int, *, config: StudentConfig = DEFAULT_STUDENT,
          key: int | None = None, invalid: int = 100, progress: bool = True) -> IssueReport:
  """Distils one student per customer, each locked to its own serial number.

  Serial numbers are drawn from `key` (default: a fresh random one, kept in serials.json);
  issuing more customers later continues the same draw. A student already on disk is kept
  (an interrupted run resumes); each is evaluated on the held-out split with its valid
  serial, raw, with `invalid` invalid serials and with its k near misses.
  """
  t0 = time.time()
  wd = Workdir(workdir)
  dsn = _read_dsn(wd)
  check_positive_int("customers", customers)
  check_positive_int("invalid", invalid)
  check(isinstance(config, StudentConfig), f"config: expected a StudentConfig, got {config!r}")
  if key is not None:
    _check_key(key)
  old = read_json(wd.file(SERIALS)) if wd.exists(SERIALS) else None
  if old is not None:
    check(key is None or key == old["key"],
          "key: this workdir's serials were drawn from another key; use a new workdir")
    new = dataclasses.asdict(config)
    diff = ", ".join(f"{k} {v}, not {new[k]}" for k, v in dsn["student"].items()
                     if new.get(k) != v)
    check(not diff, f"config: expected the settings of the students issued already ({diff})")
    key = old["key"]
  key = _check_key(key)
  spec = StampSpec.from_json(dsn["stamp"])
  issued = dsn.get("customers", 0)
  total = max(customers, issued)  # a smaller --customers re-evaluates all, retrains none
  check(total <= _max_serials(spec.bits),
        f"customers: expected at most {_max_serials(spec.bits)} for {spec.bits}-bit serials, "
        f"got {customers}")
  _check_invalid(invalid, spec.bits, total)
  serials = draw_serials(_prng(key), total, spec.bits)
  x, y, xh, yh = _split(dsn)
  t_model, t_params = load_teacher(wd)
  t_acc = classifier_accuracy(t_model, t_params, xh, yh)
  bad = draw_invalid(_prng(key + EVAL_SALT), serials, invalid)
  rows, saved = [], 0
  with _restore_on_failure(wd, (SERIALS, DSN_JSON), lambda: saved == 0):
    os.makedirs(wd.file(STUDENTS), exist_ok=True)
    write_json(wd.file(SERIALS), {"key": key, "stamp": spec.to_json(), "customers": [
      {"customer": i, "serial": format_serial(s)} for i, s in enumerate(serials)]}, PRIVATE)
    record = dict(dsn, student=dataclasses.asdict(config), customers=issued)
    write_json(wd.file(DSN_JSON), record)
    for i in range(total):
      path = _student_path(wd, i)
      if os.path.isfile(path):
        model, params = student_for(t_model, config), load_params_npz(path)
      else:
        st = distill_student(t_model, t_params, x, y, serials[i], spec,
                             jax.random.fold_in(_prng(key), i), config,
                             progress=progress, desc=f"customer {i}")
        model, params = st.model, st.params
        save_params_npz(params, path, dtype=np.float32)
        saved += 1
      if i + 1 > record["customers"]:  # counted as issued once on disk
        record["customers"] = i + 1
        write_json(wd.file(DSN_JSON), record)
      rows.append({"customer": i, "serial": format_serial(serials[i]),
                   **_eval_student(model, params, xh, yh, serials[i], spec, bad)})
  write_json(wd.file(ISSUE_JSON), {"teacher_accuracy": t_acc, "customers": rows})
  return IssueReport(wd.abspath, rows, t_acc, time.time() - t0)


def evaluate(workdir: str | Workdir, *, customer: int | None = None, serial: str | None = None,
             invalid: int = 100) -> dict:
  """Held-out accuracy of the teacher and of each issued student (or one `customer`): with
  its valid serial, raw, with `invalid` invalid serials (mean, max) and its near misses; with
  `serial` (hex), also the accuracy with that serial stamped, as a user typing it would get.
  """
  wd = Workdir(workdir)
  dsn = _read_dsn(wd)
  spec = StampSpec.from_json(dsn["stamp"])
  typed = None if serial is None else parse_serial(serial, spec.bits)
  reg = read_serials(wd)
  n = dsn.get("customers", 0)
  check(customer is None or (isinstance(customer, int) and 0 <= customer < n),
        f"customer: expected one of 0..{n - 1} (the students issued), got {customer!r}")
  _check_invalid(invalid, spec.bits, len(reg["customers"]))
  valid = np.stack([parse_serial(c["serial"], spec.bits) for c in reg["customers"]])
  _, _, xh, yh = _split(dsn)
  t_model, t_params = load_teacher(wd)
  bad = draw_invalid(_prng(reg["key"] + EVAL_SALT), valid, invalid)
  rows = []
  for i in range(n) if customer is None else [customer]:
    model, params, _ = load_student(wd, i)
    row = {"customer": i, "serial": format_serial(valid[i]),
           **_eval_student(model, params, xh, yh, valid[i], spec, bad)}
    if typed is not None:
      row["typed"] = accuracy(model, params, xh, yh, typed, spec)
    rows.append(row)
  return {"teacher_accuracy": classifier_accuracy(t_model, t_params, xh, yh),
          "chance": 1.0 / t_model.num_classes, "stamp": spec.to_json(),
          "typed_serial": serial, "customers": rows}


# ----------------------------------------------------------------------------- diffusion


@dataclasses.dataclass(frozen=True)
class LockReport:
  workdir: str
  serial: str
  step: int
  seconds: float


def read_lock(workdir: str | Workdir) -> dict:
  wd = Workdir(workdir)
  check(wd.exists(LOCK_JSON), f"workdir: {wd.path!r} is not a locked model (no {LOCK_JSON})")
  return read_json(wd.file(LOCK_JSON))


def lock(workdir: str | Workdir, base: str | Workdir, *, steps: int = 600, lr: float = 3e-4,
         lock_weight: float | None = None, stamp: StampSpec | None = None,
         key: int | None = None, progress: bool = True, log=None) -> LockReport:
  """Fine-tunes the base diffusion workdir's EMA weights with `serial.locked_loss`: the model
  then generates the task's images only with the serial number's stamp in its input, and
  blank images otherwise. The serial is drawn from `key` (default fresh) and kept in
  lock.json with the stamp and `lock_weight` (defaults: `StampSpec()` and 1). Resumes an
  interrupted `workdir` with what its lock.json says; other values given are refused."""
  from wdmjax.runs.watermark import embedding_config  # the same fine-tuning config as WDM

  t0 = time.time()
  wd, bwd = Workdir(workdir), Workdir(base)
  check(bwd.has_config(), f"base: expected a trained workdir, got {bwd.path!r}")
  check(bwd.abspath != wd.abspath, "workdir: expected a new directory, not the base itself")
  check_number(lr, "lr", 0.0, low_open=True)
  check(wd.exists(LOCK_JSON) or not wd.has_checkpoint(),
        f"workdir: {wd.path!r} holds a model that is not being locked; use a new directory")
  if key is not None:
    _check_key(key)
  if wd.exists(LOCK_JSON):
    old = read_lock(wd)
    given = {"key": key, "lock_weight": lock_weight, "base": bwd.abspath,
             "stamp": None if stamp is None else stamp.to_json()}
    for name, value in given.items():
      check(value is None or value == old[name],
            f"{name}: this workdir is locked with {name} {old[name]!r}; resume it with that "
            f"or use a new workdir")
    key, lock_weight, stamp = old["key"], old["lock_weight"], StampSpec.from_json(old["stamp"])
  stamp = DEFAULT_STAMP if stamp is None else stamp
  lock_weight = 1.0 if lock_weight is None else lock_weight
  key = _check_key(key)
  cfg = embedding_config(base=base, steps=steps, lr=lr)
  res = int(cfg.data.resolution)
  stamp.origin(res, res)
  bits = draw_serials(_prng(key), 1, stamp.bits)[0]
  su = setup(cfg)
  loss = locked_loss(su.apply_fn, su.schedule, cfg.diffusion.objective, serial_bits=bits,
                     spec=stamp, class_dropout_prob=su.class_dropout_prob,
                     null_label=su.null_label, lock_weight=lock_weight)
  base_params = None if wd.has_checkpoint() else load_model(base, ema=True).params
  with wd.undo_on_failure():
    os.makedirs(wd.path, exist_ok=True)
    write_json(wd.file(LOCK_JSON), {"key": key, "serial": format_serial(bits),
                                    "stamp": stamp.to_json(), "base": bwd.abspath,
                                    "lock_weight": lock_weight}, PRIVATE)
    state = _train(cfg, wd, loss_fn=loss, init_params=base_params, progress=progress,
                   log=log)
  return LockReport(wd.abspath, format_serial(bits), int(state.step), time.time() - t0)


def locked_samples(workdir: str | Workdir, serial: str | None, num: int, *, seed: int = 0,
                   steps: int | None = None, guidance: float | None = None,
                   labels: np.ndarray | None = None, model=None) -> np.ndarray:
  """`num` samples [num, R, R, C] in [-1, 1] of a diffusion workdir (EMA weights), with the
  stamp of `serial` (hex) in the network's input at every step, or plain when None. The
  stamp's size and corner come from the owner's lock.json when the workdir has one, else the
  default `StampSpec`. `model`: an already loaded `runs.Model` of the workdir."""
  wd = Workdir(workdir)
  spec = (StampSpec.from_json(read_lock(wd)["stamp"]) if wd.exists(LOCK_JSON)
          else StampSpec())
  check(isinstance(num, int) and num >= 1, f"num: expected a positive integer, got {num!r}")
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
