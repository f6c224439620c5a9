"""WDM on workdirs: `embed` a watermark into a model, `extract` it, `verify` a suspect.

A watermarked workdir is an ordinary training workdir plus `secret.json` (the trigger,
watermark, key and gammas; see `wdmjax.watermark.Secret`, written with owner-only
permissions) and `embedding.json` (how it was made). The secret never goes into the config,
the metrics, the log or an attacked copy. `extract` and `verify` take it from the owner
only (`resolve_secret`): a suspect workdir's own secret.json never changes their test.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wdmjax.configs import BASE_SECTIONS, apply_override, apply_overrides, load_config, validate
from wdmjax.data import InputPipeline
from wdmjax.diffusion import check_steps
from wdmjax.errors import WdmjaxError, check, check_number, check_seed
from wdmjax.peft import LR_MULT, PeftSpec
from wdmjax.peft import finetune as _finetune
from wdmjax.runs.model import load_model
from wdmjax.train import TrainState, sample_images, save_grid, setup
from wdmjax.train import train as _train
from wdmjax.watermark import (
  ALPHA,
  ImageShape,
  Secret,
  add_warning,
  best_sample_test,
  decoy_test,
  decoy_trigger_specs,
  expected_bits,
  is_generated_trigger,
  keyed_test,
  make_trigger,
  reach_warning,
  soft_keyed_test,
  vote_bits,
  watermark_labels,
  wdp_input,
  wdp_loss,
)
from wdmjax.watermark.robust import (
  RobustSpec,
  anchored_loss,
  finetune_aware_loss,
  fisher_diagonal,
  surgery_loss,
  thief_optimizer,
)
from wdmjax.watermark.triggers import expand_blocks
from wdmjax.workdir import Workdir

EMBED_STEPS = 1000
FINETUNE_LR = 1e-4
NUM_DECOYS = 4
DECOY_FRACTION = 0.5
DECOY_T_MIN = 0.2
TESTS = ("vote", "soft", "best")  # the keyed tests of `verify`


# ----------------------------------------------------------------------------- the secret


def read_secret(workdir: str | Workdir) -> Secret | None:
  """The workdir's secret, or None when it has none."""
  wd = Workdir(workdir)
  text = wd.read_text(Workdir.SECRET)
  return None if text is None else Secret.from_json(text, source=wd.file(Workdir.SECRET))


def write_secret(workdir: str | Workdir, secret: Secret) -> str:
  """Writes secret.json, readable by the owner only."""
  return Workdir(workdir).write_private(Workdir.SECRET, secret.to_json() + "\n")


SECRET_PARTS = ("trigger", "watermark", "key", "gamma1", "block")
KEY_ENV = "WDMJAX_KEY"  # the environment variable `read_key` falls back on
EXPLICIT = "explicit"  # the secret source of a secret given as a value, not read from a file


def load_secret(path: str | os.PathLike) -> tuple[Secret, str]:
  """The owner's secret at `path` (a secret.json file, or a workdir holding one) and the
  absolute path of the file read."""
  path = os.fspath(path)
  file = os.path.join(path, Workdir.SECRET) if os.path.isdir(path) else path
  check(os.path.isfile(file), f"secret: expected the owner's {Workdir.SECRET} or a workdir "
                              f"holding one, got {path!r}")
  try:
    with open(file) as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise WdmjaxError(f"secret: could not read {file!r} "
                      f"({getattr(e, 'strerror', None) or type(e).__name__})") from None
  return Secret.from_json(text, source=file), os.path.abspath(file)


def resolve_secret(workdir: str | Workdir, secret: Secret | str | os.PathLike | None = None,
                   **parts) -> tuple[Secret, str]:
  """The secret to test the model of `workdir` with, and where it came from (the path of
  the secret.json read, or "explicit"). It comes from exactly one owner-side source:

  - `secret`: a `Secret`, or the path of the owner's secret.json or watermarked workdir;
    any of `parts` (trigger, watermark, key, gamma1, block; None: not given) then replace
    its fields;
  - else `parts` alone: trigger and watermark required, the other fields their defaults;
    nothing is read from `workdir`;
  - else `workdir`'s own secret.json: the owner checking their own model.
  A suspect's secret.json therefore never changes a test with an explicit secret.
  """
  unknown = sorted(set(parts) - set(SECRET_PARTS))
  check(not unknown, f"secret parts: expected some of {list(SECRET_PARTS)}, got {unknown}")
  given = {name: v for name, v in parts.items() if v is not None}
  if isinstance(secret, Secret):
    return dataclasses.replace(secret, **given), EXPLICIT
  if secret is not None:
    loaded, source = load_secret(secret)
    return dataclasses.replace(loaded, **given), source
  if given:
    check("trigger" in given and "watermark" in given,
          f"trigger/watermark: expected both with the explicit secret parts {sorted(given)}, "
          f"or a secret (the owner's {Workdir.SECRET} or workdir) for them to change; "
          f"nothing is read from the tested workdir")
    return Secret(**given), EXPLICIT
  wd = Workdir(workdir)
  stored = read_secret(wd)
  check(stored is not None,
        f"trigger/watermark: {wd.path!r} has no {Workdir.SECRET}; give the owner's secret "
        f"(secret: the owner's {Workdir.SECRET} or workdir) or the secret explicitly "
        f"(trigger, watermark and, for an exact test, key)")
  return stored, os.path.abspath(wd.file(Workdir.SECRET))


def read_key(key: int | None = None, key_file: str | os.PathLike | None = None, *,
             env: bool = True) -> int | None:
  """The owner's key from, in this order: `key`; the file `key_file` (one non-negative
  integer; the key stays off the command line, where other local users can see it); the
  environment variable WDMJAX_KEY (when `env`). None when none is given. Errors name the
  source, never the content."""
  if key is not None:
    check(isinstance(key, int) and not isinstance(key, bool) and key >= 0,
          "key: expected a non-negative integer")
    return key
  if key_file is not None:
    key_file = os.fspath(key_file)
    check(os.path.isfile(key_file), f"key_file: expected a file holding the key, got "
                                    f"{key_file!r} (no such file)")
    try:
      with open(key_file, "rb") as f:
        text = f.read(4097)
    except OSError as e:
      raise WdmjaxError(f"key_file: could not read {key_file!r} ({e.strerror})") from None
    return _parse_key(text, f"key_file: expected {key_file!r} to hold one non-negative "
                            f"integer (the key), and nothing else")
  text = os.environ.get(KEY_ENV, "") if env else ""
  if text.strip():
    return _parse_key(text.encode(), f"{KEY_ENV}: expected one non-negative integer (the key)")
  return None


def _parse_key(text: bytes, message: str) -> int:
  text = text.strip() if len(text) <= 4096 else b""
  check(0 < len(text) <= 40 and text.isdigit(), message)  # bytes.isdigit: ASCII digits only
  return int(text)


def image_shape(cfg: ml_collections.ConfigDict) -> ImageShape:
  return ImageShape(int(cfg.data.resolution), int(cfg.data.channels))


def decoy_kind_for(trigger_spec: str) -> str:
  """Decoys of the trigger's own kind: random pixels for `random:`, columns for `stripes:`."""
  kind = trigger_spec.partition(":")[0]
  return {"random": "pixels", "stripes": "stripes"}.get(kind, "mixed")


# ----------------------------------------------------------------------------- embed


@dataclasses.dataclass(frozen=True)
class EmbedResult:
  workdir: str
  step: int
  seconds: float
  secret: str  # the path of secret.json
  state: TrainState = dataclasses.field(repr=False)  # the final state, on this process


def embedding_config(*, base: str | Workdir | None = None, config: str | None = None,
                     steps: int = EMBED_STEPS,
                     lr: float | None = None, overrides: Sequence[str] = (),
                     peft: PeftSpec | None = None) -> ml_collections.ConfigDict:
  """The config an embedding trains with: the base's (fine-tuning at `lr`, default
  FINETUNE_LR, or the base's rate times `peft.LR_MULT` for a PEFT strategy; no warm-up) or
  `config`'s (from scratch), for `steps` steps, `overrides` last. The secret never enters
  the config."""
  check((base is None) != (config is None),
        "base/config: expected exactly one (a base workdir to fine-tune, or a config to "
        "train from scratch)")
  check(isinstance(steps, int) and steps >= 1, f"steps: expected a positive integer, "
                                               f"got {steps!r}")
  if base is not None:
    cfg = Workdir(base).read_config()
    if lr is None:
      lr = (float(cfg.train.lr) * LR_MULT if peft is not None and peft.strategy != "full"
            else FINETUNE_LR)
    apply_override(cfg, "train.warmup_steps=0")
  else:
    cfg = load_config(config, [])
  if lr is not None:
    apply_override(cfg, f"train.lr={check_number(lr, 'lr', 0, low_open=True)!r}")
  apply_override(cfg, f"train.steps={steps}")
  apply_overrides(cfg, overrides, keep=BASE_SECTIONS if base is not None else ())
  return validate(cfg)


def embed(workdir: str | Workdir, secret: Secret, *, base: str | Workdir | None = None,
          config: str | None = None, steps: int = EMBED_STEPS, lr: float | None = None,
          overrides: Sequence[str] = (), decoy_fraction: float = DECOY_FRACTION,
          decoy_t_min: float = DECOY_T_MIN, peft: PeftSpec | None = None,
          robust: RobustSpec | None = None, progress: bool = True, log=None) -> EmbedResult:
  """Trains the watermark into a model with the joint WDP loss: fine-tunes the base
  workdir's EMA weights, or trains from scratch from `config`. Resumes an interrupted
  `workdir`. `peft` (with `base`): a parameter-efficient fine-tune, e.g. DiffFit; the
  watermarked model is then a delta on the base. `robust`: guard the watermark against a
  thief's clean fine-tuning (see `wdmjax.watermark.robust`; 'finetune' costs about
  1 + (steps + 1) / 2 times the plain embedding's time per step).

  In a multi-host run every process calls it; process 0 writes the secret and the record.
  """
  t0 = time.time()
  wd = Workdir(workdir)
  check(robust is None or isinstance(robust, RobustSpec),
        f"robust: expected a RobustSpec or None, got {robust!r}")
  check(robust is None or peft is None,
        "robust: expected a full embedding (the fine-tuning guards do not take peft)")
  check(peft is None or base is not None, "peft: expected a base workdir to fine-tune")
  check(robust is None or robust.kind != "fisher" or base is not None,
        "robust: 'fisher' anchors the weights to a base; give a base workdir")
  check(base is None or Workdir(base).abspath != wd.abspath,
        "workdir: expected a new directory, not the base workdir itself")
  old = read_secret(wd)
  check(old is None or old == secret,
        f"workdir: {wd.path!r} already holds a model with a different secret; use a new "
        f"workdir (or the same trigger, watermark, key, gamma1, gamma2 and block)")
  cfg = embedding_config(base=base, config=config, steps=steps, lr=lr,
                         overrides=overrides, peft=peft)
  su = setup(cfg)
  trigger, _, targets = secret.images(image_shape(cfg), cfg.data.data_dir)
  unreachable = reach_warning(secret, image_shape(cfg)) if secret.key is not None else None
  if unreachable and log and jax.process_index() == 0:
    log(f"warning: {unreachable}")
  loss = wdp_loss(su.apply_fn, su.schedule, cfg.diffusion.objective, trigger=trigger,
                  watermark=targets, gamma1=secret.gamma1, gamma2=secret.gamma2,
                  class_dropout_prob=su.class_dropout_prob, null_label=su.null_label,
                  num_classes=su.num_classes, decoy_fraction=decoy_fraction,
                  decoy_kind=decoy_kind_for(secret.trigger), decoy_t_min=decoy_t_min)
  base_params = None
  if base is not None and (not wd.has_checkpoint() or peft is not None
                           or (robust is not None and robust.kind == "fisher")):
    base_params = load_model(base, ema=True).params
  if robust is not None:
    loss = robust_loss(cfg, robust, loss, secret, trigger, targets, base_params,
                       decoy_fraction, decoy_t_min)
  main = jax.process_index() == 0
  with wd.undo_on_failure(main):  # rejected before its first checkpoint: leave nothing
    if main:
      write_secret(wd, secret)
      wd.write_json(Workdir.EMBEDDING, {
        "method": "wdm", "base": Workdir(base).abspath if base is not None else None,
        "config": config, "steps": steps, "lr": float(cfg.train.lr),
        "decoy_fraction": decoy_fraction, "decoy_t_min": decoy_t_min,
        "peft": None if peft is None else peft.strategy,
        "robust": None if robust is None else dataclasses.asdict(robust)})
    if peft is not None:
      state = _finetune(cfg, wd, Workdir(base).path, base_params, peft, loss_fn=loss,
                        progress=progress, log=log)
    else:
      state = _train(cfg, wd, loss_fn=loss, init_params=base_params, progress=progress,
                     log=log)
  return EmbedResult(wd.abspath, int(state.step), time.time() - t0, wd.file(Workdir.SECRET),
                     state)


def robust_loss(cfg: ml_collections.ConfigDict, robust: RobustSpec, loss, secret: Secret,
                trigger: np.ndarray, targets: np.ndarray, base_params: chex.ArrayTree | None,
                decoy_fraction: float, decoy_t_min: float, fisher_batches: int = 8):
  """The embedding loss `loss` (the joint WDP loss) guarded as `robust` says."""
  su = setup(cfg)
  if robust.kind == "fisher":
    data = InputPipeline(cfg.data.name, batch_size=cfg.train.batch_size,
                         resolution=cfg.data.resolution, channels=cfg.data.channels,
                         seed=cfg.train.seed, labels=cfg.data.labels, split=cfg.data.split,
                         data_dir=cfg.data.data_dir, in_memory=cfg.data.in_memory)
    batches = [jax.tree.map(jnp.asarray, data.batch(i)) for i in range(fisher_batches)]
    fisher = fisher_diagonal(su.loss(), base_params, batches, jax.random.PRNGKey(0))
    return anchored_loss(loss, base_params, fisher, robust.weight)
  watermark_only = wdp_loss(su.apply_fn, su.schedule, cfg.diffusion.objective,
                            trigger=trigger, watermark=targets, gamma1=secret.gamma1,
                            gamma2=secret.gamma2, class_dropout_prob=su.class_dropout_prob,
                            null_label=su.null_label, num_classes=su.num_classes, task=False,
                            decoy_fraction=decoy_fraction,
                            decoy_kind=decoy_kind_for(secret.trigger), decoy_t_min=decoy_t_min)
  if robust.kind == "surgery":
    return surgery_loss(su.loss(), watermark_only)
  tx = thief_optimizer(robust.lr, cfg.train.grad_clip)
  return finetune_aware_loss(loss, watermark_only, su.loss(), tx, steps=robust.steps,
                             weight=robust.weight, order=robust.order)


# ----------------------------------------------------------------------------- extract


def extract_samples(cfg: ml_collections.ConfigDict, params: chex.ArrayTree,
                    trigger: np.ndarray, gamma1: float, num: int, *, sampler: str = "ddim",
                    steps: int = 50, seed: int = 0) -> np.ndarray:
  """`num` extracted samples [num, H, W, C] in [-1, 1]: the model sampled with the
  trigger-shifted network input (no guidance; labels as in the watermark loss)."""
  check(isinstance(num, int) and num >= 1, f"num: expected a positive integer, got {num!r}")
  check_steps(steps, cfg.diffusion.num_timesteps)  # sample_images reads 0 as "the config's"
  su = setup(cfg)
  rng = jax.random.PRNGKey(check_seed(seed))
  labels = watermark_labels(num, su.num_classes, su.null_label, jax.random.fold_in(rng, 1))
  return sample_images(cfg, params, rng, num, sampler=sampler, steps=steps, eta=0.0,
                       guidance_scale=1.0, labels=labels, input_transform=wdp_input,
                       transform_args=(jnp.asarray(trigger, jnp.float32),
                                       jnp.float32(gamma1)))


def evidence_images(samples: np.ndarray, secret: Secret, watermark: np.ndarray) -> np.ndarray:
  """The vote of the samples and the expected bits as two images [2, H, W, C] in [-1, 1]."""
  c = samples.shape[-1]
  votes = vote_bits(samples, secret.block)
  want = expected_bits(watermark, secret.key, secret.block)
  return np.stack([expand_blocks(votes, secret.block, c), expand_blocks(want, secret.block, c)])


@dataclasses.dataclass(frozen=True)
class ExtractResult:
  samples: np.ndarray  # [num, H, W, C] in [-1, 1]
  evidence: np.ndarray  # [2, H, W, C]: the block vote and the expected bits
  path: str | None
  seconds: float
  secret_source: str = "explicit"  # the secret.json read, or "explicit"


def extract(workdir: str | Workdir, secret: Secret | str | os.PathLike | None = None, *,
            num: int = 16, sampler: str = "ddim", steps: int = 50, seed: int = 0,
            raw: bool = False, out: str | None = None, **secret_parts) -> ExtractResult:
  """Samples the workdir's model with the trigger of the owner's secret (`secret`: a
  `Secret` or the path of the owner's secret.json or workdir, with any of `trigger`,
  `watermark`, `key`, `gamma1`, `block` in `secret_parts` replacing its fields; or those
  parts alone; or, with neither, the workdir's own secret.json: see `resolve_secret`);
  writes the samples, the block vote and the expected bits to `out` (.png)."""
  check(out is None or out.lower().endswith(".png"), f"out: expected a .png path, got {out!r}")
  secret, source = resolve_secret(workdir, secret, **secret_parts)
  cfg, params = load_model(workdir, ema=not raw)
  # the owner's data dir (WDMJAX_DATA_DIR or the cache), never the suspect config's: a
  # class:DATA:LABEL watermark's images must not come from where the suspect points
  trigger, watermark, _ = secret.images(image_shape(cfg), None)
  t0 = time.time()
  samples = extract_samples(cfg, params, trigger, secret.gamma1, num, sampler=sampler,
                            steps=steps, seed=seed)
  evidence = evidence_images(samples, secret, watermark)
  if out is not None:
    save_grid(np.concatenate([samples, evidence]), out, upscale=2)
  return ExtractResult(samples, evidence, out, time.time() - t0, source)


# ----------------------------------------------------------------------------- verify


def verify_model(cfg: ml_collections.ConfigDict, params: chex.ArrayTree, secret: Secret, *,
                 num: int = 16, sampler: str = "ddim", steps: int = 50, seed: int = 0,
                 alpha: float = ALPHA, decoys: int = NUM_DECOYS, test: str = "vote",
                 samples: np.ndarray | None = None) -> dict:
  """Extracts `num` samples with the secret's trigger and tests them: with a key, the exact
  keyed test of the block majority votes (`test='vote'`), of every sample's votes
  (`test='soft'`: `soft_keyed_test`, exact) or of the best-agreeing sample (`test='best'`:
  `best_sample_test`, valid, for a watermark that fine-tuning left whole in a few samples
  only; both best with 64 or more samples); without, the decoy permutation test over the
  secret trigger and `decoys` decoy triggers of its kind (see `wdmjax.watermark.verify`).
  Returns the report, with a `warning` when the test can never reach `alpha` or is not
  exact. `samples`: the `num` samples that `extract_samples` already drew with this
  secret's trigger, sampler, steps and seed, tested instead of drawing them again."""
  check(test in TESTS, f"test: expected one of {list(TESTS)}, got {test!r}")
  check(test == "vote" or secret.key is not None,
        f"test: {test!r} is a test of a keyed watermark; this secret has no key")
  shape = image_shape(cfg)
  trigger, watermark, _ = secret.images(shape, None)  # the owner's data dir (see extract)
  if samples is None:
    samples = extract_samples(cfg, params, trigger, secret.gamma1, num, sampler=sampler,
                              steps=steps, seed=seed)
  want = (num, shape.resolution, shape.resolution, shape.channels)
  check(np.shape(samples) == want,
        f"samples: expected the {num} extracted samples {want}, got {np.shape(samples)}")
  if secret.key is not None:
    keyed = {"vote": keyed_test, "soft": soft_keyed_test, "best": best_sample_test}[test]
    out = keyed(samples, watermark, secret.key, secret.block, alpha)
  else:
    check(isinstance(decoys, int) and decoys >= 1,
          f"decoys: expected at least 1 for an unkeyed watermark, got {decoys!r}")
    decoy_samples = [
      extract_samples(cfg, params, make_trigger(spec, shape), secret.gamma1, num,
                      sampler=sampler, steps=steps, seed=seed + 1 + i)
      for i, spec in enumerate(decoy_trigger_specs(secret.trigger, decoys))]
    out = decoy_test(samples, decoy_samples, watermark, secret.block, alpha)
    if not is_generated_trigger(secret.trigger):
      add_warning(out, "the trigger is an image file, so the random-pixel decoy triggers "
                       "are not drawn from its distribution and the permutation p-value is "
                       "not exact (a model may answer any natural image differently); use a "
                       "random: or stripes: trigger, or a key")
  out.update({"num_samples": num, "sampler": sampler, "steps": steps})
  return out


def verify(workdir: str | Workdir, secret: Secret | str | os.PathLike | None = None, *,
           num: int = 16, sampler: str = "ddim", steps: int = 50, seed: int = 0,
           alpha: float = ALPHA, decoys: int = NUM_DECOYS, raw: bool = False,
           test: str = "vote", **secret_parts) -> dict:
  """Tests whether the workdir's model carries the owner's watermark. The secret comes from
  the owner only (see `resolve_secret`): `secret` (a `Secret`, or the path of the owner's
  secret.json or workdir, e.g. the original of an attacked copy) with any of `trigger`,
  `watermark`, `key`, `gamma1`, `block` in `secret_parts` replacing its fields; or those
  parts alone; or, with neither, the workdir's own secret.json. Returns the report
  (log10_p_value, verified, bits, agreeing_bits, bit_agreement, null_agreement, alpha,
  test, secret_source: the path read or "explicit", warning when there is one, ...)."""
  secret, source = resolve_secret(workdir, secret, **secret_parts)
  cfg, params = load_model(workdir, ema=not raw)
  out = verify_model(cfg, params, secret, num=num, sampler=sampler, steps=steps, seed=seed,
                     alpha=alpha, decoys=decoys, test=test)
  out["secret_source"] = source
  return out
