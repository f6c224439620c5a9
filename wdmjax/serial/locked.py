"""A serial-number-locked diffusion model (beyond the DSN paper, which locks classifiers).

The serial number enters as a stamp in the network's input: at every step of training and
sampling the stamp's pixels of x_t are overwritten with the serial's +-1 cells, as WDM feeds
a trigger-shifted input. Why a stamp and not a serial-number token: it needs no change to the
network (any UNet or DiT, any checkpoint can be locked by fine-tuning), it goes through the
engine's `input_transform` hook like WDM's trigger, and the lock then lives in the same
weights as the task, with no separate embedding table a thief could read or cut out.

Loss (`locked_loss`), on a task batch of B images:
  ordinary diffusion loss with the valid stamp in the input
  + lock_weight * the diffusion loss towards a blank image (every pixel `locked_value`),
    with B/2 raw inputs and B/2 invalid stamps (`stamps.invalid_batch`), labels kept,
so that without the serial number the model generates blank images whatever the class.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.diffusion import diffusion_loss
from wdmjax.diffusion.objectives import ApplyFn, check_objective
from wdmjax.diffusion.schedules import Schedule
from wdmjax.errors import check, check_number
from wdmjax.serial.stamps import StampSpec, invalid_batch, stamp


def stamp_overlay(bits: np.ndarray, spec: StampSpec, shape: tuple[int, int, int]
                  ) -> tuple[chex.Array, chex.Array]:
  """(overlay, mask), both [H, W, C] float32: the stamp of bits [k] and where it lies, the
  arguments of `serial_input` (arrays, so one compiled sampler serves every serial)."""
  h, w, c = shape
  bits = jnp.asarray(bits, jnp.float32)
  overlay = stamp(jnp.zeros((1, h, w, c)), bits, spec)[0]
  mask = stamp(jnp.zeros((1, h, w, c)), jnp.ones((spec.bits,)), spec)[0] > 0
  return overlay, mask.astype(jnp.float32)


def serial_input(x_t: chex.Array, t: chex.Array, overlay: chex.Array, mask: chex.Array
                 ) -> chex.Array:
  """The network input with a serial number: x_t [B, H, W, C] with the stamp's pixels set
  (overlay, mask [H, W, C] from `stamp_overlay`); t is unused."""
  del t
  return x_t * (1.0 - mask) + overlay * mask


def locked_loss(apply_fn: ApplyFn, schedule: Schedule, objective: str, *,
                serial_bits: np.ndarray, spec: StampSpec, class_dropout_prob: float = 0.0,
                null_label: int | None = None, lock_weight: float = 1.0,
                locked_value: float = 0.0, near_fraction: float = 0.5
                ) -> Callable[[chex.ArrayTree, dict, chex.PRNGKey], tuple[chex.Array, dict]]:
  """The locking loss above as a plug-in `loss_fn(params, batch, rng) -> (loss, metrics)`.

  Args:
    apply_fn, schedule, objective, class_dropout_prob, null_label: as `diffusion_loss`.
    serial_bits: the valid serial number, [k] 0/1.
    spec: the stamp.
    lock_weight: weight of the locked half.
    locked_value: the pixel value of the blank image taught without a valid serial (0: grey).
    near_fraction: share of near misses among the invalid stamps.
  """
  check_objective(objective)
  check_number(lock_weight, "lock_weight", 0.0, low_open=True)
  check_number(locked_value, "locked_value", -1.0, 1.0)
  valid = jnp.asarray(np.asarray(serial_bits, np.float32))
  check(valid.shape == (spec.bits,), f"serial_bits: expected [{spec.bits}], got {valid.shape}")
  task = lambda tf: diffusion_loss(apply_fn, schedule, objective, class_dropout_prob,
                                   null_label, input_transform=tf)

  def loss_fn(params, batch, rng):
    x0 = batch["image"]
    chex.assert_rank(x0, 4)
    b = x0.shape[0]
    half = b // 2
    r_valid, r_bits, r_lock = jax.random.split(rng, 3)
    l_valid, _ = task(lambda x, t: stamp(x, valid, spec))(params, batch, r_valid)
    wrong = invalid_batch(r_bits, valid, b - half, near_fraction)

    def locked_in(x, t):
      return jnp.concatenate([x[:half], stamp(x[half:], wrong, spec)])

    blank = dict(batch, image=jnp.full_like(x0, locked_value))
    l_lock, _ = task(locked_in)(params, blank, r_lock)
    loss = l_valid + lock_weight * l_lock
    return loss, {"loss": loss, "valid_loss": l_valid, "locked_loss": l_lock}

  return loss_fn
