"""Uncertainty-based augmentation: the transformation family, compositions, top-S selection."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax import augment as A
from wdmjax.errors import WdmjaxError

B = 6


@pytest.fixture(scope="module")
def batch():
  """B images [B, 16, 16, 3] in [-1, 1]: smooth blobs with noise (every op has work to do),
  with one-hot targets over 4 classes."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:16, :16] / 15.0
  base = np.stack([np.sin(3 * yy + i) * np.cos(2 * xx - i) for i in range(3)], -1)
  x = np.clip(base[None] * 0.8 + 0.3 * rng.standard_normal((B, 16, 16, 3)), -1, 1)
  y = jax.nn.one_hot(np.arange(B) % 4, 4)
  return jnp.asarray(x, jnp.float32), y


def _all(key, x, y, m):
  out = {}
  for name in A.FAMILY:
    fn = getattr(A, name)
    out[name] = fn(key, x, y, m) if name in A.MIXING else (fn(key, x, m), y)
  return out


@pytest.fixture(scope="module")
def run_all():
  return jax.jit(_all)


def test_family_has_the_published_kinds():
  assert len(A.FAMILY) >= 14
  for name in ("rotate", "translate_x", "translate_y", "shear_x", "shear_y", "scale", "flip",
               "cutout", "brightness", "contrast", "sharpness", "posterize", "solarize",
               "equalize", "autocontrast", "blur", "mixup", "cutmix"):
    assert name in A.TRANSFORMS
  assert set(A.MIXING) == {"mixup", "cutmix"}
  assert "flip" not in A.DIGIT_FAMILY


def test_each_transform_keeps_shape_range_dtype_and_changes_the_image(batch, run_all):
  x, y = batch
  out = run_all(jax.random.key(1), x, y, 0.8)
  for name, (xo, yo) in out.items():
    assert xo.shape == x.shape and xo.dtype == x.dtype, name
    assert yo.shape == y.shape, name
    assert float(xo.min()) >= -1.0 and float(xo.max()) <= 1.0, name
    assert float(jnp.abs(xo - x).mean()) > 1e-3, f"{name} did nothing at magnitude 0.8"


def test_each_transform_is_identity_at_magnitude_zero(batch, run_all):
  x, y = batch
  out = run_all(jax.random.key(2), x, y, 0.0)
  for name, (xo, yo) in out.items():
    if name == "flip":
      continue
    np.testing.assert_allclose(xo, x, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(yo, y, atol=1e-6, err_msg=name)
  flipped = out["flip"][0]
  np.testing.assert_array_equal(A.flip(jax.random.key(0), flipped, 0.0), x)


def test_transforms_are_deterministic_for_a_key_and_vary_across_keys(batch, run_all):
  x, y = batch
  a = run_all(jax.random.key(3), x, y, 0.6)
  b = run_all(jax.random.key(3), x, y, 0.6)
  c = run_all(jax.random.key(4), x, y, 0.6)
  for name in A.FAMILY:
    np.testing.assert_array_equal(a[name][0], b[name][0], err_msg=name)
  random_ops = ["rotate", "translate_x", "shear_y", "cutout", "brightness", "mixup", "cutmix"]
  assert all(not np.array_equal(a[n][0], c[n][0]) for n in random_ops)


def test_transforms_are_vmappable_over_keys(batch):
  x, _ = batch
  keys = jax.random.split(jax.random.key(5), 3)
  f = jax.jit(A.translate_x)
  many = jax.jit(jax.vmap(lambda k: A.translate_x(k, x, 0.5)))(keys)
  assert many.shape == (3, *x.shape)
  np.testing.assert_allclose(many[1], f(keys[1], x, 0.5), atol=1e-6)


def test_transforms_keep_bfloat16():
  x = jnp.zeros((2, 8, 8, 1), jnp.bfloat16)
  assert A.contrast(jax.random.key(0), x, 0.5).dtype == jnp.bfloat16


def test_translation_moves_content_by_the_stated_pixels():
  x = jnp.full((1, 20, 20, 1), -1.0).at[0, 10, 5, 0].set(1.0)
  out = jax.jit(A.translate_x)(jax.random.key(0), x, 0.5)  # 0.5 * 0.3 * 20 = 3 pixels
  col = int(jnp.argmax(out[0, 10, :, 0]))
  assert col in (2, 8)


def test_mixing_targets_sum_to_one_and_mix_as_the_pixels(batch):
  x, y = batch
  xm, ym = A.mixup(jax.random.key(6), x, y, 1.0)
  np.testing.assert_allclose(ym.sum(-1), 1.0, atol=1e-6)
  lam = A.MAX_STRENGTH["mixup"]
  # Every mixed image is (1 - lam) x_i + lam x_j for another j of the batch.
  for i in range(B):
    errs = [float(jnp.abs(xm[i] - jnp.clip((1 - lam) * x[i] + lam * x[j], -1, 1)).max())
            for j in range(B) if j != i]
    assert min(errs) < 1e-5
  xc, yc = A.cutmix(jax.random.key(7), x, y, 1.0)
  np.testing.assert_allclose(yc.sum(-1), 1.0, atol=1e-6)
  changed = np.asarray((jnp.abs(xc - x) > 0).any(-1).mean(axis=(1, 2)))
  # The label weight of the partner is the pasted area (pixels that happen to agree aside).
  assert np.all(np.asarray(1.0 - yc.max(-1)) >= changed - 1e-6)


def test_random_augment_composes_L_transforms_deterministically(batch):
  x, y = batch
  f = jax.jit(A.random_augment, static_argnames=("L", "ops", "magnitude"))
  a = f(jax.random.key(8), x, y, L=2, ops=A.FAMILY)
  b = f(jax.random.key(8), x, y, L=2, ops=A.FAMILY)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[0].shape == x.shape and a[1].shape == y.shape
  np.testing.assert_allclose(a[1].sum(-1), 1.0, atol=1e-6)
  # One op family of one op: the composition is that op applied twice.
  one = A.random_augment(jax.random.key(9), x, y, L=1, ops=("solarize",), magnitude=0.0)
  np.testing.assert_array_equal(one[0], x)


def _brightness_loss(params, images, targets):
  """A per-example 'loss' the test can recompute: a weighted mean pixel."""
  del targets
  return (images * params).mean(axis=(1, 2, 3))


def test_selection_keeps_the_highest_loss_candidates_brute_force(batch):
  x, y = batch
  key = jax.random.key(11)
  C, S, L = 4, 2, 2
  ops = ("rotate", "cutout", "solarize", "mixup")  # a small family: a quick compile
  sel = jax.jit(A.uncertainty_augment, static_argnums=(0,),
                static_argnames=("L", "C", "S", "ops"))(_brightness_loss, 1.5, (x, y), key,
                                                        L=L, C=C, S=S, ops=ops)
  cx, cy = jax.jit(functools.partial(A.augment_candidates, C=C, L=L, ops=ops))(key, x, y)
  assert cx.shape == (C, *x.shape) and cy.shape == (C, *y.shape)
  assert not np.array_equal(cx[0], cx[1])
  losses = np.asarray(_brightness_loss(1.5, cx.reshape(-1, *x.shape[1:]), None)).reshape(C, B)
  np.testing.assert_allclose(sel.candidate_losses, losses, rtol=1e-5)
  for i in range(B):
    order = np.argsort(-losses[:, i])[:S]
    for s in range(S):
      np.testing.assert_allclose(sel.images[i * S + s], cx[order[s], i], atol=1e-6)
      np.testing.assert_allclose(sel.targets[i * S + s], cy[order[s], i], atol=1e-6)
      assert sel.losses[i, s] == pytest.approx(losses[order[s], i], rel=1e-5)
  assert sel.images.shape == (B * S, *x.shape[1:])


def test_proportional_selection_draws_by_loss():
  # 3 examples x C = 4 candidates; candidate c of example b is the number 10 b + c.
  cand = jnp.arange(3)[None, :] * 10 + jnp.arange(4)[:, None]  # [C, B]
  losses = jnp.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [3.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
  keys = jax.random.split(jax.random.key(13), 4000)
  kept, kept_losses = jax.vmap(lambda k: A.select_proportional(k, cand, losses, 2))(keys)
  kept = np.asarray(kept).reshape(-1, 3, 2)  # [draws, B, S]
  # Example 0: candidates 1 and 2 at 1 : 3, never a zero-loss one.
  share = (kept[:, 0] == 2).mean()
  assert set(np.unique(kept[:, 0])) == {1, 2} and abs(share - 0.75) < 0.03
  # Example 1: equal losses; example 2: all zero, so uniform.
  for b in (1, 2):
    freq = np.bincount(kept[:, b].ravel() - 10 * b, minlength=4) / kept[:, b].size
    np.testing.assert_allclose(freq, 0.25, atol=0.03)
  np.testing.assert_allclose(np.asarray(kept_losses)[:, 0],
                             np.asarray(losses)[kept[:, 0] - 0, 0])


def test_selection_inside_a_jitted_gradient_step(batch):
  x, y = batch
  w = jnp.ones((16 * 16 * 3, 4)) * 0.01

  def loss_per_example(params, images, targets):
    logits = images.reshape(images.shape[0], -1) @ params
    return -(targets * jax.nn.log_softmax(logits)).sum(-1)

  @functools.partial(jax.jit, static_argnames="selection")
  def step(params, key, selection):
    sel = A.uncertainty_augment(loss_per_example, params, (x, y), key, L=1, C=3, S=2,
                                ops=("rotate", "brightness", "mixup"), selection=selection)
    return jax.grad(lambda p: loss_per_example(p, sel.images, sel.targets).mean())(params)

  for selection in A.SELECTIONS:
    g = step(w, jax.random.key(12), selection)
    assert g.shape == w.shape and bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize("kwargs, message", [
  (dict(policy="randaugment"), "policy: expected one of none, random, uncertainty"),
  (dict(L=0), "L: expected an int >= 1, got 0"),
  (dict(C=4, S=5), "S: expected an int in [1, 4], got 5"),
  (dict(C=0), "C: expected an int >= 1"),
  (dict(ops=("rotate", "twirl")), "ops: expected names from"),
  (dict(ops=()), "ops: expected a non-empty list"),
  (dict(magnitude=1.5), "magnitude: expected a number in [0, 1]"),
  (dict(selection="max"), "selection: expected one of top, proportional"),
])
def test_bad_augmentation_settings_name_the_argument(kwargs, message):
  with pytest.raises(WdmjaxError) as e:
    A.Augmentation(**kwargs)
  assert str(e.value).startswith(message)
  assert "\n" not in str(e.value)


def test_bad_inputs_of_the_functions_name_the_argument(batch):
  x, y = batch
  key = jax.random.key(0)
  cases = [
    (lambda: A.uncertainty_augment(_brightness_loss, 1.0, (x, y), key, L=2, C=2, S=3), "S:"),
    (lambda: A.uncertainty_augment(_brightness_loss, 1.0, (x, y), key, L=0), "L:"),
    (lambda: A.uncertainty_augment(_brightness_loss, 1.0, x, key), "batch:"),
    (lambda: A.uncertainty_augment(None, 1.0, (x, y), key), "loss_per_example:"),
    (lambda: A.uncertainty_augment(_brightness_loss, 1.0, (x, y), key, selection="x"),
     "selection:"),
    (lambda: A.random_augment(key, x, jnp.arange(B), ops=("mixup",)), "targets:"),
    (lambda: A.random_augment(key, x[0], y), "images:"),
    (lambda: A.rotate(key, x, 1.5), "magnitude:"),
    (lambda: A.rotate(key, x, jnp.ones(B + 1) * 0.5), "magnitude:"),
    (lambda: A.rotate(key, (x * 127).astype(jnp.int32), 0.5), "x:"),
    (lambda: A.mixup(key, x, jnp.arange(B), 0.5), "y:"),
  ]
  for fn, start in cases:
    with pytest.raises(WdmjaxError) as e:
      fn()
    assert str(e.value).startswith(start), str(e.value)
