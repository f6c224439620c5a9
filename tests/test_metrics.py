"""Tests of wdmjax.metrics: Frechet distance closed forms, the digit classifier, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax import data
from wdmjax.errors import WdmjaxError
from wdmjax.metrics import (
  ClassifierState,
  DigitClassifier,
  classifier_accuracy,
  classifier_features,
  classifier_logits,
  frechet_distance,
  frechet_distance_from_features,
  gaussian_stats,
  train_classifier,
)

N_TRAIN = 1000  # of the 1,797 8x8 digits; the rest are held out


def _random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / (rank or d)


def _rotation(rng: np.random.Generator, d: int) -> np.ndarray:
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return q


# --- Frechet distance -------------------------------------------------------------------------


def test_gaussian_stats_are_float64_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
  mu, sigma = gaussian_stats(x)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  assert mu.shape == (3,) and sigma.shape == (3, 3)
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
  mu1, sigma1 = gaussian_stats(x[:, :1])
  assert mu1.shape == (1,) and sigma1.shape == (1, 1)


def test_frechet_distance_is_zero_for_identical_stats():
  rng = np.random.default_rng(1)
  mu, sigma = rng.normal(size=6), _random_psd(rng, 6)
  assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
  singular = _random_psd(rng, 6, rank=2)
  assert frechet_distance(mu, singular, mu, singular) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5),
                                            (3.0, 0.1, 3.0, 4.0), (0.0, 0.0, 2.0, 1.0)])
def test_frechet_distance_1d_closed_form(m1, s1, m2, s2):
  got = frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]])
  assert isinstance(got, float)
  assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-10, abs=1e-12)


def test_frechet_distance_commuting_covariances_closed_form():
  # Shared eigenvectors: Tr((S1 S2)^{1/2}) = sum sqrt(a_i b_i).
  rng = np.random.default_rng(2)
  q = _rotation(rng, 5)
  a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.0, 3.0, 5)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_eigenvalues_of_product():
  # For full-rank covariances the eigenvalues of S1 S2 are real and positive.
  rng = np.random.default_rng(3)
  s1, s2 = _random_psd(rng, 8) + 0.1 * np.eye(8), _random_psd(rng, 8) + 0.1 * np.eye(8)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric():
  rng = np.random.default_rng(4)
  s1, s2 = _random_psd(rng, 7), _random_psd(rng, 7, rank=3)
  mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
  d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
  assert d12 > 0 and d12 == pytest.approx(d21, rel=1e-9)
  a, b = rng.normal(size=(40, 4)), rng.normal(size=(60, 4)) * 2
  assert frechet_distance_from_features(a, b) == pytest.approx(
      frechet_distance_from_features(b, a), rel=1e-9)


def test_frechet_distance_grows_with_shift():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(200, 16))
  direction = rng.normal(size=16)
  dists = [frechet_distance_from_features(a, a + t * direction) for t in (0.0, 0.5, 1.0, 2.0)]
  assert dists[0] == pytest.approx(0.0, abs=1e-8)
  assert all(x < y for x, y in zip(dists, dists[1:], strict=False))
  # A pure shift leaves the covariance alone, so the distance is exactly ||shift||^2.
  assert dists[3] == pytest.approx(4.0 * direction @ direction, rel=1e-9)


def test_frechet_distance_is_finite_for_rank_deficient_features():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(5, 32)), rng.normal(size=(4, 32)) + 1.0  # N < D: singular
  got = frechet_distance_from_features(a, b)
  assert np.isfinite(got) and got > 0


@pytest.mark.parametrize("call, name", [
    (lambda: gaussian_stats(np.zeros(5)), "features"),
    (lambda: gaussian_stats(np.zeros((1, 3))), "features"),
    (lambda: gaussian_stats(np.full((4, 2), np.nan)), "features"),
    (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), "mu2"),
    (lambda: frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)), "sigma1"),
    (lambda: frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)), "sigma2"),
    (lambda: frechet_distance(np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1"),
    (lambda: frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2)), "sigma1"),
    (lambda: frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), [[1, 1], [0, 1]]), "sigma2"),
    (lambda: frechet_distance_from_features(np.zeros((4, 3)), np.zeros((4, 2))), "b"),
    (lambda: frechet_distance_from_features(np.zeros((1, 3)), np.zeros((4, 3))), "a"),
])
def test_frechet_bad_inputs_name_the_argument(call, name):
  with pytest.raises(WdmjaxError, match=rf"^{name}: expected"):
    call()


# --- classifier -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(data_dir):
  """The 8x8 digits as float32 [N, 8, 8, 1] in [-1, 1], split into train and held-out."""
  images, labels = data.load_arrays("digits", "train", data_dir)
  x = data.preprocess(images, 8, 1)
  perm = np.random.default_rng(0).permutation(len(x))
  tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
  return x[tr], labels[tr], x[te], labels[te]


@pytest.fixture(scope="module")
def trained(digits):
  x_train, y_train, _, _ = digits
  return train_classifier(x_train, y_train, jax.random.key(0), steps=300, batch_size=64)


def test_classifier_beats_85_percent_on_held_out_digits(digits, trained):
  _, _, x_test, y_test = digits
  model, params = trained
  assert isinstance(trained, ClassifierState) and isinstance(model, DigitClassifier)
  assert classifier_accuracy(model, params, x_test, y_test) > 0.85


def test_classifier_features_are_batch_independent(digits, trained):
  _, _, x_test, _ = digits
  model, params = trained
  feats = classifier_features(model, params, x_test)
  assert feats.shape == (len(x_test), model.feature_dim) and feats.dtype == np.float32
  assert np.isfinite(feats).all() and (feats >= 0).all()  # post-ReLU
  np.testing.assert_allclose(classifier_features(model, params, x_test[:50], batch_size=16),
                             feats[:50], rtol=1e-5, atol=1e-5)
  assert classifier_logits(model, params, x_test[:3]).shape == (3, model.num_classes)


def test_classifier_fid_grows_with_noise_and_lost_structure(digits, trained):
  _, _, x_test, _ = digits
  model, params = trained
  half = len(x_test) // 2
  real_a = classifier_features(model, params, x_test[:half])
  x_b = x_test[half:]
  rng = np.random.default_rng(1)
  dists = [frechet_distance_from_features(real_a, classifier_features(model, params, x_b))]
  for std in (0.25, 0.5, 1.0):
    noised = np.clip(x_b + rng.normal(0.0, std, x_b.shape).astype(np.float32), -1.0, 1.0)
    dists.append(frechet_distance_from_features(real_a, classifier_features(model, params, noised)))
  assert all(x < y for x, y in zip(dists, dists[1:], strict=False)), dists
  shuffled = rng.permuted(x_b.reshape(len(x_b), -1), axis=1).reshape(x_b.shape)
  shuffled_dist = frechet_distance_from_features(
      real_a, classifier_features(model, params, shuffled))
  assert shuffled_dist > 10 * dists[0], (shuffled_dist, dists[0])


def test_train_classifier_is_a_function_of_its_key(digits):
  x_train, y_train, _, _ = digits
  runs = [train_classifier(x_train[:64], y_train[:64], jax.random.key(k), steps=3).params
          for k in (7, 7, 8)]
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), runs[0], runs[1])
  assert all(jax.tree.leaves(same))
  assert not np.array_equal(runs[0]["logits"]["kernel"], runs[2]["logits"]["kernel"])


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 10, 10, 3), (2, 32, 32, 3), (2, 4, 4, 2)])
def test_classifier_accepts_any_small_size_and_channels(shape):
  model = DigitClassifier(feature_dim=64)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
  logits = jax.eval_shape(model.apply, variables, x)
  assert feats.shape == (2, 64) and logits.shape == (2, 10)


def test_classifier_bad_inputs_name_the_argument(digits, trained):
  x_train, y_train, x_test, y_test = digits
  model, params = trained
  key = jax.random.key(0)
  cases = [
      (lambda: train_classifier((x_train * 127.5 + 127.5).astype(np.uint8), y_train, key),
       "images"),
      (lambda: train_classifier(x_train * 255, y_train, key), "images"),
      (lambda: train_classifier(x_train[0], y_train, key), "images"),
      (lambda: train_classifier(x_train[:, :2, :2], y_train, key), "images"),
      (lambda: train_classifier(x_train, y_train[:-1], key), "labels"),
      (lambda: train_classifier(x_train, y_train + 10, key), "labels"),
      (lambda: train_classifier(x_train, y_train.astype(np.float32), key), "labels"),
      (lambda: train_classifier(x_train, y_train, 0), "rng"),
      (lambda: train_classifier(x_train, y_train, key, steps=0), "steps"),
      (lambda: train_classifier(x_train, y_train, key, batch_size=-1), "batch_size"),
      (lambda: train_classifier(x_train, y_train, key, lr=0.0), "lr"),
      (lambda: train_classifier(x_train, y_train, key, conv_widths=()), "conv_widths"),
      (lambda: classifier_features(model, params, np.zeros((2, 16, 16, 1), np.float32)),
       "images"),
      (lambda: classifier_features(model, params, np.zeros((2, 8, 8, 3), np.float32)),
       "images"),
      (lambda: classifier_features(model, params, x_test, batch_size=0), "batch_size"),
      (lambda: classifier_features(model, {"w": 1}, x_test), "params"),
      (lambda: classifier_accuracy(model, params, x_test, y_test[:5]), "labels"),
  ]
  for call, name in cases:
    with pytest.raises(WdmjaxError, match=rf"^{name}: expected"):
      call()


def test_psnr_and_ssim_match_scikit_image():
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity

  from wdmjax.metrics.quality import psnr, ssim

  rng = np.random.default_rng(0)
  a = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  a = (a + np.roll(a, 1, 1) + np.roll(a, 1, 2)) / 3  # some structure for SSIM to see
  b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1).astype(np.float32)
  ours_ssim = np.asarray(ssim(jnp.asarray(a * 2 - 1), jnp.asarray(b * 2 - 1)))
  ours_psnr = np.asarray(psnr(jnp.asarray(a * 2 - 1), jnp.asarray(b * 2 - 1)))
  for i in range(2):
    ref = structural_similarity(a[i], b[i], channel_axis=-1, data_range=1,
                                gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(ours_ssim[i] - ref) < 1e-4, (ours_ssim[i], ref)
    assert abs(ours_psnr[i] - peak_signal_noise_ratio(a[i], b[i], data_range=1)) < 1e-3
