"""`wdmjax serial ...`: Deep Serial Number from the shell (a private teacher, students issued
to customers with one serial number each, their evaluation; a locked diffusion model)."""

from __future__ import annotations

import json

from wdmjax import runs
from wdmjax.serial import CORNERS, StampSpec, StudentConfig


def cmd_teacher(args) -> int:
  r = runs.serial_teacher(args.workdir, args.data, steps=args.steps, seed=args.seed,
                          stamp=StampSpec(bits=args.bits, cell=args.cell, corner=args.corner),
                          data_dir=args.data_dir, progress=not args.no_progress)
  print(f"teacher: {r.workdir} (held-out accuracy {r.accuracy:.4f}, {r.seconds:.0f} s)")
  return 0


def _print_customers(rows: list[dict], teacher: float) -> None:
  print(f"teacher: {teacher:.4f}")
  print("| customer | serial | valid | raw | invalid mean | invalid max | near-miss max |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['customer']} | {r['serial']} | {r['valid']:.4f} | {r['raw']:.4f} | "
          f"{r['invalid_mean']:.4f} | {r['invalid_max']:.4f} | {r['near_miss_max']:.4f} |")


def cmd_issue(args) -> int:
  cfg = StudentConfig(steps=args.steps, lr=args.lr, grl_scale=args.grl_scale,
                      snnl_weight=args.snnl_weight, domain_weight=args.domain_weight)
  r = runs.serial_issue(args.workdir, args.customers, config=cfg, key=args.key,
                        invalid=args.invalid, progress=not args.no_progress)
  _print_customers(r.customers, r.teacher_accuracy)
  print(f"{len(r.customers)} students in {r.workdir} ({r.seconds:.0f} s); their serial "
        "numbers are in serials.json (owner-only)")
  return 0


def cmd_eval(args) -> int:
  rep = runs.serial_eval(args.workdir, customer=args.customer, serial=args.serial,
                         invalid=args.invalid)
  if args.json:
    print(json.dumps(rep))
    return 0
  _print_customers(rep["customers"], rep["teacher_accuracy"])
  if args.serial is not None:
    for r in rep["customers"]:
      print(f"customer {r['customer']} with serial {args.serial}: {r['typed']:.4f}")
  return 0


def cmd_lock(args) -> int:
  r = runs.serial_lock(args.workdir, args.base, steps=args.steps, lr=args.lr,
                       lock_weight=args.lock_weight, key=args.key,
                       progress=not args.no_progress, log=print)
  print(f"locked model: {r.workdir} (step {r.step}, {r.seconds:.0f} s); its serial number "
        "is in lock.json (owner-only)")
  return 0


def cmd_sample(args) -> int:
  r = runs.serial_sample(args.workdir, args.num, serial=args.serial, seed=args.seed,
                         out=args.out)
  who = f"serial {r.serial}" if r.serial else "no serial number"
  print(f"{len(r.images)} samples with {who} -> {r.path}")
  return 0


def add_parsers(sub) -> None:
  s = sub.add_parser("serial", help="Deep Serial Number: models that work only with a valid "
                     "serial number")
  ssub = s.add_subparsers(dest="serial_command", required=True)
  t = ssub.add_parser("teacher", help="train the private teacher; start a serial workdir")
  t.add_argument("--workdir", required=True)
  t.add_argument("--data", default="mnist5k", help="a labelled image set (mnist5k, digits)")
  t.add_argument("--steps", type=int, default=1500)
  t.add_argument("--bits", type=int, default=16, help="serial-number bits (a perfect square, "
                 "a multiple of 4)")
  t.add_argument("--cell", type=int, default=1, help="pixels per bit along a side")
  t.add_argument("--corner", default="bottom_right", help=" or ".join(CORNERS))
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--data-dir", default=None)
  t.add_argument("--no-progress", action="store_true")
  t.set_defaults(func=cmd_teacher)

  d = StudentConfig()
  i = ssub.add_parser("issue", help="distil one locked student per customer")
  i.add_argument("--workdir", required=True, help="the serial workdir (with a teacher)")
  i.add_argument("--customers", type=int, required=True)
  i.add_argument("--key", type=int, default=None, help="the key serial numbers are drawn "
                 "from (default: a fresh random one, kept in serials.json)")
  i.add_argument("--steps", type=int, default=d.steps)
  i.add_argument("--lr", type=float, default=d.lr)
  i.add_argument("--grl-scale", type=float, default=d.grl_scale)
  i.add_argument("--domain-weight", type=float, default=d.domain_weight)
  i.add_argument("--snnl-weight", type=float, default=d.snnl_weight)
  i.add_argument("--invalid", type=int, default=100, help="invalid serials to evaluate")
  i.add_argument("--no-progress", action="store_true")
  i.set_defaults(func=cmd_issue)

  e = ssub.add_parser("eval", help="held-out accuracy with valid, invalid and no serials")
  e.add_argument("--workdir", required=True)
  e.add_argument("--customer", type=int, default=None, help="one customer (default: all)")
  e.add_argument("--serial", default=None, help="also try this serial number (hex)")
  e.add_argument("--invalid", type=int, default=100)
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
  lo.add_argument("--key", type=int, default=None)
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
