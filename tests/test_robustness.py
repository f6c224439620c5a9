"""Local-robustness estimators against Monte Carlo, on a linear classifier (where the Taylor
estimate is exact) and on the shipped LeNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax.data import mnist5k_split
from wdmjax.errors import WdmjaxError
from wdmjax.models import pretrained_lenet
from wdmjax.robustness import METHODS, most_vulnerable, p_robust, robustness_by_class


def linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


@pytest.fixture(scope="module")
def linear():
  rng = np.random.default_rng(0)
  d, k = 12, 5
  params = {"w": jnp.asarray(rng.normal(size=(d, k)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=k) * 0.1, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(6, d)) * 0.3, jnp.float32)
  return params, x


def test_taylor_is_exact_for_a_linear_classifier(linear):
  params, x = linear
  sigma, n = 0.3, 10**6
  key = jax.random.PRNGKey(0)
  mc = np.asarray(p_robust(linear_apply, params, x, sigma, "monte_carlo", key,
                           num_samples=n, chunk=20_000))
  taylor = np.asarray(p_robust(linear_apply, params, x, sigma, "taylor", key,
                               mvn_points=4096))
  assert 0.05 < mc.min() and mc.max() < 0.999  # the noise matters: a test that can fail
  stderr = np.sqrt(mc * (1 - mc) / n)
  np.testing.assert_array_less(np.abs(taylor - mc), 3 * stderr + 5e-4)
  # The smoothed margins of a linear classifier are its margins: with many noisy copies (the
  # noise of their mean shifts z by about 1 / sqrt(num_noisy)) mmse agrees with taylor.
  mmse = np.asarray(p_robust(linear_apply, params, x, sigma, "mmse", key, num_noisy=4096))
  np.testing.assert_allclose(mmse, taylor, atol=0.03)


def test_estimators_on_lenet_track_monte_carlo():
  model, params = pretrained_lenet()

  def apply(p, x):
    return model.apply({"params": p}, x)

  _, _, x, y = mnist5k_split()
  x = jnp.asarray(x[:16])
  key = jax.random.PRNGKey(0)
  mc = np.asarray(p_robust(apply, params, x, 0.2, "monte_carlo", key, num_samples=2000))
  for method in ("taylor", "mmse", "mv_sigmoid"):
    p = np.asarray(p_robust(apply, params, x, 0.2, method, key))
    assert p.shape == (16,) and np.all((p >= 0) & (p <= 1))
    assert np.abs(p - mc).mean() < 0.15, method
  mmse = np.asarray(p_robust(apply, params, x, 0.2, "mmse", key))
  assert np.abs(mmse - mc).mean() < 0.05
  means, bias = robustness_by_class(mc, y[:16], 10)
  assert means.shape == (10,) and float(bias) >= 0
  worst = np.asarray(most_vulnerable(mc, 3))
  assert mc[worst[0]] == mc.min() and len(set(worst.tolist())) == 3


def test_bad_robustness_arguments_give_clear_errors(linear):
  params, x = linear
  key = jax.random.PRNGKey(0)
  with pytest.raises(WdmjaxError, match="sigma"):
    p_robust(linear_apply, params, x, 0.0, "taylor", key)
  with pytest.raises(WdmjaxError, match="method"):
    p_robust(linear_apply, params, x, 0.1, "exact", key)
  with pytest.raises(WdmjaxError, match="key"):
    p_robust(linear_apply, params, x, 0.1, "taylor")
  with pytest.raises(WdmjaxError, match="k: expected"):
    most_vulnerable(jnp.ones(4), 5)
  assert set(METHODS) == {"monte_carlo", "taylor", "mmse", "mv_sigmoid"}
