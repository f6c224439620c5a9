"""`wdmjax serial ...`: Deep Serial Number from the shell (a private teacher, students issued
to customers with one serial number each, their evaluation; a locked diffusion model)."""

from __future__ import annotations

import json

from wdmjax import keys, runs
from wdmjax.runs.serial import SHORT_SERIAL_NOTE
from wdmjax.serial import CORNERS, SECURE_BITS, StampSpec, StudentConfig

KEY_HELP = keys.KEY_HELP + ": serial numbers are derived from it and sealed by it"


def _stamp(args) -> StampSpec | None:
  given = {k: v for k, v in (("bits", args.bits), ("cell", args.cell),
                             ("corner", args.corner)) if v is not None}
  return StampSpec(**given) if given else None


def cmd_teacher(args) -> int:
  stamp = _stamp(args) or StampSpec()
  r = runs.serial_teacher(args.workdir, args.data, steps=args.steps, seed=args.seed,
                          stamp=stamp, data_dir=args.data_dir, progress=not args.no_progress)
  print(f"teacher: {r.workdir} (held-out accuracy {r.accuracy:.4f}, {r.seconds:.0f} s)")
  if stamp.bits < SECURE_BITS:
    print(f"note: {stamp.bits}-bit serials; {SHORT_SERIAL_NOTE}")
  return 0


def _print_customers(rows: list[dict], teacher: float, show_serials: bool) -> None:
  """The table; serial numbers only when the owner asks (`--show-serials`): a terminal's
  output ends up in logs."""
  print(f"teacher: {teacher:.4f}")
  serial = "| serial " if show_serials else ""
  print(f"| customer {serial}| valid | raw | invalid mean | invalid max | near-miss max |")
  print("|---" * (7 if show_serials else 6) + "|")
  for r in rows:
    sn = f"| {r['serial']} " if show_serials else ""
    print(f"| {r['customer']} {sn}| {r['valid']:.4f} | {r['raw']:.4f} | "
          f"{r['invalid_mean']:.4f} | {r['invalid_max']:.4f} | {r['near_miss_max']:.4f} |")


def cmd_issue(args) -> int:
  given = {k: getattr(args, k) for k in _STUDENT_FLAGS if getattr(args, k) is not None}
  cfg = StudentConfig(**given) if given else None  # None: a resumed workdir's own settings
  r = runs.serial_issue(args.workdir, args.customers, config=cfg, key_file=args.key_file,
                        invalid=args.invalid, data_dir=args.data_dir,
                        progress=not args.no_progress)
  _print_customers(r.customers, r.teacher_accuracy, args.show_serials)
  print(f"{len(r.customers)} students in {r.workdir} ({r.seconds:.0f} s); their serial "
        f"numbers are in serials.json (owner-only, sealed by key {r.key_id}; "
        f"`serial eval --show-serials` prints them)")
  return 0


_STUDENT_FLAGS = ("steps", "lr", "grl_scale", "domain_weight", "snnl_weight")


def cmd_eval(args) -> int:
  rep = runs.serial_eval(args.workdir, customer=args.customer, serial=args.serial,
                         invalid=args.invalid, key_file=args.key_file, data_dir=args.data_dir)
  if not args.show_serials:
    rep["customers"] = [{k: v for k, v in r.items() if k != "serial"}
                        for r in rep["customers"]]
  if args.json:
    print(json.dumps(rep))
    return 0
  _print_customers(rep["customers"], rep["teacher_accuracy"], args.show_serials)
  if args.serial is not None:
    for r in rep["customers"]:
      print(f"customer {r['customer']} with serial {args.serial}: {r['typed']:.4f}")
  return 0


def cmd_lock(args) -> int:
  r = runs.serial_lock(args.workdir, args.base, steps=args.steps, lr=args.lr,
                       lock_weight=args.lock_weight, stamp=_stamp(args),
                       key_file=args.key_file, progress=not args.no_progress, log=print)
  print(f"locked model: {r.workdir} (step {r.step}, {r.seconds:.0f} s); its serial number "
        f"is in lock.json (owner-only, sealed by key {r.key_id})")
  return 0


def cmd_sample(args) -> int:
  r = runs.serial_sample(args.workdir, args.num, serial=args.serial, seed=args.seed,
                         out=args.out)
  who = f"serial {r.serial}" if r.serial else "no serial number"
  print(f"{len(r.images)} samples with {who} -> {r.path}")
  return 0


def _stamp_flags(p, default: str = " (default 64)") -> None:
  p.add_argument("--bits", type=int, default=None, help="serial-number bits, a perfect square "
                 f"and a multiple of 4{default}: shorter serials can be searched exhaustively")
  p.add_argument("--cell", type=int, default=None, help="pixels per bit along a side "
                 "(default 1)")
  p.add_argument("--corner", default=None, help=" or ".join(CORNERS) + " (default "
                 "bottom_right)")


def add_parsers(sub) -> None:
  s = sub.add_parser("serial", help="Deep Serial Number: models that work only with a valid "
                     "serial number")
  ssub = s.add_subparsers(dest="serial_command", required=True)
  t = ssub.add_parser("teacher", help="train the private teacher; start a serial workdir")
  t.add_argument("--workdir", required=True)
  t.add_argument("--data", default="mnist5k", help="a labelled image set (mnist5k, digits)")
  t.add_argument("--steps", type=int, default=1500)
  _stamp_flags(t)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--data-dir", default=None)
  t.add_argument("--no-progress", action="store_true")
  t.set_defaults(func=cmd_teacher)

  d = StudentConfig()
  i = ssub.add_parser("issue", help="distil one locked student per customer")
  i.add_argument("--workdir", required=True, help="the serial workdir (with a teacher)")
  i.add_argument("--customers", type=int, required=True)
  i.add_argument("--key-file", default=None, help=KEY_HELP)
  resumed = "; resuming: the students' own"
  i.add_argument("--steps", type=int, default=None, help=f"default {d.steps}{resumed}")
  i.add_argument("--lr", type=float, default=None, help=f"default {d.lr}{resumed}")
  i.add_argument("--grl-scale", type=float, default=None,
                 help=f"default {d.grl_scale}{resumed}")
  i.add_argument("--domain-weight", type=float, default=None,
                 help=f"default {d.domain_weight}{resumed}")
  i.add_argument("--snnl-weight", type=float, default=None,
                 help=f"default {d.snnl_weight}{resumed}")
  i.add_argument("--invalid", type=int, default=100, help="invalid serials to evaluate")
  i.add_argument("--data-dir", default=None)
  i.add_argument("--show-serials", action="store_true", help="print the serial numbers")
  i.add_argument("--no-progress", action="store_true")
  i.set_defaults(func=cmd_issue)

  e = ssub.add_parser("eval", help="held-out accuracy with valid, invalid and no serials")
  e.add_argument("--workdir", required=True)
  e.add_argument("--customer", type=int, default=None, help="one customer (default: all)")
  e.add_argument("--serial", default=None, help="also try this serial number (hex)")
  e.add_argument("--invalid", type=int, default=100)
  e.add_argument("--key-file", default=None, help=KEY_HELP)
  e.add_argument("--data-dir", default=None)
  e.add_argument("--show-serials", action="store_true", help="print (or put in the JSON) the "
                 "serial numbers")
  e.add_argument("--json", action="store_true")
  e.set_defaults(func=cmd_eval)

  lo = ssub.add_parser("lock", help="fine-tune a diffusion model to generate only with a "
                       "valid serial number's stamp")
  lo.add_argument("--base", required=True, help="the trained diffusion workdir")
  lo.add_argument("--workdir", required=True, help="a new workdir for the locked model")
  lo.add_argument("--steps", type=int, default=600)
  lo.add_argument("--lr", type=float, default=3e-4)
  lo.add_argument("--lock-weight", type=float, default=None, help="weight of the locked "
                  "half of the loss (default 1; a resumed workdir keeps its own)")
  lo.add_argument("--key-file", default=None, help=KEY_HELP)
  _stamp_flags(lo, " (default 64; a resumed workdir keeps its own)")
  lo.add_argument("--no-progress", action="store_true")
  lo.set_defaults(func=cmd_lock)

  sa = ssub.add_parser("sample", help="a sample grid of a locked model, with or without a "
                       "serial number")
  sa.add_argument("--workdir", required=True)
  sa.add_argument("--serial", default=None, help="the serial number (hex); none: plain")
  sa.add_argument("--num", type=int, default=40)
  sa.add_argument("--seed", type=int, default=0)
  sa.add_argument("--out", default="serial_grid.png")
  sa.set_defaults(func=cmd_sample)
