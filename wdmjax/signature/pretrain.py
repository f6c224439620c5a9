"""Pre-training the HiDDeN encoder and extractor with attacks in the loop (Stable Signature's
first stage): the encoder hides k random bits in an image as a small residual, one attack
(noise layer) edits the batch, the extractor reads the bits back.

Loss per image: BCE(extractor logits, bits) + image_weight * ||strength * residual||^2 (mean
square on the [-1, 1] scale). Only the extractor is kept afterwards: Stable Signature roots
its bits in a latent decoder instead of the encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wdmjax.augment import select_top
from wdmjax.errors import check, check_number
from wdmjax.signature.hidden import HiddenEncoder, HiddenExtractor, embed
from wdmjax.signature.noise import NOISE_LAYERS, apply_noise, check_noise_layers

Array = jax.Array
SELECTIONS = ("uncertainty", "uniform")


class Hidden(NamedTuple):
  """The encoder and extractor modules and their variables ({'params', 'batch_stats'})."""
  encoder: HiddenEncoder
  extractor: HiddenExtractor
  encoder_vars: Any
  extractor_vars: Any

  def extract(self, images: Array) -> Array:
    """Logits [B, k] of images [B, H, W, C] (running BatchNorm statistics)."""
    return self.extractor.apply(self.extractor_vars, images)


def init_hidden(key: Array, image_shape: tuple[int, int, int], num_bits: int = 48,
                channels: int = 32, encoder_depth: int = 4, extractor_depth: int = 8,
                pool: int = 1) -> Hidden:
  """A fresh HiDDeN pair for images [H, W, C] (`pool`: see `HiddenExtractor`)."""
  check(isinstance(pool, int) and not isinstance(pool, bool) and 1 <= pool <= min(image_shape[:2]),
        f"pool: expected an integer in [1, {min(image_shape[:2])}], got {pool!r}")
  enc = HiddenEncoder(num_bits=num_bits, channels=channels, depth=encoder_depth)
  ext = HiddenExtractor(num_bits=num_bits, channels=channels, depth=extractor_depth, pool=pool)
  x = jnp.zeros((2, *image_shape), jnp.float32)
  bits = jnp.zeros((2, num_bits), jnp.int32)
  k1, k2 = jax.random.split(key)
  return Hidden(enc, ext, enc.init(k1, x, bits), ext.init(k2, x))


class PretrainState(NamedTuple):
  enc_params: Any
  ext_params: Any
  enc_stats: Any
  ext_stats: Any
  opt_state: Any


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  """Adam at `lr` with cosine decay over `steps` (to 5% of `lr`)."""
  return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))


def init_state(hidden: Hidden, tx: optax.GradientTransformation) -> PretrainState:
  """The training state of `hidden`'s variables with a fresh optimizer state."""
  params = (hidden.encoder_vars["params"], hidden.extractor_vars["params"])
  return PretrainState(*params, hidden.encoder_vars["batch_stats"],
                       hidden.extractor_vars["batch_stats"], tx.init(params))


class PretrainProgress(NamedTuple):
  """Where a pre-training stands after `step` steps: enough to continue it exactly (the
  batches and noise of each step are drawn from the key and the step's index)."""
  step: int
  state: PretrainState
  history: list[dict]   # the rows logged so far
  counts: np.ndarray    # [attacks] how often each attack was applied


def _losses(enc, ext, params, stats, images, bits, noise_names, index, key, strength,
            image_weight, train: bool):
  """Per-image total loss [B], bit accuracy [B], the new BatchNorm stats."""
  (ep, xp), (es, xs) = params, stats
  residual, enc_upd = enc.apply({"params": ep, "batch_stats": es}, images, bits, train=train,
                                mutable=["batch_stats"])
  signed = embed(images, residual, strength)
  attacked = apply_noise(noise_names, index, key, signed)
  logits, ext_upd = ext.apply({"params": xp, "batch_stats": xs}, attacked, train=train,
                              mutable=["batch_stats"])
  bce = optax.sigmoid_binary_cross_entropy(logits, bits.astype(jnp.float32)).mean(-1)
  mse = jnp.mean((signed - images) ** 2, axis=(1, 2, 3))
  acc = ((logits > 0) == (bits > 0)).mean(-1)
  return bce + image_weight * mse, (bce, mse, acc, enc_upd["batch_stats"],
                                    ext_upd["batch_stats"])


def make_pretrain_step(hidden: Hidden, tx: optax.GradientTransformation,
                       noise_names: tuple[str, ...], selection: str, candidates: int,
                       strength: float, image_weight: float) -> Callable:
  """(state, images [B,H,W,C], key) -> (state, metrics); jitted."""
  enc, ext = hidden.encoder, hidden.extractor
  n = len(noise_names)

  def step(state: PretrainState, images: Array, key: Array):
    k_bits, k_pick, k_cand, k_noise = jax.random.split(key, 4)
    bits = jax.random.bernoulli(k_bits, 0.5, (images.shape[0], enc.num_bits)).astype(jnp.int32)
    params = (state.enc_params, state.ext_params)
    stats = (state.enc_stats, state.ext_stats)
    if selection == "uniform" or candidates == 1:
      index = jax.random.randint(k_pick, (), 0, n)
    else:
      # C candidate attacks, scored on this batch without gradients; keep the one with the
      # highest mean loss (S = 1 of C, the batch as one example).
      cands = jax.random.choice(k_pick, n, (candidates,), replace=candidates > n)
      scores = jnp.stack([
        _losses(enc, ext, jax.lax.stop_gradient(params), stats, images, bits, noise_names,
                c, jax.random.fold_in(k_cand, i), strength, image_weight, False)[0].mean()
        for i, c in enumerate(cands)])
      index = select_top(cands[:, None], scores[:, None], 1)[0][0]

    def loss_fn(p):
      per, aux = _losses(enc, ext, p, stats, images, bits, noise_names, index, k_noise,
                         strength, image_weight, True)
      return per.mean(), aux

    (loss, (bce, mse, acc, es, xs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    ep, xp = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "bce": bce.mean(), "mse": mse.mean(), "bit_acc": acc.mean(),
               "attack": index}
    return PretrainState(ep, xp, es, xs, opt_state), metrics

  return jax.jit(step)


class PretrainResult(NamedTuple):
  hidden: Hidden
  history: list[dict]  # per logged step: step, loss, bce, mse, bit_acc, attack (name)


def pretrain_hidden(images: np.ndarray, key: Array, *, num_bits: int = 48, steps: int = 2000,
                    batch_size: int = 32, lr: float = 1e-3, channels: int = 32,
                    encoder_depth: int = 4, extractor_depth: int = 8, pool: int = 1,
                    attacks: Sequence[str] = tuple(NOISE_LAYERS),
                    selection: str = "uncertainty", candidates: int = 3,
                    strength: float = 0.2, image_weight: float = 1.0, log_every: int = 50,
                    progress: bool = False, hidden: Hidden | None = None,
                    start: PretrainProgress | None = None,
                    on_step: Callable[[PretrainProgress], None] | None = None
                    ) -> PretrainResult:
  """Trains a HiDDeN pair on `images` [N, H, W, C] in [-1, 1] for `steps` batches.

  One attack of `attacks` per batch, `selection` "uniform" (drawn at random) or "uncertainty"
  (the highest-loss of `candidates` drawn attacks). `strength` scales the encoder's tanh
  residual. Adam at `lr` with cosine decay. Continues from `hidden` when given.

  `start`: resume this same run (same arguments and key) from the progress that `on_step`
  reported, with the same result as a run never stopped; `start.state` must have the
  structure of `init_state` (checked). `on_step` is called after every step.
  """
  x = np.asarray(images, np.float32)
  chex.assert_rank(x, 4)
  check(len(x) >= batch_size, f"images: expected at least batch_size = {batch_size} images, "
                              f"got {len(x)}")
  check(float(np.abs(x).max()) <= 1.0 + 1e-6, "images: expected values in [-1, 1]")
  for name, v in (("steps", steps), ("batch_size", batch_size), ("num_bits", num_bits),
                  ("candidates", candidates), ("log_every", log_every)):
    check(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          f"{name}: expected a positive integer, got {v!r}")
  check(selection in SELECTIONS, f"selection: expected one of {SELECTIONS}, got {selection!r}")
  check_number(lr, "lr", 0, low_open=True)
  check_number(strength, "strength", 0, 1, low_open=True)
  check_number(image_weight, "image_weight", 0)
  names = check_noise_layers(tuple(attacks))
  if hidden is None:
    hidden = init_hidden(jax.random.fold_in(key, 1), x.shape[1:], num_bits, channels,
                         encoder_depth, extractor_depth, pool)
  tx = make_optimizer(lr, steps)
  state = init_state(hidden, tx)
  if start is None:
    done = PretrainProgress(0, state, [], np.zeros(len(names), np.int64))
  else:
    leaves, treedef = jax.tree.flatten(state)
    got = jax.tree.leaves(start.state)
    check(isinstance(start.step, int) and 0 <= start.step <= steps
          and len(got) == len(leaves) and jax.tree.structure(start.state) == treedef
          and all(np.shape(a) == np.shape(b) for a, b in zip(got, leaves, strict=True))
          and np.shape(start.counts) == (len(names),),
          f"start: expected the progress of this pre-training (step <= {steps}, "
          f"{len(leaves)} arrays), got step {start.step!r} and {len(got)} arrays")
    done = start._replace(state=jax.tree.unflatten(treedef, [
      jnp.asarray(a, b.dtype) for a, b in zip(got, leaves, strict=True)]),
      counts=np.asarray(start.counts, np.int64), history=list(start.history))
  step = make_pretrain_step(hidden, tx, names, selection, candidates, strength, image_weight)
  rng = np.random.default_rng(int(jax.random.randint(jax.random.fold_in(key, 2), (), 0,
                                                     2**31 - 1)))
  for _ in range(done.step):  # the batches of the steps already done: drawn, not trained on
    rng.choice(len(x), batch_size, replace=False)
  it = range(done.step, steps)
  if progress:
    from tqdm.auto import tqdm  # only for interactive runs
    it = tqdm(it, desc=f"HiDDeN ({selection})", unit="step", initial=done.step, total=steps)
  for i in it:
    batch = jnp.asarray(x[rng.choice(len(x), batch_size, replace=False)])
    new, m = step(done.state, batch, jax.random.fold_in(key, 1000 + i))
    counts = done.counts.copy()
    counts[int(m["attack"])] += 1
    history = done.history
    if (i + 1) % log_every == 0 or i + 1 == steps:
      row = {k: float(v) for k, v in m.items() if k != "attack"}
      row.update(step=i + 1, attack=names[int(m["attack"])])
      history = [*history, row]
      if progress:
        it.set_postfix(bit_acc=f"{row['bit_acc']:.3f}", mse=f"{row['mse']:.4f}")
    # One assignment: a signal between two statements never leaves a step half-recorded.
    done = PretrainProgress(i + 1, new, history, counts)
    if on_step is not None:
      on_step(done)
  state = done.state
  out = Hidden(hidden.encoder, hidden.extractor,
               {"params": state.enc_params, "batch_stats": state.enc_stats},
               {"params": state.ext_params, "batch_stats": state.ext_stats})
  history = [*done.history, {"step": steps, "attack_counts": dict(
    zip(names, done.counts.tolist(), strict=True))}]
  return PretrainResult(out, history)

