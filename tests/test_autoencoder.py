"""The small latent diffusion model: the KL autoencoder, its latent TFDS set, a latent DiT
trained on it by the engine, and images generated through (another) decoder."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import TINY_DIT, run_cli
from wdmjax import data, runs
from wdmjax.configs import load_config
from wdmjax.data.latents import prepare_ae_latents
from wdmjax.errors import WdmjaxError
from wdmjax.models.autoencoder import autoencoder_modules, init_autoencoder
from wdmjax.runs.autoencoder import AUTOENCODER_JSON, AUTOENCODER_NPZ, RECONSTRUCTIONS
from wdmjax.workdir import Workdir

CHANNELS = (8, 8)  # tiny: the shapes are the point, not the quality
AE_STEPS = 30
LDM_OVERRIDES = ["model.width=32", "model.depth=1", "model.num_heads=2",
                 "diffusion.num_timesteps=100", "train.steps=2", "train.batch_size=8",
                 "train.warmup_steps=0", "train.log_every=1", "train.ckpt_every=2",
                 "sample.steps=4"]


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
  """An autoencoder workdir (30 tiny steps on mnist5k) and its result."""
  workdir = str(tmp_path_factory.mktemp("ae") / "ae")
  r = runs.train_autoencoder(workdir, "mnist5k", steps=AE_STEPS, batch_size=8,
                             channels=CHANNELS, progress=False)
  return r


@pytest.fixture(scope="module")
def ldm(ae, tmp_path_factory):
  """A latent DiT workdir: mnist5k_ldm at a tiny size, 2 steps on the autoencoder's latents."""
  workdir = str(tmp_path_factory.mktemp("ldm") / "ldm")
  runs.train("mnist5k_ldm", workdir, [*LDM_OVERRIDES, f"data.data_dir={ae.latents_data_dir}"],
             samples=False, progress=False)
  return workdir


def _listing(path) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), path)
                for d, _, files in os.walk(path) for f in files)


@pytest.mark.parametrize("shape, latent", [((28, 28, 1), (7, 7, 4)), ((32, 32, 3), (8, 8, 4))])
def test_encoder_downsamples_by_4_and_decoder_upsamples_back(shape, latent):
  encoder, decoder = autoencoder_modules(shape)  # the default channels (32, 64)
  params = jax.eval_shape(lambda k: init_autoencoder(k, shape), jax.random.key(0))
  assert set(params) == {"encoder", "decoder"}
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  mean, logvar = jax.eval_shape(lambda p, x: encoder.apply({"params": p}, x),
                                params["encoder"], x)
  assert mean.shape == logvar.shape == (2, *latent)
  # The decoder runs on its own tree alone: the two trees are separate.
  out = jax.eval_shape(lambda p, z: decoder.apply({"params": p}, z), params["decoder"], mean)
  assert out.shape == (2, *shape)


def test_logvar_is_clipped_and_a_bad_image_size_is_refused():
  # The fixture's shapes: the (slow to compile) initialisation is compiled once.
  encoder, _ = autoencoder_modules((28, 28, 1), CHANNELS)
  params = init_autoencoder(jax.random.key(0), (28, 28, 1), CHANNELS)
  params = jax.tree.map(lambda v: v * 1e4, params)  # huge outputs
  apply = jax.jit(lambda p, x: encoder.apply({"params": p}, x))
  _, logvar = apply(params["encoder"], jnp.ones((1, 28, 28, 1)))
  assert float(logvar.min()) == -30.0 or float(logvar.max()) == 20.0
  assert -30.0 <= float(logvar.min()) and float(logvar.max()) <= 20.0
  with pytest.raises(WdmjaxError, match=r"^x: expected \[B, H, W, C\] with H, W multiples of 4"):
    jax.eval_shape(apply, params["encoder"], jax.ShapeDtypeStruct((1, 30, 30, 1), jnp.float32))


def test_training_lowers_the_loss_and_writes_the_workdir(ae):
  meta = json.load(open(os.path.join(ae.workdir, AUTOENCODER_JSON)))
  losses = [h["loss"] for h in meta["history"]]
  assert len(losses) == AE_STEPS and losses[-1] < 0.8 * losses[0], losses
  assert meta["data"] == "mnist5k" and meta["image_shape"] == [28, 28, 1]
  assert meta["channels"] == list(CHANNELS) and meta["latent_channels"] == 4
  assert meta["scale"] == pytest.approx(ae.scale) and meta["psnr"] == pytest.approx(ae.psnr)
  assert 5 < ae.psnr < 40 and ae.num_latents == 5000
  assert ae.latents_name == "ae_latents/mnist5k"
  assert ae.latents_data_dir == os.path.join(ae.workdir, "tfds")
  for name in (AUTOENCODER_NPZ, RECONSTRUCTIONS):
    assert os.path.getsize(os.path.join(ae.workdir, name)) > 0
  with np.load(os.path.join(ae.workdir, AUTOENCODER_NPZ)) as z:
    assert {z[k].dtype for k in z.files} == {np.dtype(np.float32)}
  assert f"--set data.data_dir={ae.latents_data_dir}" in ae.train_command


def test_latent_set_holds_unit_variance_latents_of_every_image(ae):
  """The latents of the TFDS set are the scaled posterior means of the images, in order."""
  latents, labels = data.load_arrays("ae_latents/mnist5k", data_dir=ae.latents_data_dir)
  images, digit_labels = data.load_arrays("mnist5k")
  assert latents.shape == (5000, 7, 7, 4) and latents.dtype == np.float16
  np.testing.assert_array_equal(labels, digit_labels)
  assert abs(float(latents.astype(np.float32).std()) - 1.0) < 0.05
  model = runs.load_autoencoder(ae.workdir)
  x = images[:8].astype(np.float32) / 127.5 - 1.0
  z = model.encode(x)
  np.testing.assert_allclose(z, latents[:8].astype(np.float32), atol=2e-2, rtol=2e-3)
  z1, z2 = (model.encode(x, key=jax.random.key(1)) for _ in range(2))
  np.testing.assert_array_equal(z1, z2)  # a posterior sample is a function of its key
  assert not np.allclose(z1, z)


def test_decode_with_other_decoder_params(ae):
  model = runs.load_autoencoder(ae.workdir)
  assert model.data == "mnist5k" and model.image_shape == (28, 28, 1)
  assert model.latent_shape == (7, 7, 4) and model.path == ae.workdir
  z = np.random.default_rng(0).normal(size=(3, 7, 7, 4)).astype(np.float32)
  own = model.decode(z)
  assert own.shape == (3, 28, 28, 1) and own.min() >= -1 and own.max() <= 1
  np.testing.assert_array_equal(model.decode(z, model.params["decoder"]), own)
  other = jax.tree.map(lambda v: v * 0.5, model.params["decoder"])
  assert not np.allclose(model.decode(z, other), own)
  with pytest.raises(WdmjaxError, match=r"^decoder_params: expected the decoder's parameter"):
    model.decode(z, model.params["encoder"])
  with pytest.raises(WdmjaxError, match=r"^latents: expected \[N, 7, 7, 4\]"):
    model.decode(z[..., :3])


def test_generate_decodes_the_same_latents_through_any_decoder(ldm, ae, tmp_path):
  model = runs.ldm_autoencoder(ldm)
  assert model.path == ae.workdir
  out = str(tmp_path / "grid.png")
  a = runs.generate(ldm, 4, seed=3, out=out)
  assert a.images.shape == (4, 28, 28, 1) and a.latents.shape == (4, 7, 7, 4)
  assert a.images.min() >= -1 and a.images.max() <= 1 and os.path.getsize(out) > 0
  np.testing.assert_array_equal(a.labels, [0, 1, 2, 3])
  other = jax.tree.map(lambda v: v * 0.5, model.params["decoder"])
  b = runs.generate(ldm, 4, seed=3, decoder_params=other)
  np.testing.assert_array_equal(a.latents, b.latents)
  assert not np.allclose(a.images, b.images)
  # Latents are not clipped to [-1, 1] (unit-variance data): untrained, they spread wide.
  assert np.abs(a.latents).max() > 1.0
  c = runs.generate(ldm, 4, seed=3, labels=np.array([7, 7, 7, 7]))
  np.testing.assert_array_equal(c.labels, [7, 7, 7, 7])
  assert not np.allclose(c.latents, a.latents)
  with pytest.raises(WdmjaxError, match=r"^labels: expected \[num\] = \(4,\) integers in "
                                        r"\[0, 10\)"):
    runs.generate(ldm, 4, labels=np.array([0, 1, 2, 10]))


def test_unknown_data_and_an_existing_workdir_are_refused_with_nothing_written(ae, tmp_path):
  with pytest.raises(WdmjaxError, match=r"^data: expected one of \['mnist5k', 'photos32'\]"):
    runs.train_autoencoder(str(tmp_path / "new"), "cifar10", progress=False)
  assert not os.path.exists(tmp_path / "new")
  before = _listing(ae.workdir)
  with pytest.raises(WdmjaxError, match=r"^workdir: .* already holds an autoencoder"):
    runs.train_autoencoder(ae.workdir, "mnist5k", steps=1, progress=False)
  assert _listing(ae.workdir) == before


def test_a_failed_training_leaves_nothing(ae, tmp_path, monkeypatch):
  """A failure after the latent set and the params were written removes the new workdir."""
  import wdmjax.runs.autoencoder as mod

  params = runs.load_autoencoder(ae.workdir).params
  monkeypatch.setattr(mod, "_train_autoencoder", lambda *a, **k: (params, []))  # no compile

  def fail(*args, **kwargs):
    assert os.path.exists(tmp_path / "w" / "tfds" / "ae_latents")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(mod, "save_panels", fail)
  with pytest.raises(OSError, match="No space left"):
    runs.train_autoencoder(str(tmp_path / "w"), "mnist5k", steps=1, channels=CHANNELS,
                           progress=False)
  assert not os.path.exists(tmp_path / "w")


def test_a_rerun_after_a_kill_during_encoding_rebuilds_the_latent_set(ae, tmp_path,
                                                                     monkeypatch):
  """A SIGKILL while the latent set was being built leaves its shards, a part of the TFDS
  folder, perhaps the params, and no JSON (nor a released lock): the same command cleans
  them up and finishes, where it used to refuse the workdir forever."""
  import wdmjax.runs.autoencoder as mod

  params = runs.load_autoencoder(ae.workdir).params
  monkeypatch.setattr(mod, "_train_autoencoder", lambda *a, **k: (params, []))  # no compile
  w = tmp_path / "w"
  torn = w / "tfds" / "ae_latents" / "mnist5k" / "1.0.0.incomplete_ABC"
  torn.mkdir(parents=True)
  (torn / "ae_latents-train.array_record-00000-of-00001").write_bytes(b"torn")
  (w / "tfds" / "downloads").mkdir()
  (w / ".latent_shards_abc").mkdir()
  (w / ".latent_shards_abc" / "latents_000.npz").write_bytes(b"torn")
  (w / AUTOENCODER_NPZ).write_bytes(b"torn")
  (w / ".wdmjax.lock").write_text("999999\nwdmjax autoencoder train\n")  # its holder died
  r = runs.train_autoencoder(str(w), "mnist5k", steps=1, channels=CHANNELS, progress=False)
  assert r.num_latents == 5000
  assert sorted(os.listdir(w)) == [AUTOENCODER_JSON, AUTOENCODER_NPZ, RECONSTRUCTIONS, "tfds"]
  latents, _ = data.load_arrays("ae_latents/mnist5k", data_dir=r.latents_data_dir)
  assert latents.shape == (5000, 7, 7, 4)
  assert runs.load_autoencoder(str(w)).scale == pytest.approx(r.scale)
  # A tfds/ that the command did not make is someone else's: refused, left alone.
  other = tmp_path / "other"
  (other / "tfds" / "mnist").mkdir(parents=True)
  with pytest.raises(WdmjaxError, match=r"^workdir: .* holds a tfds/ that `autoencoder train` "
                                        r"did not make \(mnist\)"):
    runs.train_autoencoder(str(other), "mnist5k", steps=1, progress=False)
  assert os.listdir(other / "tfds") == ["mnist"]


def test_latents_that_are_not_finite_or_overflow_float16_are_refused(tmp_path, monkeypatch):
  for name, value, says in [("nan", np.nan, r"finite values, got NaN or inf in example 1"),
                            ("big", 1e5, r"values within float16's range \(\|x\| <= "
                                         r"65504\), got 100000")]:
    z, y = _shards(tmp_path / name, 3)
    z[1, 0, 0, 0] = value
    np.savez(tmp_path / name / "a.npz", latents=z, labels=y)
    with pytest.raises(WdmjaxError, match=rf"a.npz: array `latents`: expected {says}"):
      prepare_ae_latents(str(tmp_path / name), "mnist5k", str(tmp_path / "d"))
  assert not os.path.exists(tmp_path / "d")
  shards = tmp_path / "imagenet"  # the `latents` command: one line naming shard and array
  shards.mkdir()
  z = np.zeros((2, 32, 32, 4), np.float32)
  z[0, 1, 2, 3] = np.inf
  np.savez(shards / "s0.npz", latents=z, labels=np.zeros(2, np.int64))
  monkeypatch.chdir(tmp_path)
  r = run_cli("latents", "--npz-dir", shards, "--data-dir", tmp_path / "out")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "s0.npz: array `latents`: expected finite values" in r.stderr
  assert not os.path.exists(tmp_path / "out")


def test_an_ldm_workdir_needs_ae_latents_in_an_autoencoder_workdir(tmp_path, ae):
  wd = Workdir(tmp_path / "pixels")
  wd.write_config(load_config(TINY_DIT))  # a pixel-space model: no autoencoder
  with pytest.raises(WdmjaxError, match=r"^ldm_workdir: expected a latent diffusion model .* "
                                        r"got .* trained on 'digits'"):
    runs.generate(wd.path, 2)
  wd = Workdir(tmp_path / "elsewhere")  # latents in a data dir that is not <ae>/tfds
  wd.write_config(load_config("mnist5k_ldm", [f"data.data_dir={tmp_path / 'tfds'}"]))
  with pytest.raises(WdmjaxError, match=r"^ldm_workdir: expected data.data_dir = "
                                        r"<autoencoder workdir>/tfds"):
    runs.ldm_autoencoder(wd.path)
  with pytest.raises(WdmjaxError, match=r"^workdir: no autoencoder in"):
    runs.load_autoencoder(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["elsewhere", "pixels"]


def _shards(directory, n, r=7, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  z = rng.normal(size=(n, r, r, 4)).astype(np.float32)
  y = rng.integers(0, num_classes, n)
  np.savez(os.path.join(directory, "a.npz"), latents=z, labels=y)
  return z, y


def test_ae_latents_round_trip_through_tfds_and_the_pipeline(tmp_path):
  z, y = _shards(tmp_path / "npz", 6)
  builder = prepare_ae_latents(str(tmp_path / "npz"), "mnist5k", str(tmp_path / "tfds"))
  assert builder.info.splits["train"].num_examples == 6
  source = data.load_source("ae_latents/mnist5k", data_dir=str(tmp_path / "tfds"))
  assert source.num_classes == 10 and len(source) == 6
  latents, labels = data.load_arrays("ae_latents/mnist5k", data_dir=str(tmp_path / "tfds"))
  np.testing.assert_array_equal(latents, z.astype(np.float16))
  np.testing.assert_array_equal(labels, y)
  pipe = data.InputPipeline("ae_latents/mnist5k", 3, 7, 4, data_dir=str(tmp_path / "tfds"))
  assert pipe.batch(0)["image"].shape == (3, 7, 7, 4)


def test_bad_ae_latent_shards_and_names_are_refused(tmp_path):
  _shards(tmp_path / "wrong_r", 2, r=8)
  with pytest.raises(WdmjaxError, match=r"expected `latents` float \[N, 7, 7, 4\]"):
    prepare_ae_latents(str(tmp_path / "wrong_r"), "mnist5k", str(tmp_path / "d"))
  _shards(tmp_path / "label", 3, r=8, num_classes=2)  # photos32 has one class
  with pytest.raises(WdmjaxError, match=r"expected labels in \[0, 1\)"):
    prepare_ae_latents(str(tmp_path / "label"), "photos32", str(tmp_path / "d"))
  assert not os.path.exists(tmp_path / "d")
  with pytest.raises(WdmjaxError, match=r"expected one of \['ae_latents/mnist5k', "
                                        r"'ae_latents/photos32'\]"):
    data.load_source("ae_latents/cifar", data_dir=str(tmp_path / "d"))
  with pytest.raises(WdmjaxError, match=r"is not prepared .* `wdmjax autoencoder train"):
    data.load_source("ae_latents/mnist5k", data_dir=str(tmp_path / "d"))


def test_photos32_is_a_fixed_grid_of_rgb_crops_of_the_bundled_photos():
  from wdmjax.data.builders import PHOTO_CROP, grid_crops, read_photo

  images, labels = data.load_arrays("photos32")
  assert images.shape == (2126, 32, 32, 3) and images.dtype == np.uint8
  assert data.load_source("photos32").num_classes == 1 and not labels.any()
  china = read_photo("sklearn", "china")  # 427 x 640: 13 x 20 crops, the grid centred
  np.testing.assert_array_equal(images[0], china[5:37, 0:32])
  np.testing.assert_array_equal(images[:260], grid_crops(china, PHOTO_CROP))


@pytest.mark.parametrize("args, flag", [
    (["autoencoder", "train", "--workdir", "ae", "--data", "cifar10"], "--data"),
    (["autoencoder", "train", "--workdir", "ae", "--steps", "0"], "--steps"),
    (["autoencoder", "generate", "--ldm", "nowhere", "--num", "4"], "--ldm"),
    (["autoencoder", "generate", "--ldm", "nowhere", "--out", "g.jpg"], "--out"),
    (["autoencoder", "generate", "--ldm", "nowhere", "--num", "0"], "--num"),
    (["autoencoder", "train", "--workdir", "ae", "--steps", "100000000000"], "--steps"),
])
def test_cli_bad_input_is_one_line_naming_the_flag(args, flag, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  r = run_cli(*args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"wdmjax: error: {flag}: "), lines
  assert not r.stdout and not os.listdir(tmp_path)
