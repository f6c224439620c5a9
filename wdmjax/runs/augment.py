"""Uncertainty-based augmentation on a data set: a picture of the candidates, and a classifier
trained with an augmentation policy (`wdmjax augment preview`, `wdmjax classifier`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageDraw

from wdmjax.augment import DIGIT_FAMILY, POLICIES, Augmentation, augment_candidates, shifted
from wdmjax.data import labelled_split
from wdmjax.errors import check, check_seed
from wdmjax.files import atomic_open, check_dir_path, check_file_path, write_json
from wdmjax.metrics.classifier import classifier_accuracy, train_classifier
from wdmjax.models.lenet import pretrained_lenet
from wdmjax.models.params_io import save_params_npz
from wdmjax.runs.arguments import MAX_DRAWS, MAX_STEPS, check_count
from wdmjax.train.images import to_uint8

_KEPT = (40, 170, 60)     # frame of a kept candidate
# The digit classifier's activations, gradients and optimiser traffic per example, in units
# of the input image's bytes: a generous estimate (its conv stages are 16 and 32 wide).
_ACTIVATIONS = 256
_DROPPED = (200, 200, 200)


@dataclasses.dataclass(frozen=True)
class PreviewResult:
  """What `preview` drew: `path` (PNG), the policy, `num` images, the candidates' losses
  [num, C] under `scorer` (None for "random"), and the kept candidates' indices [num, S]
  (None likewise)."""
  path: str
  policy: str
  num: int
  scorer: str | None
  losses: np.ndarray | None
  kept: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class ClassifierResult:
  """A classifier trained with an augmentation policy: held-out accuracy on the clean and on
  the shifted (rotated and translated) held-out images, the training time, the files."""
  accuracy: float
  shifted_accuracy: float
  seconds: float
  steps: int
  augment: dict
  path: str | None
  report: str | None


def _augmentation(policy: str, L: int, C: int, S: int, magnitude: float,
                  ops: Sequence[str] | None, selection: str) -> Augmentation:
  check_count("L", L, MAX_DRAWS)
  check_count("C", C, MAX_DRAWS)
  return Augmentation(policy=policy, L=L, C=C, S=S, magnitude=magnitude,
                      ops=tuple(ops) if ops is not None else DIGIT_FAMILY,
                      selection=selection)


def _check_data_dir(data_dir) -> None:
  if data_dir is not None:
    check_dir_path(data_dir, "data_dir")


def _scorer(data: str, images: np.ndarray, labels: np.ndarray, seed: int):
  """A per-example loss (images [-1, 1], one-hot targets) -> losses, and its name: the
  shipped LeNet for 28 x 28 digits, else a classifier trained here for 300 steps."""
  if images.shape[1:] == (28, 28, 1) and data == "mnist5k":
    model, params = pretrained_lenet()
    scale = lambda x: (x + 1.0) / 2.0  # LeNet reads [0, 1]
    name = "shipped LeNet"
  else:
    # A key of its own: the candidates are drawn from key(seed).
    model, params = train_classifier(images, labels, jax.random.fold_in(jax.random.key(seed), 1),
                                     steps=300, num_classes=int(labels.max()) + 1)
    scale = lambda x: x
    name = "a classifier trained for 300 steps"

  @jax.jit
  def losses(x, t):
    return optax.softmax_cross_entropy(model.apply({"params": params}, scale(x)), t)

  return losses, name


def _render(rows: list[np.ndarray], kept: np.ndarray | None, losses: np.ndarray | None,
            path: str, title: str) -> str:
  """rows: [num] uint8 [1 + C, H, W, c] (the original, then the candidates) -> one PNG; the
  kept candidates framed, every candidate's loss under it."""
  up = max(1, 84 // rows[0].shape[1])
  h, w = rows[0].shape[1] * up, rows[0].shape[2] * up
  pad, cap, head = 6, 14 if losses is not None else 0, 20
  cols = rows[0].shape[0]
  canvas = Image.new("RGB", (cols * (w + pad) + pad + 10, head + len(rows) * (h + pad + cap)
                             + pad), "white")
  draw = ImageDraw.Draw(canvas)
  draw.text((pad, 4), title, fill="black")
  for r, row in enumerate(rows):
    top = head + r * (h + pad + cap)
    for c in range(cols):
      left = pad + c * (w + pad) + (10 if c else 0)
      tile = row[c].repeat(up, 0).repeat(up, 1)
      tile = tile.repeat(3, -1) if tile.shape[-1] == 1 else tile
      if c and kept is not None:
        color = _KEPT if (c - 1) in kept[r] else _DROPPED
        draw.rectangle([left - 3, top - 3, left + w + 2, top + h + 2], fill=color)
      canvas.paste(Image.fromarray(tile), (left, top))
      if c and losses is not None:
        draw.text((left, top + h + 2), f"{abs(losses[r, c - 1]):.2f}", fill="black")
  with atomic_open(path) as f:
    canvas.save(f, format="PNG")
  return path


def preview(data: str = "mnist5k", policy: str = "uncertainty", out: str = "grid.png", *,
            num: int = 8, L: int = 2, C: int = 4, S: int = 1, magnitude: float = 1.0,
            ops: Sequence[str] | None = None, selection: str = "top", seed: int = 0,
            data_dir: str | None = None) -> PreviewResult:
  """A picture of the policy on real images: each row an image of `data` and its C
  candidate compositions of L transformations; for "uncertainty" the S candidates with the
  highest loss under a classifier are framed (what training would keep), every loss below.

  Args:
    data: an embedded labelled set (mnist5k, digits) or a TFDS one in `data_dir`.
    policy: "random" or "uncertainty".
    out: the PNG to write.
    num: images (rows).
    L, C, S, magnitude, ops, selection: the policy's settings (ops default:
      `DIGIT_FAMILY`; see `wdmjax.augment.Augmentation`).
    seed: picks the images and draws the candidates.
    data_dir: TFDS data dir.

  Returns:
    PreviewResult.
  """
  check(policy in ("random", "uncertainty"),
        f"policy: expected one of random, uncertainty, got {policy!r}")
  aug = _augmentation(policy, L, C, S, magnitude, ops, selection)
  check_count("num", num)
  seed = check_seed(seed)
  check(str(out).lower().endswith(".png"), f"out: expected a .png path, got {out!r}")
  check_file_path(out, "out")
  _check_data_dir(data_dir)
  x, y, _, _ = labelled_split(data, seed=0, data_dir=data_dir)
  pick = np.random.default_rng(seed).choice(len(y), size=min(num, len(y)), replace=False)
  # The candidates, their flattened copy and the classifier's activations on them.
  check_count("C", aug.C, bytes_each=_ACTIVATIONS * x[0].nbytes * len(pick),
              what=f"a candidate of {len(pick)} images")
  num_classes = int(y.max()) + 1
  images = jnp.asarray(x[pick])
  targets = jax.nn.one_hot(y[pick], num_classes)
  cand_x, cand_y = jax.jit(functools.partial(
      augment_candidates, C=aug.C, L=aug.L, ops=aug.ops, magnitude=aug.magnitude))(
          jax.random.key(seed), images, targets)
  losses = kept = scorer = None
  if policy == "uncertainty":
    loss_fn, scorer = _scorer(data, x, y, seed)
    flat = loss_fn(cand_x.reshape(-1, *images.shape[1:]), cand_y.reshape(-1, num_classes))
    losses = np.asarray(flat.reshape(aug.C, -1).T)  # [num, C]
    if aug.selection == "top":  # the rules of uncertainty_augment
      kept = np.asarray(jax.lax.top_k(losses, aug.S)[1])
    else:
      w = np.maximum(losses, 0.0)
      w = np.where(w.sum(1, keepdims=True) > 0, w, 1.0)
      kept = np.asarray(jax.random.categorical(jax.random.key(seed + 1), jnp.log(w), axis=-1,
                                               shape=(aug.S, len(w))).T)
  rows = [to_uint8(np.concatenate([x[pick][i:i + 1], np.asarray(cand_x[:, i])]))
          for i in range(len(pick))]
  what = (f"uncertainty: C={aug.C} candidates of L={aug.L}, kept S={aug.S} (framed, "
          f"{aug.selection}) by loss under {scorer}") if policy == "uncertainty" else \
      f"random: {aug.C} draws of L={aug.L} transformations"
  path = _render(rows, kept, losses, os.fspath(out), f"{data} - {what}")
  return PreviewResult(path, policy, len(pick), scorer, losses, kept)


def classifier(data: str = "mnist5k", augment: str = "uncertainty", *, steps: int = 1000,
               batch_size: int = 64, lr: float = 3e-3, L: int = 2, C: int = 4, S: int = 1,
               magnitude: float = 1.0, ops: Sequence[str] | None = None,
               selection: str = "top", seed: int = 0, shift: float = 0.5,
               out: str | None = None, data_dir: str | None = None,
               progress: bool = False) -> ClassifierResult:
  """Trains the small digit classifier (`DigitClassifier`) on `data`'s training split with
  an augmentation policy and measures it on the held-out split, clean and shifted.

  Args:
    data: an embedded labelled set (mnist5k, digits) or a TFDS one in `data_dir`.
    augment: "none", "random" or "uncertainty".
    steps, batch_size, lr: the classifier's training (Adam, cosine-decayed).
    L, C, S, magnitude, ops, selection: the policy's settings (ops default:
      `DIGIT_FAMILY`; see `wdmjax.augment.Augmentation`).
    seed: initialization, batches and augmentation.
    shift: magnitude of the shifted held-out set (`wdmjax.augment.shifted`).
    out: a `.npz` for the parameters (its report beside it, `.json`), or None.
    data_dir: TFDS data dir.
    progress: a progress bar.

  Returns:
    ClassifierResult.
  """
  check(augment in POLICIES, f"augment: expected one of {', '.join(POLICIES)}, got {augment!r}")
  aug = _augmentation(augment, L, C, S, magnitude, ops, selection)
  seed = check_seed(seed)
  check(isinstance(shift, float | int) and 0.0 <= shift <= 1.0,
        f"shift: expected a number in [0, 1], got {shift!r}")
  check_count("steps", steps, MAX_STEPS)
  check_count("batch_size", batch_size)
  if out is not None:
    check(str(out).endswith(".npz"), f"out: expected a path ending in .npz, got {out!r}")
    check_file_path(out, "out")
  _check_data_dir(data_dir)
  x, y, xh, yh = labelled_split(data, seed=0, data_dir=data_dir)
  # A step holds batch_size * C candidates (C for "uncertainty") and their activations.
  per_step = aug.C if aug.policy == "uncertainty" else 1
  check_count("batch_size", batch_size, bytes_each=_ACTIVATIONS * x[0].nbytes * per_step,
              what=f"an example{f' ({per_step} candidates)' if per_step > 1 else ''}")
  t0 = time.perf_counter()
  model, params = train_classifier(x, y, jax.random.key(seed), steps=steps,
                                   batch_size=batch_size, lr=lr, num_classes=int(y.max()) + 1,
                                   augment=aug, progress=progress)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - t0
  xs = np.asarray(jax.jit(shifted)(jax.random.key(10_000 + seed), jnp.asarray(xh),
                                   float(shift)))
  acc = classifier_accuracy(model, params, xh, yh)
  acc_shift = classifier_accuracy(model, params, xs, yh)
  spec = {"policy": aug.policy, "L": aug.L, "C": aug.C, "S": aug.S,
          "magnitude": aug.magnitude, "ops": list(aug.ops), "selection": aug.selection}
  report = path = None
  if out is not None:
    report_dict = {"data": data, "augment": spec, "steps": steps, "batch_size": batch_size,
                   "lr": lr, "seed": seed, "shift": shift, "accuracy": acc,
                   "shifted_accuracy": acc_shift, "seconds": seconds}
    path = save_params_npz(params, os.fspath(out), dtype=np.float32)
    report = write_json(os.fspath(out)[:-4] + ".json", report_dict)
  return ClassifierResult(acc, acc_shift, seconds, steps, spec, path, report)
