"""Stable Signature's parts: HiDDeN encoder and extractor, PCA whitening, exact detection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax.errors import WdmjaxError
from wdmjax.signature import (
  HiddenEncoder,
  HiddenExtractor,
  detect,
  embed,
  fit_whitening,
  identify_users,
  message_bits,
  whiten,
)
from wdmjax.signature.finetune import clip_into_range

K = 8


@pytest.fixture(scope="module")
def extractor():
  model = HiddenExtractor(num_bits=K, channels=8, depth=2)
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
  variables = model.init(jax.random.key(1), images)
  return model, variables, jax.jit(lambda v, x: model.apply(v, x))


def test_encoder_gives_a_bounded_residual_and_the_extractor_k_logits(extractor):
  enc = HiddenEncoder(num_bits=K, channels=8, depth=2)
  images = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3), minval=-1, maxval=1)
  bits = message_bits(jax.random.key(3), K, num_users=4)
  v = enc.init(jax.random.key(4), images, bits)
  residual, updates = enc.apply(v, images, bits, train=True, mutable=["batch_stats"])
  assert residual.shape == images.shape and float(jnp.abs(residual).max()) <= 1.0
  assert "batch_stats" in updates
  signed = embed(images, residual, 0.1)
  assert float(jnp.abs(signed - images).max()) <= 0.1 + 1e-6
  model, variables, apply = extractor
  assert apply(variables, signed).shape == (4, K)


def test_whitening_decorrelates_held_out_clean_logits(extractor):
  model, variables, apply = extractor
  # Clean images: smooth random fields, so the untrained extractor's logits are correlated.
  keys = jax.random.split(jax.random.key(5), 2)
  fields = [jax.image.resize(jax.random.normal(k, (1200, 4, 4, 3)), (1200, 16, 16, 3),
                             "linear") for k in keys]
  fit_logits, held_logits = (apply(variables, jnp.tanh(f)) for f in fields)
  raw = np.corrcoef(np.asarray(held_logits), rowvar=False)
  assert np.abs(raw - np.eye(K)).max() > 0.3  # correlated before: the test has work to do
  w = fit_whitening(fit_logits)
  cov = np.cov(np.asarray(whiten(w, held_logits)), rowvar=False)
  assert np.abs(cov - np.eye(K)).max() < 0.2, cov


def test_detection_is_the_exact_binomial_test():
  message = message_bits(jax.random.key(6), 48)
  logits = jnp.where(message == 1, 3.0, -3.0)[None].repeat(3, 0)
  logits = logits.at[1, :7].multiply(-1).at[2, :8].multiply(-1)  # 41 and 40 agreeing bits
  d = detect(logits, message, fpr=1e-6)
  assert int(d.threshold) == 41
  np.testing.assert_array_equal(d.agreeing, [48, 41, 40])
  np.testing.assert_array_equal(d.detected, [True, True, False])
  assert float(d.log10_p[1]) == pytest.approx(np.log10(3.1e-7), abs=0.02)
  # Unsigned images: each bit a fair coin; at 1e-6 none of 2,000 is detected.
  random_logits = jax.random.normal(jax.random.key(7), (2000, 48))
  assert int(detect(random_logits, message).detected.sum()) == 0


def test_identification_finds_the_user_and_tightens_the_threshold():
  messages = message_bits(jax.random.key(8), 48, num_users=100)
  logits = jnp.where(messages[7] == 1, 1.0, -1.0).at[:3].multiply(-1)[None]
  ident = identify_users(logits, messages, fpr=1e-6)
  assert int(ident.best[0]) == 7 and bool(ident.identified[0])
  assert int(ident.threshold[0]) > 41  # fpr / 100 per user


@pytest.mark.parametrize("call, start", [
  (lambda: fit_whitening(jnp.ones((8, K))), "logits:"),
  (lambda: fit_whitening(jnp.full((20, K), jnp.nan)), "logits:"),
  (lambda: detect(jnp.ones((2, 48)), jnp.ones(47, jnp.int32)), "message:"),
  (lambda: detect(jnp.ones((2, 48)), jnp.ones(48, jnp.int32), fpr=0.0), "fpr:"),
  (lambda: identify_users(jnp.ones((2, 48)), jnp.ones((3, 32), jnp.int32)), "messages:"),
  (lambda: HiddenEncoder(num_bits=K).init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)),
                                           jnp.zeros((2, K + 1))), "bits:"),
  (lambda: HiddenExtractor(num_bits=K).init(jax.random.key(0), jnp.zeros((8, 8, 3))),
   "images:"),
])
def test_bad_inputs_name_the_argument(call, start):
  with pytest.raises(WdmjaxError) as e:
    call()
  assert str(e.value).startswith(start) and "\n" not in str(e.value)


def test_grid_pooling_reads_k_logits_and_a_bad_pool_is_refused():
  from wdmjax.signature.pretrain import init_hidden

  h = init_hidden(jax.random.key(0), (16, 16, 1), K, channels=4, encoder_depth=1,
                  extractor_depth=1, pool=4)
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 1), minval=-1, maxval=1)
  assert h.extract(x).shape == (3, K)
  # The linear layer reads every cell: 4 x 4 cells of max(channels, k) features.
  assert h.extractor_vars["params"]["Dense_0"]["kernel"].shape == (16 * K, K)
  for bad in (0, 17, 2.0):
    with pytest.raises(WdmjaxError, match="pool"):
      init_hidden(jax.random.key(0), (16, 16, 1), K, pool=bad)


def test_decoder_outputs_are_read_clipped_and_only_pulled_back_into_range():
  """Fine-tuning reads images as delivered (clipped); the gradient of a clipped pixel passes
  only when a descent step moves it back towards [-1, 1]."""
  x = jnp.array([1.5, 1.5, -1.5, -1.5, 0.5])
  w = jnp.array([-1.0, 1.0, 1.0, -1.0, 2.0])  # d loss / d output
  np.testing.assert_array_equal(clip_into_range(x), jnp.clip(x, -1.0, 1.0))
  g = jax.grad(lambda v: jnp.sum(w * clip_into_range(v)))(x)
  # 1.5 pushed up (descent raises it) and -1.5 pushed down: cut; pulled back: passed.
  np.testing.assert_array_equal(g, jnp.array([0.0, 1.0, 0.0, -1.0, 2.0]))
