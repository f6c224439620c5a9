"""The config schema: every section and key with its default, overrides, validation, JSON.

A config has the sections `data`, `model`, `diffusion`, `train`, `sample` and `mesh`;
`default_config()` lists every key with its default and `validate()` checks the values, so
that a bad value is reported by name before anything is compiled. A validated config is
locked: no key can be added by mistake (a typo), only existing values changed.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Sequence

import ml_collections

from wdmjax.diffusion.guidance import MAX_GUIDANCE
from wdmjax.errors import WdmjaxError, check, check_number, check_seed

# Leaves smaller than this many elements stay replicated under FSDP: splitting a bias or a
# norm scale saves nothing and costs one more collective per leaf (train.sharding.fsdp_spec).
FSDP_MIN_SIZE = 2**12


def default_config() -> ml_collections.ConfigDict:
  """Every section and key a config may set, with defaults."""
  c = ml_collections.ConfigDict()
  # in_memory False: read each batch from the array_record files (sets larger than memory).
  # channels 4: latents (e.g. imagenet_latents/256), which the pipeline takes as they are.
  c.data = dict(name="mnist5k", split="train", resolution=32, channels=1, labels=None,
                data_dir=None, in_memory=True)
  # Model keys are passed to the model constructor; `name` picks the architecture.
  c.model = dict(name="dit")
  # Label dropout for classifier-free guidance is a model key (model.class_dropout_prob): the
  # model needs it to size its label table with a null class.
  c.diffusion = dict(schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                     objective="eps")
  c.train = dict(steps=1000, batch_size=64, lr=1e-4, warmup_steps=100, weight_decay=0.0,
                 grad_clip=1.0, ema_decay=0.999, seed=0, log_every=50, ckpt_every=500,
                 keep_checkpoints=2, sample_every=0, async_checkpoint=False)
  c.sample = dict(sampler="ddim", steps=50, eta=0.0, num=64, guidance_scale=None, ema=True,
                  seed=0, dropout=False)
  # Devices = data x fsdp; parameters and optimizer state are sharded over fsdp (FSDP).
  # Leaves under fsdp_min_size elements stay replicated (see train.sharding.fsdp_spec).
  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=FSDP_MIN_SIZE)
  return ml_collections.ConfigDict(c.to_dict())


def merge(base: ml_collections.ConfigDict, update: dict) -> ml_collections.ConfigDict:
  """Returns base with `update` merged in; unknown sections are an error, unknown model keys
  are allowed (the model constructor checks them)."""
  out = base.to_dict()
  for section, values in update.items():
    check(section in out, f"config: unknown section {section!r}; expected one of {sorted(out)}")
    check(isinstance(values, dict), f"config.{section}: expected a dict, got {values!r}")
    for k, v in values.items():
      check(section == "model" or k in out[section],
            f"config: unknown key {section}.{k}; expected one of {sorted(out[section])}")
      out[section][k] = v
  return ml_collections.ConfigDict(out)


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return text  # a bare string such as `data.name=digits` (or nothing Python could parse)


def apply_override(cfg: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `section.key=value` override in place (value parsed as a Python literal)."""
  check("=" in item, f"overrides: expected KEY=VALUE, got {item!r}")
  key, text = item.split("=", 1)
  parts = key.strip().split(".")
  check(len(parts) == 2, f"overrides: expected a key of the form section.name, got {key!r}")
  section, name = parts
  check(section in cfg, f"overrides: unknown section {section!r}; expected one of {sorted(cfg)}")
  check(section == "model" or name in cfg[section],
        f"overrides: unknown key {key!r}; expected one of "
        f"{sorted(section + '.' + k for k in cfg[section])}")
  value = _parse_value(text)
  old = cfg[section].get(name)
  if isinstance(old, bool) or isinstance(value, bool):
    check(isinstance(value, bool), f"overrides: {key}: expected True or False, got {text!r}")
    check(old is None or isinstance(old, bool),
          f"overrides: {key}: expected a value of type {type(old).__name__}, got {text!r}")
  elif isinstance(old, float) and isinstance(value, int):
    try:
      value = float(value)
    except OverflowError:
      raise WdmjaxError(f"overrides: {key}: expected a finite number, got {text!r}") from None
  elif isinstance(old, int) and isinstance(value, float) and value.is_integer():
    value = int(value)
  elif old is not None and value is not None and type(old) is not type(value):
    raise WdmjaxError(f"overrides: {key}: expected a value of type {type(old).__name__}, "
                      f"got {text!r}")
  with cfg.unlocked():  # a validated config is locked; a model key may be new
    cfg[section][name] = value


# The sections a fine-tune takes from its base: they fix the parameters' shapes and meaning.
# Model keys without parameters (the dropout rate, the compute dtype) may still change.
BASE_SECTIONS = ("model", "diffusion")
_FREE_MODEL_KEYS = ("dropout", "dtype")


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str],
                    keep: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Applies `section.key=value` overrides in order (see `apply_override`); one that changes
  a key of a section in `keep` (a fine-tune's BASE_SECTIONS) is an error. Returns `cfg`."""
  for item in overrides:
    before = {s: cfg[s].to_dict() for s in keep}
    apply_override(cfg, item)
    for s in keep:
      after = cfg[s].to_dict()
      changed = sorted(k for k in {*before[s], *after}
                       if before[s].get(k, _MISSING) != after.get(k, _MISSING)
                       and not (s == "model" and k in _FREE_MODEL_KEYS))
      if changed:
        k = changed[0]
        raise WdmjaxError(f"overrides: {s}.{k}: expected the base's value "
                          f"{before[s].get(k)!r} (a fine-tune keeps its base's {s} section), "
                          f"got {after.get(k)!r}")
  return cfg


_MISSING = object()  # a key that one side of a comparison lacks


def _positive_int(cfg, key: str, minimum: int = 1) -> None:
  section, name = key.split(".")
  v = cfg[section][name]
  check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
        f"{key}: expected an integer >= {minimum}, got {v!r}")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every value a run depends on, raising WdmjaxError naming the first bad key, and
  locks `cfg` (returned): from then on a key can be changed but not added."""
  for key in ("train.steps", "train.batch_size", "data.resolution", "data.channels",
              "diffusion.num_timesteps", "sample.steps", "sample.num"):
    _positive_int(cfg, key)
  for key in ("train.log_every", "train.ckpt_every", "train.sample_every", "train.warmup_steps",
              "train.keep_checkpoints"):
    _positive_int(cfg, key, minimum=0)
  check(cfg.data.channels in (1, 3, 4),
        f"data.channels: expected 1 or 3 (images) or 4 (latents), got {cfg.data.channels}")
  # Every number is finite and in its range: NaN and inf pass `x > 0` but poison a run.
  check_number(cfg.train.lr, "train.lr", 0, low_open=True)
  check_number(cfg.train.weight_decay, "train.weight_decay", 0)
  check_number(cfg.train.ema_decay, "train.ema_decay", 0, 1, high_open=True)
  if cfg.train.grad_clip is not None:
    check_number(cfg.train.grad_clip, "train.grad_clip", 0, low_open=True)
  check_number(cfg.sample.eta, "sample.eta", 0, 1)
  if cfg.sample.guidance_scale is not None:
    check_number(cfg.sample.guidance_scale, "sample.guidance_scale", -MAX_GUIDANCE,
                 MAX_GUIDANCE)
  for key in ("diffusion.beta_start", "diffusion.beta_end"):
    check_number(cfg.diffusion[key.split(".")[1]], key, 0, 1, low_open=True, high_open=True)
  check(cfg.diffusion.beta_start <= cfg.diffusion.beta_end,
        f"diffusion.beta_start: expected at most diffusion.beta_end = "
        f"{cfg.diffusion.beta_end}, got {cfg.diffusion.beta_start}")
  check_seed(cfg.train.seed, "train.seed")
  check_seed(cfg.sample.seed, "sample.seed")
  for key in ("data.in_memory", "train.async_checkpoint", "sample.ema", "sample.dropout"):
    section, name = key.split(".")
    check(isinstance(cfg[section][name], bool),
          f"{key}: expected True or False, got {cfg[section][name]!r}")
  for key in ("data.name", "data.split"):
    section, name = key.split(".")
    check(isinstance(cfg[section][name], str) and cfg[section][name],
          f"{key}: expected a name, got {cfg[section][name]!r}")
  check(cfg.data.data_dir is None or isinstance(cfg.data.data_dir, str),
        f"data.data_dir: expected None or a directory, got {cfg.data.data_dir!r}")
  for name, v in cfg.model.items():  # the model checks its own keys when it is built
    check(not isinstance(v, float) or math.isfinite(v),
          f"model.{name}: expected a finite number, got {v!r}")
  check(cfg.model.get("name") in ("unet", "dit"),
        f"model.name: expected 'unet' or 'dit', got {cfg.model.get('name')!r}")
  check(cfg.diffusion.objective in ("eps", "x0", "v"),
        f"diffusion.objective: expected 'eps', 'x0' or 'v', got {cfg.diffusion.objective!r}")
  check(cfg.diffusion.schedule in ("linear", "cosine"),
        f"diffusion.schedule: expected 'linear' or 'cosine', got {cfg.diffusion.schedule!r}")
  check(cfg.sample.sampler in ("ddim", "ddpm"),
        f"sample.sampler: expected 'ddim' or 'ddpm', got {cfg.sample.sampler!r}")
  check(cfg.sample.steps <= cfg.diffusion.num_timesteps,
        f"sample.steps: expected at most diffusion.num_timesteps = "
        f"{cfg.diffusion.num_timesteps}, got {cfg.sample.steps}")
  check(cfg.data.labels is None or (isinstance(cfg.data.labels, (list, tuple))
                                    and all(isinstance(v, int) for v in cfg.data.labels)),
        f"data.labels: expected None or a list of class indices, got {cfg.data.labels!r}")
  check(isinstance(cfg.mesh.data, int) and not isinstance(cfg.mesh.data, bool)
        and (cfg.mesh.data == -1 or cfg.mesh.data >= 1),
        f"mesh.data: expected -1 (all devices) or a positive integer, got {cfg.mesh.data!r}")
  _positive_int(cfg, "mesh.fsdp")
  _positive_int(cfg, "mesh.fsdp_min_size")
  cfg.lock()
  return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str | bytes, source: str | None = None) -> ml_collections.ConfigDict:
  """The config written by `to_json`, merged over today's defaults (keys added since are
  filled in) and validated. `source` (the file) is named in the error of a bad config."""
  what = source or "config"
  try:
    d = json.loads(text)
  except ValueError as e:  # a truncated or garbled file (UnicodeDecodeError included)
    raise WdmjaxError(f"{what}: expected the config JSON that wdmjax writes, got invalid "
                      f"JSON ({e})") from None
  check(isinstance(d, dict), f"{what}: expected a JSON object of config sections, got "
                             f"{json.dumps(d)[:60]}")
  # Removed from the schema: it never had an effect (the model key is the one read).
  d.get("diffusion", {}).pop("class_dropout_prob", None)
  try:
    return validate(merge(default_config(), d))
  except WdmjaxError as e:
    if not source:
      raise
    raise WdmjaxError(f"{e} (in {source!r})") from None
