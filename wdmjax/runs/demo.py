"""`demo`: the whole WDM story on the embedded MNIST digits, in about 2 minutes on 2 CPU cores.

1. base model: the small DiT shipped in wdmjax/assets (trained by
   experiments/make_demo_base.py), or one trained here with `train_base`;
2. embed a keyed watermark by fine-tuning it with the Watermark Diffusion Process;
3. task samples of both models and the extracted watermark, side by side in demo.png;
4. verify the watermarked model (verified) and the clean base with the same secret (not);
5. report.json.
`OUT/base` and `OUT/watermarked` are ordinary workdirs for every other command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import os
import time

import jax

from wdmjax.configs import apply_override, load_config, validate
from wdmjax.errors import check
from wdmjax.files import check_dir_path, write_json
from wdmjax.models import load_params_npz
from wdmjax.runs.model import load_model
from wdmjax.runs.watermark import embed, evidence_images, extract_samples, image_shape, verify_model
from wdmjax.train import make_grid, sample_images, save_panels
from wdmjax.train import train as _train
from wdmjax.train.compilation import compile_clock
from wdmjax.train.export import load_config_json, workdir_from_params
from wdmjax.watermark import Secret
from wdmjax.workdir import Workdir

# The demo's secret, with the paper's gamma1 = 0.8 and gamma2 = 0.1. Its embedding: the
# watermark appears abruptly, all 49 bits after 120 steps at lr 2e-3 where 120 steps at 1e-3
# or 80 at 3e-3 agree by chance only; a batch of 24 or DiffFit did not get there in 200
# steps. 160 steps at 2e-3 keep a third more steps than the shortest run that verified, and
# the FD stays below the base's (experiments/results/demo_embedding.md).
DEMO_SECRET = Secret(trigger="random:2026", watermark="keyed:11", key=424242, gamma1=0.8,
                     gamma2=0.1, block=4)
EMBED_STEPS = 160
EMBED_LR = 2e-3
BASE_CONFIG = "mnist5k_dit"  # what `train_base` trains (its train.steps unless base_steps)


def base_workdir(path: str, train_base: bool = False, base_steps: int | None = None,
                 log=None) -> Workdir:
  """The demo's clean base model in `path`: the shipped DiT (the default), or one trained
  from BASE_CONFIG (resumed when interrupted). Kept when `path` already holds one."""
  log = log or (lambda *_: None)
  wd = Workdir(path)
  if train_base:
    cfg = load_config(BASE_CONFIG)
    if base_steps is not None:
      apply_override(cfg, f"train.steps={base_steps}")
    validate(cfg)
    log(f"[1/4] training the base DiT for {cfg.train.steps} steps (resumes if interrupted)")
    _train(cfg, wd, log=log)
    return wd
  if wd.has_checkpoint():
    log(f"[1/4] base model: {wd.path} (already there)")
    return wd
  assets = importlib.resources.files("wdmjax") / "assets"
  cfg = load_config_json(str(assets / "demo_base.json"))
  workdir_from_params(cfg, load_params_npz(str(assets / "demo_base.npz")), wd,
                      int(cfg.train.steps))
  log(f"[1/4] base model: the shipped {cfg.model.depth}-block DiT trained for "
      f"{cfg.train.steps} steps on mnist5k -> {wd.path}")
  return wd


@dataclasses.dataclass(frozen=True)
class DemoResult:
  report: dict  # {"watermarked": verify report, "clean": verify report}
  picture: str  # demo.png
  report_file: str  # report.json
  base: str
  watermarked: str
  seconds: float
  # per phase (base, embed, sample, verify): {"seconds", "compile_seconds", "programs",
  # "cache_hits"}; compile_seconds is jit's tracing, lowering and compiling (or cache reads)
  phases: dict = dataclasses.field(default_factory=dict)


class _Phases:
  """Wall and compile time of each named phase of a run."""

  def __init__(self):
    self.table: dict[str, dict] = {}

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.perf_counter()
    with compile_clock() as c:
      yield
    self.table[name] = {"seconds": time.perf_counter() - t0, "compile_seconds": c.seconds,
                        "programs": c.programs, "cache_hits": c.cache_hits}


def demo(out: str = "wdmjax_demo", *, steps: int = EMBED_STEPS, train_base: bool = False,
         base_steps: int | None = None, num: int = 16, progress: bool = True,
         log=None) -> DemoResult:
  """Runs the demo into `out` (see the module docstring); `log` gets its four stage lines."""
  log = log or (lambda *_: None)
  t0 = time.time()
  # Every argument before any work: a bad one must not cost a trained, written base model.
  check_dir_path(out, "out", writable=True)
  for name, v in (("steps", steps), ("num", num)):
    check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          f"{name}: expected a positive integer, got {v!r}")
  check(base_steps is None or (isinstance(base_steps, int) and not isinstance(base_steps, bool)
                               and base_steps >= 1),
        f"base_steps: expected a positive integer, got {base_steps!r}")
  check(base_steps is None or train_base,
        f"base_steps: expected only with train_base (the shipped base is already trained), "
        f"got {base_steps!r}")
  os.makedirs(out, exist_ok=True)
  phase = _Phases()
  with phase("base"):
    base = base_workdir(os.path.join(out, "base"), train_base, base_steps, log)
  wm_dir = Workdir(os.path.join(out, "watermarked"))
  log(f"[2/4] embedding the watermark: {steps} fine-tuning steps with the watermark "
      f"diffusion process (gamma1 {DEMO_SECRET.gamma1}, gamma2 {DEMO_SECRET.gamma2})")
  with phase("embed"):
    embed(wm_dir, DEMO_SECRET, base=base, steps=steps, lr=EMBED_LR,
          overrides=["train.sample_every=0"], progress=progress, log=log)

  log("[3/4] sampling both models and extracting the watermark")
  with phase("sample"):
    cfg, base_params = load_model(base)
    _, wm_params = load_model(wm_dir)
    rng = jax.random.PRNGKey(0)
    task_base = sample_images(cfg, base_params, rng, 40)
    task_wm = sample_images(cfg, wm_params, rng, 40)
    trigger, watermark, _ = DEMO_SECRET.images(image_shape(cfg))
    extracted = extract_samples(cfg, wm_params, trigger, DEMO_SECRET.gamma1, num)
    extracted_clean = extract_samples(cfg, base_params, trigger, DEMO_SECRET.gamma1, num)
    ev = evidence_images(extracted, DEMO_SECRET, watermark)
    picture = save_panels([
      ("base model: task samples", make_grid(task_base, nrow=10, upscale=2)),
      ("watermarked: task samples", make_grid(task_wm, nrow=10, upscale=2)),
      ("watermarked + trigger", make_grid(extracted, nrow=4, upscale=2)),
      ("vote / expected bits", make_grid(ev, nrow=1, upscale=2)),
      ("base + trigger", make_grid(extracted_clean, nrow=4, upscale=2)),
    ], os.path.join(out, "demo.png"))

  log("[4/4] verifying both models with the same secret")
  with phase("verify"):  # the extractions above are verify's own (same sampler and seed)
    report = {
      "watermarked": verify_model(cfg, wm_params, DEMO_SECRET, num=num, samples=extracted),
      "clean": verify_model(cfg, base_params, DEMO_SECRET, num=num, samples=extracted_clean),
    }
    report_file = write_json(os.path.join(out, "report.json"), report)
  return DemoResult(report, os.path.abspath(picture), os.path.abspath(report_file),
                    base.abspath, wm_dir.abspath, time.time() - t0, phase.table)
