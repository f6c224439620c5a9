"""The config schema: every section and key with its default, overrides, validation, JSON.

A config has the sections `data`, `model`, `diffusion`, `train`, `sample` and `mesh`;
`default_config()` lists every key with its default and `validate()` checks the values, so
that a bad value is reported by name before anything is compiled. A validated config is
locked: no key can be added by mistake (a typo), only existing values changed.
"""

from __future__ import annotations

import ast
import json

import ml_collections

from wdmjax.errors import WdmjaxError, check

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
  except (ValueError, SyntaxError):
    return text  # a bare string such as `data.name=digits`


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
  elif isinstance(old, float) and isinstance(value, int):
    value = float(value)
  elif isinstance(old, int) and isinstance(value, float) and value.is_integer():
    value = int(value)
  elif old is not None and value is not None and type(old) is not type(value):
    raise WdmjaxError(f"overrides: {key}: expected a value of type {type(old).__name__}, "
                      f"got {text!r}")
  with cfg.unlocked():  # a validated config is locked; a model key may be new
    cfg[section][name] = value


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
  check(isinstance(cfg.train.lr, (int, float)) and cfg.train.lr > 0,
        f"train.lr: expected a positive number, got {cfg.train.lr!r}")
  check(0.0 <= cfg.train.ema_decay < 1.0,
        f"train.ema_decay: expected a value in [0, 1), got {cfg.train.ema_decay!r}")
  check(cfg.train.grad_clip is None or cfg.train.grad_clip > 0,
        f"train.grad_clip: expected a positive number or None, got {cfg.train.grad_clip!r}")
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
  check(isinstance(cfg.mesh.data, int) and (cfg.mesh.data == -1 or cfg.mesh.data >= 1),
        f"mesh.data: expected -1 (all devices) or a positive integer, got {cfg.mesh.data!r}")
  _positive_int(cfg, "mesh.fsdp")
  _positive_int(cfg, "mesh.fsdp_min_size")
  cfg.lock()
  return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """The config written by `to_json`, merged over today's defaults (keys added since are
  filled in) and validated."""
  d = json.loads(text)
  # Removed from the schema: it never had an effect (the model key is the one read).
  d.get("diffusion", {}).pop("class_dropout_prob", None)
  return validate(merge(default_config(), d))
