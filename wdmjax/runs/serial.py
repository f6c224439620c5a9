"""Deep Serial Number on workdirs: a private `teacher`, students `issue`d to customers (one
serial number each), their `evaluate`-ion; and a serial-number-`lock`-ed diffusion model.

A serial workdir holds:
  dsn.json          the data, the stamp, the teacher's settings and its file's sha256
  teacher.npz       the private teacher (owner-only permissions)
  serials.json      sealed by the owner key, owner-only: a random nonce, the students'
                    settings, the teacher's sha256, and per customer the serial number and
                    the sha256 of the student issued
  students/customer_NNN.npz   what each customer receives
  issue.json        per customer: accuracy with the valid serial, raw, with invalid ones (no
                    serial numbers: it is readable by others)
A locked diffusion workdir is a training workdir (fine-tuned from a base) plus `lock.json`
(sealed, owner-only: the nonce, the serial number, the stamp, the base, the lock weight).

Serial numbers come from the owner key (`wdmjax.keys`: `key_file`, else `$WDMJAX_OWNER_KEY_FILE` or
`$WDMJAX_OWNER_KEY`) and the workdir's nonce (`serial.derive_serials`); they are kept only in the
owner's sealed, private files and never printed unless asked for. Every file is read back
through a typed loader (`wdmjax.records`): a tampered, truncated or mistyped one, a student
or teacher that is not the file issued here (copied from another workdir, say), or a record
sealed by another key is refused in one line that names the file. Writing commands hold the
workdir's lock. Evaluation takes the serial numbers from the owner's files or from the
caller, never from anything shipped with a student.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import stat
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wdmjax.data import labelled_split
from wdmjax.errors import SEED_MAX, WdmjaxError, check, check_seed, show
from wdmjax.files import atomic_write, write_json
from wdmjax.keys import check_seal, key_id, owner_key, seal
from wdmjax.metrics.classifier import DigitClassifier, classifier_accuracy, train_classifier
from wdmjax.models.layers import check_positive_int
from wdmjax.models.params_io import save_params_npz
from wdmjax.records import MAX_NPZ_BYTES, field, read_json_file, read_npz_file, regular_file
from wdmjax.serial import (
  CORNERS,
  SECURE_BITS,
  StampSpec,
  StudentConfig,
  accuracy,
  derive_serials,
  distill_student,
  draw_invalid,
  format_serial,
  max_serials,
  near_misses,
  new_nonce,
  owner_prng,
  parse_serial,
  student_for,
)
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
METHOD = "deep_serial_number"
LOCK_METHOD = "serial_lock"
MAX_CUSTOMERS = 10_000  # each a trained student on disk: far beyond any use of this library
MAX_INVALID = 10_000  # invalid serials evaluated per student
MAX_SAMPLES = 10_000  # images per `sample` call (a 28x28 RGB float32 batch: 94 MB)
MAX_CLASSES = 10_000
MAX_WIDTH = 4096
SHORT_SERIAL_NOTE = (f"serials under {SECURE_BITS} bits can be found by trying them all "
                     f"(16 bits: minutes on a CPU)")


def _sha256(path: str, what: str) -> str:
  regular_file(path, what, MAX_NPZ_BYTES)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(2**20), b""):
      h.update(chunk)
  return h.hexdigest()


def _hex(record: dict, key: str, what: str, n: int) -> str:
  """A field of exactly `n` lower-case hex digits."""
  value = field(record, key, "str", what, low=n, high=n)
  check(all(c in string.hexdigits[:16] for c in value),
        f"{what}: field {key!r}: expected {n} lower-case hex digits, got {show(value, 60)}")
  return value


def _stamp_field(record: dict, what: str) -> StampSpec:
  d = field(record, "stamp", "dict", what)
  sub = f"{what}: field 'stamp'"
  check(set(d) == {"bits", "cell", "corner"},
        f"{sub}: expected the fields bits, cell and corner, got {show(sorted(d), 60)}")
  bits = field(d, "bits", "int", sub, low=4, high=4096)
  cell = field(d, "cell", "int", sub, low=1, high=4096)
  corner = field(d, "corner", "str", sub, choices=CORNERS)
  try:
    return StampSpec(bits=bits, cell=cell, corner=corner)
  except WdmjaxError as e:
    raise WdmjaxError(f"{sub}: {e}") from None


def _student_field(record: dict, what: str) -> StudentConfig:
  d = field(record, "student", "dict", what)
  names = {f.name for f in dataclasses.fields(StudentConfig)}
  check(set(d) == names, f"{what}: field 'student': expected the fields {sorted(names)}, got "
                         f"{show(sorted(d), 100)}")
  try:
    return StudentConfig(**d)
  except (WdmjaxError, TypeError) as e:
    raise WdmjaxError(f"{what}: field 'student': {e}") from None


def _private(path: str, what: str) -> None:
  """Refuses an owner-only file that others may read: its serial numbers may have leaked."""
  mode = stat.S_IMODE(os.lstat(path).st_mode)
  check(not mode & 0o077, f"{what}: expected a file only its owner can read (mode 600), got "
                          f"mode {mode:o}; its serial numbers may have leaked (chmod 600 it, "
                          f"and consider issuing new ones)")


# ----------------------------------------------------------------------------- teacher


@dataclasses.dataclass(frozen=True)
class Dsn:
  """A serial workdir's dsn.json, checked."""
  data: str
  seed: int
  image_shape: tuple[int, int, int]
  stamp: StampSpec
  teacher: DigitClassifier
  teacher_sha256: str | None  # None in workdirs made before it was recorded


@dataclasses.dataclass(frozen=True)
class TeacherReport:
  workdir: str
  accuracy: float  # held out
  seconds: float


def _foreign(wd: Workdir) -> list[str]:
  """What a directory holds besides its lock (a serial workdir starts in a new or empty
  one, never in another kind of run's)."""
  if not os.path.isdir(wd.path):
    return []
  return sorted(n for n in os.listdir(wd.path) if n != ".wdmjax.lock")


def teacher(workdir: str | Workdir, data: str = "mnist5k", *, steps: int = 1500,
            stamp: StampSpec = DEFAULT_STAMP, seed: int = 0, data_dir: str | None = None,
            progress: bool = True) -> TeacherReport:
  """Trains the private teacher (a `DigitClassifier`) on the data's training split and
  starts a serial workdir with it in a new or empty directory. The stamp may cover at most
  half of the image's side (`StampSpec.check_small`); the default, 64 bits, is too long to
  search. `data_dir` is used here only, never recorded: later commands take their own."""
  t0 = time.time()
  wd = Workdir(workdir)
  check(not os.path.lexists(wd.file(DSN_JSON)),
        f"workdir: {wd.path!r} holds a teacher already; use a new directory")
  other = _foreign(wd)
  check(not other, f"workdir: expected a new or empty directory for a serial workdir, got "
                   f"{wd.path!r}, which holds {show(other, 80)} (another run); use a new "
                   f"directory")
  check_positive_int("steps", steps)
  seed = check_seed(seed)
  check(isinstance(stamp, StampSpec), f"stamp: expected a StampSpec, got {stamp!r}")
  x, y, xh, yh = labelled_split(data, seed=seed, data_dir=data_dir)
  stamp.check_small(*x.shape[1:3])
  with wd.undo_on_failure():
    state = train_classifier(x, y, jax.random.PRNGKey(seed), steps=steps, progress=progress,
                             num_classes=int(y.max()) + 1)
    acc = classifier_accuracy(*state, xh, yh)
    save_params_npz(state.params, wd.file(TEACHER), dtype=np.float32, mode=PRIVATE)
    write_json(wd.file(DSN_JSON), {
      "method": METHOD, "data": data, "seed": seed, "stamp": stamp.to_json(),
      "image_shape": list(x.shape[1:]),
      "teacher": {"steps": steps, "num_classes": state.model.num_classes,
                  "conv_widths": list(state.model.conv_widths),
                  "feature_dim": state.model.feature_dim, "accuracy": acc,
                  "sha256": _sha256(wd.file(TEACHER), wd.file(TEACHER))}})
  return TeacherReport(wd.abspath, acc, time.time() - t0)


def _require_dsn(wd: Workdir) -> None:
  check(os.path.lexists(wd.file(DSN_JSON)),
        f"workdir: {wd.path!r} is not a serial workdir (no {DSN_JSON}; start one with "
        f"`wdmjax serial teacher`)")


def read_dsn(workdir: str | Workdir) -> Dsn:
  """The serial workdir's dsn.json, every field checked (one line naming the file and the
  field otherwise). A `data_dir` it may hold (older versions wrote one) is ignored."""
  wd = Workdir(workdir)
  _require_dsn(wd)
  what = wd.file(DSN_JSON)
  rec = read_json_file(what)
  field(rec, "method", "str", what, choices=[METHOD])
  data = field(rec, "data", "str", what, low=1, high=200)
  seed = field(rec, "seed", "int", what, low=0, high=SEED_MAX)
  shape = field(rec, "image_shape", "list", what, low=3, high=3)
  for n in shape:
    check(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 4096,
          f"{what}: field 'image_shape': expected 3 sizes in [1, 4096], got {show(shape)}")
  stamp = _stamp_field(rec, what)
  try:
    stamp.origin(shape[0], shape[1])
  except WdmjaxError as e:
    raise WdmjaxError(f"{what}: field 'stamp': {e}") from None
  t = field(rec, "teacher", "dict", what)
  sub = f"{what}: field 'teacher'"
  num_classes = field(t, "num_classes", "int", sub, low=2, high=MAX_CLASSES)
  widths = field(t, "conv_widths", "list", sub, low=1,
                 high=max(1, int(np.log2(min(shape[:2])))))
  check(all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= MAX_WIDTH
            for w in widths),
        f"{sub}: field 'conv_widths': expected widths in [1, {MAX_WIDTH}], got {show(widths)}")
  feature_dim = field(t, "feature_dim", "int", sub, low=1, high=MAX_WIDTH)
  sha = None if t.get("sha256") is None else _hex(t, "sha256", sub, 64)
  model = DigitClassifier(num_classes=num_classes, conv_widths=tuple(widths),
                          feature_dim=feature_dim)
  return Dsn(data, seed, tuple(shape), stamp, model, sha)


@functools.lru_cache(maxsize=16)
def _param_shapes(model, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  return {k: tuple(v.shape) for k, v in
          traverse_util.flatten_dict(tree["params"], sep="/").items()}


def _load_params(path: str, model, shape: tuple[int, ...], what: str,
                 sha256: str | None = None, issued_as: str = "") -> dict:
  """The params of `model` (for images of `shape`) in the .npz at `path`: the arrays and
  their shapes must be the model's; with `sha256`, the file must be that one, byte for byte
  (the one issued in this workdir, not a copy of another's)."""
  if sha256 is not None:
    check(_sha256(path, what) == sha256,
          f"{what}: expected {issued_as or 'the file recorded for it'} (sha256 "
          f"{sha256[:16]}...), got another file: replaced, altered or copied from elsewhere")
  arrays = read_npz_file(path, what=what)
  want = _param_shapes(model, tuple(shape))
  check(set(arrays) == set(want), f"{what}: expected the arrays {show(sorted(want), 120)}, "
                                  f"got {show(sorted(arrays), 120)}")
  for k, s in want.items():
    check(arrays[k].shape == s, f"{what}: array {k!r}: expected shape {s}, got "
                                f"{arrays[k].shape}")
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32)
                                       for k, v in arrays.items()}, sep="/")


def load_teacher(workdir: str | Workdir) -> tuple[DigitClassifier, dict]:
  """(teacher module, its params) of a serial workdir, checked against dsn.json."""
  wd = Workdir(workdir)
  dsn = read_dsn(wd)
  return dsn.teacher, _load_params(wd.file(TEACHER), dsn.teacher, dsn.image_shape,
                                   wd.file(TEACHER), dsn.teacher_sha256,
                                   f"the teacher recorded in {DSN_JSON}")


# ----------------------------------------------------------------------------- serials


@dataclasses.dataclass(frozen=True)
class Serials:
  """A serial workdir's serials.json, sealed by the owner key and checked."""
  nonce: str
  data: str
  seed: int
  stamp: StampSpec
  student: StudentConfig
  teacher_sha256: str
  customers: tuple[dict, ...]  # {"customer": i, "serial": hex, "student_sha256": hex}

  def to_json(self) -> dict:
    return {"method": METHOD, "nonce": self.nonce, "data": self.data, "seed": self.seed,
            "stamp": self.stamp.to_json(), "student": dataclasses.asdict(self.student),
            "teacher_sha256": self.teacher_sha256, "customers": list(self.customers)}


def _sealed_record(wd: Workdir, name: str, key: bytes, missing: str) -> tuple[dict, str]:
  """(the owner-only record `name` of the workdir, checked to be sealed by `key`; its path);
  `missing`: the message when there is none."""
  what = wd.file(name)
  check(os.path.lexists(what), missing)
  rec = read_json_file(what)
  _private(what, what)
  check_seal(rec, key, what)
  return rec, what


def _read_serials(wd: Workdir, key: bytes) -> Serials:
  rec, what = _sealed_record(wd, SERIALS, key, f"workdir: {wd.path!r} has issued no students "
                                               f"yet")
  field(rec, "method", "str", what, choices=[METHOD])
  stamp = _stamp_field(rec, what)
  rows = field(rec, "customers", "list", what, high=MAX_CUSTOMERS)
  customers = []
  for i, c in enumerate(rows):
    sub = f"{what}: customer {i}"
    field(c, "customer", "int", sub, low=i, high=i)
    text = field(c, "serial", "str", sub)
    try:
      parse_serial(text, stamp.bits)
    except WdmjaxError as e:
      raise WdmjaxError(f"{sub}: {e}") from None
    customers.append({"customer": i, "serial": text,
                      "student_sha256": _hex(c, "student_sha256", sub, 64)})
  return Serials(_hex(rec, "nonce", what, 32), field(rec, "data", "str", what, low=1, high=200),
                 field(rec, "seed", "int", what, low=0, high=SEED_MAX), stamp,
                 _student_field(rec, what), _hex(rec, "teacher_sha256", what, 64),
                 tuple(customers))


def _write_serials(wd: Workdir, reg: Serials, key: bytes) -> None:
  write_json(wd.file(SERIALS), seal(reg.to_json(), key), PRIVATE)


def _check_bound(wd: Workdir, dsn: Dsn, reg: Serials, key: bytes) -> np.ndarray:
  """The serials [n, k] of `reg`, checked to be the key's and to belong to this workdir's
  teacher, data and stamp (dsn.json is not sealed: a change to it is refused here)."""
  what = wd.file(DSN_JSON)
  check(dsn.stamp == reg.stamp, f"{what}: field 'stamp': expected the stamp the students "
                                f"were issued with ({reg.stamp.to_json()}), got "
                                f"{dsn.stamp.to_json()}")
  check((dsn.data, dsn.seed) == (reg.data, reg.seed),
        f"{what}: fields 'data', 'seed': expected those the students were issued with "
        f"({reg.data!r}, {reg.seed}), got ({dsn.data!r}, {dsn.seed})")
  teacher_file = wd.file(TEACHER)
  check(_sha256(teacher_file, teacher_file) == reg.teacher_sha256,
        f"{teacher_file}: expected the teacher the students were issued from (sha256 "
        f"{reg.teacher_sha256[:16]}... in {SERIALS}), got another file")
  if not reg.customers:
    return np.zeros((0, reg.stamp.bits), np.uint8)
  serials = derive_serials(key, reg.nonce, len(reg.customers), reg.stamp.bits)
  for c, s in zip(reg.customers, serials, strict=True):
    check(c["serial"] == format_serial(s),
          f"{wd.file(SERIALS)}: customer {c['customer']}: expected the serial number the "
          f"owner key derives, got another")
  return serials


def read_serials(workdir: str | Workdir, key_file: str | os.PathLike | None = None) -> dict:
  """The owner's serials.json, its seal checked with the owner key (`key_file`, else the
  environment: see `wdmjax.keys.owner_key`): {"nonce", "stamp", "student", "customers":
  [{"customer", "serial", "student_sha256"}], ...}."""
  wd = Workdir(workdir)
  _require_dsn(wd)
  key = owner_key(key_file)
  reg = _read_serials(wd, key)
  _check_bound(wd, read_dsn(wd), reg, key)
  return reg.to_json()


def _student_path(wd: Workdir, customer: int) -> str:
  return os.path.join(wd.file(STUDENTS), f"customer_{customer:03d}.npz")


def _load_student(wd: Workdir, dsn: Dsn, reg: Serials, customer: int):
  model = student_for(dsn.teacher, reg.student)
  path = _student_path(wd, customer)
  params = _load_params(path, model, dsn.image_shape, path,
                        reg.customers[customer]["student_sha256"],
                        f"the student issued to customer {customer} here")
  return model, params


def load_student(workdir: str | Workdir, customer: int,
                 key_file: str | os.PathLike | None = None):
  """(student module, params, its StudentConfig) of one customer: the file issued in this
  workdir (its sha256 sealed in serials.json by the owner key), nothing else."""
  wd = Workdir(workdir)
  _require_dsn(wd)
  key = owner_key(key_file)
  dsn, reg = read_dsn(wd), _read_serials(wd, key)
  _check_bound(wd, dsn, reg, key)
  _check_customer(customer, len(reg.customers))
  model, params = _load_student(wd, dsn, reg, customer)
  return model, params, reg.student


def _check_nonce(nonce) -> None:
  check(nonce is None or (isinstance(nonce, str) and len(nonce) == 32
                          and all(c in string.hexdigits[:16] for c in nonce)),
        f"nonce: expected 32 lower-case hex digits, got {show(nonce, 60)}")


def _check_customer(customer, n: int) -> None:
  ok = isinstance(customer, int) and not isinstance(customer, bool) and 0 <= customer < n
  check(ok, f"customer: expected one of 0..{n - 1} (the students issued), got {customer!r}")


def _check_invalid(invalid: int, bits: int, valid: int) -> None:
  check_positive_int("invalid", invalid)
  check(invalid <= min(MAX_INVALID, 2 ** bits - valid),
        f"invalid: expected at most {min(MAX_INVALID, 2 ** bits - valid)} invalid serials of "
        f"{bits} bits (besides the {valid} valid ones), got {invalid}")


def _split(dsn: Dsn, data_dir: str | None):
  x, y, xh, yh = labelled_split(dsn.data, seed=dsn.seed, data_dir=data_dir)
  check(tuple(x.shape[1:]) == dsn.image_shape,
        f"data_dir: expected {dsn.data} images of shape {list(dsn.image_shape)} (the "
        f"teacher's), got {list(x.shape[1:])}")
  return x, y, xh, yh


def _eval_student(model, params, xh, yh, valid: np.ndarray, spec: StampSpec,
                  invalid: np.ndarray) -> dict:
  inv = [accuracy(model, params, xh, yh, b, spec) for b in invalid]
  near = [accuracy(model, params, xh, yh, b, spec) for b in near_misses(valid)]
  return {"valid": accuracy(model, params, xh, yh, valid, spec),
          "raw": accuracy(model, params, xh, yh),
          "invalid_mean": float(np.mean(inv)), "invalid_max": float(np.max(inv)),
          "invalid_num": len(inv),
          "near_miss_mean": float(np.mean(near)), "near_miss_max": float(np.max(near))}


def _npz_bytes(params) -> bytes:
  """A student's params as the bytes of its .npz (float32, compressed)."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  buf = io.BytesIO()
  np.savez_compressed(buf, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
  return buf.getvalue()


def _clean_interrupted(wd: Workdir) -> None:
  """Removes the temporary files a killed write left (`files.atomic_open`'s `.NAME.*.tmp`);
  called with the workdir's lock held, so no live writer owns them."""
  for d, names in ((wd.path, (SERIALS, ISSUE_JSON)), (wd.file(STUDENTS), None)):
    if not os.path.isdir(d):
      continue
    for n in os.listdir(d):
      ours = names is None or any(n.startswith(f".{m}.") for m in names)
      if ours and n.startswith(".") and n.endswith(".tmp"):
        os.remove(os.path.join(d, n))


@dataclasses.dataclass(frozen=True)
class IssueReport:
  workdir: str
  customers: list[dict]  # per customer: customer, serial, valid, raw, invalid_*, near_miss_*
  teacher_accuracy: float
  seconds: float
  key_id: str  # the owner key's public id


def issue(workdir: str | Workdir, customers: int, *, config: StudentConfig | None = None,
          key_file: str | os.PathLike | None = None, invalid: int = 100,
          data_dir: str | None = None, nonce: str | None = None,
          progress: bool = True) -> IssueReport:
  """Distils one student per customer, each locked to its own serial number.

  Serial numbers are derived from the owner key (`key_file`, else the environment) and the
  workdir's nonce; serials.json keeps them sealed by the key, with each student's sha256.
  Issuing more customers later continues the same draw, with the same key only, and the
  same `config` (default: the settings of the students issued, else `StudentConfig()`). A student
  already issued is kept (an interrupted run resumes, a kill loses at most the student in
  training); each is evaluated on the held-out split with its valid serial, raw, with
  `invalid` invalid serials and with its k near misses. Holds the workdir's lock.

  `nonce` (32 hex digits, public): the workdir's nonce when it issues its first student
  (default: a fresh random one); a fixed key and nonce reproduce the same serials, which
  only demos and tests want. A resumed workdir keeps its own.
  """
  t0 = time.time()
  wd = Workdir(workdir)
  check_positive_int("customers", customers)
  check(customers <= MAX_CUSTOMERS,
        f"customers: expected at most {MAX_CUSTOMERS:,}, got {customers:,}")
  check_positive_int("invalid", invalid)
  check(config is None or isinstance(config, StudentConfig),
        f"config: expected a StudentConfig, got {config!r}")
  _check_nonce(nonce)
  _require_dsn(wd)
  key = owner_key(key_file)
  with wd.lock():
    dsn = read_dsn(wd)
    _clean_interrupted(wd)
    t_sha = _sha256(wd.file(TEACHER), wd.file(TEACHER))
    if os.path.lexists(wd.file(SERIALS)):
      reg = _read_serials(wd, key)
      _check_bound(wd, dsn, reg, key)
      check(nonce is None or nonce == reg.nonce,
            f"nonce: expected this workdir's own ({reg.nonce}), got {nonce!r}")
      config = reg.student if config is None else config
      new, old = dataclasses.asdict(config), dataclasses.asdict(reg.student)
      diff = ", ".join(f"{k} {v}, not {new[k]}" for k, v in old.items() if new[k] != v)
      check(not diff, f"config: expected the settings of the students issued already ({diff})")
    else:
      config = DEFAULT_STUDENT if config is None else config
      reg = Serials(nonce or new_nonce(), dsn.data, dsn.seed, dsn.stamp, config, t_sha, ())
    spec = reg.stamp
    issued = len(reg.customers)
    total = max(customers, issued)  # a smaller --customers re-evaluates all, retrains none
    check(total <= max_serials(spec.bits),
          f"customers: expected at most {max_serials(spec.bits)} for {spec.bits}-bit serials, "
          f"got {customers}")
    _check_invalid(invalid, spec.bits, total)
    for i in range(issued, total):
      path = _student_path(wd, i)
      check(not os.path.lexists(path),
            f"{path}: expected no file (no student {i} was issued in this workdir), got one; "
            f"remove it to issue student {i}")
    serials = derive_serials(key, reg.nonce, total, spec.bits)
    x, y, xh, yh = _split(dsn, data_dir)
    t_model = dsn.teacher
    t_params = _load_params(wd.file(TEACHER), t_model, dsn.image_shape, wd.file(TEACHER),
                            dsn.teacher_sha256, f"the teacher recorded in {DSN_JSON}")
    t_acc = classifier_accuracy(t_model, t_params, xh, yh)
    bad = draw_invalid(owner_prng(key, reg.nonce, "invalid"), serials, invalid)
    made_dir = not os.path.isdir(wd.file(STUDENTS))
    rows = []
    try:
      os.makedirs(wd.file(STUDENTS), exist_ok=True)
      for i in range(total):
        path = _student_path(wd, i)
        if i < issued and os.path.lexists(path):
          model, params = _load_student(wd, dsn, reg, i)
        else:  # new, or recorded but killed before its file was written
          st = distill_student(t_model, t_params, x, y, serials[i], spec,
                               owner_prng(key, reg.nonce, f"student {i}"), config,
                               progress=progress, desc=f"customer {i}")
          model, params, data = st.model, st.params, _npz_bytes(st.params)
          row = {"customer": i, "serial": format_serial(serials[i]),
                 "student_sha256": hashlib.sha256(data).hexdigest()}
          # Sealed first, then written: a file on disk is always one the record vouches for.
          reg = dataclasses.replace(reg, customers=(*reg.customers[:i], row,
                                                    *reg.customers[i + 1:]))
          _write_serials(wd, reg, key)
          atomic_write(path, data)
        rows.append({"customer": i, "serial": format_serial(serials[i]),
                     **_eval_student(model, params, xh, yh, serials[i], spec, bad)})
    except BaseException:
      if made_dir and not os.listdir(wd.file(STUDENTS)):
        os.rmdir(wd.file(STUDENTS))
      raise
    write_json(wd.file(ISSUE_JSON), {
      "teacher_accuracy": t_acc, "key_id": key_id(key),
      "customers": [{k: v for k, v in r.items() if k != "serial"} for r in rows]})
  return IssueReport(wd.abspath, rows, t_acc, time.time() - t0, key_id(key))


def evaluate(workdir: str | Workdir, *, customer: int | None = None, serial: str | None = None,
             invalid: int = 100, key_file: str | os.PathLike | None = None,
             data_dir: str | None = None) -> dict:
  """Held-out accuracy of the teacher and of each issued student (or one `customer`): with
  its valid serial, raw, with `invalid` invalid serials (mean, max) and its near misses; with
  `serial` (hex), also the accuracy with that serial stamped, as a user typing it would get.
  Needs the owner key (the serials are sealed by it); writes nothing. The rows hold the
  serial numbers: print them only where the owner means to."""
  wd = Workdir(workdir)
  _require_dsn(wd)
  key = owner_key(key_file)
  dsn, reg = read_dsn(wd), _read_serials(wd, key)
  valid = _check_bound(wd, dsn, reg, key)
  spec = reg.stamp
  typed = None if serial is None else parse_serial(serial, spec.bits)
  n = len(reg.customers)
  check(n > 0, f"workdir: {wd.path!r} has issued no students yet")
  check(customer is None or (isinstance(customer, int) and not isinstance(customer, bool)
                             and 0 <= customer < n),
        f"customer: expected one of 0..{n - 1} (the students issued), got {customer!r}")
  _check_invalid(invalid, spec.bits, n)
  _, _, xh, yh = _split(dsn, data_dir)
  t_params = _load_params(wd.file(TEACHER), dsn.teacher, dsn.image_shape, wd.file(TEACHER),
                          reg.teacher_sha256, f"the teacher recorded in {SERIALS}")
  bad = draw_invalid(owner_prng(key, reg.nonce, "invalid"), valid, invalid)
  rows = []
  for i in range(n) if customer is None else [customer]:
    model, params = _load_student(wd, dsn, reg, i)
    row = {"customer": i, "serial": format_serial(valid[i]),
           **_eval_student(model, params, xh, yh, valid[i], spec, bad)}
    if typed is not None:
      row["typed"] = accuracy(model, params, xh, yh, typed, spec)
    rows.append(row)
  return {"teacher_accuracy": classifier_accuracy(dsn.teacher, t_params, xh, yh),
          "chance": 1.0 / dsn.teacher.num_classes, "stamp": spec.to_json(),
          "typed_serial": serial, "key_id": key_id(key), "customers": rows}
