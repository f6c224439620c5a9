"""`ood score` and `ood eval`: a workdir's diffusion model as an out-of-distribution screen.

    report = runs.ood_score("runs/dit", data="gaussian")          # per-image scores, flags
    report = runs.ood_eval("runs/dit", "mnist5k@9", ["gaussian", "digits28"])   # AUROC ...

Both first build the detector from in-distribution validation images alone (`val`, by
default the model's own training data, which the report says): the per-step losses of half
of them fit the Gaussian combiner, the other half and a patch-shuffled proxy of it choose
the aggregation (`wdmjax.ood.aggregate.select`), and that half sets the threshold at `fpr`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check, check_number, check_seed
from wdmjax.files import check_dir_path, check_file_path, write_json
from wdmjax.ood import (
    AGGREGATIONS,
    Detector,
    calibrate,
    candidates,
    detection_report,
    load_images,
    may_share_images,
    proxy_outliers,
    reconstruct,
    reconstruction_losses,
    select,
)
from wdmjax.ood.reconstruction import DEFAULT_BATCH, check_steps_t
from wdmjax.runs.arguments import MAX_DRAWS, check_count
from wdmjax.runs.images import read_images
from wdmjax.runs.model import load_model
from wdmjax.train import Setup, setup
from wdmjax.workdir import Workdir

DEFAULT_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of T: the default steps t


def default_steps(num_timesteps: int) -> tuple[int, ...]:
  """The default steps t of a T-step model: 10%, 30%, ..., 90% of T (at least 1)."""
  return tuple(max(1, round(f * num_timesteps)) for f in DEFAULT_FRACTIONS)


DEFAULT_T = default_steps(1000)  # (100, 300, 500, 700, 900)
DEFAULT_DRAWS = 2
DEFAULT_VAL = 500


@functools.lru_cache(maxsize=16)
def unconditional_model(su: Setup):
  """The network of `su` as (params, x, t) -> output: a class-conditional model is asked
  for its unconditional (null-label) prediction. One function per Setup: no recompiles."""
  model, k, null = su.model, su.num_classes, su.null_label
  check(k == 0 or null is not None,
        "workdir: expected an unconditional model or one trained with label dropout (a null "
        "class), got a class-conditional model without one")

  def fn(params, x, t):
    y = None if k == 0 else jnp.full(t.shape, null, jnp.int32)
    return model.apply({"params": params}, x, t, y, train=False)

  return fn


@dataclasses.dataclass(frozen=True)
class Scorer:
  """A workdir's model ready to score images: `losses(images, key, ...)` -> [N, K, D]."""
  workdir: str
  setup: Setup
  params: chex.ArrayTree

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.setup.image_shape

  @property
  def num_timesteps(self) -> int:
    return self.setup.schedule.num_timesteps

  def losses(self, images: chex.Array, key: chex.PRNGKey, *, t: int | Sequence[int] = DEFAULT_T,
             draws: int = DEFAULT_DRAWS, ddim_steps: int = 1, metric: str = "x0",
             batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    out = reconstruction_losses(unconditional_model(self.setup), self.params, self.setup.schedule,
                                images, key, t=t, draws=draws,
                                objective=self.setup.cfg.diffusion.objective, metric=metric,
                                ddim_steps=ddim_steps, batch_size=batch_size,
                                image_shape=self.image_shape)
    return np.asarray(out)

  def reconstruct(self, images: chex.Array, key: chex.PRNGKey, *, t: int = 600,
                  ddim_steps: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(x_t, x_hat) of images [N, H, W, C]: what the score compares (one noise draw)."""
    xt, xh = reconstruct(unconditional_model(self.setup), self.params, self.setup.schedule,
                         images, key, t=t, objective=self.setup.cfg.diffusion.objective,
                         ddim_steps=ddim_steps)
    return np.asarray(xt), np.asarray(xh)


def load_scorer(workdir: str | Workdir, ema: bool = True) -> Scorer:
  """The model of a trained pixel-space workdir (its EMA weights by default) as a Scorer."""
  cfg, params = load_model(workdir, ema=ema)
  su = setup(cfg)
  check(not str(cfg.data.name).startswith(("ae_latents", "imagenet_latents")),
        f"workdir: expected a pixel-space model, got one trained on latents "
        f"({cfg.data.name!r}); score its decoder's inputs instead")
  unconditional_model(su)  # refuses a conditional model without a null class, before any work
  return Scorer(Workdir(workdir).abspath, su, params)


def training_spec(cfg) -> str:
  """The data spec (`NAME:SPLIT[@CLASSES]`) of a config's training data."""
  spec = f"{cfg.data.name}:{cfg.data.split}"
  if cfg.data.get("labels"):
    spec += "@" + ",".join(str(int(c)) for c in cfg.data.labels)
  return spec


def _check_common(t, draws, fpr, val_n, ddim_steps, aggregation, batch_size, seed,
                  num_timesteps, image_shape) -> tuple[int, ...]:
  ts = default_steps(num_timesteps) if t is None else check_steps_t(t, num_timesteps)
  image = 4 * int(np.prod(image_shape))  # bytes of one float32 image
  # A batch holds batch_size * K * draws noised copies, their predictions and gradients-free
  # intermediates (about 8 images' worth each); the validation set, its proxy and losses.
  check_count("draws", draws, MAX_DRAWS)
  check_count("batch_size", batch_size, bytes_each=8 * image * len(ts) * draws,
              what=f"{len(ts)} steps x {draws} draws")
  check_count("draws", draws, bytes_each=8 * image * len(ts) * batch_size,
              what=f"{len(ts)} steps x a batch of {batch_size}")
  check_count("val_n", val_n, low=4, bytes_each=4 * image, what="a validation image")
  check_count("ddim_steps", ddim_steps, num_timesteps)
  check_number(fpr, "fpr", 0, 1, low_open=True, high_open=True)
  check(aggregation is None or aggregation in AGGREGATIONS,
        f"aggregation: expected one of {list(AGGREGATIONS)} (or none: chosen on validation "
        f"data), got {aggregation!r}")
  check(aggregation in (None, "single") or len(ts) >= 2,
        f"aggregation: expected at least 2 steps t for {aggregation!r}, got {list(ts)}")
  check_seed(seed)
  return ts


def _check_n(n, image_shape) -> int | None:
  """`n` images at most (None: all), bounded by memory (each image and two working copies)."""
  if n is None:
    return None
  return check_count("n", n, bytes_each=3 * 4 * int(np.prod(image_shape)), what="an image")


def _check_data_dir(data_dir) -> None:
  if data_dir is not None:
    check_dir_path(data_dir, "data_dir")


@dataclasses.dataclass(frozen=True)
class DetectorBuild:
  """What `build_detector` made: the calibrated detector, each candidate's proxy AUROC,
  and every candidate (fitted on the same validation images)."""
  detector: Detector
  selection: list[dict]
  candidates: list[Detector]


def build_detector(scorer: Scorer, val_images: np.ndarray, key: chex.PRNGKey, *,
                   t: Sequence[int], draws: int, ddim_steps: int, fpr: float,
                   aggregation: str | None = None, batch_size: int = DEFAULT_BATCH
                   ) -> DetectorBuild:
  """The detector from ID validation images [N, H, W, C], shuffled with `key` (a data set
  stored class by class must not give its halves different classes): the first half fits
  the combiner, the second half (and its patch-shuffled proxy) chooses the aggregation (the
  best of `aggregation` when given) and sets the threshold at `fpr`."""
  n = len(val_images)
  half = n // 2
  k_perm, k_loss, k_proxy, k_ploss = jax.random.split(key, 4)
  val_images = np.asarray(val_images)[np.asarray(jax.random.permutation(k_perm, n))]
  kw = dict(t=t, draws=draws, ddim_steps=ddim_steps, batch_size=batch_size)
  val_losses = scorer.losses(val_images, k_loss, **kw)
  fit, cal = val_losses[:half], val_losses[half:]
  proxy = proxy_outliers(val_images[half:], k_proxy)
  proxy_losses = scorer.losses(proxy, k_ploss, **kw)
  best, rows = select(tuple(t), fit, cal, proxy_losses, aggregation)
  return DetectorBuild(calibrate(best, cal, fpr), rows, candidates(tuple(t), fit))


def _val_detector(scorer: Scorer, val: str | None, val_n: int, key: chex.PRNGKey,
                  seed: int, data_dir: str | None, **kw) -> tuple[str, bool, int, DetectorBuild]:
  """(val spec, whether it is the training data, images, the detector) from `val_n` images
  of `val` (default: the model's training data); `kw` as `build_detector` takes them."""
  spec = val or training_spec(scorer.setup.cfg)
  images = load_images(spec, scorer.image_shape, n=val_n, seed=seed, data_dir=data_dir,
                       name="val")
  check(len(images) >= 4, f"val: expected at least 4 validation images, got {len(images)} "
                          f"from {spec!r}")
  return spec, val is None, len(images), build_detector(scorer, images, key, **kw)


def score(workdir: str | Workdir, images: str | np.ndarray | None = None,
          data: str | None = None, *, t: int | Sequence[int] | None = None,
          draws: int = DEFAULT_DRAWS, seed: int = 0, fpr: float = 0.05,
          val: str | None = None, val_n: int = DEFAULT_VAL, n: int | None = None,
          ddim_steps: int = 1, aggregation: str | None = None,
          batch_size: int = DEFAULT_BATCH, data_dir: str | None = None,
          out: str | None = None) -> dict:
  """Per-image OOD scores of `images` (a directory or file of PNG/JPEG at the model's size,
  or an array [N, H, W, C] in [-1, 1]) or of the data spec `data` (see
  `wdmjax.ood.load_images`; at most `n` images) at steps `t` (default `default_steps(T)`:
  10%, 30%, ..., 90% of T) with `draws` noise draws each, flagged above the threshold that flags
  `fpr` of the ID validation images `val` (default: the model's training data).

  Returns {'detector', 'threshold', 'fpr', 'val', 'val_is_training_data', 'selection',
  'flagged', 'images': [{'image', 'score', 'flagged'}], 'seconds', 'images_per_second'
  (of the scoring call, its compilation included)};
  also written to `out` (.json) when given.
  """
  t0 = time.time()
  check((images is None) != (data is None),
        "images: expected either images (a directory, file or array) or data (a data set "
        "name), not both and not neither")
  check(n is None or data is not None,
        f"n: expected only with data (every given image is scored), got {n!r}")
  check(out is None or str(out).lower().endswith(".json"),
        f"out: expected a .json path, got {out!r}")
  if out is not None:
    check_file_path(out, "out")
  _check_data_dir(data_dir)
  scorer = load_scorer(workdir)
  n = _check_n(n, scorer.image_shape)
  ts = _check_common(t, draws, fpr, val_n, ddim_steps, aggregation, batch_size, seed,
                     scorer.num_timesteps, scorer.image_shape)
  if data is not None:
    x = load_images(data, scorer.image_shape, n=n, seed=seed, data_dir=data_dir)
    names = [f"{data}#{i}" for i in range(len(x))]
  elif isinstance(images, str | os.PathLike):
    arrays, names = read_images(os.fspath(images), scorer.image_shape)
    x = np.stack(arrays)
  else:
    x = np.asarray(images, np.float32)
    check(x.ndim == 4 and x.size and np.all(np.isfinite(x)) and np.abs(x).max() <= 1.05,
          f"images: expected an array [N, H, W, C] of finite values in [-1, 1], got shape "
          f"{x.shape}" + (f", range [{x.min():.4g}, {x.max():.4g}]" if x.size else ""))
    check(tuple(x.shape[1:]) == tuple(scorer.image_shape),
          f"images: expected [N, {', '.join(map(str, scorer.image_shape))}] (the model's "
          f"shape), got {x.shape}")
    names = [str(i) for i in range(len(x))]
  key = jax.random.PRNGKey(seed)
  spec, default_val, nval, built = _val_detector(
      scorer, val, val_n, jax.random.fold_in(key, 1), seed, data_dir, t=ts, draws=draws,
      ddim_steps=ddim_steps, fpr=fpr, aggregation=aggregation, batch_size=batch_size)
  det, rows = built.detector, built.selection
  t1 = time.time()
  losses = scorer.losses(x, jax.random.fold_in(key, 2), t=ts, draws=draws,
                         ddim_steps=ddim_steps, batch_size=batch_size)
  scored = time.time() - t1
  s = det.score(losses)
  flags = s > det.threshold
  report = {
      "workdir": scorer.workdir, "detector": det.name, "t": list(ts), "draws": draws,
      "ddim_steps": ddim_steps, "threshold": det.threshold, "fpr": fpr, "val": spec,
      "val_images": nval, "val_is_training_data": default_val, "selection": rows,
      "flagged": int(flags.sum()), "num_images": len(s),
      "images": [{"image": nm, "score": float(v), "flagged": bool(f)}
                 for nm, v, f in zip(names, s, flags, strict=True)],
      "seconds": time.time() - t0, "images_per_second": len(s) / max(scored, 1e-9),
  }
  if out is not None:
    write_json(out, report)
  return report


def evaluate(workdir: str | Workdir, id_data: str, ood_data: Sequence[str], *,
             t: int | Sequence[int] | None = None, draws: int = DEFAULT_DRAWS, seed: int = 0,
             fpr: float = 0.05, val: str | None = None, val_n: int = DEFAULT_VAL,
             n: int | None = 1000, ddim_steps: int = 1, aggregation: str | None = None,
             batch_size: int = DEFAULT_BATCH, data_dir: str | None = None) -> dict:
  """Detection of each OOD set in `ood_data` against the ID test set `id_data` (data specs,
  at most `n` images each): AUROC, AUPR, FAR95, TPR at 5% false alarms, and the share
  flagged at the detector's threshold (set at `fpr` on `val`).

  Returns {'detector', 'threshold', 'val', 'val_is_training_data', 'selection',
  'id': {'data', 'images', 'flagged'}, 'rows': [{'data', 'images', 'auroc', 'aupr', 'far95',
  'tpr_at_fpr_0.05', 'flagged'}], 'seconds'}.
  """
  t0 = time.time()
  check(isinstance(ood_data, Sequence) and not isinstance(ood_data, str) and len(ood_data),
        f"ood_data: expected a non-empty list of data sets, got {ood_data!r}")
  check(len({id_data, *ood_data}) == len(ood_data) + 1,
        f"ood_data: expected data sets different from each other and from id_data, got "
        f"{list(ood_data)!r} against {id_data!r}")
  for spec in ood_data:
    check(not may_share_images(id_data, spec),
          f"ood_data: expected data sets that share no images with id_data, got {spec!r} "
          f"against {id_data!r} (the same set, split and classes: in- and "
          f"out-of-distribution at once)")
  _check_data_dir(data_dir)
  scorer = load_scorer(workdir)
  n = _check_n(n, scorer.image_shape)
  ts = _check_common(t, draws, fpr, val_n, ddim_steps, aggregation, batch_size, seed,
                     scorer.num_timesteps, scorer.image_shape)
  sets = {spec: load_images(spec, scorer.image_shape, n=n, seed=seed, data_dir=data_dir,
                            name="id_data" if i == 0 else "ood_data")
          for i, spec in enumerate([id_data, *ood_data])}
  key = jax.random.PRNGKey(seed)
  spec, default_val, nval, built = _val_detector(
      scorer, val, val_n, jax.random.fold_in(key, 1), seed, data_dir, t=ts, draws=draws,
      ddim_steps=ddim_steps, fpr=fpr, aggregation=aggregation, batch_size=batch_size)
  det, rows = built.detector, built.selection
  scores = {}
  for i, (name, x) in enumerate(sets.items()):
    losses = scorer.losses(x, jax.random.fold_in(key, 10 + i), t=ts, draws=draws,
                           ddim_steps=ddim_steps, batch_size=batch_size)
    scores[name] = det.score(losses)
  sid = scores[id_data]
  table = [{"data": name, "images": len(scores[name]),
            **detection_report(sid, scores[name]),
            "flagged": float(np.mean(scores[name] > det.threshold))} for name in ood_data]
  return {"workdir": scorer.workdir, "detector": det.name, "t": list(ts), "draws": draws,
          "threshold": det.threshold, "fpr": fpr, "val": spec, "val_images": nval,
          "val_is_training_data": default_val, "selection": rows,
          "id": {"data": id_data, "images": len(sid),
                 "flagged": float(np.mean(sid > det.threshold))},
          "rows": table, "seconds": time.time() - t0}


__all__ = ["DEFAULT_T", "DetectorBuild", "Scorer", "build_detector", "default_steps",
           "evaluate", "load_scorer", "score", "training_spec"]
