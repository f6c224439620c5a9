"""The `wdmjax` command: diffusion models, their watermarks and the tools around them.

Subcommands: train, sample, keygen, embed, extract, verify, attack, finetune, params, plan, latents,
demo, augment preview, classifier, autoencoder train, autoencoder generate,
signature pretrain/embed/generate/detect/identify,
serial teacher/issue/eval/lock/sample, ood score/eval, evaluate. Each calls one
function of `wdmjax.runs` and prints what it returns.

Errors in what the user typed are printed as one line (`wdmjax: error: ...`, exit status 2),
never as a traceback. The library names a bad parameter (`steps: expected ...`); the command
line names the flag that set it (`--steps: expected ...`). A failure of the system underneath
(a read-only file system, a full disk, a permission denied, ...) is one line too,
`wdmjax: error: PATH: STRERROR`, with exit status 1. A run (train, embed, finetune, demo)
stopped by SIGTERM or Ctrl-C saves its last step and exits with status 128 + the signal's
number (143 for SIGTERM, 130 for Ctrl-C): not finished, rerun the same command to resume.
Every other command stopped by SIGTERM exits with 143 too, after undoing what it had not
finished. Every writing command holds its workdir's lock (`wdmjax.locks`): a second one on
the same workdir is refused in one line naming the first one's pid.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading

import jax

from wdmjax import runs
from wdmjax.cli.attack import add_parsers as add_attack_parsers
from wdmjax.cli.augment import add_parsers as add_augment_parsers
from wdmjax.cli.autoencoder import add_parsers as add_autoencoder_parsers
from wdmjax.cli.demo import add_parser as add_demo_parser
from wdmjax.cli.evaluate import add_parser as add_evaluate_parser
from wdmjax.cli.multihost import add_distributed_args, connect
from wdmjax.cli.ood import add_parsers as add_ood_parsers
from wdmjax.cli.peft import add_parsers as add_peft_parsers
from wdmjax.cli.serial import add_parsers as add_serial_parsers
from wdmjax.cli.signature import add_parsers as add_signature_parsers
from wdmjax.cli.watermark import add_parsers as add_watermark_parsers
from wdmjax.errors import Interrupted, Terminated, WdmjaxError
from wdmjax.train.compilation import enable_compilation_cache
from wdmjax.train.distributed import exit_run
from wdmjax.train.host_memory import keep_host_memory

# Library parameter names whose flag is spelled differently.
_FLAG_OF = {"overrides": "set", "strategy": "peft", "guidance_scale": "guidance",
            "image_size": "image_size", "chips": "chip",
            "initialization_timeout": "init_timeout"}
_NAMES = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:(?:/|, )[A-Za-z_][A-Za-z0-9_]*)*):")


def _cmd_train(args) -> int:
  r = runs.train(args.config, args.workdir, args.set, samples=not args.no_samples,
                 progress=not args.no_progress, log=print)
  if jax.process_index() == 0:
    if r.samples:
      print(f"samples: {r.samples}")
    print(f"workdir: {r.workdir} (step {r.step})")
  return 0


def _cmd_sample(args) -> int:
  r = runs.sample(args.workdir, args.num, sampler=args.sampler, steps=args.steps, eta=args.eta,
                  guidance=args.guidance, seed=args.seed, raw=args.raw, out=args.out)
  print(f"{args.num} samples ({r.sampler}, {r.steps} steps) in {r.seconds:.1f} s -> {r.path}")
  return 0


def _cmd_latents(args) -> int:
  r = runs.latents(args.npz_dir, args.image_size, args.data_dir)
  print(f"{r.name}: {r.num_examples:,} latents in {r.data_dir}")
  return 0


def _cmd_plan(args) -> int:
  p = runs.plan(args.config, args.devices, fsdp=args.fsdp, peft=args.peft, chips=args.chip,
                mfu=args.mfu, overrides=args.set)
  if args.json:
    print(json.dumps(p))
    return 0
  gib = 2**30
  print(f"{p['params']:,} parameters ({p['trainable']:,} trained), global batch {p['batch']}, "
        f"mesh {p['mesh']}")
  frozen = p["frozen_bytes_per_device"]
  print(f"train state {p['state_bytes'] / gib:.2f} GiB: {p['state_bytes_per_device'] / gib:.2f}"
        f" GiB per device" + (f", frozen weights {frozen / gib:.2f} GiB per device"
                              if frozen else ""))
  print(f"model FLOPs per step {p['flops_per_step'] / 1e12:.1f} TFLOP "
        f"({p['flops_per_step'] / p['batch'] / 1e9:.1f} GFLOP per example, forward + "
        f"backward)")
  print(f"at {100 * p['mfu']:.0f}% MFU on {p['devices']} chips ({p['steps']:,} steps):")
  print("| chip | step (s) | images/s | run (h) | state per chip (GiB) | chip memory (GiB) |")
  print("|---|---|---|---|---|---|")
  for r in p["chips"]:
    print(f"| {r['chip']} | {r['step_s']:.3f} | {r['images_per_s']:,.0f} | {r['hours']:.1f} | "
          f"{r['state_gib_per_chip']:.2f} | {r['chip_gib']:.0f} |")
  return 0


def _cmd_keygen(args) -> int:
  kid = runs.keygen(args.path)
  print(f"owner key {kid} written to {args.path} (mode 600): keep it safe and private; "
        f"pass it with --key-file or $WDMJAX_OWNER_KEY_FILE")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="wdmjax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train a diffusion model from a config (resumes a workdir)")
  t.add_argument("--config", required=True, help="a shipped config's name (mnist5k_dit, ...) "
                 "or a config file")
  t.add_argument("--workdir", required=True, help="checkpoints, metrics and samples go here")
  t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value, e.g. --set train.steps=100 (repeatable)")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  t.add_argument("--no-samples", action="store_true", help="no final sample grid")
  add_distributed_args(t)
  t.set_defaults(func=_cmd_train)

  s = sub.add_parser("sample", help="draw a sample grid from a trained workdir")
  s.add_argument("--workdir", required=True)
  s.add_argument("--num", type=int, default=64)
  s.add_argument("--sampler", choices=["ddim", "ddpm"], default=None)
  s.add_argument("--steps", type=int, default=None)
  s.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
  s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA")
  s.add_argument("--out", default="grid.png")
  s.set_defaults(func=_cmd_sample)

  la = sub.add_parser("latents", help="build the imagenet_latents TFDS set from VAE latent "
                      "shards (*.npz with latents [N, R, R, 4] and labels [N])")
  la.add_argument("--npz-dir", required=True, help="the directory of *.npz shards")
  la.add_argument("--image-size", type=int, default=256, help="256 (32x32 latents) or 512")
  la.add_argument("--data-dir", default=None, help="TFDS data dir (default: "
                  "$WDMJAX_DATA_DIR or ~/.cache/wdmjax/tensorflow_datasets)")
  la.set_defaults(func=_cmd_latents)

  pl = sub.add_parser("plan", help="plan a run from abstract shapes: parameters, state bytes "
                      "per chip, model FLOPs per step, step time at an assumed MFU")
  pl.add_argument("--config", required=True)
  pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  pl.add_argument("--devices", type=int, required=True, help="chips in the mesh")
  pl.add_argument("--fsdp", type=int, default=None, help="FSDP axis size (default mesh.fsdp)")
  pl.add_argument("--peft", default=None, help="plan a fine-tune by this strategy (difffit, ...)")
  pl.add_argument("--chip", action="append", default=None,
                  help="chip kind (repeatable; default all known)")
  pl.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
  pl.add_argument("--json", action="store_true")
  pl.set_defaults(func=_cmd_plan)

  kg = sub.add_parser("keygen", help="write a new owner key file (mode 600) for signature "
                      "and serial")
  kg.add_argument("path", help="the new key file (an existing file is never overwritten)")
  kg.set_defaults(func=_cmd_keygen)

  add_watermark_parsers(sub)
  add_attack_parsers(sub)
  add_peft_parsers(sub)
  add_demo_parser(sub)
  add_augment_parsers(sub)
  add_autoencoder_parsers(sub)
  add_signature_parsers(sub)
  add_serial_parsers(sub)
  add_ood_parsers(sub)
  add_evaluate_parser(sub)
  _no_abbreviations(p)
  return p


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
  """Every flag must be typed in full: argparse would take `--key SECRET` for `--key-file
  SECRET` (and quote the secret back as a missing file)."""
  parser.allow_abbrev = False
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for child in action.choices.values():
        _no_abbreviations(child)


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
  """dest -> its long flag, for the options of `command`."""
  for action in parser._subparsers._group_actions:  # the subcommands
    sub = action.choices.get(command)
    if sub is not None:
      flags = {a.dest: max(a.option_strings, key=len) for a in sub._actions if a.option_strings}
      for nested in (sub._subparsers._group_actions if sub._subparsers else []):
        for p in nested.choices.values():  # `wdmjax augment preview`: its options too
          flags.update({a.dest: max(a.option_strings, key=len) for a in p._actions
                        if a.option_strings})
      return flags
  return {}


def flag_message(message: str, flags: dict[str, str]) -> str:
  """'steps: expected ...' -> '--steps: expected ...' when every name before the colon is a
  parameter that one of the command's flags sets; other messages are left as they are."""
  m = _NAMES.match(message)
  if not m:
    return message
  names = re.split(r"/|, ", m.group(1))
  dests = [_FLAG_OF.get(n, n) for n in names]
  if not all(d in flags for d in dests):
    return message
  head = m.group(1)
  for n, d in zip(names, dests, strict=True):
    head = re.sub(rf"\b{n}\b", flags[d], head, count=1)
  return head + message[m.end(1):]


# Storage libraries below Orbax (tensorstore) report an OS error as text, e.g.
# 'RESOURCE_EXHAUSTED: ... local file "P": ... No space left on device [os_error_code='28']'.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")
_OS_ERROR_PATH = re.compile(r'(?:local file|Failed writing:|Failed reading:|opening)\s+"([^"]+)"')


def os_error(e: BaseException) -> OSError | None:
  """The OS error behind `e` (itself, one in its chain of explicit causes, or one that
  tensorstore reports as text), or None when it has none."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError):
      return e
    m = _OS_ERROR_CODE.search(str(e))
    if m:
      code, paths = int(m.group(1)), _OS_ERROR_PATH.findall(str(e))
      return OSError(code, os.strerror(code), paths[-1] if paths else None)
    e = e.__cause__  # not __context__: a bug raised while handling an OS error stays a bug
  return None


def describe_os_error(e: OSError) -> str:
  """'PATH: STRERROR' (e.g. '/data/run: Read-only file system'), or the error itself when it
  names no file."""
  if e.filename is not None and e.strerror:
    return f"{os.fsdecode(e.filename)}: {e.strerror}"
  return e.strerror or str(e) or type(e).__name__


def _quiet_libraries() -> None:
  """Orbax and TensorStore log every failure of their worker threads with a traceback
  (hundreds of lines on a full disk) before the same error reaches `main`, which says it in
  one line: the command line shows only their critical messages (WDMJAX_LOG=1: all)."""
  if not os.environ.get("WDMJAX_LOG"):
    for name in ("absl", "asyncio"):
      logging.getLogger(name).setLevel(logging.CRITICAL)


def _raise_terminated(signum, frame):
  raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
  """Every command: SIGTERM stops it as Ctrl-C does (a training loop saves its step first,
  any other command undoes what it had not finished), with exit status 143."""
  if threading.current_thread() is threading.main_thread():
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
      return _main(argv)
    finally:
      signal.signal(signal.SIGTERM, old)
  return _main(argv)


def _main(argv: list[str] | None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  _quiet_libraries()
  enable_compilation_cache()  # before the first compilation, or JAX ignores it
  keep_host_memory()  # before JAX starts its threads, or it does nothing
  try:
    if hasattr(args, "coordinator"):
      connect(args)
    code = args.func(args)
    if hasattr(args, "coordinator"):
      exit_run(code)
    return code
  except WdmjaxError as e:
    print(f"wdmjax: error: {flag_message(str(e), _flags(parser, args.command))}",
          file=sys.stderr)
    return 2
  except Exception as e:  # an OS error below is one line too; anything else is a bug
    err = os_error(e)
    if err is None:
      raise
    print(f"wdmjax: error: {describe_os_error(err)}", file=sys.stderr)
    return 1
  except Interrupted as e:  # saved and resumable: a distinct status, not a success
    if jax.process_index() == 0:
      print(f"wdmjax: {e}", file=sys.stderr)
    code = 128 + e.signum
    if hasattr(args, "coordinator"):
      exit_run(code)
    return code
  except Terminated as e:
    print(f"wdmjax: {e}", file=sys.stderr)
    code = 128 + e.signum
    if hasattr(args, "coordinator"):
      exit_run(code)
    return code
  except KeyboardInterrupt:
    print("wdmjax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
