"""`wdmjax autoencoder train` and `wdmjax autoencoder generate`: a small latent diffusion
model from the shell (the autoencoder and its latent set; images of a latent DiT)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys

from wdmjax import runs
from wdmjax.runs.autoencoder import AUTOENCODER_DATA


def cmd_train(args) -> int:
  # TFDS announces the build of the latent set on stdout: stdout is for the result alone.
  with contextlib.redirect_stdout(sys.stderr):
    r = runs.train_autoencoder(args.workdir, args.data, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr,
                               kl_weight=args.kl_weight, seed=args.seed,
                               data_dir=args.data_dir, progress=not args.no_progress)
  if args.json:
    print(json.dumps({**dataclasses.asdict(r), "next": r.train_command}))
    return 0
  print(f"autoencoder: {r.workdir} ({r.steps} steps, {r.seconds:.1f} s)")
  print(f"held-out reconstruction PSNR {r.psnr:.2f} dB, latent scale {r.scale:.4f} "
        f"({r.reconstructions})")
  print(f"{r.latents_name}: {r.num_latents:,} latents in {r.latents_data_dir}")
  print(f"next, train a latent DiT: {r.train_command}")
  return 0


def cmd_generate(args) -> int:
  r = runs.generate(args.ldm_workdir, args.num, seed=args.seed, steps=args.steps,
                    guidance=args.guidance, out=args.out)
  print(f"{len(r.images)} images -> {r.path}")
  return 0


def add_parsers(sub) -> None:
  a = sub.add_parser("autoencoder", help="a small latent diffusion model: train the "
                     "autoencoder and its latent set; generate through its decoder")
  asub = a.add_subparsers(dest="autoencoder_command", required=True)
  t = asub.add_parser("train", help="train the autoencoder of an embedded image set and "
                      "encode the set into WORKDIR/tfds (ae_latents/DATA)")
  t.add_argument("--workdir", required=True, help="a new directory for the autoencoder")
  t.add_argument("--data", default="mnist5k", help=", ".join(AUTOENCODER_DATA))
  t.add_argument("--steps", type=int, default=4000)
  t.add_argument("--batch-size", type=int, default=8)
  t.add_argument("--lr", type=float, default=2e-3)
  t.add_argument("--kl-weight", type=float, default=1e-6)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--data-dir", default=None, help="TFDS data dir of the image set")
  t.add_argument("--no-progress", action="store_true")
  t.add_argument("--json", action="store_true")
  t.set_defaults(func=cmd_train)

  g = asub.add_parser("generate", help="images of a latent DiT, decoded by its autoencoder")
  g.add_argument("--ldm", dest="ldm_workdir", required=True,
                 help="the latent DiT's workdir (trained on ae_latents/...)")
  g.add_argument("--num", type=int, default=100)
  g.add_argument("--out", default="grid.png", help="the PNG to write")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
  g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
  g.set_defaults(func=cmd_generate)
