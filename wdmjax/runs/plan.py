"""`plan` (memory and time per chip of a config's train step, from abstract shapes) and
`latents` (the VAE-latent data set of latent diffusion models)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from wdmjax.configs import load_config
from wdmjax.data.latents import prepare_latents
from wdmjax.errors import check, check_number
from wdmjax.files import check_dir_path
from wdmjax.peft import PeftSpec, prepare
from wdmjax.train.plan import CHIPS, plan_step


def plan(config: str, devices: int, *, fsdp: int | None = None, peft: str | None = None,
         chips: Sequence[str] | None = None, mfu: float = 0.4,
         overrides: Sequence[str] = ()) -> dict:
  """The plan of one train step of `config` on `devices` chips (FSDP axis `fsdp`; a
  fine-tune by strategy `peft`), with the step time at `mfu` on each of `chips` (default
  all known): the `StepPlan` fields plus 'mfu', 'steps' and 'chips' (a row per chip)."""
  cfg = load_config(config, overrides)
  chips = list(chips or sorted(CHIPS))
  for c in chips:
    check(c in CHIPS, f"chip: expected one of {sorted(CHIPS)}, got {c!r}")
  check_number(mfu, "mfu", 0, 1, low_open=True)
  spec = None if peft is None else PeftSpec(peft)

  def split(params):
    trainable, frozen, _, combine = prepare(spec, params)
    return trainable, frozen, combine

  p = plan_step(cfg, devices, fsdp, None if spec is None else split)
  rows = []
  for c in chips:
    t = p.step_seconds(c, mfu)
    rows.append({"chip": c, "step_s": t, "images_per_s": p.batch / t,
                 "hours": t * cfg.train.steps / 3600,
                 "state_gib_per_chip": (p.state_bytes_per_device
                                        + p.frozen_bytes_per_device) / 2**30,
                 "chip_gib": CHIPS[c][1]})
  return {**p.to_dict(), "devices": p.devices, "mfu": mfu, "steps": int(cfg.train.steps),
          "chips": rows}


@dataclasses.dataclass(frozen=True)
class LatentsResult:
  name: str
  num_examples: int
  data_dir: str


def latents(npz_dir: str, image_size: int = 256, data_dir: str | None = None) -> LatentsResult:
  """Builds `imagenet_latents/<image_size>` (256 or 512) from shards of VAE latents
  (*.npz with latents [N, R, R, 4] and labels [N])."""
  check(image_size in (256, 512), f"image_size: expected 256 or 512, got {image_size!r}")
  if data_dir is not None:  # the set is written there
    check_dir_path(data_dir, "data_dir", writable=True)
  builder = prepare_latents(npz_dir, image_size, data_dir)
  return LatentsResult(f"imagenet_latents/{image_size}",
                       int(builder.info.splits["train"].num_examples), str(builder.data_dir))
