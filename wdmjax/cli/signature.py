"""`wdmjax signature ...`: Stable Signature from the shell (pre-train the extractor, sign a
latent diffusion model's decoder for N users, generate, detect, identify).

`embed`, `detect` and `identify` need the owner key: `--key-file FILE` (made by `wdmjax
keygen FILE`), or `$WDMJAX_OWNER_KEY_FILE`, or the key itself in `$WDMJAX_OWNER_KEY`. The key
is never printed nor written into the workdir."""

from __future__ import annotations

import json

from wdmjax import runs
from wdmjax.keys import KEY_HELP
from wdmjax.runs.signature import CHECKPOINT_EVERY
from wdmjax.signature.pretrain import SELECTIONS


def cmd_pretrain(args) -> int:
  r = runs.signature_pretrain(args.workdir, args.data, steps=args.steps,
                              warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                              lr=args.lr, selection=args.selection, candidates=args.candidates,
                              pool=args.pool, seed=args.seed, data_dir=args.data_dir,
                              progress=not args.no_progress,
                              checkpoint_every=args.checkpoint_every)
  accs = ", ".join(f"{k} {v:.3f}" for k, v in r.attacked_bit_accuracy.items())
  resumed = f", resumed from step {r.resumed_from}" if r.resumed_from else ""
  print(f"extractor: {r.workdir} ({r.steps} steps, {r.selection}, {r.seconds:.0f} s{resumed})")
  print(f"held-out bit accuracy: {accs}")
  return 0


def cmd_embed(args) -> int:
  r = runs.signature_embed(args.workdir, args.ldm, args.users, key_file=args.key_file,
                           seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, image_weight=args.image_weight,
                           null_images=args.null_images, progress=not args.no_progress)
  if r.cleaned:
    print(f"removed what an interrupted signing left: {', '.join(r.cleaned)}")
  print(f"{r.users} signed decoders in {r.decoders} ({r.seconds:.0f} s); bit accuracy "
        f"{r.bit_accuracy:.3f} (worst user {r.worst_bit_accuracy:.3f})")
  return 0


def cmd_generate(args) -> int:
  r = runs.signature_generate(args.workdir, None if args.original else args.user, args.num,
                              seed=args.seed, out=args.out)
  who = "the original decoder" if args.original else f"user {args.user}"
  print(f"{len(r.images)} images of {who} -> {r.path}")
  return 0


def _detect(args, user) -> int:
  rep = runs.signature_detect(args.workdir, args.images, user=user, fpr=args.fpr,
                              registry=args.registry, key_file=args.key_file)
  if args.json:
    print(json.dumps(rep))
    return 0
  for row in rep["images"]:
    who = "-" if row["user"] is None else str(row["user"])
    print(f"{row['image']}: {row['agreeing']}/{rep['num_bits']} bits, log10 p "
          f"{row['log10_p']:.2f}, {'detected' if row['detected'] else 'not detected'}, "
          f"user {who}")
  print(f"{rep['detected']}/{len(rep['images'])} images detected at FPR {rep['fpr']:g} "
        f"(threshold {rep['threshold']} bits, {rep['users']} users)")
  return 0


def cmd_detect(args) -> int:
  return _detect(args, args.user)


def cmd_identify(args) -> int:
  return _detect(args, None)


def add_parsers(sub) -> None:
  s = sub.add_parser("signature", help="Stable Signature: every image of a latent diffusion "
                     "model signed by its decoder, detected with an exact test")
  ssub = s.add_subparsers(dest="signature_command", required=True)
  p = ssub.add_parser("pretrain", help="pre-train the HiDDeN encoder and extractor with "
                      "attacks in the loop; fit the whitening")
  p.add_argument("--workdir", required=True, help="the signature workdir")
  p.add_argument("--data", default="mnist5k")
  p.add_argument("--steps", type=int, default=4000)
  p.add_argument("--warmup-steps", type=int, default=2000, help="steps without attacks first")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--selection", default="uncertainty", help=" or ".join(SELECTIONS))
  p.add_argument("--candidates", type=int, default=3, help="attacks scored per batch")
  p.add_argument("--pool", type=int, default=1, help="1: global average pooling (published); "
                 "G: a G x G grid of cells (learns far faster, tolerates crops less)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY,
                 help="save the state every N steps (a rerun of the same command resumes)")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=cmd_pretrain)

  e = ssub.add_parser("embed", help="fine-tune one decoder per user (messages from the owner "
                      "key)")
  e.add_argument("--workdir", required=True, help="the signature workdir (pre-trained)")
  e.add_argument("--ldm", required=True, help="the latent DiT's workdir")
  e.add_argument("--users", type=int, required=True)
  e.add_argument("--key-file", default=None, help=KEY_HELP)
  e.add_argument("--seed", type=int, default=0, help="the fine-tuning's batches (the "
                 "messages come from the owner key)")
  e.add_argument("--steps", type=int, default=100)
  e.add_argument("--batch-size", type=int, default=4)
  e.add_argument("--lr", type=float, default=5e-4)
  e.add_argument("--image-weight", type=float, default=0.2)
  e.add_argument("--null-images", type=int, default=1000,
                 help="unsigned images of the model the signing's whitening is fitted on, so "
                 "that detection's false-positive rate holds on them (0: the extractor's)")
  e.add_argument("--no-progress", action="store_true")
  e.set_defaults(func=cmd_embed)

  g = ssub.add_parser("generate", help="images of the LDM through a user's decoder (PNGs)")
  g.add_argument("--workdir", required=True)
  g.add_argument("--user", type=int, default=0)
  g.add_argument("--original", action="store_true", help="the unsigned decoder instead")
  g.add_argument("--num", type=int, default=16)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--out", required=True, help="a new directory for the PNGs")
  g.set_defaults(func=cmd_generate)

  for name, func, text in (("detect", cmd_detect, "is a user's message in each image?"),
                           ("identify", cmd_identify, "which user signed each image?")):
    d = ssub.add_parser(name, help=text)
    d.add_argument("--workdir", required=True, help="the signature workdir")
    d.add_argument("--images", required=True, help="a directory of PNG/JPEG images, or one; "
                   "the generated size or crops and downscales of it")
    if name == "detect":
      d.add_argument("--user", type=int, default=None,
                     help="test this user's message alone (default: identify among all)")
    d.add_argument("--fpr", type=float, default=1e-6)
    d.add_argument("--registry", default=None, help="the registry (default: the workdir's)")
    d.add_argument("--key-file", default=None, help=KEY_HELP)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=func)
