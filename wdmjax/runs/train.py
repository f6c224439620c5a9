"""`train` and `sample`: a diffusion model trained into a workdir, and sampled from one."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np

from wdmjax.configs import load_config
from wdmjax.diffusion.guidance import MAX_GUIDANCE
from wdmjax.errors import check, check_number, check_seed
from wdmjax.files import check_file_path
from wdmjax.runs.model import load_model
from wdmjax.train import TrainState, save_grid, setup, write_final_samples
from wdmjax.train import sample_images as _sample_images
from wdmjax.train import train as _train
from wdmjax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class TrainResult:
  workdir: str
  step: int
  samples: str | None  # the final sample grid, when one was written
  seconds: float
  state: TrainState = dataclasses.field(repr=False)  # the final state, on this process


def train(config: str, workdir: str | Workdir, overrides: Sequence[str] = (), *,
          samples: bool = True, progress: bool = True, log=None) -> TrainResult:
  """Trains the model of `config` (a shipped config's name or a file) in `workdir`,
  resuming it when it holds a checkpoint, and draws the final sample grid."""
  t0 = time.time()
  cfg = load_config(config, overrides)
  with Workdir(workdir).undo_on_failure(jax.process_index() == 0):
    state = _train(cfg, workdir, progress=progress, log=log)
  path = None
  if int(state.step) >= cfg.train.steps and samples:
    path = write_final_samples(cfg, state, workdir)
  return TrainResult(Workdir(workdir).abspath, int(state.step), path, time.time() - t0, state)


@dataclasses.dataclass(frozen=True)
class SampleResult:
  images: np.ndarray  # [num, R, R, C] in [-1, 1]
  path: str | None
  sampler: str
  steps: int
  seconds: float


def sample(workdir: str | Workdir, num: int = 64, *, sampler: str | None = None,
           steps: int | None = None, eta: float | None = None, guidance: float | None = None,
           seed: int = 0, raw: bool = False, out: str | None = None) -> SampleResult:
  """`num` samples of the workdir's model (its EMA weights unless `raw`), with the config's
  sampler settings unless given; written as a grid to `out` (.png) when given."""
  check(isinstance(num, int) and num >= 1, f"num: expected a positive integer, got {num!r}")
  check(steps is None or (isinstance(steps, int) and steps >= 1),
        f"steps: expected a positive integer, got {steps!r}")
  check(out is None or out.lower().endswith(".png"), f"out: expected a .png path, got {out!r}")
  if out is not None:
    check_file_path(out, "out")
  if eta is not None:
    check_number(eta, "eta", 0, 1)
  if guidance is not None:
    check_number(guidance, "guidance", -MAX_GUIDANCE, MAX_GUIDANCE)
  check_seed(seed)
  cfg, params = load_model(workdir, ema=not raw)
  t0 = time.time()
  images = _sample_images(cfg, params, jax.random.PRNGKey(seed), num, sampler=sampler,
                          steps=steps, eta=eta, guidance_scale=guidance)
  seconds = time.time() - t0
  if out is not None:
    k = setup(cfg).num_classes
    save_grid(images, out, nrow=k if k and num % k == 0 else None, upscale=2)
  return SampleResult(images, out, sampler or cfg.sample.sampler, steps or cfg.sample.steps,
                      seconds)
