"""Weight, sampling and image attacks: exact where they can be, clear errors, CLI."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_DIT, run_cli
from wdmjax.attacks import (
  apply_attacks,
  brightness,
  center_crop,
  compose,
  contrast,
  gaussian_blur,
  gaussian_noise,
  jpeg,
  jpeg_ste,
  kernel_sparsity,
  parse_attack,
  prune,
  quantize,
  quantize_int8,
  random_crop,
  resize,
  rotate,
  weight_noise,
)
from wdmjax.attacks.model import is_kernel
from wdmjax.configs import load_config
from wdmjax.errors import WdmjaxError
from wdmjax.models import build_model, init_params


@pytest.fixture(scope="module")
def dit_params():
  model = build_model(dict(name="dit", resolution=8, in_channels=1, patch_size=2, width=32,
                           depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.1))
  params = init_params(model, jax.random.PRNGKey(0))
  # Trained weights are not at their init: give every leaf a spread of values.
  return jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.PRNGKey(v.size),
                                                            v.shape), params)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.7])
def test_prune_zeroes_the_fraction_of_kernel_weights(dit_params, scope, fraction):
  pruned = prune(dit_params, fraction, scope)
  assert abs(kernel_sparsity(pruned) - fraction) < 0.01
  flat_p = jax.tree_util.tree_flatten_with_path(pruned)[0]
  flat_o = jax.tree.leaves(dit_params)
  for (path, v), o in zip(flat_p, flat_o, strict=True):
    keys = tuple(getattr(k, "key", str(k)) for k in path)
    if not is_kernel(keys, v):
      np.testing.assert_array_equal(v, o)  # biases, norms, gammas untouched
    else:
      kept = np.asarray(v) != 0
      np.testing.assert_array_equal(np.asarray(v)[kept], np.asarray(o)[kept])
      if scope == "layer":
        assert abs(1 - kept.mean() - fraction) <= 1.0 / v.size + 1e-9
  if scope == "global":  # what survives is the largest in magnitude, over all kernels
    kernels = [(np.asarray(v), np.asarray(o)) for (path, v), o in zip(flat_p, flat_o,
                                                                     strict=True)
               if is_kernel(tuple(getattr(k, "key", str(k)) for k in path), v)]
    smallest_kept = np.abs(np.concatenate([o[v != 0] for v, o in kernels])).min()
    largest_cut = np.abs(np.concatenate([o[v == 0] for v, o in kernels])).max()
    assert largest_cut <= smallest_kept


def test_int8_round_trip_is_within_half_a_step(dit_params):
  for v in jax.tree.leaves(dit_params):
    q, scale = quantize_int8(v)
    assert q.dtype == jnp.int8
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale) - np.asarray(v))
    assert np.all(err <= np.asarray(scale) / 2 + 1e-7)
  for mode in ("fp16", "bf16", "int8"):
    out = quantize(dit_params, mode)
    assert jax.tree.structure(out) == jax.tree.structure(dit_params)
  bf = quantize(dit_params, "bf16")
  leaf = jax.tree.leaves(bf)[0]
  np.testing.assert_array_equal(leaf, leaf.astype(jnp.bfloat16).astype(jnp.float32))


def test_jpeg_is_pillow_and_the_straight_through_one_is_close():
  rng = np.random.default_rng(0)
  gray = np.clip(rng.normal(0, 0.5, (3, 16, 16, 1)), -1, 1).astype(np.float32)
  for q in (20, 75):
    got = jpeg(gray, q)
    for im, g in zip(gray, got, strict=True):
      buf = io.BytesIO()
      u8 = np.clip(np.round((im[..., 0] + 1) * 127.5), 0, 255).astype(np.uint8)
      Image.fromarray(u8).save(buf, format="JPEG", quality=q)
      want = np.asarray(Image.open(io.BytesIO(buf.getvalue())), np.float32) / 127.5 - 1
      np.testing.assert_array_equal(g[..., 0], want)
    smooth = np.asarray(jax.image.resize(jnp.asarray(gray[:, :4, :4]), (3, 16, 16, 1),
                                         "bilinear"))
    ste = np.asarray(jpeg_ste(jnp.asarray(smooth), q))
    assert np.abs(ste - jpeg(smooth, q)).mean() < 0.01
    assert np.abs(ste - smooth).mean() > 0.001  # it does compress
  g = jax.grad(lambda v: jpeg_ste(v, 50).sum())(jnp.asarray(gray))
  assert float(jnp.abs(g).mean()) > 0.5  # straight through: gradient about 1
  with pytest.raises(WdmjaxError, match="quality"):
    jpeg(gray, 0)


def test_image_attacks_compose_in_order_and_rotate_counter_clockwise():
  x = jnp.asarray(np.random.default_rng(1).uniform(-0.5, 0.5, (2, 8, 8, 1)), jnp.float32)
  a = compose([lambda v: brightness(v, 0.4), lambda v: contrast(v, 3.0)])(x)
  b = compose([lambda v: contrast(v, 3.0), lambda v: brightness(v, 0.4)])(x)
  np.testing.assert_allclose(a, contrast(brightness(x, 0.4), 3.0))
  assert float(jnp.abs(a - b).max()) > 0.1
  np.testing.assert_allclose(rotate(x, 90.0), np.rot90(np.asarray(x), 1, axes=(1, 2)),
                             atol=1e-5)


def test_model_attacks_compose_in_order(dit_params):
  cfg = load_config(TINY_DIT, [])
  attacks = [parse_attack("noise:0.01"), parse_attack("prune:0.5")]
  _, a = apply_attacks(cfg, dit_params, attacks)
  _, b = apply_attacks(cfg, dit_params, attacks[::-1])
  assert abs(kernel_sparsity(a) - 0.5) < 0.01  # pruned last: exactly half zero
  assert kernel_sparsity(b) < 0.01  # noise after pruning fills the zeros
  want = prune(weight_noise(dit_params, jax.random.fold_in(jax.random.PRNGKey(0), 0), 0.01),
               0.5)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(u, v)
  cfg2, _ = apply_attacks(cfg, dit_params, [parse_attack("steps:7"), parse_attack("dropout:0.3")])
  assert cfg2.sample.steps == 7 and cfg.sample.steps == 10
  assert cfg2.model.dropout == 0.3 and cfg2.sample.dropout and not cfg.sample.dropout


@pytest.mark.parametrize("text,match", [
  ("zap:1", "expected a name in"), ("prune:1.5", r"F in \[0, 1\)"), ("prune", "STRENGTH"),
  ("noise:-1", "STD in"), ("quantize:int4", "MODE"), ("finetune:0", "positive integer"),
  ("raw:1", "no strength"), ("steps:x", "positive integer"), ("dropout:1", r"F in \[0, 1\)")])
def test_bad_attack_names_and_strengths_give_clear_errors(text, match):
  with pytest.raises(WdmjaxError, match=match):
    parse_attack(text)


def test_attack_cli_writes_a_workdir_verify_accepts(tmp_path):
  src = str(tmp_path / "wm")
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", src, "--trigger", "random:1",
              "--watermark", "keyed:2", "--key", "5", "--block", "2", "--steps", "4",
              "--no-progress")
  assert r.returncode == 0, r.stderr
  out = str(tmp_path / "attacked")
  r = run_cli("attack", "--workdir", src, "--out", out, "--attack", "finetune:3",
              "--attack", "prune:0.3", "--attack", "quantize:int8", "--attack", "steps:6",
              "--attack", "dropout:0.2",
              "--no-progress")
  assert r.returncode == 0, r.stderr
  meta = json.load(open(os.path.join(out, "attacks.json")))
  assert meta["attacks"] == ["finetune:3", "prune:0.3", "quantize:int8", "steps:6",
                             "dropout:0.2"]
  # The owner's secret stays home: the attacked copy is verified with the original's.
  assert not os.path.exists(os.path.join(out, "secret.json"))
  r = run_cli("verify", "--workdir", out, "--json", "--num", "2", "--steps", "4")
  assert r.returncode == 2 and "--trigger/--watermark" in r.stderr, r.stderr
  r = run_cli("verify", "--workdir", out, "--secret", src, "--json", "--num", "2", "--steps",
              "4")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["bits"] == 16
  # A second run into the same directory is refused; nothing half-written is left.
  r = run_cli("attack", "--workdir", src, "--out", out, "--attack", "noise:0.1")
  assert r.returncode == 2 and "--out" in r.stderr
  r = run_cli("attack", "--workdir", src, "--out", str(tmp_path / "x"), "--attack", "prune",
              "--attack", "raw")
  assert r.returncode == 2 and not os.path.exists(tmp_path / "x")


def test_sampling_dropout_changes_the_output_only_when_on(dit_params):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t, y = jnp.array([10, 50]), jnp.array([1, 2])
  outs = {}
  for rate in (0.0, 0.5):
    model = build_model(dict(name="dit", resolution=8, in_channels=1, patch_size=2, width=32,
                             depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.1,
                             dropout=rate))
    for train in (False, True):
      outs[rate, train] = model.apply({"params": dit_params}, x, t, y, train=train,
                                      rngs={"dropout": jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(outs[0.0, True], outs[0.0, False])
  np.testing.assert_array_equal(outs[0.5, False], outs[0.0, False])
  assert float(jnp.abs(outs[0.5, True] - outs[0.5, False]).max()) > 1e-3


def test_geometric_and_photometric_attacks_do_what_they_say():
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
  np.testing.assert_allclose(center_crop(x, 1.0), x, atol=1e-5)  # full area: unchanged
  np.testing.assert_allclose(resize(x, 1.0), x, atol=1e-5)
  i = np.arange(16, dtype=np.float32)
  smooth = jnp.asarray(np.sin(i[:, None] / 4) * np.cos(i[None, :] / 5))[None, :, :, None]
  crop = center_crop(smooth, 0.25)  # the central 8x8, upsampled 2x
  np.testing.assert_allclose(crop.reshape(1, 8, 2, 8, 2, 1).mean((2, 4)),
                             smooth[:, 4:12, 4:12], atol=0.05)
  small = center_crop(smooth, 0.25, resize_back=False)  # Stable Signature's crop: kept small
  np.testing.assert_array_equal(small, smooth[:, 4:12, 4:12])
  assert resize(x, 0.25, resize_back=False).shape == (3, 8, 8, 3)
  r = random_crop(x, jax.random.PRNGKey(0), 0.5)
  assert r.shape == x.shape and float(jnp.abs(r - x).mean()) > 0.05
  flat = jnp.full((1, 16, 16, 1), 0.3)
  np.testing.assert_allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)  # keeps a constant
  blurred = gaussian_blur(x, 1.5)
  assert float(jnp.abs(jnp.diff(blurred, axis=1)).mean()) < 0.5 * float(
    jnp.abs(jnp.diff(x, axis=1)).mean())
  z = jnp.zeros((4, 32, 32, 1))
  assert float(gaussian_noise(z, jax.random.PRNGKey(0), 0.1).std()) == pytest.approx(0.1, rel=0.05)
  assert float(brightness(x, 0.5).max()) <= 1.0
  with pytest.raises(WdmjaxError, match="crop"):
    center_crop(x, 0.0)
  with pytest.raises(WdmjaxError, match=r"images: expected shape \[B, H, W, C\]"):
    resize(x[0], 0.5)
