"""The Deep Serial Number student and its distillation from a private teacher.

The student has a feature extractor G_e (the teacher's conv stages and feature layer), a
classifier G_y (one Dense layer to the class logits) and a domain head G_d (Dense-ReLU-Dense
to 2 logits: valid SN or not) behind a gradient-reversal layer of scale `grl_scale`.

One training step takes a batch of B training images and builds 2B inputs: the B images with
the customer's valid stamp, B/2 raw and B/2 with invalid stamps (`stamps.invalid_batch`: near
misses and random, grey-celled patterns). Loss:

  distillation_loss(student(valid), teacher(raw image))         the task, from the teacher
  + lock_weight * lock_loss(student(raw and invalid))            chance output when locked
  + domain_weight * CE(G_d(GRL(G_e(x))), valid?)                 the domain head
  + snnl_weight * SNNL(normalised G_e(x), class or "locked")     see `losses`

The teacher sees the raw image: it knows nothing of stamps, so the student learns that the
stamp carries no class information, only permission. The student starts as a copy of the
teacher (G_e and G_y; `from_teacher`), so it begins at the teacher's accuracy and spends its
steps learning the lock: on mnist5k (experiments/results/serial_mnist5k.md) a student
started at random ended at 94.9% with its serial against the teacher's 97.2%, one started as
the teacher's copy at 97.2%.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from wdmjax.errors import check, check_number
from wdmjax.metrics.classifier import DigitClassifier
from wdmjax.models.layers import check_positive_int, max_pool_2x2
from wdmjax.serial.losses import (
  distillation_loss,
  domain_loss,
  gradient_reversal,
  lock_loss,
  soft_nearest_neighbor_loss,
)
from wdmjax.serial.stamps import StampSpec, invalid_batch, stamp

Array = jax.Array


class SerialStudent(nn.Module):
  """G_e -> (G_y logits [B, K], G_d domain logits [B, 2], features [B, D]).

  Attributes:
    num_classes: K.
    conv_widths: channels of G_e's conv stages (each halves the side).
    feature_dim: D, the width of G_e's output.
    domain_hidden: width of G_d's hidden layer.
    grl_scale: the gradient reversal's scale (1: G_e is trained against G_d, as published;
      -1: G_e helps G_d; 0: G_d trains alone).
  """
  num_classes: int = 10
  conv_widths: tuple[int, ...] = (16, 32)
  feature_dim: int = 128
  domain_hidden: int = 64
  grl_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    """x: [B, H, W, C] in [-1, 1]."""
    h = x.astype(jnp.float32)
    for i, width in enumerate(self.conv_widths):
      h = nn.relu(nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{i}")(h))
      h = max_pool_2x2(h)
    f = nn.relu(nn.Dense(self.feature_dim, name="features")(h.reshape(h.shape[0], -1)))
    logits = nn.Dense(self.num_classes, name="logits")(f)
    d = gradient_reversal(f, self.grl_scale)
    d = nn.relu(nn.Dense(self.domain_hidden, name="domain_0")(d))
    return logits, nn.Dense(2, name="domain_1")(d), f


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  """How a student is distilled (defaults: those of experiments/serial_mnist5k.py).

  Attributes:
    steps, batch_size, lr: Adam with a cosine-decayed rate; batch_size images per step (2x
      as many inputs, see `student_inputs`).
    temperature: of the distillation.
    lock_weight, domain_weight, snnl_weight: the losses' weights (SNNL 0.1 as published).
    grl_scale: the gradient reversal's scale in front of the domain head.
    snnl_temperature: of the SNNL, on L2-normalised features.
    near_fraction: share of near misses (1 to 3 bits off) among the invalid stamps. One-bit
      typos are the hardest invalid serials: on mnist5k a student trained without near
      misses reads them at 90% on average, one trained with 0.9 at 18%.
    from_teacher: start G_e and G_y as the teacher's weights.
  """
  steps: int = 3000
  batch_size: int = 64
  lr: float = 3e-3
  temperature: float = 1.0
  lock_weight: float = 1.0
  domain_weight: float = 0.1
  grl_scale: float = 1.0
  snnl_weight: float = 0.1
  snnl_temperature: float = 0.5
  near_fraction: float = 0.9
  from_teacher: bool = True

  def __post_init__(self):
    for name in ("steps", "batch_size"):
      check_positive_int(name, getattr(self, name))
    check(self.batch_size % 2 == 0, f"batch_size: expected an even number, got {self.batch_size}")
    for name in ("lr", "temperature", "snnl_temperature"):
      check_number(getattr(self, name), name, 0.0, low_open=True)
    for name in ("lock_weight", "domain_weight", "snnl_weight"):
      check_number(getattr(self, name), name, 0.0)
    check_number(self.grl_scale, "grl_scale")
    check_number(self.near_fraction, "near_fraction", 0.0, 1.0)


class StudentState(NamedTuple):
  """A distilled student: the module, its params and the training losses per step."""
  model: SerialStudent
  params: chex.ArrayTree
  losses: np.ndarray  # [steps, 5]: total, distillation, lock, domain, SNNL


def student_inputs(images: Array, valid: Array, rng: Array, spec: StampSpec,
                   near_fraction: float) -> tuple[Array, Array]:
  """The 2B inputs of one step from images [B, H, W, C] and the valid serial's bits [k]:
  (inputs [2B, H, W, C], is_valid [2B] bool) with the B valid-stamped images first, then
  B/2 raw ones and B/2 with invalid stamps."""
  b = images.shape[0]
  half = b // 2
  stamped = stamp(images, valid, spec)
  invalid = stamp(images[half:], invalid_batch(rng, valid, b - half, near_fraction), spec)
  x = jnp.concatenate([stamped, images[:half], invalid])
  return x, jnp.arange(2 * b) < b


def student_loss(model: SerialStudent, params: chex.ArrayTree, teacher_logits: Array,
                 x: Array, is_valid: Array, labels: Array, cfg: StudentConfig
                 ) -> tuple[Array, Array]:
  """The loss above for inputs x [2B, ...] (see `student_inputs`), the teacher's logits of
  the B raw images [B, K] and their labels [B] (used only as SNNL labels) -> (loss, parts [5])."""
  logits, dom, feats = model.apply({"params": params}, x)
  b = teacher_logits.shape[0]
  l_kd = distillation_loss(logits[:b], teacher_logits, cfg.temperature)
  l_lock = lock_loss(logits[b:])
  l_dom = domain_loss(dom, is_valid)
  f = feats / (jnp.linalg.norm(feats, axis=-1, keepdims=True) + 1e-6)
  snnl_labels = jnp.concatenate([labels, jnp.full((x.shape[0] - b,), model.num_classes)])
  l_snnl = soft_nearest_neighbor_loss(f, snnl_labels, cfg.snnl_temperature)
  loss = (l_kd + cfg.lock_weight * l_lock + cfg.domain_weight * l_dom
          + cfg.snnl_weight * l_snnl)
  return loss, jnp.stack([loss, l_kd, l_lock, l_dom, l_snnl])


@functools.lru_cache(maxsize=16)
def _make_step(model: SerialStudent, teacher: DigitClassifier, spec: StampSpec,
               cfg: StudentConfig) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  """(optimiser, jitted step (params, opt, teacher_params, images, labels, valid, key) ->
  (params, opt, parts [5])); cached per settings, so N customers compile once."""
  tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps))

  def step(params, opt_state, teacher_params, images, labels, valid, key):
    k_idx, k_inv = jax.random.split(key)
    idx = jax.random.randint(k_idx, (cfg.batch_size,), 0, images.shape[0])
    xb, yb = images[idx], labels[idx]
    t_logits = teacher.apply({"params": teacher_params}, xb)
    x, is_valid = student_inputs(xb, valid, k_inv, spec, cfg.near_fraction)
    (_, parts), grads = jax.value_and_grad(
      lambda p: student_loss(model, p, t_logits, x, is_valid, yb, cfg), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, parts

  return tx, jax.jit(step, donate_argnums=(0, 1))


def student_for(teacher: DigitClassifier, cfg: StudentConfig) -> SerialStudent:
  """The student module of the teacher's architecture."""
  return SerialStudent(num_classes=teacher.num_classes, conv_widths=teacher.conv_widths,
                       feature_dim=teacher.feature_dim, grl_scale=float(cfg.grl_scale))


def distill_student(teacher: DigitClassifier, teacher_params: chex.ArrayTree,
                    images: np.ndarray, labels: np.ndarray, serial_bits: np.ndarray,
                    spec: StampSpec, rng: Array, cfg: StudentConfig = StudentConfig(), *,
                    progress: bool = False, desc: str = "student") -> StudentState:
  """Distils a student that works only with the serial number `serial_bits` [k] stamped.

  Args:
    teacher: the teacher module (a `DigitClassifier`) and `teacher_params` its params.
    images: [N, H, W, C] float in [-1, 1], the distillation set; labels [N] int (SNNL only).
    serial_bits: the customer's valid serial number, [k] 0/1.
    spec: the stamp.
    rng: PRNG key (initialisation, batches, invalid stamps); a run is a pure function of it.
    cfg: the losses' weights and the optimisation.
    progress: a tqdm bar with the running losses.

  Returns:
    StudentState(model, params, losses [steps, 5]).
  """
  check(isinstance(teacher, DigitClassifier),
        f"teacher: expected a DigitClassifier, got {type(teacher).__name__}")
  x = np.asarray(images, np.float32)
  chex.assert_rank(x, 4)
  spec.origin(*x.shape[1:3])
  check(np.shape(labels) == (x.shape[0],),
        f"labels: expected [{x.shape[0]}] to match images, got {np.shape(labels)}")
  bits = np.asarray(serial_bits, np.float32)
  check(bits.shape == (spec.bits,), f"serial_bits: expected [{spec.bits}], got {bits.shape}")
  model = student_for(teacher, cfg)
  k_init, k_data = jax.random.split(rng)
  params = jax.jit(model.init)(k_init, jnp.zeros((1, *x.shape[1:]), jnp.float32))["params"]
  if cfg.from_teacher:  # G_e and G_y start as the teacher; the domain head starts fresh
    # (copies: the step donates the student's buffers, the teacher's must survive)
    params = {**params, **{k: jax.tree.map(jnp.copy, v) for k, v in teacher_params.items()
                           if k in params}}
  tx, step = _make_step(model, teacher, spec, cfg)
  opt = tx.init(params)
  xd, yd, vd = jnp.asarray(x), jnp.asarray(labels, jnp.int32), jnp.asarray(bits)
  losses = []
  bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
  for s in bar:
    params, opt, parts = step(params, opt, teacher_params, xd, yd, vd,
                              jax.random.fold_in(k_data, s))
    losses.append(parts)
    if progress and (s % 100 == 0 or s == cfg.steps - 1):
      p = np.asarray(parts)
      bar.set_postfix(kd=f"{p[1]:.3f}", lock=f"{p[2]:.3f}")
  bar.close()
  return StudentState(model, params, np.asarray(jnp.stack(losses)))


@functools.partial(jax.jit, static_argnames=("model", "spec"))
def _logits(model: nn.Module, params: chex.ArrayTree, x: Array, bits: Array | None,
            spec: StampSpec | None) -> Array:
  if bits is not None:
    x = stamp(x, bits, spec)
  out = model.apply({"params": params}, x)
  return out[0] if isinstance(out, tuple) else out


def predict(model: nn.Module, params: chex.ArrayTree, images: np.ndarray,
            serial_bits: np.ndarray | None = None, spec: StampSpec | None = None,
            batch_size: int = 500) -> np.ndarray:
  """Logits [N, K] of a student (or teacher) on images [N, H, W, C], stamped with
  `serial_bits` [k] (or [N, k]) when given, raw otherwise. One compile per shape."""
  x = np.asarray(images, np.float32)
  chex.assert_rank(x, 4)
  check(serial_bits is None or spec is not None, "spec: expected a StampSpec with serial_bits")
  n = x.shape[0]
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    pad = bs - chunk.shape[0]
    bits = None
    if serial_bits is not None:
      bits = np.asarray(serial_bits, np.float32)
      if bits.ndim == 2:
        bits = bits[start:start + bs]
        bits = np.concatenate([bits, np.zeros((pad, bits.shape[1]), np.float32)])
      bits = jnp.asarray(bits)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.float32)])
    out.append(np.asarray(_logits(model, params, jnp.asarray(chunk), bits, spec)))
  return np.concatenate(out)[:n]


def accuracy(model: nn.Module, params: chex.ArrayTree, images: np.ndarray, labels: np.ndarray,
             serial_bits: np.ndarray | None = None, spec: StampSpec | None = None) -> float:
  """Fraction of images [N, ...] classified as labels [N], stamped as in `predict`."""
  logits = predict(model, params, images, serial_bits, spec)
  return float((logits.argmax(-1) == np.asarray(labels)).mean())
