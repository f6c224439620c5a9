"""`wdmjax signature pretrain`: the HiDDeN encoder and extractor of a signature workdir,
trained with one attack per batch, then the extractor's whitening fitted on held-out images.

It holds the workdir's lock, saves its state to `pretrain_checkpoint.npz` every
`checkpoint_every` steps (and when stopped by SIGTERM or Ctrl-C), and a rerun with the same
arguments continues from it to the result of a run never stopped; a checkpoint of other
arguments is refused in one line. The files are those of `wdmjax.runs.signature`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wdmjax import records
from wdmjax.data import labelled_split
from wdmjax.errors import WdmjaxError, check, check_number, check_seed, show
from wdmjax.files import check_dir_path, save_npz
from wdmjax.runs.arguments import check_count
from wdmjax.runs.signature import (
  CHECKPOINT,
  CHECKPOINT_EVERY,
  ENCODER,
  EXTRACTOR,
  HIDDEN_JSON,
  MAX_BITS,
  MAX_CANDIDATES,
  MAX_CHANNELS,
  MAX_DEPTH,
  MAX_STEPS,
  _count,
  _extract,
  _flat,
)
from wdmjax.signature import fit_whitening
from wdmjax.signature.detect import message_bits
from wdmjax.signature.noise import NOISE_LAYERS, apply_noise, check_noise_layers
from wdmjax.signature.pretrain import (
  SELECTIONS,
  Hidden,
  PretrainProgress,
  init_hidden,
  init_state,
  make_optimizer,
  pretrain_hidden,
)
from wdmjax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class PretrainReport:
  """The pre-trained extractor: held-out bit accuracy clean and under each noise layer;
  `resumed_from`: the step an interrupted run was continued from (0: a fresh run)."""
  workdir: str
  steps: int
  seconds: float
  selection: str
  bit_accuracy: float
  attacked_bit_accuracy: dict[str, float]
  resumed_from: int = 0


def _bit_accuracy(hidden: Hidden, images: np.ndarray, key, strength: float,
                  names: tuple[str, ...]) -> dict[str, float]:
  """Held-out bit accuracy of encoder -> noise layer -> extractor, per noise layer."""
  bits = message_bits(key, hidden.extractor.num_bits, num_users=len(images))

  @jax.jit
  def acc(x, b, index, k):
    residual = hidden.encoder.apply(hidden.encoder_vars, x, b)
    signed = jnp.clip(x + strength * residual, -1.0, 1.0)
    logits = hidden.extractor.apply(hidden.extractor_vars, apply_noise(names, index, k, signed))
    return ((logits > 0) == (b > 0)).mean()

  out = {}
  for i, name in enumerate(names):
    out[name] = float(np.mean([acc(jnp.asarray(images[s:s + 250]), bits[s:s + 250], i,
                                   jax.random.fold_in(key, s))
                               for s in range(0, len(images), 250)]))
  return out


def _checkpoint_template(image_shape: tuple, args: dict):
  """The structure and shapes of a pre-training state for `args` (no memory allocated)."""
  def make():
    h = init_hidden(jax.random.key(0), image_shape, args["num_bits"], args["channels"], 4,
                    args["extractor_depth"], args["pool"])
    return init_state(h, make_optimizer(1.0, 1))
  return jax.eval_shape(make)


def _save_checkpoint(wd: Workdir, args: dict, phase: str, p: PretrainProgress,
                     warmup_history: list) -> None:
  leaves = jax.tree.leaves(jax.device_get(p.state))
  meta = {"args": args, "phase": phase, "step": p.step, "history": p.history,
          "warmup_history": warmup_history, "counts": np.asarray(p.counts).tolist()}
  arrays = {f"state/{i:05d}": np.asarray(a) for i, a in enumerate(leaves)}
  arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  save_npz(wd.file(CHECKPOINT), arrays)


def _read_checkpoint(wd: Workdir, args: dict, image_shape: tuple) -> dict | None:
  """The saved progress of an interrupted pre-training with these `args`: {phase, progress,
  warmup_history}; None when there is none. Another run's checkpoint is refused."""
  path = wd.file(CHECKPOINT)
  if not os.path.lexists(path):
    return None
  arrays = records.read_npz_file(path, ["meta"])
  try:
    meta = json.loads(arrays["meta"].astype(np.uint8).tobytes().decode("utf-8"))
  except (ValueError, TypeError) as e:
    raise WdmjaxError(f"{path}: array 'meta': expected JSON text, got {type(e).__name__}") \
      from None
  old = records.field(meta, "args", "dict", path)
  for k, v in args.items():
    check(old.get(k) == v, f"{path}: holds an interrupted pre-training with other arguments "
                           f"({k} {show(old.get(k), 40)}, not {show(v, 40)}); rerun it with "
                           f"the same arguments to resume it, or remove the file to start "
                           f"afresh")
  phase = records.field(meta, "phase", "str", path, choices=("warmup", "attacks"))
  total = args["warmup_steps"] if phase == "warmup" else args["steps"] - args["warmup_steps"]
  step = records.field(meta, "step", "int", path, low=0, high=total)
  history = records.field(meta, "history", "list", path)
  warmup_history = records.field(meta, "warmup_history", "list", path)
  n = len(args["attacks"]) if phase == "attacks" else 1
  counts = records.field(meta, "counts", "list", path, low=n, high=n)
  check(all(isinstance(c, int) and 0 <= c <= step for c in counts),
        f"{path}: field 'counts': expected {n} counts in [0, {step}], got {show(counts, 60)}")
  template = _checkpoint_template(image_shape, args)
  want, treedef = jax.tree.flatten(template)
  names = [f"state/{i:05d}" for i in range(len(want))]
  check(set(arrays) == {*names, "meta"},
        f"{path}: expected the {len(want)} arrays of this pre-training's state, got "
        f"{len(arrays) - 1}")
  for name, w in zip(names, want, strict=True):
    check(arrays[name].shape == w.shape, f"{path}: array {name!r}: expected shape {w.shape}, "
                                         f"got {arrays[name].shape}")
  state = jax.tree.unflatten(treedef, [jnp.asarray(arrays[n], w.dtype)
                                       for n, w in zip(names, want, strict=True)])
  return {"phase": phase, "warmup_history": warmup_history,
          "progress": PretrainProgress(step, state, history, np.asarray(counts, np.int64))}


def pretrain(workdir: str | Workdir, data: str = "mnist5k", *, steps: int = 4000,
             warmup_steps: int = 2000, batch_size: int = 32, lr: float = 2e-3,
             selection: str = "uncertainty", candidates: int = 3, channels: int = 16,
             num_bits: int = 48, strength: float = 0.3, image_weight: float = 0.1,
             attacks: Sequence[str] = tuple(NOISE_LAYERS), extractor_depth: int = 8,
             pool: int = 1, seed: int = 0, data_dir: str | None = None, progress: bool = True,
             checkpoint_every: int = CHECKPOINT_EVERY) -> PretrainReport:
  """Pre-trains a HiDDeN encoder and extractor on `data`'s training images, fits the
  whitening on the clean logits of its held-out images and writes extractor.npz, encoder.npz
  and hidden.json. (`signature embed` whitens afresh on the signed model's own images.)

  The first `warmup_steps` train without attacks (the bits are learned first); the rest apply
  one noise layer per batch, chosen by `selection` ("uncertainty": the highest-loss of
  `candidates` drawn ones; "uniform": one drawn at random) from `attacks` (names of
  `wdmjax.signature.NOISE_LAYERS`). `pool` = 1 is the published extractor's global pooling;
  g > 1 pools over a g x g grid (see `HiddenExtractor`).

  Resumable: the state is saved to pretrain_checkpoint.npz every `checkpoint_every` steps,
  at the end of the warm-up and when the run is stopped (SIGTERM, Ctrl-C); the same call
  again continues from it, with the result of a run never stopped. A checkpoint of other
  arguments is refused (remove it to start afresh). `batch_size` is bounded by the training
  images and by memory.
  """
  wd = Workdir(workdir)
  check_dir_path(wd.path, "workdir", writable=True)
  check(not wd.exists(EXTRACTOR), f"workdir: {wd.path!r} already holds an extractor "
                                  f"({EXTRACTOR}); use another directory")
  steps = _count("steps", steps, MAX_STEPS)
  check(isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool)
        and 0 <= warmup_steps < steps,
        f"warmup_steps: expected an integer in [0, steps = {steps}), got {show(warmup_steps)}")
  check(selection in SELECTIONS, f"selection: expected one of {SELECTIONS}, got "
                                 f"{show(selection)}")
  candidates = _count("candidates", candidates, MAX_CANDIDATES)
  channels = _count("channels", channels, MAX_CHANNELS)
  num_bits = _count("num_bits", num_bits, MAX_BITS)
  extractor_depth = _count("extractor_depth", extractor_depth, MAX_DEPTH)
  checkpoint_every = _count("checkpoint_every", checkpoint_every, MAX_STEPS)
  check_number(lr, "lr", 0, low_open=True)
  check_number(strength, "strength", 0, 1, low_open=True)
  check_number(image_weight, "image_weight", 0)
  seed = check_seed(seed, "seed")
  attacks = check_noise_layers(tuple(attacks))
  check(isinstance(batch_size, int | np.integer) and not isinstance(batch_size, bool)
        and batch_size >= 1, f"batch_size: expected a positive integer, got {show(batch_size)}")
  x, _, xh, _ = labelled_split(data, data_dir=data_dir)
  h, w, c = x.shape[1:]
  check(len(xh) > num_bits, f"data: expected more held-out images than the {num_bits} bits "
                            f"(the whitening is fitted on them), got {len(xh)} in {data!r}")
  batch_size = _count("batch_size", batch_size, len(x),
                      f" (the training images of {data!r})")
  # Activations of the encoder, the extractor and the scored candidate attacks, kept for the
  # backward pass: an estimate, within a small factor.
  per_image = 4 * h * w * (channels * (4 + extractor_depth + 2) + num_bits + c) * (8 + candidates)
  batch_size = check_count("batch_size", batch_size, bytes_each=per_image, what="images")
  pool = _count("pool", pool, min(h, w), f" (the side of the {w}x{h} images of {data!r})")
  args = {"data": data, "steps": steps, "warmup_steps": warmup_steps,
          "batch_size": batch_size, "lr": float(lr), "selection": selection,
          "candidates": candidates, "channels": channels, "num_bits": num_bits,
          "strength": float(strength), "image_weight": float(image_weight),
          "attacks": list(attacks), "extractor_depth": extractor_depth, "pool": pool,
          "seed": seed}
  key = jax.random.key(seed)
  common = dict(num_bits=num_bits, batch_size=batch_size, channels=channels,
                extractor_depth=extractor_depth, pool=pool, strength=strength,
                image_weight=image_weight, progress=progress)
  with wd.lock():
    check(not wd.exists(EXTRACTOR), f"workdir: {wd.path!r} already holds an extractor "
                                    f"({EXTRACTOR}); use another directory")
    saved = _read_checkpoint(wd, args, (h, w, c))
    start = time.time()
    resumed_from = 0 if saved is None else (
      saved["progress"].step + (warmup_steps if saved["phase"] == "attacks" else 0))
    latest: list = [None, None]  # the last progress reported, the last saved

    def on_step(phase: str, warmup_history: list, p: PretrainProgress) -> None:
      latest[0] = (phase, warmup_history, p)
      total = warmup_steps if phase == "warmup" else steps - warmup_steps
      if p.step % checkpoint_every == 0 or (phase == "warmup" and p.step == total):
        _save_checkpoint(wd, args, phase, p, warmup_history)
        latest[1] = latest[0]

    history: list = []
    hidden = None
    try:
      if warmup_steps and (saved is None or saved["phase"] == "warmup"):
        r = pretrain_hidden(x, jax.random.fold_in(key, 1), steps=warmup_steps, lr=lr,
                            attacks=("identity",), selection="uniform", **common,
                            hidden=None if saved is None else _modules(x, key, common),
                            start=None if saved is None else saved["progress"],
                            on_step=lambda p: on_step("warmup", [], p))
        hidden, history = r.hidden, [dict(h, phase="warmup") for h in r.history]
      elif saved is not None and saved["phase"] == "attacks":
        history, hidden = saved["warmup_history"], _modules(x, key, common)
      r = pretrain_hidden(x, jax.random.fold_in(key, 2), steps=steps - warmup_steps,
                          lr=lr / 2 if warmup_steps else lr, selection=selection,
                          candidates=candidates, attacks=attacks, hidden=hidden, **common,
                          start=saved["progress"] if saved and saved["phase"] == "attacks"
                          else None,
                          on_step=lambda p, wh=history: on_step("attacks", wh, p))
    except KeyboardInterrupt:  # SIGTERM (Terminated) or Ctrl-C: keep what was done
      if latest[0] is not None and latest[0] is not latest[1]:
        phase, warmup_history, p = latest[0]
        _save_checkpoint(wd, args, phase, p, warmup_history)
      raise
    history += [dict(h, phase="attacks") for h in r.history]
    hidden = r.hidden
    # Whitened on held-out images: unsigned images the extractor was not trained on.
    logits = np.concatenate([np.asarray(_extract(hidden.extractor, hidden.extractor_vars,
                                                 jnp.asarray(xh[s:s + 500])))
                             for s in range(0, len(xh), 500)])
    wh = fit_whitening(logits)
    accs = _bit_accuracy(hidden, xh, jax.random.fold_in(key, 3), strength,
                         tuple(dict.fromkeys(("identity", *attacks))))
    seconds = time.time() - start
    with wd.undo_on_failure():
      save_npz(wd.file(EXTRACTOR), {**_flat(hidden.extractor_vars, "vars"),
                                    "whitening/mean": np.asarray(wh.mean),
                                    "whitening/matrix": np.asarray(wh.matrix)},
               compressed=True)
      save_npz(wd.file(ENCODER), _flat(hidden.encoder_vars, "vars"), compressed=True)
      wd.write_json(HIDDEN_JSON, {
        "data": data, "image_shape": [int(h), int(w), int(c)], "num_bits": num_bits,
        "channels": channels, "encoder_depth": hidden.encoder.depth,
        "extractor_depth": hidden.extractor.depth, "pool": hidden.extractor.pool,
        "steps": steps, "warmup_steps": warmup_steps, "batch_size": batch_size, "lr": lr,
        "selection": selection, "candidates": candidates, "strength": strength,
        "image_weight": image_weight, "seed": seed, "seconds": seconds,
        "resumed_from": resumed_from, "whitening": "held-out images",
        "held_out_bit_accuracy": accs, "history": history})
    wd.remove(CHECKPOINT)
  return PretrainReport(wd.abspath, steps, seconds, selection, accs["identity"], accs,
                        resumed_from)


def _modules(x: np.ndarray, key, common: dict) -> Hidden:
  """A fresh HiDDeN pair of this run's shapes: the modules a resumed phase trains (its
  variables come from the checkpoint)."""
  return init_hidden(jax.random.fold_in(jax.random.fold_in(key, 1), 1), x.shape[1:],
                     common["num_bits"], common["channels"], 4, common["extractor_depth"],
                     common["pool"])


