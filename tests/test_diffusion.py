"""The diffusion engine: schedules, objectives, DDPM and DDIM samplers, guidance."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax import diffusion as d
from wdmjax.errors import WdmjaxError

SHAPE = (3, 4, 4, 1)


@pytest.fixture(scope="module")
def schedule():
  return d.make_schedule("linear", 200)


def oracle(schedule, x0_value):
  """A denoiser that knows the data is the constant x0_value: predicts eps exactly."""
  return lambda x, t: d.eps_from_x0(schedule, jnp.full_like(x, x0_value), x, t)


def test_linear_schedule_endpoints():
  s = d.make_schedule("linear", 1000)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  assert float(s.alphas_cumprod[-1]) < 1e-4  # x_T is pure noise
  c = d.make_schedule("cosine", 1000)
  assert np.all(np.diff(np.asarray(c.alphas_cumprod)) < 0)


@pytest.mark.parametrize("objective", d.OBJECTIVES)
def test_objective_conversions_recover_x0_and_eps(schedule, objective):
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, SHAPE, minval=-1, maxval=1)
  eps = jax.random.normal(k2, SHAPE)
  t = jnp.array([0, 50, 199])
  xt = d.q_sample(schedule, x0, t, eps)
  out = d.target(objective, schedule, x0, eps, t)
  x0_hat, eps_hat = d.to_x0_eps(objective, schedule, out, xt, t)
  # x0 from eps divides by sqrt(abar_T) ~ 0.1 at t = 199: allow float32 error accordingly.
  np.testing.assert_allclose(x0_hat, x0, atol=5e-5)
  np.testing.assert_allclose(eps_hat, eps, atol=5e-5)


def test_q_posterior_mean_is_between_x0_and_xt(schedule):
  x0, xt = jnp.zeros(SHAPE), jnp.ones(SHAPE)
  mean, var, _ = d.q_posterior(schedule, x0, xt, jnp.array([1, 100, 199]))
  assert np.all((mean > 0) & (mean < 1)) and np.all(var > 0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_samplers_with_oracle_return_the_data(schedule, sampler):
  x_T = jax.random.normal(jax.random.key(1), SHAPE)
  if sampler == "ddim":
    x = d.ddim_sample(oracle(schedule, 0.3), schedule, x_T, steps=20)
  else:
    x = d.ddpm_sample(oracle(schedule, 0.3), schedule, x_T, jax.random.key(2), steps=200)
  np.testing.assert_allclose(x, 0.3, atol=1e-3)


def test_ddim_eta0_is_deterministic(schedule):
  # A smooth denoiser whose x0 estimate 0.5 tanh(x_t) stays inside the clipping range.
  den = lambda x, t: d.eps_from_x0(schedule, 0.5 * jnp.tanh(x), x, t)
  x_T = jax.random.normal(jax.random.key(1), SHAPE)
  f = jax.jit(lambda x, k: d.ddim_sample(den, schedule, x, k, steps=25, eta=0.0))
  a = f(x_T, jax.random.key(5))
  b = f(x_T, jax.random.key(6))  # a different noise key must not matter at eta = 0
  np.testing.assert_array_equal(a, b)
  c = d.ddim_sample(den, schedule, x_T, jax.random.key(5), steps=25, eta=1.0)
  assert not np.allclose(a, c)


def test_ddpm_fixed_noise_array_is_bitwise_reproducible(schedule):
  den = lambda x, t: 0.1 * x
  x_T = jax.random.normal(jax.random.key(1), SHAPE)
  noise = jax.random.normal(jax.random.key(2), (10,) + SHAPE)
  f = jax.jit(lambda x, n: d.ddpm_sample(den, schedule, x, n, steps=10))
  a, b = np.asarray(f(x_T, noise)), np.asarray(f(x_T, noise))
  assert a.tobytes() == b.tobytes()
  c = f(x_T, noise.at[3].add(1.0))  # the stream is really used
  assert not np.allclose(a, c)


def test_noise_array_of_wrong_shape_is_a_clear_error(schedule):
  with pytest.raises(WdmjaxError, match="noise: expected"):
    d.ddpm_sample(lambda x, t: x, schedule, jnp.zeros(SHAPE), jnp.zeros((3,) + SHAPE), steps=10)


def test_input_transform_is_fed_to_the_network_only(schedule):
  # An x0-predicting identity network: one DDIM step returns exactly what it was fed.
  tau = jnp.full(SHAPE, 0.5)
  den = lambda x_in, t: x_in
  x_T = jnp.full(SHAPE, 0.6)
  plain = d.ddim_sample(den, schedule, x_T, steps=1, objective="x0")
  shifted = d.ddim_sample(den, schedule, x_T, steps=1, objective="x0",
                          input_transform=lambda x, t: 0.8 * x + 0.2 * tau)
  np.testing.assert_allclose(plain, 0.6, atol=1e-6)
  np.testing.assert_allclose(shifted, 0.8 * 0.6 + 0.2 * 0.5, atol=1e-6)


def test_respaced_timesteps():
  ts = d.respaced_timesteps(1000, 50)
  assert ts[0] == 0 and ts[-1] == 999 and len(np.unique(ts)) == 50
  with pytest.raises(WdmjaxError, match="steps"):
    d.respaced_timesteps(1000, 1001)


def test_classifier_free_guidance_mixes_outputs():
  def model_fn(params, x, t, y):  # 2 when conditioned, 1 for the null class
    return jnp.where((y >= 0)[:, None, None, None], 2.0, 1.0) * jnp.ones_like(x)

  den = d.guided_model_fn(model_fn, None, jnp.array([3, 4]), 3.0, -1)
  out = den(jnp.zeros((2, 2, 2, 1)), jnp.zeros((2,), jnp.int32))
  np.testing.assert_allclose(out, 1.0 + 3.0 * (2.0 - 1.0))


def test_diffusion_loss_is_zero_for_the_oracle(schedule):
  """The eps loss of a network that outputs the true noise is 0 (up to float error)."""
  x0 = jnp.full((4, 4, 4, 1), 0.3)

  def apply(params, xt, t, y, rng, train):
    return d.eps_from_x0(schedule, x0, xt, t)

  loss, metrics = d.diffusion_loss(apply, schedule, "eps")(None, {"image": x0}, jax.random.key(0))
  assert float(loss) < 1e-8
  chex.assert_shape(metrics["loss"], ())


def test_ddim_steps_walk_down_the_respaced_timesteps(schedule):
  """Each DDIM step must move from t_i to t_{i-1}: record the timesteps the network sees."""
  seen = []

  def den(x, t):
    jax.debug.callback(lambda tt: seen.append(int(tt[0])), t)
    return jnp.zeros_like(x)

  d.ddim_sample(den, schedule, jnp.zeros(SHAPE), steps=5)
  assert seen == sorted(d.respaced_timesteps(200, 5).tolist(), reverse=True)


def test_stochastic_samplers_land_on_the_oracle_data(schedule):
  """With a perfect denoiser for x0 = 0 and no clipping, two stochastic steps end on x0."""
  x_T = jax.random.normal(jax.random.key(3), (4000, 1, 1, 1))
  den = oracle(schedule, 0.0)
  a = d.ddim_sample(den, schedule, x_T, jax.random.key(4), steps=2, eta=1.0, clip_denoised=False)
  b = d.ddpm_sample(den, schedule, x_T, jax.random.key(4), steps=2, clip_denoised=False,
                    variance="fixed_small")
  np.testing.assert_allclose(a, 0.0, atol=1e-4)  # the last step lands on x0 = 0 exactly
  np.testing.assert_allclose(b, 0.0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_jitted_sample_entry_point_runs_both_samplers(schedule, sampler):
  """`sample` jits over the schedule and params: both samplers must trace with them."""
  def model_fn(params, x, t, y):
    return d.eps_from_x0(schedule, jnp.full_like(x, params), x, t)

  x = d.sample(model_fn, jnp.float32(0.25), jax.random.key(0), schedule, shape=SHAPE,
               sampler=sampler, steps=20)
  np.testing.assert_allclose(x, 0.25, atol=1e-3)
