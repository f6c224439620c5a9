"""DiffFit, BitFit, LoRA and full fine-tuning: labels, the split train step, delta checkpoints."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests.conftest import TINY_DIT, run_cli
from wdmjax.configs import load_config
from wdmjax.diffusion import diffusion_loss, make_schedule
from wdmjax.errors import WdmjaxError
from wdmjax.models import build_model, init_params
from wdmjax.peft import (
  PeftSpec,
  apply_delta,
  apply_lora,
  count,
  finetune,
  init_lora,
  merge,
  param_labels,
  prepare,
  split,
)
from wdmjax.runs import load_model
from wdmjax.train import create_train_state, load_trained, make_optimizer, make_train_step, train
from wdmjax.train.sharding import make_mesh
from wdmjax.workdir import Workdir

DELTA_FILE, PEFT_FILE = Workdir.DELTA, Workdir.PEFT



def apply_fn_for(model):
  return lambda p, x, t, y, rng, train: model.apply({"params": p}, x, t, y, train=train,
                                                    rngs={"dropout": rng})


# The DiffFit paper's Food-101 setting: DiT-XL/2 at 256 px (32x32x4 latents), 101 classes.
XL2_FOOD101 = dict(name="dit", preset="XL/2", resolution=32, in_channels=4, num_classes=101,
                   learn_sigma=True, class_dropout_prob=0.1)
TINY = dict(name="dit", resolution=8, in_channels=1, patch_size=2, width=16, depth=4,
            num_heads=2, num_classes=10, class_dropout_prob=0.1)


def test_dit_xl2_counts_match_the_paper():
  """BitFit 0.61M; DiffFit 0.09-0.13% of 673.8M (abstract shapes: nothing allocated)."""
  full = count(XL2_FOOD101, PeftSpec("full"))
  assert full["total"] == pytest.approx(673.8e6, rel=1e-3)
  assert count(XL2_FOOD101, PeftSpec("bitfit"))["trainable"] == pytest.approx(0.61e6, rel=0.01)
  difffit = count(XL2_FOOD101, PeftSpec("difffit"))
  assert 0.0009 <= difffit["fraction"] <= 0.0013
  # 14 of the 28 blocks' gammas (2 x 1152 each) on top of BitFit.
  assert difffit["trainable"] - count(XL2_FOOD101, PeftSpec("bitfit"))["trainable"] == 14 * 2304


def test_labels_by_strategy():
  params = init_params(build_model(TINY), jax.random.PRNGKey(0))
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(
    param_labels(params, "difffit")).items()}
  assert flat["DiTBlock_0/attn/qkv/bias"] == "train"
  assert flat["DiTBlock_0/attn/qkv/kernel"] == "freeze"
  assert flat["y_embedder/embedding_table/embedding"] == "train"
  assert flat["DiTBlock_1/gamma_attn"] == "train" and flat["DiTBlock_2/gamma_attn"] == "freeze"
  bitfit = traverse_util.flatten_dict(param_labels(params, "bitfit"))
  assert bitfit[("DiTBlock_0", "gamma_mlp")] == "freeze"
  three = traverse_util.flatten_dict(param_labels(params, "difffit", gamma_blocks=3))
  assert three[("DiTBlock_2", "gamma_mlp")] == "train"
  assert set(jax.tree.leaves(param_labels(params, "full"))) == {"train"}
  with pytest.raises(WdmjaxError, match="strategy: expected one of"):
    param_labels(params, "adapters")


def _perturbed(params, seed=3):
  """DiT's zero-initialised gates and output layer stop every gradient at step 0; a trained
  model has none of those zeros."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys, strict=True)])


def _step_fixture(strategy):
  model = build_model(TINY)
  params = _perturbed(init_params(model, jax.random.PRNGKey(0)))
  trainable, frozen, _, combine = prepare(PeftSpec(strategy), params)
  loss = diffusion_loss(apply_fn_for(model), make_schedule("linear", 50), "eps", 0.1, -1)
  tx = make_optimizer(1e-2, 0, 0.0, 1.0)
  return params, trainable, frozen, combine, loss, tx


def test_difffit_step_moves_trainable_leaves_only():
  params, trainable, frozen, combine, loss, tx = _step_fixture("difffit")
  step = make_train_step(loss, tx, 0.99, make_mesh(1), frozen=frozen, combine=combine)
  state = create_train_state(trainable, tx, jax.random.PRNGKey(1))
  # The optimizer keeps state for the trainable leaves alone.
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  assert n_opt <= 2 * n_train + 8
  batch = {"image": jax.random.uniform(jax.random.PRNGKey(2), (8, 8, 8, 1), minval=-1,
                                       maxval=1), "label": jnp.arange(8)}
  state, metrics = step(state, batch)
  assert np.isfinite(metrics["loss"])
  after = traverse_util.flatten_dict(combine(state.params, frozen))
  before = traverse_util.flatten_dict(params)
  moved = traverse_util.flatten_dict(trainable)
  for k, v in before.items():
    if k in moved:
      assert not np.array_equal(after[k], v), f"trainable {k} did not move"
    else:
      assert np.array_equal(after[k], v), f"frozen {k} changed"


def _dots(fn, *args) -> int:
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_split_gradient_skips_frozen_weight_gradients():
  """The gradient w.r.t. the trainable part has fewer matmuls than the full gradient: XLA
  never sees the frozen kernels' weight-gradient products."""
  params, trainable, frozen, combine, loss, _ = _step_fixture("difffit")
  batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.arange(4)}
  rng = jax.random.PRNGKey(0)
  full = _dots(jax.grad(lambda p: loss(p, batch, rng)[0]), params)
  part = _dots(jax.grad(lambda t: loss(combine(t, frozen), batch, rng)[0]), trainable)
  forward = _dots(lambda p: loss(p, batch, rng)[0], params)
  assert part < full
  # Each of the 4 blocks has 4 frozen kernels (qkv, proj, fc1, fc2): 16 fewer products.
  assert full - part >= 16 and part >= 2 * forward - 4


def test_lora_starts_as_the_identity_and_trains_adapters():
  params = init_params(build_model(TINY), jax.random.PRNGKey(0))
  adapters = init_lora(jax.random.PRNGKey(1), params, rank=2)
  assert len(adapters["lora"]) == 4 * 4
  folded = apply_lora({**params, **adapters})
  for a, b in zip(jax.tree.leaves(folded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  _, trainable, frozen, combine, loss, tx = _step_fixture("lora")
  assert set(trainable) == {"lora", "y_embedder"}
  step = make_train_step(loss, tx, 0.99, make_mesh(1), frozen=frozen, combine=combine)
  state = create_train_state(trainable, tx, jax.random.PRNGKey(1))
  state, _ = step(state, {"image": jnp.ones((4, 8, 8, 1)) * 0.5, "label": jnp.arange(4)})
  b = state.params["lora"]["DiTBlock_0.mlp.fc1.kernel"]["b"]
  assert np.abs(np.asarray(b)).max() > 0


def test_split_and_merge_round_trip():
  params = init_params(build_model(TINY), jax.random.PRNGKey(0))
  t, f = split(params, param_labels(params, "bitfit"))
  back = merge(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  with pytest.raises(WdmjaxError, match="both parts"):
    merge(t, t)


# ----------------------------------------------------------------------------- workdirs


@pytest.fixture(scope="module")
def base_and_finetune(tmp_path_factory):
  root = tmp_path_factory.mktemp("peft")
  base = str(root / "base")
  train(load_config(TINY_DIT, ["train.steps=4"]), base, progress=False)
  ft = str(root / "difffit")
  cfg = load_config(TINY_DIT, ["train.steps=6", "train.lr=1e-2"])
  finetune(cfg, ft, base, load_trained(base)[1], PeftSpec("difffit"), progress=False)
  return root, base, ft


def test_delta_plus_base_reproduces_the_finetune_exactly(base_and_finetune):
  _, base, ft = base_and_finetune
  _, tuned = load_model(ft)
  _, base_params = load_trained(base)
  ref = json.load(open(os.path.join(ft, PEFT_FILE)))
  assert ref["strategy"] == "difffit" and 0 < ref["fraction"] < 0.05
  rebuilt = apply_delta(os.path.join(ft, DELTA_FILE), base_params, ref)
  for a, b in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(tuned), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The delta holds the trainable leaves only: a small fraction of the base's bytes.
  n_base = sum(np.asarray(x).nbytes for x in jax.tree.leaves(base_params))
  assert os.path.getsize(os.path.join(ft, DELTA_FILE)) < 0.1 * n_base


def test_a_different_base_is_refused(base_and_finetune, tmp_path):
  _, base, ft = base_and_finetune
  ref = json.load(open(os.path.join(ft, PEFT_FILE)))
  _, base_params = load_trained(base)
  other = jax.tree.map(lambda x: x + 1e-3, base_params)
  with pytest.raises(WdmjaxError, match="not the base this fine-tune was trained on"):
    apply_delta(os.path.join(ft, DELTA_FILE), other, ref)
  # The workdir's own loading checks its base too: point it at another trained model.
  other_base = str(tmp_path / "other")
  train(load_config(TINY_DIT, ["train.steps=2", "train.seed=7"]), other_base, progress=False)
  copy = str(tmp_path / "copy")  # the same checkpoints, peft.json pointing at other_base
  os.makedirs(copy)
  for name in ("config.json", "checkpoints"):
    os.symlink(os.path.join(ft, name), os.path.join(copy, name))
  json.dump({**ref, "base": other_base}, open(os.path.join(copy, PEFT_FILE), "w"))
  with pytest.raises(WdmjaxError, match="not the base"):
    load_model(copy)
  with pytest.raises(WdmjaxError, match="holds a fine-tune"):  # the engine alone cannot
    load_trained(copy)


def test_cli_params_and_finetune(base_and_finetune):
  root, base, _ = base_and_finetune
  r = run_cli("params", "--config", TINY_DIT, "--peft", "bitfit", "--json")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert set(out) == {"trainable", "total", "fraction"} and 0 < out["fraction"] < 0.05
  r = run_cli("finetune", "--base", base, "--workdir", str(root / "bad"), "--peft", "difffit",
              "--set", "model.width=64", "--steps", "2", "--no-progress")
  assert r.returncode == 2 and "model.width: expected the base's value 32" in r.stderr
  assert "Traceback" not in r.stderr and not (root / "bad").exists()


def test_cli_finetune_and_a_difffit_watermark(base_and_finetune):
  """`finetune` and `embed --peft difffit` leave deltas that the other commands load."""
  root, base, _ = base_and_finetune
  ft = str(root / "cli_bitfit")
  r = run_cli("finetune", "--base", base, "--workdir", ft, "--peft", "bitfit", "--steps", "3",
              "--no-progress")
  assert r.returncode == 0, r.stderr
  assert "delta" in r.stdout and os.path.exists(os.path.join(ft, DELTA_FILE))
  assert json.load(open(os.path.join(ft, "config.json")))["train"]["lr"] == pytest.approx(1e-2)
  wm = str(root / "cli_wdm")
  r = run_cli("embed", "--base", base, "--workdir", wm, "--peft", "difffit", "--trigger",
              "random:1", "--watermark", "keyed:2", "--key", "5", "--block", "2", "--steps",
              "3", "--no-progress")
  assert r.returncode == 0, r.stderr
  assert json.load(open(os.path.join(wm, PEFT_FILE)))["strategy"] == "difffit"
  r = run_cli("verify", "--workdir", wm, "--json", "--num", "2", "--steps", "3")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["test"] == "exact-binomial"
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", str(root / "x"), "--peft", "difffit",
              "--trigger", "random:1", "--watermark", "keyed:2", "--key", "5", "--steps", "2")
  assert r.returncode == 2 and "--peft: expected a base workdir" in r.stderr


@pytest.mark.parametrize("strategy", ["lora", "difffit"])
def test_a_saved_delta_applies_onto_its_base_for_every_layout(strategy, tmp_path):
  """The delta file round trip, LoRA included (its adapters are keyed by kernel path)."""
  from wdmjax.peft import combine_params, reference, save_delta
  base = init_params(build_model(TINY), jax.random.PRNGKey(0))
  spec = PeftSpec(strategy)
  trainable, frozen, _, combine = prepare(spec, base, jax.random.PRNGKey(1))
  trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # a trained delta is not at init
  path = save_delta(trainable, str(tmp_path / "delta.npz"))
  got = apply_delta(path, base, reference(spec, "base", base, trainable, frozen))
  want = combine_params(trainable, frozen, spec.lora_alpha)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    if strategy == "difffit":  # leaves copied as they are: bit for bit
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:  # W + s B A folded by two compiled paths: equal to float32 rounding (1 ulp seen)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
