"""`evaluate`: watermarks benchmarked on one diffusion model under the same attacks, with
calibrated detection rates.

For a model (the shipped demo DiT unless a workdir is given):
  1. `num_null` unwatermarked images (DDIM from ordinary noise, the config's guidance and
     cycling labels) are inverted once; each method's p-values on them give its empirical
     false-positive rate at every nominal one (the calibration column);
  2. per method, `num` images from watermarked noise with the same labels; per attack, the
     attacked images are inverted with the owner's model (the null label: the detector does
     not know the class) and tested: TPR at each nominal FPR with Clopper-Pearson intervals,
     bit accuracy where there are bits;
  3. quality: Frechet distance (LeNet features) of the watermarked images to the clean ones,
     beside that of as many clean images (the floor: FD's small-sample bias at this n);
  4. cost: seconds per image to embed (the noise) and to detect (inversion and test).

Methods: tree_ring (two tests: `tree_ring` under the Gaussian null, `tree_ring_published`
the paper's), gaussian_shading, wdm and stable_signature.
  * wdm (pixel-space models): the owner queries the model with the trigger and tests every
    extracted sample on its own (`wdm`, exact) and groups of `wdm_group` by majority vote
    (`wdm_voteN`, the test of `wdmjax verify`); image attacks edit the extracted samples (a
    suspect API that post-processes its outputs), model attacks edit the weights (a thief's
    copy). Without `wdm_workdir`, the demo's secret is embedded into the base (600 steps,
    kept in OUT/wdm).
  * stable_signature (latent models, with `signature_workdir` signed for the model): images
    through one user's decoder, read by the extractor (`wdmjax signature detect`); model
    attacks edit the latent DiT (the signed decoder stays), and a decoder swap decodes the
    same latents with the original decoder.
On a latent model the noise watermarks mark the initial latents (Tree-Ring on the last
latent channel, from the zero frequency as in the paper); images are decoded, attacked, and
encoded again before the inversion.

The regeneration attack `regen:T` noises each image to step T and denoises it with a second
clean model (`regen_workdir`), which the caller supplies.

Writes OUT/benchmark.json, OUT/benchmark.md, OUT/samples.png (watermarked samples under
each attack) and OUT/scores.npz (every test's per-image log10 p: null, each attack, each
attack on unwatermarked images); returns the report. A refused argument leaves OUT untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from wdmjax.attacks.image import apply_image_attacks, parse_image_attack
from wdmjax.attacks.spec import parse_attack
from wdmjax.diffusion.inversion import generate, invert, regenerate
from wdmjax.errors import WdmjaxError, check, check_seed
from wdmjax.files import atomic_write, check_dir_path, write_json
from wdmjax.locks import directory_lock
from wdmjax.metrics import frechet_distance_from_features
from wdmjax.metrics.quality import psnr, ssim
from wdmjax.models.lenet import pretrained_lenet
from wdmjax.noisemark import gaussian_shading as gs
from wdmjax.noisemark import tree_ring as tr
from wdmjax.ood.baselines import lenet_outputs
from wdmjax.records import field, read_json_file, read_npz_file
from wdmjax.runs.arguments import MAX_STEPS, check_count, renamed
from wdmjax.runs.attack import attack_model
from wdmjax.runs.autoencoder import ldm_autoencoder
from wdmjax.runs.demo import DEMO_SECRET, base_workdir
from wdmjax.runs.evaluate_report import markdown
from wdmjax.runs.model import load_model
from wdmjax.runs.signature import detect as signature_detect
from wdmjax.runs.signature import load_user_decoder, signature_meta
from wdmjax.runs.watermark import embed, extract_samples, image_shape, read_secret, resolve_secret
from wdmjax.stats.binomial import binomial_log10_sf
from wdmjax.stats.rates import empirical_tpr, rate_at
from wdmjax.train import make_grid, save_panels, setup
from wdmjax.train.sampling import sample_labels
from wdmjax.watermark.verify import agreement, expected_bits, vote_bits
from wdmjax.workdir import Workdir

NOISE_METHODS = ("tree_ring", "gaussian_shading")
METHODS = (*NOISE_METHODS, "wdm", "stable_signature")
PIXEL_DEFAULT = (*NOISE_METHODS, "wdm")  # the methods of a pixel-space model
DEFAULT_MODEL_ATTACKS = ("prune:0.3", "quantize:int8", "noise_rel:0.05", "finetune:100",
                         "finetune:1000", "finetune_difffit:100", "finetune_difffit:1000",
                         "finetune_lora:100", "finetune_lora:1000")
DEFAULT_ATTACKS = ("none", "crop:0.7", "resize:0.5", "jpeg:90", "jpeg:50", "jpeg:10", "blur:1",
                   "noise:0.1", "rotate:10", "brightness:0.3", "contrast:0.6",
                   "jpeg:50+crop:0.8")
FPRS = (1e-2, 1e-4, 1e-6)
# WDM's embedding when evaluate makes one: the demo's secret at 600 steps and lr 3e-4, the
# embedding whose robustness experiments/watermark_benchmark.py measured (the demo's own
# is shorter: see experiments/results/demo_embedding.md)
WDM_STEPS = 600
WDM_LR = 3e-4
# Which threat each watermark addresses (generation-time marks vanish when a thief samples).
APPLICABILITY = {
  "tree_ring": {"images from the owner's pipeline": "yes (inversion with the owner's model)",
                "stolen weights, thief samples": "no: the thief draws his own noise",
                "fine-tuned / pruned / quantised copy": "no: ditto"},
  "gaussian_shading": {"images from the owner's pipeline": "yes (inversion with the owner's "
                                                           "model)",
                       "stolen weights, thief samples": "no: the thief draws his own noise",
                       "fine-tuned / pruned / quantised copy": "no: ditto"},
  "wdm": {"images from the owner's pipeline": "no: ordinary samples carry nothing",
          "stolen weights, thief samples": "yes: the owner queries the model with the trigger",
          "fine-tuned / pruned / quantised copy": "yes, within the measured budget "
                                                  "(wdm_finetune_robustness)"},
  "stable_signature": {"images from the owner's pipeline": "yes (the decoder's bits)",
                       "stolen weights, thief samples": "yes, unless the decoder is swapped",
                       "fine-tuned / pruned / quantised copy": "yes for the diffusion model; "
                                                               "no after a decoder swap"},
}


@dataclasses.dataclass(frozen=True)
class BenchmarkReport:
  report: dict  # everything in benchmark.json
  files: dict[str, str]
  seconds: float


def _check_methods(methods: Sequence[str]) -> tuple[str, ...]:
  methods = tuple(methods)
  check(len(methods) >= 1, "methods: expected at least one method")
  for m in methods:
    check(m in METHODS, f"methods: expected names in {list(METHODS)}, got {m!r}")
  check(len(set(methods)) == len(methods), f"methods: expected distinct names, got {methods}")
  return methods


def default_tree_ring_rings(side: int, latent: bool = False) -> tuple[int, int]:
  """(inner, radius) of the ring key for x_T of `side` pixels. Pixel space: rings from a
  tenth of the side (the image's own layout owns the lowest frequencies) to three tenths.
  Latents: the paper's rings, from the zero frequency to 10/64 of the side (at least 2, at
  most side / 2 - 1)."""
  if latent:
    return 0, max(1, min(side // 2 - 1, max(2, round(10 * side / 64))))
  radius = max(2, min(side // 2 - 1, round(0.3 * side)))
  return min(radius, max(2, round(0.1 * side))), radius


def _batched(fn, x: np.ndarray, y: np.ndarray, batch: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(jnp.asarray(x[s:s + batch]), jnp.asarray(y[s:s + batch])))
                         for s in range(0, len(x), batch)])


@dataclasses.dataclass
class _Bench:
  """What every method's loop shares: the model, its sampler, the null images, the attacks."""

  cfg: object
  params: object
  su: object
  shape: tuple
  chains: dict
  fprs: tuple
  steps: int
  batch_size: int
  root: jax.Array
  gen_kw: dict
  null_label: int
  clean: np.ndarray  # [num_null, H, W, C] unwatermarked samples of the model
  y_null: np.ndarray
  x_null_T: np.ndarray
  gen_seconds: float
  features: object  # images -> LeNet features, or None
  f_clean: np.ndarray | None
  fd_floor: float | None
  bar: object
  regen: object = None  # (images, t, key) -> images regenerated by a second clean model
  ae: object = None  # the autoencoder of a latent model (None: pixel space)
  # every test's per-image log10 p ("test|null", "test|attack", "test|attack|null"): saved
  # as scores.npz, so any rate of the report can be recomputed without rerunning
  scores: dict = dataclasses.field(default_factory=dict)
  # what is finished, saved as it goes (set by `evaluate` once the report exists)
  journal: _Journal | None = None
  report: dict | None = None
  panels: list | None = None

  def finished(self, key: str) -> bool:
    """Whether an earlier, interrupted run with the same arguments finished unit `key`."""
    return self.journal is not None and self.journal.finished(key)

  def commit(self, key: str) -> None:
    """Saves the report, the scores and the panels so far: unit `key` is finished."""
    if self.journal is not None:
      self.journal.save(key, self.report, self.scores, self.panels)

  def attack_all(self, images: np.ndarray, root, offset: int) -> dict[str, np.ndarray]:
    """Every attack on `images` (attack i keyed fold_in(root, offset + i)), the edits of
    one kind vmapped over their strengths."""
    keys = [jax.random.fold_in(root, offset + i) for i in range(len(self.chains))]
    return dict(zip(self.chains, apply_image_attacks(list(self.chains.values()), images, keys,
                                                     self.regen), strict=True))

  def to_images(self, x: np.ndarray, decoder_params=None) -> np.ndarray:
    """The model's samples as images: decoded latents, or the pixels themselves."""
    return x if self.ae is None else self.ae.decode(x, decoder_params, self.batch_size)

  def from_images(self, images: np.ndarray) -> np.ndarray:
    """What the model diffuses, from images: encoded latents, or the pixels themselves."""
    return images if self.ae is None else self.ae.encode(images, None, self.batch_size)

  def gen(self, x_T, y, params=None):
    return generate(self.su.model_fn, self.params if params is None else params,
                    self.su.schedule, x_T, y=y, **self.gen_kw)

  def fd(self, images: np.ndarray) -> float | None:
    if self.f_clean is None:
      return None
    return frechet_distance_from_features(self.features(images), self.f_clean)

  def rows(self, variant: str, attack: str, log10_p: np.ndarray, null_log10_p: np.ndarray,
           attacked_null: np.ndarray | None = None, **extra) -> dict:
    """One test under one attack. `attacked_null`: the same attack on unwatermarked images,
    whose FPR (at the nominal levels and at the thresholds set on the unattacked null) says
    whether a TPR under that attack is evidence or the attack moving every image's score."""
    row = {"method": variant, "attack": attack,
           "tpr": {f"{f:g}": rate_at(log10_p, f) for f in self.fprs},
           "tpr_empirical": {f"{f:g}": empirical_tpr(log10_p, null_log10_p, f)
                             for f in self.fprs},
           "median_log10_p": float(np.median(log10_p))}
    self.scores[f"{variant}|null"] = np.asarray(null_log10_p, np.float64)
    self.scores[f"{variant}|{attack}"] = np.asarray(log10_p, np.float64)
    if attacked_null is not None:
      self.scores[f"{variant}|{attack}|null"] = np.asarray(attacked_null, np.float64)
      row["fpr_attacked"] = {f"{f:g}": rate_at(attacked_null, f) for f in self.fprs}
      row["fpr_attacked_empirical"] = {f"{f:g}": empirical_tpr(attacked_null, null_log10_p, f)
                                       for f in self.fprs}
    return row | extra


PROGRESS_JSON = "progress.json"
PROGRESS_NPZ = "progress.npz"


class _Journal:
  """What an evaluation has finished, saved in OUT as it goes: after every unit of work (a
  method under one attack) the report so far, every score and every panel, atomically
  (progress.npz first, then progress.json, which names the units done and so commits
  them). A rerun with the same arguments restores them and skips the units done; every
  unit is a function of the arguments alone (its keys folded from the seed), so the report
  is the one an uninterrupted run writes. Removed once the report is written."""

  def __init__(self, out: str, args: dict):
    self.out, self.args = out, args
    self.done: list[str] = []
    self.report: dict | None = None
    self.scores: dict[str, np.ndarray] = {}
    self.panels: list = []
    path = os.path.join(out, PROGRESS_JSON)
    if not os.path.lexists(path):
      return
    what = f"out: {path}"
    saved = read_json_file(path, what)
    check(field(saved, "args", "dict", what) == args,
          f"out: expected the arguments of the unfinished evaluation in {out!r}, got others "
          f"({', '.join(k for k in args if saved['args'].get(k) != args[k]) or 'a change'});"
          f" rerun it with the same arguments to resume, or use a new --out")
    self.done = [str(k) for k in field(saved, "done", "list", what)]
    self.report = field(saved, "report", "dict", what)
    titles = field(saved, "panels", "list", what)
    arrays = read_npz_file(os.path.join(out, PROGRESS_NPZ), None,
                           f"out: {os.path.join(out, PROGRESS_NPZ)}", finite=False)
    missing = [f"panel_{i}" for i in range(len(titles)) if f"panel_{i}" not in arrays]
    check(not missing, f"{what}: expected the panels it names in {PROGRESS_NPZ}, got none "
                       f"of {missing[:3]}")
    self.panels = [(str(t), arrays[f"panel_{i}"]) for i, t in enumerate(titles)]
    self.scores = {k[len("score|"):]: v for k, v in arrays.items() if k.startswith("score|")}

  def finished(self, key: str) -> bool:
    return key in self.done

  def save(self, key: str, report: dict, scores: dict, panels: list) -> None:
    """Commits the unit `key`: everything so far."""
    self.done.append(key)
    arrays = {f"score|{k}": v for k, v in scores.items()}
    arrays.update({f"panel_{i}": np.asarray(p) for i, (_, p) in enumerate(panels)})
    path = os.path.join(self.out, PROGRESS_NPZ)
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)
    write_json(os.path.join(self.out, PROGRESS_JSON),
               {"args": self.args, "done": self.done, "report": report,
                "panels": [t for t, _ in panels]})

  def remove(self) -> None:
    for name in (PROGRESS_JSON, PROGRESS_NPZ):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(self.out, name))


def evaluate(out: str, methods: Sequence[str] = PIXEL_DEFAULT,
             attacks: Sequence[str] = DEFAULT_ATTACKS, *, workdir: str | None = None,
             num: int = 64, num_null: int = 256, steps: int = 20, inversion_iters: int = 2,
             fprs: Sequence[float] = FPRS, seed: int = 0, batch_size: int = 64,
             wdm_workdir: str | None = None, wdm_secret: str | None = None,
             model_attacks: Sequence[str] = DEFAULT_MODEL_ATTACKS, wdm_group: int = 16,
             wdm_null: int = 1024, regen_workdir: str | None = None, regen_steps: int = 20,
             signature_workdir: str | None = None, signature_user: int = 0,
             signature_key_file: str | None = None, progress: bool = True, log=None
             ) -> BenchmarkReport:
  """Benchmarks `methods` under `attacks` (`wdmjax.attacks.image` names) and, for the
  model watermarks, `model_attacks` (`wdmjax.attacks.spec` names) on a model; see the module
  docstring. Returns the report and writes it to `out`.

  Holds `out`'s writer lock (a second evaluation there is refused in one line), refuses an
  `out` that holds a finished report, and saves each finished unit as it goes: a rerun with
  the same arguments after a crash or a kill resumes where it stopped (see `_Journal`)."""
  kwargs = dict(locals())
  check_dir_path(out, "out", writable=True)
  out_existed = os.path.exists(out)
  with directory_lock(out, "out"):
    return _evaluate(**kwargs, out_existed=out_existed)


def _evaluate(out: str, methods: Sequence[str], attacks: Sequence[str], *, workdir, num,
              num_null, steps, inversion_iters, fprs, seed, batch_size, wdm_workdir,
              wdm_secret, model_attacks, wdm_group, wdm_null, regen_workdir, regen_steps,
              signature_workdir, signature_user, signature_key_file, progress, log,
              out_existed: bool
              ) -> BenchmarkReport:
  """`evaluate` under `out`'s lock; `out_existed`: whether `out` was there before it."""
  log = log or (lambda *_: None)
  t_start = time.time()
  methods = _check_methods(methods)
  chains = {}
  for a in attacks:
    try:
      chains[a] = parse_image_attack(a)
    except WdmjaxError as e:  # name the parameter this function takes
      raise WdmjaxError(str(e).replace("attack:", "attacks:", 1)) from None
  check(len(chains) >= 1, "attacks: expected at least one attack")
  wants_regen = any(x.name == "regen" for c in chains.values() for x in c)
  check(not wants_regen or regen_workdir is not None,
        "attacks: regen:T needs a second clean model to regenerate with (regen_workdir)")
  check(regen_workdir is None or os.path.isdir(regen_workdir),
        f"regen_workdir: no such directory {regen_workdir!r}")
  parsed_model_attacks = []
  for a in model_attacks:
    try:
      parsed_model_attacks.append(parse_attack(a))
    except WdmjaxError as e:
      raise WdmjaxError(str(e).replace("attack:", "model_attacks:", 1)) from None
    check(parsed_model_attacks[-1].name not in ("raw", "steps", "dropout"),
          f"model_attacks: expected attacks on the weights or fine-tuning, got {a!r}")
  for name, v in (("num", num), ("num_null", num_null), ("batch_size", batch_size),
                  ("wdm_group", wdm_group), ("wdm_null", wdm_null)):
    check_count(name, v)
  check_count("steps", steps, MAX_STEPS)
  check(isinstance(inversion_iters, int) and 0 <= inversion_iters <= 20,
        f"inversion_iters: expected an integer in [0, 20], got {inversion_iters!r}")
  check(len(fprs) >= 1 and all(0 < f < 1 for f in fprs),
        f"fprs: expected numbers in (0, 1), got {list(fprs)}")
  seed = check_seed(seed)
  check(wdm_workdir is None or "wdm" in methods,
        "wdm_workdir: only with the method wdm")
  if wdm_workdir is not None:
    check(os.path.isdir(wdm_workdir), f"wdm_workdir: no such directory {wdm_workdir!r}")
  check_count("regen_steps", regen_steps, MAX_STEPS)
  check(("stable_signature" in methods) == (signature_workdir is not None),
        "signature_workdir: expected a signature workdir (wdmjax signature pretrain / embed) "
        "exactly when the methods include stable_signature")
  if signature_workdir is not None:
    check(os.path.isdir(signature_workdir),
          f"signature_workdir: no such directory {signature_workdir!r}")
    check(isinstance(signature_user, int) and signature_user >= 0,
          f"signature_user: expected a non-negative integer, got {signature_user!r}")
  report_path = os.path.join(out, "benchmark.json")
  check(not os.path.lexists(report_path),
        f"out: expected a directory without a finished report, got {out!r}, which holds "
        f"{report_path!r}; use a new --out (or remove the report to run again)")
  # What the report is a function of (progress and log aside), as JSON reads it back.
  args = json.loads(json.dumps({
      "methods": list(methods), "attacks": list(attacks), "workdir": workdir, "num": num,
      "num_null": num_null, "steps": steps, "inversion_iters": inversion_iters,
      "fprs": list(fprs), "seed": seed, "batch_size": batch_size, "wdm_workdir": wdm_workdir,
      "wdm_secret": wdm_secret, "model_attacks": list(model_attacks), "wdm_group": wdm_group,
      "wdm_null": wdm_null, "regen_workdir": regen_workdir, "regen_steps": regen_steps,
      "signature_workdir": signature_workdir, "signature_user": signature_user}))
  try:
    journal = _Journal(out, args)
    if workdir is None:
      workdir = base_workdir(os.path.join(out, "base")).path
    model = load_model(workdir)
    cfg, params = model.cfg, model.params
    su = setup(cfg)
    shape = tuple(su.image_shape)  # what the model diffuses: images or latents
    with renamed("ldm_workdir", "workdir"):
      ae = None if shape[-1] in (1, 3) else ldm_autoencoder(workdir)
    image_shape_ = shape if ae is None else tuple(ae.image_shape)
    check(ae is None or "wdm" not in methods,
          "methods: wdm is benchmarked on pixel-space models here; drop it for a latent model")
    check(ae is not None or "stable_signature" not in methods,
          "methods: stable_signature signs the decoder of a latent diffusion model; got the "
          f"pixel-space model {workdir!r}")
    check(steps <= cfg.diffusion.num_timesteps,
          f"steps: expected an integer in [1, {cfg.diffusion.num_timesteps}], got {steps}")
    # Images held at once: the null and its inversions, each method's images under every
    # attack (and the attacked null), a batch's activations.
    image = 4 * int(np.prod(image_shape_)) + 4 * int(np.prod(shape))
    check_count("num_null", num_null, bytes_each=4 * image, what="an unwatermarked image")
    check_count("num", num, bytes_each=(2 * len(chains) + 4) * image,
                what=f"an image under {len(chains)} attacks")
    check_count("wdm_null", wdm_null, bytes_each=4 * image, what="an extracted sample")
    check_count("batch_size", batch_size, bytes_each=64 * image, what="a batch's image")
    regen = None
    if regen_workdir is not None:
      with renamed("workdir", "regen_workdir"):
        rm = load_model(regen_workdir)
      rsu = setup(rm.cfg)
      check(tuple(rsu.image_shape) == image_shape_,
            f"regen_workdir: expected a pixel-space model of images {image_shape_}, got "
            f"{tuple(rsu.image_shape)}")
      rnull = rsu.null_label if rsu.null_label is not None else 0

      def regen(x, t, key):
        x, outs = np.asarray(x), []
        for i, s0 in enumerate(range(0, len(x), batch_size)):
          xb = jnp.asarray(x[s0:s0 + batch_size])
          outs.append(np.asarray(regenerate(
              rsu.model_fn, rm.params, rsu.schedule, xb, t, jax.random.fold_in(key, i),
              steps=min(regen_steps, t), objective=rm.cfg.diffusion.objective,
              y=jnp.full((len(xb),), rnull, jnp.int32))))
        return np.concatenate(outs)
  except WdmjaxError:
    if not out_existed:  # refused: leave no trace of the shipped base copied into `out`
      shutil.rmtree(out, ignore_errors=True)
    raise
  guidance = cfg.sample.get("guidance_scale")
  guided = su.null_label is not None and guidance is not None and guidance != 1.0
  null_label = su.null_label if su.null_label is not None else 0
  gen_kw = dict(steps=steps, objective=cfg.diffusion.objective)
  if guided:
    gen_kw.update(guidance_scale=float(guidance), null_label=int(null_label))

  root = jax.random.PRNGKey(seed)
  noise_methods = [m for m in methods if m in NOISE_METHODS]
  phases = (1 + (2 if noise_methods else 0) + len(noise_methods) * (1 + len(chains))
            + (3 + len(chains) + len(parsed_model_attacks) if "wdm" in methods else 0)
            + (2 + len(chains) + len(parsed_model_attacks) if "stable_signature" in methods
               else 0))
  bar = tqdm(total=phases, disable=not progress, desc="evaluate", unit="phase")
  # The null: unwatermarked samples of the model (and the FD reference).
  y_null = _labels(cfg, num_null)
  x_null_T = np.asarray(jax.random.normal(jax.random.fold_in(root, 0), (num_null, *shape)))
  t0 = time.time()
  clean = _batched(lambda x, y: generate(su.model_fn, params, su.schedule, x, y=y, **gen_kw),
                   x_null_T, y_null, batch_size)
  clean = clean if ae is None else ae.decode(clean, None, batch_size)
  gen_seconds = (time.time() - t0) / num_null
  bar.update()
  lenet, lenet_params = pretrained_lenet()
  # FD in the shipped LeNet's features (28 x 28 digits only; LeNet reads [0, 1]).
  features = ((lambda x: lenet_outputs(lenet, lenet_params, (x + 1.0) / 2.0)[1])
              if image_shape_ == (28, 28, 1) else None)
  # FD has a large small-sample bias: every method's `num` images and an equal number of
  # unwatermarked ones (the floor) are compared with the rest of the unwatermarked images.
  k = min(num, num_null // 2)
  f_clean = None if features is None or k < 2 else features(clean[k:])
  fd_floor = (None if f_clean is None
              else frechet_distance_from_features(features(clean[:k]), f_clean))
  b = _Bench(cfg, params, su, shape, chains, tuple(fprs), steps, batch_size, root, gen_kw,
             int(null_label), clean, y_null, x_null_T, gen_seconds, features, f_clean,
             fd_floor, bar, regen, ae)

  report = {
    "model": {"workdir": str(workdir), "image_shape": list(image_shape_),
              "latent_shape": None if ae is None else list(shape),
              "objective": cfg.diffusion.objective,
              "guidance_scale": float(guidance) if guided else None},
    "settings": {"num": num, "num_null": num_null, "steps": steps,
                 "regen_workdir": regen_workdir, "regen_steps": regen_steps,
                 "inversion_iters": inversion_iters, "seed": seed, "fprs": list(fprs),
                 "empirical_threshold": "strict"},  # empirical_tpr's tie-safe rule
    "methods": list(methods), "attacks": list(chains),
    "model_attacks": [str(a) for a in parsed_model_attacks],
    "applicability": {m: APPLICABILITY[m] for m in APPLICABILITY},
    "calibration": {}, "rows": [], "quality": {}, "cost": {},
  }
  panels = []
  if journal.report is not None:  # a rerun: what the interrupted one finished
    check(set(journal.report) == set(report) and all(
        isinstance(journal.report[k], type(v)) for k, v in report.items() if v is not None),
          f"out: {os.path.join(out, PROGRESS_JSON)}: expected the report of an evaluation, "
          f"got fields {sorted(journal.report)[:12]}")
    log(f"resuming: {len(journal.done)} finished units in {out}")
    report, panels = journal.report, journal.panels
    b.scores.update(journal.scores)
  b.journal, b.report, b.panels = journal, report, panels
  if noise_methods and not journal.finished("noise_marks"):
    _noise_marks(b, report, panels, noise_methods, num, inversion_iters, seed, log)
    b.commit("noise_marks")
  if "wdm" in methods and not journal.finished("wdm"):
    _wdm(b, report, panels, num, out, wdm_workdir, wdm_secret, parsed_model_attacks,
         wdm_group, wdm_null, seed, progress, log)
    b.commit("wdm")
  if "stable_signature" in methods and not journal.finished("stable_signature"):
    _stable_signature(b, report, panels, num, signature_workdir, signature_user,
                      signature_key_file, parsed_model_attacks, seed, progress, log)
    b.commit("stable_signature")
  bar.close()
  seconds = time.time() - t_start
  report["seconds"] = seconds
  os.makedirs(out, exist_ok=True)
  scores_path = os.path.join(out, "scores.npz")
  np.savez_compressed(scores_path + ".tmp.npz", **b.scores)
  os.replace(scores_path + ".tmp.npz", scores_path)
  files = {"json": write_json(os.path.join(out, "benchmark.json"), report),
           "scores": scores_path,
           "markdown": atomic_write(os.path.join(out, "benchmark.md"), markdown(report)),
           "samples": save_panels(panels, os.path.join(out, "samples.png"),
                                  per_row=min(len(chains), 12))}
  journal.remove()  # the report is written: nothing left to resume
  return BenchmarkReport(report, files, seconds)


def _labels(cfg, n: int) -> np.ndarray:
  lab = sample_labels(cfg, n)
  return np.zeros(n, np.int32) if lab is None else np.asarray(lab)


def _noise_marks(b: _Bench, report: dict, panels: list, methods: list[str], num: int,
                 inversion_iters: int, seed: int, log) -> None:
  """Tree-Ring and Gaussian Shading: watermarked noise -> images -> attacks -> inversion."""
  su, shape, params = b.su, b.shape, b.params

  def inv(x, y):  # the detector does not know the label: the unconditional chain
    y0 = jnp.full_like(y, b.null_label)
    return invert(su.model_fn, params, su.schedule, x, steps=b.steps,
                  objective=b.cfg.diffusion.objective, y=y0, fixed_point_iters=inversion_iters)

  latent = b.ae is not None
  inner, radius = default_tree_ring_rings(min(shape[:2]), latent)
  channel = shape[-1] - 1 if latent else 0  # the paper marks the last latent channel
  tr_key = tr.make_key(seed + 1, shape, radius=radius, inner=inner, channel=channel)
  block = next(k for k in (4, 2, 1) if shape[0] % k == 0 and shape[1] % k == 0)
  factor = shape[-1] if block == 1 else 1  # at least 4 replicas per bit where it can
  gs_key = gs.make_key(seed + 2, shape, block=block, channel_factor=factor)
  report["settings"]["tree_ring"] = {"inner": inner, "radius": radius, "channel": channel}
  report["settings"]["gaussian_shading"] = {"block": block, "channel_factor": factor,
                                            "bits": int(gs_key.message.size)}

  def scores(z) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    if "tree_ring" in methods:
      out["tree_ring"] = {"log10_p": tr.log10_p_values(z, tr_key, "gaussian")}
      out["tree_ring_published"] = {"log10_p": tr.log10_p_values(z, tr_key, "published")}
    if "gaussian_shading" in methods:
      acc, lp = gs.detect(z, gs_key)
      out["gaussian_shading"] = {"log10_p": lp, "bit_accuracy": acc}
    return out

  t0 = time.time()
  null_scores = scores(_batched(inv, b.from_images(b.clean), b.y_null, b.batch_size))
  detect_seconds = (time.time() - t0) / len(b.clean)
  b.bar.update()
  for m, s in null_scores.items():
    report["calibration"][m] = {f"{f:g}": rate_at(s["log10_p"], f) for f in b.fprs}
  log(f"null: {len(b.clean)} unwatermarked images inverted ({detect_seconds:.3f} s per image)")
  # The attacks on `num` unwatermarked images: their FPR under each attack.
  n_att = min(num, len(b.clean))
  attacked_null = {}
  for name, attacked in b.attack_all(b.clean[:n_att], b.root, 9000).items():
    attacked_null[name] = scores(_batched(inv, b.from_images(attacked), b.y_null[:n_att],
                                          b.batch_size))
  b.bar.update()
  y = _labels(b.cfg, num)
  for mi, m in enumerate(methods):
    if all(b.finished(f"{m}|{name}") for name in b.chains):
      continue  # every row of m is in the report an interrupted run saved
    rk = jax.random.fold_in(b.root, 100 + mi)
    t0 = time.time()
    x_T = np.asarray(tr.watermark_noise(rk, tr_key, num, shape) if m == "tree_ring"
                     else gs.watermark_noise(rk, gs_key, num))
    embed_seconds = (time.time() - t0) / num
    images = b.to_images(_batched(b.gen, x_T, y, b.batch_size))
    b.bar.update()
    report["quality"][m] = {"fd_to_clean": b.fd(images), "fd_clean_same_n": b.fd_floor,
                            "psnr": None, "ssim": None,
                            "note": "the watermark edits the noise, not the image"}
    report["cost"][m] = {"embed_seconds_per_image": embed_seconds,
                         "generate_seconds_per_image": b.gen_seconds,
                         "detect_seconds_per_image": detect_seconds}
    for name, attacked in b.attack_all(images, rk, 1000).items():
      if b.finished(f"{m}|{name}"):
        continue
      z = _batched(inv, b.from_images(attacked), y, b.batch_size)
      for variant, s in scores(z).items():
        if variant.startswith(m):
          extra = ({"bit_accuracy": float(np.mean(s["bit_accuracy"]))}
                   if "bit_accuracy" in s else {})
          report["rows"].append(b.rows(variant, name, s["log10_p"],
                                       null_scores[variant]["log10_p"],
                                       attacked_null[name][variant]["log10_p"], **extra))
      panels.append((f"{m} {name}", make_grid(attacked[:4], nrow=2, upscale=2)))
      b.commit(f"{m}|{name}")
      b.bar.update()


def _per_sample_log10_p(samples: np.ndarray, watermark: np.ndarray, key: int, block: int
                        ) -> tuple[np.ndarray, np.ndarray]:
  """(bit agreement [m], exact log10 p [m]) of each extracted sample on its own: its block
  signs against the keyed bits (a tie counts as a disagreement, which keeps p exact or
  conservative)."""
  want = expected_bits(watermark, key, block)
  agree = np.array([np.sum(vote_bits(s[None], block) == want) for s in samples])
  n = want.size
  return agree / n, np.asarray(binomial_log10_sf(agree, np.full_like(agree, n), 0.5),
                               np.float64)


def _group_log10_p(samples: np.ndarray, watermark: np.ndarray, key: int, block: int,
                   group: int) -> np.ndarray:
  """The exact vote test (`wdmjax verify`) on consecutive groups of `group` samples."""
  want = expected_bits(watermark, key, block)
  ks = [agreement(vote_bits(samples[s:s + group], block), want)[0]
        for s in range(0, len(samples) - group + 1, group)]
  return np.asarray(binomial_log10_sf(np.asarray(ks), np.full(len(ks), want.size), 0.5),
                    np.float64)


def _wdm(b: _Bench, report: dict, panels: list, num: int, out: str, wdm_workdir, wdm_secret,
         model_attacks: list, group: int, n_null: int, seed: int, progress: bool, log
         ) -> None:
  """WDM: the owner queries a (suspect) model with the trigger and tests each extracted
  sample, and groups of `group` samples by majority vote; image attacks edit the extracted
  samples (a suspect API post-processing its outputs), model attacks edit the weights."""
  embed_seconds = None
  if wdm_workdir is None:
    wdm_workdir = os.path.join(out, "wdm")
    log(f"wdm: embedding the demo secret into the base for {WDM_STEPS} steps -> "
        f"{wdm_workdir} (kept for the next run)")
    if not Workdir(wdm_workdir).has_checkpoint() or read_secret(wdm_workdir) is None:
      r = embed(wdm_workdir, DEMO_SECRET, base=report["model"]["workdir"], steps=WDM_STEPS,
                lr=WDM_LR, progress=progress)
      embed_seconds = r.seconds
  if embed_seconds is None:  # made before: the time its training recorded, if it did
    embed_seconds = (Workdir(wdm_workdir).read_json(Workdir.SUMMARY) or {}).get("seconds")
  secret, source = resolve_secret(wdm_workdir, wdm_secret)
  check(secret.key is not None, "wdm_secret: evaluate tests keyed WDM watermarks only")
  wm = load_model(wdm_workdir)
  check(tuple(setup(wm.cfg).image_shape) == b.shape,
        f"wdm_workdir: expected a model of images {b.shape}, got {setup(wm.cfg).image_shape}")
  trigger, watermark, _ = secret.images(image_shape(wm.cfg), None)
  b.bar.update()

  def extract(cfg, params, n, s):
    return extract_samples(cfg, params, trigger, secret.gamma1, n, steps=b.steps, seed=s)

  # The null: the clean base queried with the owner's trigger (exact over keys anyway).
  base = load_model(report["model"]["workdir"])
  null_samples = extract(base.cfg, base.params, n_null, seed + 7)
  null_lp = _per_sample_log10_p(null_samples, watermark, secret.key, secret.block)[1]
  null_group = _group_log10_p(null_samples, watermark, secret.key, secret.block, group)
  report["calibration"]["wdm"] = {f"{f:g}": rate_at(null_lp, f) for f in b.fprs}
  if len(null_group):
    report["calibration"][f"wdm_vote{group}"] = {f"{f:g}": rate_at(null_group, f)
                                                 for f in b.fprs}
  b.bar.update()
  t0 = time.time()
  samples = extract(wm.cfg, wm.params, num, seed + 8)
  detect_seconds = (time.time() - t0) / num
  # Quality: the watermarked model's ordinary samples from the null's own noise and labels.
  k = min(num, len(b.clean))
  ordinary = _batched(lambda x, y: b.gen(x, y, wm.params), b.x_null_T[:k], b.y_null[:k],
                      b.batch_size)
  report["quality"]["wdm"] = {
    "fd_to_clean": b.fd(ordinary), "fd_clean_same_n": b.fd_floor,
    "psnr": float(np.mean(psnr(jnp.asarray(ordinary), jnp.asarray(b.clean[:k])))),
    "ssim": float(np.mean(ssim(jnp.asarray(ordinary), jnp.asarray(b.clean[:k])))),
    "note": "PSNR/SSIM: the watermarked model's samples against the clean model's from the "
            "same noise and labels"}
  report["cost"]["wdm"] = {"embed_seconds": embed_seconds,
                           "generate_seconds_per_image": b.gen_seconds,
                           "detect_seconds_per_image": detect_seconds}
  report["settings"]["wdm"] = {"workdir": str(wdm_workdir), "secret_source": source,
                               "bits": int(expected_bits(watermark, secret.key,
                                                         secret.block).size),
                               "group": group, "gamma1": secret.gamma1}
  b.bar.update()

  def add_rows(attack: str, s: np.ndarray, null_s: np.ndarray | None = None) -> None:
    acc, lp = _per_sample_log10_p(s, watermark, secret.key, secret.block)
    g = _group_log10_p(s, watermark, secret.key, secret.block, group)
    a_lp = a_g = None
    if null_s is not None:  # the same attack on the clean model's extractions
      a_lp = _per_sample_log10_p(null_s, watermark, secret.key, secret.block)[1]
      a_g = _group_log10_p(null_s, watermark, secret.key, secret.block, group)
    report["rows"].append(b.rows("wdm", attack, lp, null_lp, a_lp,
                                 bit_accuracy=float(acc.mean())))
    if len(g):
      report["rows"].append(b.rows(f"wdm_vote{group}", attack, g, null_group,
                                   a_g if a_g is not None and len(a_g) else None))

  attacked_null = b.attack_all(null_samples[:num], b.root, 9000)
  for name, attacked in b.attack_all(samples, b.root, 5000).items():
    if not b.finished(f"wdm|{name}"):
      add_rows(name, attacked, attacked_null[name])
      panels.append((f"wdm {name}", make_grid(attacked[:4], nrow=2, upscale=2)))
      b.commit(f"wdm|{name}")
    b.bar.update()
  for ai, a in enumerate(model_attacks):
    if b.finished(f"wdm|model {a}"):
      continue
    log(f"wdm: model attack {a}")
    cfg_a, params_a = attack_model(wm.cfg, wm.params, [a], seed=seed + ai, progress=progress)
    add_rows(f"model {a}", extract(cfg_a, params_a, num, seed + 8))
    b.commit(f"wdm|model {a}")
    b.bar.update()


def _stable_signature(b: _Bench, report: dict, panels: list, num: int, sig_workdir: str,
                      user: int, key_file: str | None, model_attacks: list, seed: int,
                      progress: bool, log) -> None:
  """Stable Signature: images of the latent model through the user's fine-tuned decoder;
  detection reads the bits with the extractor (`wdmjax signature detect`). Image attacks edit
  the images; model attacks edit the latent DiT (the signed decoder stays), and a decoder
  swap decodes the same latents with the original decoder."""
  meta = signature_meta(sig_workdir)
  check(os.path.realpath(meta["ldm"]) == os.path.realpath(report["model"]["workdir"]),
        f"signature_workdir: signed for the model {meta['ldm']!r}, not for "
        f"{report['model']['workdir']!r}")
  check(user < meta["users"], f"signature_user: expected a user in [0, {meta['users']}), "
        f"got {user}")
  decoder = load_user_decoder(sig_workdir, user)
  fpr_min = min(b.fprs)

  def log10_p(images: np.ndarray) -> np.ndarray:
    r = signature_detect(sig_workdir, images, user=user, fpr=fpr_min, key_file=key_file)
    return np.asarray([row["log10_p"] for row in r["images"]], np.float64), r["num_bits"]

  null_lp, bits = log10_p(b.clean)
  report["calibration"]["stable_signature"] = {f"{f:g}": rate_at(null_lp, f) for f in b.fprs}
  b.bar.update()
  y = _labels(b.cfg, num)
  x_T = np.asarray(jax.random.normal(jax.random.fold_in(b.root, 300), (num, *b.shape)))
  latents = _batched(b.gen, x_T, y, b.batch_size)
  signed = b.to_images(latents, decoder)
  unsigned = b.to_images(latents)
  t0 = time.time()
  log10_p(signed)  # timed alone: the 'none' row below tests the same images
  detect_seconds = (time.time() - t0) / num
  report["quality"]["stable_signature"] = {
    "fd_to_clean": b.fd(signed), "fd_clean_same_n": b.fd_floor,
    "psnr": float(np.mean(psnr(jnp.asarray(signed), jnp.asarray(unsigned)))),
    "ssim": float(np.mean(ssim(jnp.asarray(signed), jnp.asarray(unsigned)))),
    "note": "PSNR/SSIM: the user's decoder against the original on the same latents"}
  report["cost"]["stable_signature"] = {"embed_seconds": meta.get("seconds"),
                                        "generate_seconds_per_image": b.gen_seconds,
                                        "detect_seconds_per_image": detect_seconds}
  report["settings"]["stable_signature"] = {"workdir": str(sig_workdir), "user": user,
                                            "users": meta["users"], "bits": bits}
  b.bar.update()
  attacked_null = b.attack_all(b.clean[:num], b.root, 9000)
  for name, attacked in b.attack_all(signed, b.root, 7000).items():
    if not b.finished(f"stable_signature|{name}"):
      report["rows"].append(b.rows("stable_signature", name, log10_p(attacked)[0], null_lp,
                                   log10_p(attacked_null[name])[0]))
      panels.append((f"stable_signature {name}", make_grid(attacked[:4], nrow=2, upscale=2)))
      b.commit(f"stable_signature|{name}")
    b.bar.update()
  if not b.finished("stable_signature|model decoder swap"):
    report["rows"].append(b.rows("stable_signature", "model decoder swap",
                                 log10_p(unsigned)[0], null_lp))
    b.commit("stable_signature|model decoder swap")
  for ai, a in enumerate(model_attacks):
    if b.finished(f"stable_signature|model {a}"):
      continue
    log(f"stable_signature: model attack {a} (on the latent DiT; the signed decoder stays)")
    _, params_a = attack_model(b.cfg, b.params, [a], seed=seed + ai, progress=progress)
    lat = _batched(lambda x, yy, p=params_a: b.gen(x, yy, p), x_T, y, b.batch_size)
    report["rows"].append(b.rows("stable_signature", f"model {a}",
                                 log10_p(b.to_images(lat, decoder))[0], null_lp))
    b.commit(f"stable_signature|model {a}")
    b.bar.update()
