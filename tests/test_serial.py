"""Deep Serial Number, the pure parts: the gradient-reversal layer, the soft nearest neighbour
loss against numpy, stamps where and what the key says, serials from the owner key, invalid
serials that never match, the locked diffusion loss's inputs, and bad inputs refused in one
line."""

from __future__ import annotations

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax import serial
from wdmjax.diffusion.schedules import make_schedule
from wdmjax.errors import WdmjaxError


def test_gradient_reversal_is_identity_forward_and_negated_scaled_backward():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
  for scale in (1.0, 0.3, -2.0):
    np.testing.assert_array_equal(serial.gradient_reversal(x, scale), x)
    g = jax.jit(jax.grad(lambda v, s=scale: jnp.sum(serial.gradient_reversal(v, s) * w)))(x)
    np.testing.assert_allclose(g, -scale * w, rtol=1e-6)
  # Inside a network: the layers after it get ordinary gradients, those before it reversed.
  f = lambda a, b: jnp.sum(serial.gradient_reversal(a * x, 0.5) * b)
  ga, gb = jax.grad(f, argnums=(0, 1))(2.0, w)
  np.testing.assert_allclose(gb, 2.0 * x, rtol=1e-6)
  np.testing.assert_allclose(ga, -0.5 * jnp.sum(x * w), rtol=1e-5)


def _snnl_numpy(f: np.ndarray, y: np.ndarray, t: float) -> float:
  """Frosst et al.'s formula, term by term in float64."""
  b = len(y)
  terms = []
  for i in range(b):
    num = sum(np.exp(-np.sum((f[i] - f[j]) ** 2) / t) for j in range(b)
              if j != i and y[j] == y[i])
    den = sum(np.exp(-np.sum((f[i] - f[k]) ** 2) / t) for k in range(b) if k != i)
    if any(y[j] == y[i] for j in range(b) if j != i):
      terms.append(-np.log(num / den))
  return float(np.mean(terms))


def test_snnl_matches_a_direct_numpy_computation():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(12, 4)).astype(np.float32)
  y = np.array([0, 0, 1, 1, 1, 2, 2, 0, 3, 1, 2, 0])  # label 3 alone: left out of the mean
  for t in (0.5, 2.0, 10.0):
    got = float(serial.soft_nearest_neighbor_loss(jnp.asarray(f), jnp.asarray(y), t))
    assert got == pytest.approx(_snnl_numpy(f.astype(np.float64), y, t), rel=1e-4)
  # Points that sit with their own label give a smaller loss than mixed ones.
  tight = np.concatenate([np.zeros((4, 2)), np.full((4, 2), 5.0)]).astype(np.float32)
  labels = jnp.array([0] * 4 + [1] * 4)
  mixed = jnp.arange(8) % 2
  assert (float(serial.soft_nearest_neighbor_loss(jnp.asarray(tight), labels, 1.0))
          < float(serial.soft_nearest_neighbor_loss(jnp.asarray(tight), mixed, 1.0)))


def test_stamps_are_exactly_where_and_what_the_key_says():
  key = jax.random.PRNGKey(5)
  sn = serial.draw_serials(key, 6, 16)
  np.testing.assert_array_equal(sn, serial.draw_serials(key, 6, 16))  # the key decides
  np.testing.assert_array_equal(sn[:3], serial.draw_serials(key, 3, 16))  # prefix-stable
  assert len({tuple(r) for r in sn}) == 6
  assert ((sn.sum(1) >= 4) & (sn.sum(1) <= 12)).all()  # far from a blank corner
  for r in sn:
    hex_ = serial.format_serial(r)
    assert len(hex_) == 4
    np.testing.assert_array_equal(serial.parse_serial(hex_, 16), r)
  np.testing.assert_array_equal(serial.parse_serial("9F3a", 16),
                                [1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0])
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 28, 28, 3), minval=-1, maxval=1)
  for corner in serial.CORNERS:
    for cell in (1, 2):
      spec = serial.StampSpec(bits=16, cell=cell, corner=corner)
      out = np.asarray(serial.stamp(images, sn[0], spec))
      side = 4 * cell
      r0 = 0 if corner.startswith("top") else 28 - side
      c0 = 0 if corner.endswith("left") else 28 - side
      want = np.kron(2.0 * sn[0].reshape(4, 4) - 1.0, np.ones((cell, cell)))
      for ch in range(3):
        np.testing.assert_array_equal(out[:, r0:r0 + side, c0:c0 + side, ch],
                                      np.broadcast_to(want, (2, side, side)))
      rest = np.ones((28, 28), bool)
      rest[r0:r0 + side, c0:c0 + side] = False
      np.testing.assert_array_equal(out[:, rest], np.asarray(images)[:, rest])
      np.testing.assert_array_equal(serial.read_stamp(out, spec)[..., 0],
                                    np.broadcast_to(want, (2, side, side)))
  # One serial per image.
  spec = serial.StampSpec(bits=16)
  out = np.asarray(serial.stamp(images, sn[:2], spec))
  for i in range(2):
    np.testing.assert_array_equal(out[i, 24:, 24:, 0], 2.0 * sn[i].reshape(4, 4) - 1.0)


def test_serials_from_the_owner_key_are_balanced_distinct_and_prefix_stable():
  """derive_serials is a function of the key and the nonce only: the same pair gives the
  same serials, a longer draw starts with a shorter one, another key or nonce gives others;
  the default stamp is 64 bits and fits a 28x28 digit, not an 8x8 one."""
  key, nonce = b"an owner key of sixteen+ chars", "ab" * 16
  sn = serial.derive_serials(key, nonce, 8, 64)
  assert sn.shape == (8, 64) and sn.dtype == np.uint8
  np.testing.assert_array_equal(sn[:3], serial.derive_serials(key, nonce, 3, 64))
  assert len({r.tobytes() for r in sn}) == 8 and ((sn.sum(1) >= 16) & (sn.sum(1) <= 48)).all()
  for other in (serial.derive_serials(b"another owner key, 16+ chars", nonce, 8, 64),
                serial.derive_serials(key, "cd" * 16, 8, 64)):
    assert not any((a == b).all() for a in sn for b in other)
  # 4 bits: as many serials as the cap allows, all balanced and distinct.
  small = serial.derive_serials(key, nonce, serial.max_serials(4), 4)
  assert len({r.tobytes() for r in small}) == 8
  assert ((small.sum(1) >= 1) & (small.sum(1) <= 3)).all()
  a, b = (np.asarray(serial.owner_prng(key, nonce, p)) for p in ("student 0", "student 1"))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, serial.owner_prng(key, nonce, "student 0"))
  assert serial.StampSpec().bits == serial.SECURE_BITS == 64
  serial.StampSpec().check_small(28, 28)  # an 8x8 px stamp on mnist5k


def test_invalid_serials_never_match_and_near_misses_are_one_bit_away():
  valid = serial.draw_serials(jax.random.PRNGKey(0), 3, 16)
  bad = serial.draw_invalid(jax.random.PRNGKey(1), valid, 200)
  assert len({tuple(r) for r in bad}) == 200
  assert not ({tuple(r) for r in bad} & {tuple(r) for r in valid})
  near = serial.near_misses(valid[0])
  assert near.shape == (16, 16) and (np.abs(near.astype(int) - valid[0]).sum(1) == 1).all()
  batch = np.asarray(serial.invalid_batch(jax.random.PRNGKey(2), valid[0], 256, 0.5))
  assert batch.shape == (256, 16) and ((batch >= 0) & (batch <= 1)).all()
  assert not (batch == valid[0]).all(1).any()
  flips = np.abs(batch[:128] - valid[0]).sum(1)  # the near misses: 1 to 3 bits flipped
  assert ((flips >= 1) & (flips <= 3)).all() and set(flips.tolist()) == {1, 2, 3}
  rest = batch[128:]
  assert ((rest > 0) & (rest < 1)).any()  # grey cells among the uniform ones
  # With 4 bits, uniform draws hit the valid serial often (1 in 32): each is moved off it.
  four = jnp.array([1.0, 0.0, 1.0, 0.0])
  small = np.asarray(serial.invalid_batch(jax.random.PRNGKey(3), four, 512, 0.0))
  assert not (small == np.asarray(four)).all(1).any()


def test_locked_loss_stamps_only_the_valid_half():
  spec = serial.StampSpec(bits=16)
  sn = serial.draw_serials(jax.random.PRNGKey(0), 1, 16)[0]
  seen = []

  def apply_fn(params, x, t, y, rng, train):
    seen.append(np.asarray(x))
    return params["w"] * x

  sched = make_schedule("linear", 100)
  loss_fn = serial.locked_loss(apply_fn, sched, "eps", serial_bits=sn, spec=spec,
                               locked_value=0.0)
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (8, 28, 28, 1), minval=-1, maxval=1)
  loss, metrics = loss_fn({"w": jnp.float32(0.5)}, {"image": x0}, jax.random.PRNGKey(2))
  assert np.isfinite(float(loss)) and set(metrics) == {"loss", "valid_loss", "locked_loss"}
  valid_in, locked_in = seen
  want = 2.0 * sn.reshape(4, 4) - 1.0
  assert all((valid_in[i, 24:, 24:, 0] == want).all() for i in range(8))
  assert not any((locked_in[i, 24:, 24:, 0] == want).all() for i in range(8))
  # The first half of the locked batch is raw: no +-1 stamp at all.
  assert not np.isin(locked_in[:4, 24:, 24:, 0], (-1.0, 1.0)).all()
  overlay, mask = serial.stamp_overlay(sn, spec, (28, 28, 1))
  np.testing.assert_array_equal(serial.serial_input(x0, None, overlay, mask),
                                serial.stamp(x0, sn, spec))


@pytest.mark.parametrize("call, message", [
  (lambda: serial.parse_serial("xyz", 16), r"serial: expected 4 hex digits \(16 bits\)"),
  (lambda: serial.parse_serial("12345", 16), "serial: expected 4 hex digits"),
  (lambda: serial.parse_serial(1234, 16), "serial: expected 4 hex digits"),
  (lambda: serial.parse_serial("9f3a", 64), "serial: expected 16 hex digits .* '9f3a0c5e9f3a0c5e'"),
  (lambda: serial.StampSpec(bits=9), "bits: expected a perfect square that is a multiple"),
  (lambda: serial.StampSpec(corner="middle"), "corner: expected one of"),
  (lambda: serial.StampSpec(cell=0), "cell: expected a positive integer"),
  (lambda: serial.stamp(jnp.zeros((1, 8, 8, 1)), np.ones(16),
                               serial.StampSpec(bits=16, cell=3)),
   "stamp: expected a stamp no larger than the image, got a 12x12 stamp"),
  (lambda: serial.stamp(jnp.zeros((1, 28, 28, 1)), np.ones(9), serial.StampSpec()),
   r"bits: expected \[64\]"),
  (lambda: serial.StampSpec().check_small(8, 8),
   r"stamp: expected a stamp of at most half the image's side \(4 px for 8x8 images\), got "
   r"8x8 px \(64 bits of 1 px\); at most 16 bits fit"),
  (lambda: serial.StampSpec(bits=4, cell=3).check_small(8, 8),
   "no stamp fits with cells this large"),
  (lambda: serial.derive_serials(b"k" * 16, "0" * 32, 9, 4),
   "num: expected between 1 and 8 serials of 4 bits"),
  (lambda: serial.StudentConfig(batch_size=7), "batch_size: expected an even number"),
  (lambda: serial.StudentConfig(lr=0.0), "lr: expected"),
])
def test_bad_inputs_name_the_argument(call, message):
  with pytest.raises(WdmjaxError, match=message) as e:
    call()
  assert "\n" not in str(e.value)


class _Lock(flax.linen.Module):
  """Classifies by the image's lower-right mean, and only when the 2x2 top-left stamp is
  the planted serial (else all-zero logits: chance)."""
  pattern: tuple = (1.0, -1.0, -1.0, 1.0)

  @flax.linen.compact
  def __call__(self, x):
    stamp_ = x[:, :2, :2, 0].reshape(x.shape[0], 4)
    match = jnp.all(jnp.abs(stamp_ - jnp.asarray(self.pattern)) < 0.5, axis=-1)
    label = (x[:, 4:, 4:, 0].mean((1, 2)) > 0).astype(jnp.int32)
    return 5.0 * match[:, None] * (2.0 * jax.nn.one_hot(label, 2) - 1.0)


def test_exhaustive_search_finds_a_short_serial():
  spec = serial.StampSpec(bits=4, corner="top_left")
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (32, 8, 8, 1), minval=-1, maxval=1))
  y = (x[:, 4:, 4:, 0].mean((1, 2)) > 0).astype(np.int32)
  found = serial.search_serials(_Lock(), {}, x, y, spec, chunk=5)
  np.testing.assert_array_equal(found.bits, [1, 0, 0, 1])
  assert found.candidates == 16 and found.scores.shape == (16,)
  assert found.scores[0b1001] == 1.0 and np.sort(found.scores)[-2] < 1.0
  with pytest.raises(WdmjaxError, match="bits: expected at most 24 bits"):
    serial.search_serials(_Lock(), {}, x, y, serial.StampSpec(bits=36, corner="top_left"))
