"""`wdmjax embed | extract | verify`: WDM on workdirs.

A watermarked workdir is an ordinary training workdir (config.json, checkpoints/, metrics)
plus `secret.json` (the trigger, watermark, key and gammas; see `watermark.Secret`) and
`embedding.json` (how it was made: base workdir, steps). The secret never goes into the
config, the metrics or the log.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from wdmjax.cli.multihost import add_distributed_args
from wdmjax.cli.peft import peft_args, spec_from_args
from wdmjax.errors import WdmjaxError, check
from wdmjax.watermark import (
  ALPHA,
  ImageShape,
  Secret,
  decoy_test,
  expected_bits,
  keyed_test,
  vote_bits,
  watermark_labels,
  wdp_input,
  wdp_loss,
)
from wdmjax.watermark.secret import SECRET_FILE
from wdmjax.watermark.triggers import expand_blocks

EMBED_STEPS = 1000
FINETUNE_LR = 1e-4
NUM_DECOYS = 4
DECOY_FRACTION = 0.5
DECOY_T_MIN = 0.2


# ----------------------------------------------------------------------------- files


def _write_private(path: str, text: str) -> None:
  """Atomic write, readable by the owner only."""
  tmp = path + ".tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def read_secret(workdir: str) -> Secret | None:
  """The workdir's secret, or None when it has none."""
  path = os.path.join(workdir, SECRET_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return Secret.from_json(f.read(), source=path)


def write_secret(workdir: str, secret: Secret) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, SECRET_FILE)
  _write_private(path, secret.to_json() + "\n")
  return path


def image_shape(cfg) -> ImageShape:
  return ImageShape(int(cfg.data.resolution), int(cfg.data.channels))


# ----------------------------------------------------------------------------- embed


def embed(workdir: str, secret: Secret, *, base: str | None = None, config: str | None = None,
          steps: int = EMBED_STEPS, lr: float | None = None, overrides: list[str] = (),
          decoy_fraction: float = DECOY_FRACTION, decoy_t_min: float = DECOY_T_MIN,
          peft=None, progress: bool = True, log=print):
  """Trains the watermark into a model: fine-tunes the base workdir's EMA weights, or trains
  from scratch from `config`, with the joint WDP loss. Resumes an interrupted `workdir`.
  `peft` (a `wdmjax.peft.PeftSpec`, with `base`): a parameter-efficient fine-tune, e.g.
  DiffFit, whose learning rate defaults to the base's times `wdmjax.peft.LR_MULT`; the
  watermarked model is then a delta on the base.

  In a multi-host run every process calls it; process 0 writes the secret and the record.

  Returns the final TrainState.
  """
  from wdmjax.train import load_config, load_trained, train
  from wdmjax.train.checkpoint import has_checkpoint
  from wdmjax.train.config import apply_override, validate
  from wdmjax.train.loop import read_config
  from wdmjax.train.sampling import (
    apply_fn_for,
    model_from_config,
    num_classes,
    schedule_from_config,
  )

  check((base is None) != (config is None),
        "--base/--config: expected exactly one (a base workdir to fine-tune, or a config to "
        "train from scratch)")
  check(isinstance(steps, int) and steps >= 1, f"--steps: expected a positive integer, "
                                               f"got {steps!r}")
  old = read_secret(workdir)
  check(old is None or old == secret,
        f"--workdir: {workdir!r} already holds a model with a different secret; use a new "
        f"--workdir (or the same --trigger/--watermark/--key/--gamma1/--gamma2/--block)")
  init_params = None
  check(peft is None or base is not None, "--peft: expected --base (a model to fine-tune)")
  if base is not None:
    check(os.path.abspath(base) != os.path.abspath(workdir),
          "--workdir: expected a new directory, not the --base workdir itself")
    cfg = read_config(base)
    if not has_checkpoint(workdir) and peft is None:
      _, _, init_params = load_trained(base, ema=True)
    if lr is None and peft is not None and peft.strategy != "full":
      from wdmjax.peft import LR_MULT

      lr = float(cfg.train.lr) * LR_MULT
    apply_override(cfg, f"train.lr={FINETUNE_LR if lr is None else lr}")
    apply_override(cfg, "train.warmup_steps=0")
  else:
    cfg = load_config(config, [])
    if lr is not None:
      apply_override(cfg, f"train.lr={lr}")
  apply_override(cfg, f"train.steps={steps}")
  for o in overrides:
    apply_override(cfg, o)
  validate(cfg)
  trigger, _, targets = secret.images(image_shape(cfg), cfg.data.data_dir)
  model = model_from_config(cfg)
  k = num_classes(cfg)
  p = float(cfg.model.get("class_dropout_prob", 0.0) or 0.0) if k else 0.0
  null = -1 if (k and p > 0) else None
  loss = wdp_loss(apply_fn_for(model), schedule_from_config(cfg), cfg.diffusion.objective,
                  trigger=trigger, watermark=targets, gamma1=secret.gamma1,
                  gamma2=secret.gamma2, class_dropout_prob=p, null_label=null, num_classes=k,
                  decoy_fraction=decoy_fraction, decoy_kind=decoy_kind_for(secret.trigger),
                  decoy_t_min=decoy_t_min)
  fresh = not has_checkpoint(workdir)
  main = jax.process_index() == 0
  written = []
  if main:
    written = [write_secret(workdir, secret), os.path.join(workdir, "embedding.json")]
    with open(written[1], "w") as f:
      json.dump({"method": "wdm", "base": os.path.abspath(base) if base else None,
                 "config": config, "steps": steps, "lr": float(cfg.train.lr),
                 "decoy_fraction": decoy_fraction, "decoy_t_min": decoy_t_min,
                 "peft": None if peft is None else peft.strategy}, f, indent=2)
  try:
    if peft is not None:
      from wdmjax.peft import finetune

      return finetune(cfg, workdir, base, peft, loss_fn=loss, progress=progress, log=log)
    return train(cfg, workdir, loss_fn=loss, init_params=init_params, progress=progress,
                 log=log)
  except WdmjaxError:
    if fresh and not has_checkpoint(workdir):  # rejected before any step: leave nothing
      for path in written:
        if os.path.exists(path):
          os.remove(path)
    raise


def decoy_kind_for(trigger_spec: str) -> str:
  """Decoys of the trigger's own kind: random pixels for `random:`, columns for `stripes:`."""
  kind = trigger_spec.partition(":")[0]
  return {"random": "pixels", "stripes": "stripes"}.get(kind, "mixed")


# ----------------------------------------------------------------------------- extract


def extract_samples(cfg, model, params, trigger: np.ndarray, gamma1: float, num: int, *,
                    sampler: str = "ddim", steps: int = 50, seed: int = 0) -> np.ndarray:
  """`num` extracted samples [num, H, W, C] in [-1, 1]: the trained model sampled with the
  trigger-shifted network input (no guidance; labels as in the watermark loss)."""
  import jax.numpy as jnp

  from wdmjax.train.sampling import num_classes, sample_images

  check(isinstance(num, int) and num >= 1, f"--num: expected a positive integer, got {num!r}")
  k = num_classes(cfg)
  p = float(cfg.model.get("class_dropout_prob", 0.0) or 0.0) if k else 0.0
  rng = jax.random.PRNGKey(seed)
  labels = watermark_labels(num, k, -1 if p > 0 else None, jax.random.fold_in(rng, 1))
  return sample_images(cfg, model, params, rng, num, sampler=sampler, steps=steps, eta=0.0,
                       guidance_scale=1.0, labels=labels, input_transform=wdp_input,
                       transform_args=(jnp.asarray(trigger, jnp.float32),
                                       jnp.float32(gamma1)))


def resolve_secret(workdir: str, trigger: str | None, watermark: str | None, key: int | None,
                   gamma1: float | None, block: int | None) -> Secret:
  """The workdir's secret with any explicitly given part replaced; a suspect workdir without
  a secret needs --trigger and --watermark."""
  stored = read_secret(workdir)
  if stored is None:
    check(trigger is not None and watermark is not None,
          f"--trigger/--watermark: {workdir!r} has no {SECRET_FILE}; give the secret "
          f"explicitly (--trigger SPEC --watermark SPEC [--key INT])")
    stored = Secret(trigger=trigger, watermark=watermark)
  changes = {name: v for name, v in (("trigger", trigger), ("watermark", watermark),
                                     ("key", key), ("gamma1", gamma1), ("block", block))
             if v is not None}
  return Secret(**{**stored.__dict__, **changes})


def verify_workdir(workdir: str, secret: Secret, *, num: int = 16, sampler: str = "ddim",
                   steps: int = 50, seed: int = 0, alpha: float = ALPHA,
                   decoys: int = NUM_DECOYS, ema: bool = True) -> dict:
  """Extracts `num` samples from the workdir's model with the secret's trigger and tests them
  (exact keyed test with a key, decoy-calibrated test without). Returns the report."""
  from wdmjax.train import load_trained

  cfg, model, params = load_trained(workdir, ema=ema)
  return verify_model(cfg, model, params, secret, num=num, sampler=sampler, steps=steps,
                      seed=seed, alpha=alpha, decoys=decoys)


def verify_model(cfg, model, params, secret: Secret, *, num: int = 16, sampler: str = "ddim",
                 steps: int = 50, seed: int = 0, alpha: float = ALPHA,
                 decoys: int = NUM_DECOYS) -> dict:
  from wdmjax.watermark.triggers import make_trigger

  shape = image_shape(cfg)
  trigger, watermark, _ = secret.images(shape, cfg.data.data_dir)
  samples = extract_samples(cfg, model, params, trigger, secret.gamma1, num, sampler=sampler,
                            steps=steps, seed=seed)
  extra = {"num_samples": num, "sampler": sampler, "steps": steps}
  if secret.key is not None:
    out = keyed_test(samples, watermark, secret.key, secret.block, alpha)
  else:
    check(decoys >= 1, f"--decoys: expected at least 1 for an unkeyed watermark, got {decoys}")
    decoy_samples = [
      extract_samples(cfg, model, params, make_trigger(f"random:{1_000_003 + i}", shape),
                      secret.gamma1, num, sampler=sampler, steps=steps, seed=seed + 1 + i)
      for i in range(decoys)]
    out = decoy_test(samples, decoy_samples, watermark, secret.block, alpha)
  out.update(extra)
  return out


def evidence_images(samples: np.ndarray, secret: Secret, watermark: np.ndarray) -> np.ndarray:
  """The vote of the samples and the expected bits as two images [2, H, W, C] in [-1, 1]."""
  c = samples.shape[-1]
  votes = vote_bits(samples, secret.block)
  want = expected_bits(watermark, secret.key, secret.block)
  return np.stack([expand_blocks(votes, secret.block, c), expand_blocks(want, secret.block, c)])


# ----------------------------------------------------------------------------- commands


def cmd_embed(args) -> int:
  secret = Secret(trigger=args.trigger, watermark=args.watermark, key=args.key,
                  gamma1=args.gamma1, gamma2=args.gamma2, block=args.block)
  t0 = time.time()
  state = embed(args.workdir, secret, base=args.base, config=args.config, steps=args.steps,
                lr=args.lr, overrides=args.set, decoy_fraction=args.decoy_fraction,
                decoy_t_min=args.decoy_t_min, progress=not args.no_progress,
                peft=None if args.peft is None else spec_from_args(args))
  if jax.process_index() == 0:
    print(f"watermarked workdir: {os.path.abspath(args.workdir)} (step {int(state.step)}, "
          f"{time.time() - t0:.0f} s); secret in {SECRET_FILE}")
  return 0


def cmd_extract(args) -> int:
  from wdmjax.train import load_trained, save_grid

  check(args.out.lower().endswith(".png"), f"--out: expected a .png path, got {args.out!r}")
  secret = resolve_secret(args.workdir, args.trigger, args.watermark, args.key, args.gamma1,
                          args.block)
  cfg, model, params = load_trained(args.workdir, ema=not args.raw)
  trigger, watermark, _ = secret.images(image_shape(cfg), cfg.data.data_dir)
  t0 = time.time()
  samples = extract_samples(cfg, model, params, trigger, secret.gamma1, args.num,
                            sampler=args.sampler, steps=args.steps, seed=args.seed)
  tiles = np.concatenate([samples, evidence_images(samples, secret, watermark)])
  save_grid(tiles, args.out, upscale=2)
  print(f"{args.num} extracted samples ({args.sampler}, {args.steps} steps, "
        f"{time.time() - t0:.1f} s), then the block vote and the expected bits -> {args.out}")
  return 0


def cmd_verify(args) -> int:
  secret = resolve_secret(args.workdir, args.trigger, args.watermark, args.key, args.gamma1,
                          args.block)
  out = verify_workdir(args.workdir, secret, num=args.num, sampler=args.sampler,
                       steps=args.steps, seed=args.seed, alpha=args.alpha, decoys=args.decoys)
  if args.json:
    print(json.dumps(out))
  else:
    print(format_report(out))
  return 0


def format_report(r: dict) -> str:
  verdict = "VERIFIED" if r["verified"] else "not verified"
  return (f"{verdict}: {r['agreeing_bits']}/{r['bits']} bits agree "
          f"({100 * r['bit_agreement']:.1f}%, null {100 * r['null_agreement']:.1f}%), "
          f"log10 p = {r['log10_p_value']:.2f} (alpha {r['alpha']:g}, {r['test']} test, "
          f"{r['num_samples']} samples, {r['sampler']}-{r['steps']})")


def add_parsers(sub) -> None:
  """Adds embed, extract and verify to the `wdmjax` subcommand parser."""
  from wdmjax.watermark import GAMMA1, GAMMA2

  def secret_args(p, required: bool):
    p.add_argument("--trigger", required=required, default=None,
                   help="random:SEED, stripes:SEED or an image file")
    p.add_argument("--watermark", required=required, default=None,
                   help="keyed:SEED, class:DATA:LABEL or an image file")
    p.add_argument("--key", type=int, default=None,
                   help="the owner's integer key (keyed bits give an exact test)")
    p.add_argument("--gamma1", type=float, default=GAMMA1 if required else None,
                   help="trigger mix of the watermark process")
    p.add_argument("--block", type=int, default=4 if required else None,
                   help="bit block size in pixels (must divide the resolution)")

  def sampling_args(p, num: int):
    p.add_argument("--num", type=int, default=num, help="extracted samples")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (respaced)")
    p.add_argument("--seed", type=int, default=0)

  e = sub.add_parser("embed", help="train a watermark into a model (WDM)")
  src = e.add_mutually_exclusive_group(required=True)
  src.add_argument("--base", help="a trained workdir to fine-tune")
  src.add_argument("--config", help="a config to train from scratch with the watermark")
  e.add_argument("--workdir", required=True, help="the watermarked model goes here")
  secret_args(e, required=True)
  e.add_argument("--gamma2", type=float, default=GAMMA2, help="watermark loss weight")
  e.add_argument("--steps", type=int, default=EMBED_STEPS)
  e.add_argument("--lr", type=float, default=None,
                 help=f"learning rate (default {FINETUNE_LR:g} when fine-tuning)")
  e.add_argument("--decoy-fraction", type=float, default=DECOY_FRACTION,
                 help="share of the watermark half-batch given to decoy triggers (task images "
                      "behind random triggers, ordinary target), which makes the watermark "
                      "answer only to the secret trigger (0: the paper's loss)")
  peft_args(e, required=False)
  e.add_argument("--decoy-t-min", type=float, default=DECOY_T_MIN,
                 help="decoys only at timesteps t >= this fraction of the chain (low-noise "
                      "decoys leak speckle into ordinary samples)")
  e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config value (repeatable)")
  e.add_argument("--no-progress", action="store_true")
  add_distributed_args(e)
  e.set_defaults(func=cmd_embed)

  x = sub.add_parser("extract", help="sample a watermarked model with its trigger")
  x.add_argument("--workdir", required=True)
  secret_args(x, required=False)
  sampling_args(x, 16)
  x.add_argument("--raw", action="store_true", help="use the raw weights, not the EMA")
  x.add_argument("--out", default="watermark.png")
  x.set_defaults(func=cmd_extract)

  v = sub.add_parser("verify", help="test whether a model carries a watermark")
  v.add_argument("--workdir", required=True)
  secret_args(v, required=False)
  sampling_args(v, 16)
  v.add_argument("--alpha", type=float, default=ALPHA, help="false-positive level")
  v.add_argument("--decoys", type=int, default=NUM_DECOYS,
                 help="decoy triggers for an unkeyed watermark")
  v.add_argument("--json", action="store_true", help="print one JSON object")
  v.set_defaults(func=cmd_verify)
