"""Tests of wdmjax.models: shapes, published parameter counts, DiffFit gammas, input checks."""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from wdmjax.errors import WdmjaxError
from wdmjax.models import (
  DIT_PRESETS,
  NULL_LABEL,
  DiT,
  SelfAttention,
  UNet,
  attention,
  build_model,
  count_params,
  drop_labels,
  get_2d_sincos_pos_embed,
  init_params,
  param_count_from_config,
  timestep_embedding,
)

RES, C, B = 8, 3, 2
TINY_UNET = dict(name="unet", resolution=RES, in_channels=C, ch=16, ch_mult=(1, 2),
                 num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, num_groups=4)
TINY_DIT = dict(name="dit", resolution=RES, in_channels=C, patch_size=2, width=32, depth=2,
                num_heads=4, num_classes=10, class_dropout_prob=0.1)


def _inputs(num_classes: int = 0, seed: int = 0):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (B, RES, RES, C))
  t = jax.random.randint(kt, (B,), 0, 1000)
  y = jax.random.randint(ky, (B,), 0, num_classes) if num_classes else None
  return x, t, y


def _perturb(params, seed: int = 1, scale: float = 0.1):
  """Adds noise to every leaf, so zero-initialised layers (adaLN, outputs) become live."""
  # numpy noise: one jax.random call per leaf would cost seconds of XLA compilation.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def _flat(params) -> dict:
  return traverse_util.flatten_dict(params, sep="/")


def _set(params, pattern: str, fn):
  flat = {k: (fn(v) if re.fullmatch(pattern, k) else v) for k, v in _flat(params).items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def _fixture(cfg: dict) -> SimpleNamespace:
  """A tiny model, its initial params, perturbed params and a jitted apply (compiled once)."""
  model = build_model(cfg)
  params0 = init_params(model, jax.random.key(0))
  return SimpleNamespace(model=model, cfg=cfg, params0=params0, params=_perturb(params0),
                         apply=jax.jit(model.apply, static_argnames="train"))


@pytest.fixture(scope="module")
def unet() -> SimpleNamespace:
  return _fixture({**TINY_UNET, "num_classes": 10, "class_dropout_prob": 0.1})


@pytest.fixture(scope="module")
def dit() -> SimpleNamespace:
  return _fixture(TINY_DIT)


def _output_shape(cfg: dict) -> tuple[int, ...]:
  model = build_model(cfg)
  x, t, y = _inputs(model.num_classes)
  out = jax.eval_shape(lambda r: model.init_with_output(r, x, t, y)[0], jax.random.key(0))
  assert out.dtype == jnp.float32
  return out.shape


# ----- shapes -----

@pytest.mark.parametrize("num_classes,learn_sigma,out_channels", [(0, False, None),
                                                                   (10, True, None),
                                                                   (10, False, 5)])
def test_output_shapes(num_classes, learn_sigma, out_channels):
  expected = (B, RES, RES, (out_channels or C) * (2 if learn_sigma else 1))
  for cfg in (TINY_UNET, TINY_DIT):
    cfg = {**cfg, "num_classes": num_classes, "learn_sigma": learn_sigma,
           "out_channels": out_channels}
    assert _output_shape(cfg) == expected


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_output_is_zero_at_init(name, request):
  net = request.getfixturevalue(name)
  x, t, y = _inputs(10)
  out = net.apply({"params": net.params0}, x, t, y)
  assert out.shape == (B, RES, RES, C)
  np.testing.assert_array_equal(out, 0.0)  # zero-initialised output conv / adaLN-Zero


def test_unet_and_dit_accept_float_timesteps(unet, dit):
  x, t, y = _inputs(10)
  for net in (unet, dit):
    params, apply = net.params, net.apply
    out_int = apply({"params": params}, x, t, y)
    out_float = apply({"params": params}, x, t.astype(jnp.float32), y)
    np.testing.assert_allclose(out_int, out_float, atol=1e-5)
    assert np.all(np.isfinite(out_int)) and float(jnp.abs(out_int).max()) > 0


def test_null_label_has_one_meaning(dit):
  model, params, apply = dit.model, dit.params, dit.apply
  x, t, _ = _inputs()
  assert model.null_label == NULL_LABEL == -1
  out_null = apply({"params": params}, x, t, jnp.full((B,), model.null_label))
  out_none = apply({"params": params}, x, t, None)
  out_class = apply({"params": params}, x, t, jnp.zeros((B,), jnp.int32))
  np.testing.assert_allclose(out_none, out_null, atol=1e-6)
  assert float(jnp.abs(out_class - out_null).max()) > 1e-4  # the null row is its own row
  table = params["y_embedder"]["embedding_table"]["embedding"]
  assert table.shape == (11, 32)  # num_classes + 1 rows: the last is the null class


# ----- published parameter counts (jax.eval_shape, no allocation) -----

def test_ddpm_cifar10_unet_param_count():
  n = param_count_from_config(dict(name="unet", resolution=32, in_channels=3, ch=128,
                                   ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                   attn_resolutions=(16,), dropout=0.1))
  assert abs(n / 35.7e6 - 1) < 0.01, n


@pytest.mark.parametrize("preset,published", [("S/2", 33e6), ("B/2", 130e6), ("L/2", 458e6),
                                              ("XL/2", 675e6)])
def test_dit_param_count_matches_paper(preset, published):
  n = param_count_from_config(dict(name="dit", preset=preset, resolution=32, in_channels=4,
                                   num_classes=1000, class_dropout_prob=0.1, learn_sigma=True))
  assert abs(n / published - 1) < 0.01, n


def test_dit_presets_cover_patch_sizes():
  assert {"S/2", "S/4", "S/8", "B/2", "L/4", "XL/2", "XL/8"} <= set(DIT_PRESETS)
  assert DIT_PRESETS["XL/2"] == dict(width=1152, depth=28, num_heads=16, patch_size=2)


# ----- DiffFit gammas -----

def test_dit_gamma_leaves_are_ones_of_shape_width(dit):
  flat = _flat(dit.params0)
  gammas = {k: v for k, v in flat.items() if re.fullmatch(".*gamma.*", k)}
  assert sorted(gammas) == [f"DiTBlock_{i}/gamma_{b}" for i in range(2) for b in ("attn", "mlp")]
  for v in gammas.values():
    assert v.shape == (32,)
    np.testing.assert_array_equal(v, 1.0)


def test_dit_gamma_blocks_limits_gammas_to_first_blocks():
  model = build_model({**TINY_DIT, "depth": 3, "gamma_blocks": 1})
  flat = _flat(jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0)))
  assert sorted(k for k in flat if "gamma" in k) == ["DiTBlock_0/gamma_attn",
                                                    "DiTBlock_0/gamma_mlp"]


def test_dit_gamma_scales_branches(dit):
  params, apply = dit.params, dit.apply
  x, t, y = _inputs(10)
  base = apply({"params": params}, x, t, y)
  doubled = _set(params, ".*gamma.*", lambda g: 2 * g)
  assert float(jnp.abs(apply({"params": doubled}, x, t, y) - base).max()) > 1e-3

  # gamma = 0 in block 0: its attention / MLP weights no longer matter.
  zeroed = _set(params, "DiTBlock_0/gamma_.*", jnp.zeros_like)
  shaken = _set(zeroed, "DiTBlock_0/(attn|mlp)/.*", lambda w: w + 1.0)
  out_zero = apply({"params": zeroed}, x, t, y)
  np.testing.assert_allclose(apply({"params": shaken}, x, t, y), out_zero, atol=1e-6)
  shaken_live = _set(params, "DiTBlock_0/(attn|mlp)/.*", lambda w: w + 1.0)
  assert float(jnp.abs(apply({"params": shaken_live}, x, t, y) - base).max()) > 1e-3


# ----- input and config checks -----

@pytest.mark.parametrize("cfg", [TINY_UNET, TINY_DIT], ids=["unet", "dit"])
def test_wrong_input_shape_names_expected_shape(cfg):
  model = build_model(cfg)
  nc = cfg.get("num_classes", 0)
  _, t, y = _inputs(nc)
  message = "x: expected shape [B, 8, 8, 3], got (2, 6, 6, 1)"
  with pytest.raises(WdmjaxError, match=re.escape(message)):
    model.init(jax.random.key(0), jnp.zeros((B, 6, 6, 1)), t, y)
  x, _, _ = _inputs(nc)
  with pytest.raises(WdmjaxError, match=r"t: expected shape \[B\]"):
    model.init(jax.random.key(0), x, jnp.zeros((B, 1)), y)


def test_label_checks():
  unconditional = build_model(TINY_UNET)
  x, t, _ = _inputs()
  with pytest.raises(WdmjaxError, match="y: expected None"):
    unconditional.init(jax.random.key(0), x, t, jnp.zeros((B,), jnp.int32))
  no_null = build_model({**TINY_DIT, "class_dropout_prob": 0.0})
  with pytest.raises(WdmjaxError, match="y: expected"):
    no_null.init(jax.random.key(0), x, t, None)
  with pytest.raises(WdmjaxError, match=r"y: expected shape \[B\]"):
    no_null.init(jax.random.key(0), x, t, jnp.zeros((B + 1,), jnp.int32))


@pytest.mark.parametrize("cfg,match", [
  ({**TINY_UNET, "resolution": 10, "ch_mult": (1, 2, 2)}, "resolution: expected a multiple of"),
  ({**TINY_UNET, "num_groups": 5}, "num_groups: expected a divisor"),
  ({**TINY_DIT, "num_heads": 5}, "width: expected a multiple of num_heads=5"),
  ({**TINY_DIT, "resolution": 9}, "resolution: expected a multiple of patch_size=2"),
  ({**TINY_DIT, "gamma_blocks": 3}, "gamma_blocks: expected"),
  ({**TINY_DIT, "depth_": 3}, "model.depth_: unknown key"),
  ({**TINY_DIT, "name": "vit"}, "model.name: expected one of"),
  ({**TINY_DIT, "preset": "M/2"}, "model.preset: expected one of"),
])
def test_build_model_rejects_bad_config(cfg, match):
  with pytest.raises(WdmjaxError, match=match):
    build_model(cfg)


def test_build_model_from_config_dict_with_preset():
  cfg = ml_collections.ConfigDict(dict(name="dit", preset="S/4", resolution=32, in_channels=4,
                                       depth=2, dtype="bfloat16"))
  model = build_model(cfg)
  assert isinstance(model, DiT)
  assert (model.width, model.depth, model.patch_size, model.dtype) == (384, 2, 4, jnp.bfloat16)
  unet_model = build_model(ml_collections.ConfigDict({**TINY_UNET, "ch_mult": [1, 2]}))
  assert isinstance(unet_model, UNet) and unet_model.ch_mult == (1, 2)
  params = jax.eval_shape(lambda r: init_params(unet_model, r), jax.random.key(0))
  assert count_params(params) == param_count_from_config(TINY_UNET)


# ----- embeddings -----

def test_self_attention_matches_dense_qkv_formulation():
  """The heads-first projection computes what Dense(3C) -> split -> attention -> Dense does."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 12))
  mod = SelfAttention(num_heads=3)
  params = mod.init(jax.random.PRNGKey(1), x)["params"]
  params["qkv"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), (36,))
  assert params["qkv"]["kernel"].shape == (12, 36)
  qkv = (x @ params["qkv"]["kernel"] + params["qkv"]["bias"]).reshape(2, 5, 3, 3, 4)
  h = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(2, 5, 12)
  want = h @ params["proj"]["kernel"] + params["proj"]["bias"]
  np.testing.assert_allclose(mod.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_token_dense_is_the_dense_layer_on_flattened_tokens():
  """Same parameter tree and values as nn.Dense on [B, L, C], for the output and for every
  gradient (the flattening is only a layout for XLA's weight-gradient matmuls)."""
  import flax.linen as nn

  from wdmjax.models.layers import token_dense

  class Flat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return token_dense(x, 7, name="fc")

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(7, name="fc")(x)

  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4))
  params = Plain().init(jax.random.PRNGKey(1), x)["params"]
  params["fc"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), (7,))
  flat_params = Flat().init(jax.random.PRNGKey(1), x)["params"]
  assert jax.tree.map(jnp.shape, flat_params) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(Flat().apply({"params": params}, x),
                             Plain().apply({"params": params}, x), rtol=1e-6, atol=1e-6)
  loss = lambda mod: lambda p, x: jnp.sum(jnp.sin(mod.apply({"params": p}, x)))
  got = jax.grad(loss(Flat()), argnums=(0, 1))(params, x)
  want = jax.grad(loss(Plain()), argnums=(0, 1))(params, x)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, got, want)


@pytest.mark.parametrize("c, f", [(6, 9), (9, 6)])  # either operand is the one transposed
def test_dense_matmul_has_the_gradients_of_a_matmul(c, f):
  """Value and both gradients of x @ kernel; a frozen kernel costs no weight gradient."""
  from wdmjax.models.layers import dense_matmul

  x = jax.random.normal(jax.random.PRNGKey(0), (11, c))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (c, f))
  loss = lambda mm: lambda x, k: jnp.sum(jnp.sin(mm(x, k)))
  np.testing.assert_allclose(dense_matmul(x, kernel), x @ kernel, rtol=1e-6, atol=1e-6)
  got = jax.jit(jax.grad(loss(dense_matmul), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, kernel)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, want)
  only_x = jax.make_jaxpr(jax.grad(loss(dense_matmul)))(x, kernel)
  assert str(only_x).count("dot_general") == 2  # the product and dx, no x^T g


def test_attention_backward_matches_autodiff():
  """FlashAttention's backward (from the saved weights and output) equals autodiff of
  softmax attention, for q, k and v."""
  from wdmjax.models.layers import attention_heads_first

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, w = (jax.random.normal(key, (2, 3, 5, 4)) for key in keys)
  heads_last = lambda a: a.transpose(0, 2, 1, 3)
  reference = lambda q, k, v: heads_last(attention(heads_last(q), heads_last(k), heads_last(v)))
  np.testing.assert_allclose(attention_heads_first(q, k, v), reference(q, k, v),
                             rtol=1e-5, atol=1e-6)
  loss = lambda fn: lambda q, k, v: jnp.sum(w * fn(q, k, v))
  got = jax.jit(jax.grad(loss(attention_heads_first), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)


def test_dit_mlp_is_dense_gelu_dense():
  """The checkpointed bias + GELU epilogue changes the program, not the function or its
  gradients."""
  import flax.linen as nn

  from wdmjax.models.dit import Mlp

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.gelu(nn.Dense(8, name="fc1")(x), approximate=True)
      return nn.Dense(x.shape[-1], name="fc2")(h)

  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  params = Plain().init(jax.random.PRNGKey(1), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1 * jnp.ones_like(a), params)  # non-zero biases
  assert (jax.tree.map(jnp.shape, Mlp(8).init(jax.random.PRNGKey(1), x)["params"])
          == jax.tree.map(jnp.shape, params))
  loss = lambda mod: lambda p, x: jnp.sum(jnp.sin(mod.apply({"params": p}, x)))
  got = jax.grad(loss(Mlp(8)), argnums=(0, 1))(params, x)
  want = jax.grad(loss(Plain()), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)


def test_timestep_embedding_values():
  emb = timestep_embedding(jnp.array([0, 5]), 6)
  assert emb.shape == (2, 6)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0], atol=1e-7)  # cos then sin
  np.testing.assert_allclose(emb[1, 0], np.cos(5.0), rtol=1e-6)  # lowest index: frequency 1
  assert timestep_embedding(jnp.array([1.5]), 7).shape == (1, 7)


def test_pos_embed_coord_scale_matches_coarse_grid():
  g, w = 4, 16
  coarse = get_2d_sincos_pos_embed(w, g).reshape(g, g, w)
  fine = get_2d_sincos_pos_embed(w, 2 * g, coord_scale=2.0).reshape(2 * g, 2 * g, w)
  # Every other fine token sits exactly on a coarse token...
  np.testing.assert_allclose(fine[::2, ::2], coarse, atol=1e-6)
  # ...so the fine grid spans the same coordinate range [0, g) (largest at g - 1/2).
  ref = get_2d_sincos_pos_embed(w, 2 * g).reshape(2 * g, 2 * g, w)
  assert np.abs(fine - ref).max() > 0.1
  assert fine.dtype == np.float32 and fine.shape == (2 * g, 2 * g, w)


def test_dit_params_transfer_to_twice_the_resolution(dit):
  # The position embedding is fixed, so the same params run at 2x resolution (DiffFit).
  model2 = build_model({**TINY_DIT, "resolution": 2 * RES, "pos_coord_scale": 2.0})
  x = jax.random.normal(jax.random.key(3), (B, 2 * RES, 2 * RES, C))
  out = model2.apply({"params": dit.params}, x, jnp.array([3, 500]), jnp.array([1, 2]))
  assert out.shape == (B, 2 * RES, 2 * RES, C) and bool(jnp.all(jnp.isfinite(out)))


def test_drop_labels():
  y = jnp.arange(1000) % 10
  np.testing.assert_array_equal(drop_labels(y, jax.random.key(0), 0.0), y)
  np.testing.assert_array_equal(drop_labels(y, jax.random.key(0), 1.0, null_label=10), 10)
  dropped = drop_labels(y, jax.random.key(0), 0.3)
  frac = float(jnp.mean(dropped == NULL_LABEL))
  assert 0.24 < frac < 0.36
  np.testing.assert_array_equal(jnp.where(dropped == NULL_LABEL, y, dropped), y)


# ----- dropout and dtype -----

def test_unet_dropout_only_in_training(unet):
  apply = unet.apply
  x, t, y = _inputs(10)
  variables = {"params": unet.params}
  eval_a = apply(variables, x, t, y, train=False)
  eval_b = apply(variables, x, t, y, train=False, rngs={"dropout": jax.random.key(7)})
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(variables, x, t, y, train=True, rngs={"dropout": jax.random.key(1)})
  train_b = apply(variables, x, t, y, train=True, rngs={"dropout": jax.random.key(2)})
  assert float(jnp.abs(train_a - eval_a).max()) > 1e-4
  assert float(jnp.abs(train_a - train_b).max()) > 1e-4


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_bfloat16_compute_is_finite_and_close(name, request):
  net = request.getfixturevalue(name)
  model16 = build_model({**net.cfg, "dtype": "bfloat16"})
  x, t, y = _inputs(10)
  shapes16 = jax.eval_shape(lambda r: init_params(model16, r), jax.random.key(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))  # params stay f32
  out32 = net.apply({"params": net.params}, x, t, y)
  out16 = jax.jit(model16.apply)({"params": net.params}, x, t, y)
  assert out16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out16)))
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel
