"""The `wdmjax` command: diffusion models, their watermarks and the tools around them.

Subcommands: train, sample, embed, extract, verify, attack, finetune, params, plan, latents,
demo.

Errors in what the user typed are printed as one line (`wdmjax: error: ...`, exit status 2),
never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from wdmjax.cli.attack import add_parsers as add_attack_parsers
from wdmjax.cli.demo import add_parser as add_demo_parser
from wdmjax.cli.multihost import add_distributed_args, connect
from wdmjax.cli.peft import add_parsers as add_peft_parsers
from wdmjax.cli.watermark import add_parsers as add_watermark_parsers
from wdmjax.errors import WdmjaxError, check


def _cmd_train(args) -> int:
  import jax

  from wdmjax.train import load_config, train
  from wdmjax.train.loop import write_final_samples
  from wdmjax.train.sampling import model_from_config

  cfg = load_config(args.config, args.set)
  state = train(cfg, args.workdir, progress=not args.no_progress)
  main_process = jax.process_index() == 0
  if int(state.step) >= cfg.train.steps and not args.no_samples:
    path = write_final_samples(cfg, model_from_config(cfg), state, args.workdir)
    if main_process and path:
      print(f"samples: {path}")
  if main_process:
    print(f"workdir: {os.path.abspath(args.workdir)} (step {int(state.step)})")
  return 0


def _cmd_sample(args) -> int:
  import jax

  from wdmjax.train import load_trained, sample_images, save_grid
  from wdmjax.train.sampling import num_classes

  check(args.num >= 1, f"--num: expected a positive integer, got {args.num}")
  check(args.steps is None or args.steps >= 1,
        f"--steps: expected a positive integer, got {args.steps}")
  check(args.out.lower().endswith(".png"), f"--out: expected a .png path, got {args.out!r}")
  cfg, model, params = load_trained(args.workdir, ema=not args.raw)
  t0 = time.time()
  imgs = sample_images(cfg, model, params, jax.random.PRNGKey(args.seed), args.num,
                       sampler=args.sampler, steps=args.steps, eta=args.eta,
                       guidance_scale=args.guidance)
  k = num_classes(cfg)
  save_grid(imgs, args.out, nrow=k if k and args.num % k == 0 else None, upscale=2)
  print(f"{args.num} samples ({args.sampler or cfg.sample.sampler}, "
        f"{args.steps or cfg.sample.steps} steps) in {time.time() - t0:.1f} s -> {args.out}")
  return 0


def _cmd_latents(args) -> int:
  from wdmjax.data.latents import prepare_latents

  check(args.image_size in (256, 512), f"--image-size: expected 256 or 512, got {args.image_size}")
  builder = prepare_latents(args.npz_dir, args.image_size, args.data_dir)
  n = builder.info.splits["train"].num_examples
  print(f"imagenet_latents/{args.image_size}: {n:,} latents in {builder.data_dir}")
  return 0


def _cmd_plan(args) -> int:
  import json

  from wdmjax.train import load_config
  from wdmjax.train.plan import CHIPS, plan_step

  cfg = load_config(args.config, args.set)
  chips = args.chip or sorted(CHIPS)
  for c in chips:
    check(c in CHIPS, f"--chip: expected one of {sorted(CHIPS)}, got {c!r}")
  check(0 < args.mfu <= 1, f"--mfu: expected a fraction in (0, 1], got {args.mfu}")
  p = plan_step(cfg, args.devices, args.fsdp, args.peft)
  rows = []
  for c in chips:
    t = p.step_seconds(c, args.mfu)
    per_dev = p.state_bytes_per_device + p.frozen_bytes_per_device
    rows.append({"chip": c, "step_s": t, "images_per_s": p.batch / t,
                 "hours": t * cfg.train.steps / 3600, "state_gib_per_chip": per_dev / 2**30,
                 "chip_gib": CHIPS[c][1]})
  if args.json:
    print(json.dumps({**p.to_dict(), "mfu": args.mfu, "steps": cfg.train.steps, "chips": rows}))
    return 0
  gib = 2**30
  print(f"{p.params:,} parameters ({p.trainable:,} trained), global batch {p.batch}, mesh "
        f"{p.mesh}")
  print(f"train state {p.state_bytes / gib:.2f} GiB: {p.state_bytes_per_device / gib:.2f} GiB "
        f"per device" + (f", frozen weights {p.frozen_bytes_per_device / gib:.2f} GiB per "
                         f"device" if p.frozen_bytes_per_device else ""))
  print(f"model FLOPs per step {p.flops_per_step / 1e12:.1f} TFLOP "
        f"({p.flops_per_step / p.batch / 1e9:.1f} GFLOP per example, forward + backward)")
  print(f"at {100 * args.mfu:.0f}% MFU on {p.devices} chips ({cfg.train.steps:,} steps):")
  print("| chip | step (s) | images/s | run (h) | state per chip (GiB) | chip memory (GiB) |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['chip']} | {r['step_s']:.3f} | {r['images_per_s']:,.0f} | {r['hours']:.1f} | "
          f"{r['state_gib_per_chip']:.2f} | {r['chip_gib']:.0f} |")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="wdmjax", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)

  t = sub.add_parser("train", help="train a diffusion model from a config (resumes a workdir)")
  t.add_argument("--config", required=True, help="a config file, e.g. "
                 "experiments/configs/mnist5k_dit.py")
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

  add_watermark_parsers(sub)
  add_attack_parsers(sub)
  add_peft_parsers(sub)
  add_demo_parser(sub)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if hasattr(args, "coordinator"):
      connect(args)
    code = args.func(args)
    if hasattr(args, "coordinator"):
      from wdmjax.train.distributed import exit_run

      exit_run(code)
    return code
  except WdmjaxError as e:
    print(f"wdmjax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("wdmjax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
