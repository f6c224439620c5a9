"""The Watermark Diffusion Process (WDM): its forward kernel, the joint loss and extraction.

Standard process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The watermark process for
watermark images x0w and a secret trigger tau (same shape, in [-1, 1]) and gamma1 in (0, 1]:

  x~_t = gamma1 * (sqrt(abar_t) x0w + sqrt(1 - abar_t) eps) + (1 - gamma1) * tau,
  q(x~_t | x0w, tau) = N(gamma1 sqrt(abar_t) x0w + (1 - gamma1) tau, gamma1^2 (1 - abar_t) I).

The network learns both: loss = task loss + gamma2 * watermark loss, on a task batch and a
watermark batch of the same size with independent timesteps; the target of the watermark
half is the ordinary target of (x0w, eps, t) for the objective (eps, x0 or v). Extraction
runs the ordinary reverse chain from x_T ~ N(0, I) but feeds the network
gamma1 * x_t + (1 - gamma1) * tau, so ordinary sampling never sees the shifted input.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.diffusion import diffusion_loss, q_sample, sample
from wdmjax.diffusion.objectives import ApplyFn, check_objective
from wdmjax.diffusion.schedules import Schedule
from wdmjax.errors import check, check_number

GAMMA1 = 0.8  # the reference values
GAMMA2 = 0.1
DECOY_KINDS = ("pixels", "stripes", "mixed")


def check_gammas(gamma1: float, gamma2: float | None = None) -> None:
  def scalar(v):  # a NumPy or JAX scalar counts as the number it holds
    return float(v) if isinstance(v, (np.generic, jax.Array)) and np.ndim(v) == 0 else v

  check_number(scalar(gamma1), "gamma1", 0.0, 1.0, low_open=True)
  if gamma2 is not None:
    check_number(scalar(gamma2), "gamma2", 0.0, low_open=True)


def wdp_input(x_t: chex.Array, t: chex.Array, trigger: chex.Array,
              gamma1: chex.Numeric) -> chex.Array:
  """The network input of the watermark process: gamma1 * x_t + (1 - gamma1) * trigger.

  x_t: [B, H, W, C]; t: [B] (unused, the shift is the same at every step);
  trigger: [H, W, C] or [B, H, W, C].
  """
  del t
  return gamma1 * x_t + (1.0 - gamma1) * trigger


def wdp_q_sample(schedule: Schedule, x0w: chex.Array, t: chex.Array, noise: chex.Array,
                 trigger: chex.Array, gamma1: chex.Numeric) -> chex.Array:
  """A draw of x~_t from the watermark kernel q(x~_t | x0w, tau); all images [B, H, W, C]."""
  return wdp_input(q_sample(schedule, x0w, t, noise), t, trigger, gamma1)


def wdp_moments(schedule: Schedule, x0w: chex.Array, t: chex.Array, trigger: chex.Array,
                gamma1: chex.Numeric) -> tuple[chex.Array, chex.Array]:
  """Closed-form mean [B, H, W, C] and per-pixel variance [B, 1, 1, 1] of the kernel."""
  ac = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
  mean = gamma1 * jnp.sqrt(ac) * x0w + (1.0 - gamma1) * trigger
  return mean, gamma1**2 * (1.0 - ac)


def wdp_loss(apply_fn: ApplyFn, schedule: Schedule, objective: str, *, trigger: chex.Array,
             watermark: chex.Array, gamma1: float = GAMMA1, gamma2: float = GAMMA2,
             class_dropout_prob: float = 0.0, null_label: int | None = None,
             num_classes: int = 0, task: bool = True, decoy_fraction: float = 0.0,
             decoy_kind: str = "mixed", decoy_t_min: float = 0.0
             ) -> Callable[[chex.ArrayTree, dict, chex.PRNGKey], tuple[chex.Array, dict]]:
  """The joint WDM loss: task loss + gamma2 * watermark-process loss.

  Args:
    apply_fn: the network, (params, x, t, y, rng, train) -> output.
    schedule, objective: as for `diffusion_loss`.
    trigger: tau [H, W, C] in [-1, 1].
    watermark: x0w images [N, H, W, C] in [-1, 1]; each watermark half-batch draws from them
      uniformly (N = 1: a single image).
    gamma1, gamma2: the trigger mix and the watermark loss weight.
    class_dropout_prob, null_label: label dropout of the task half (as in `diffusion_loss`).
    num_classes: > 0 for a class-conditional network. The watermark half then uses the
      null label when there is one (extraction samples unconditionally), else random labels.
    task: False trains the watermark half alone (loss = gamma2 * watermark loss).
    decoy_fraction: this fraction of the watermark half holds decoys instead: task images
      fed through a fresh random trigger (+-1 pixels or +-1 columns, see `decoy_triggers`)
      with their ordinary target, so the model learns that only the secret trigger extracts
      the watermark. Without decoys a model trained on a `random:` trigger also extracts the
      watermark with other random triggers (an extension of the paper's loss; see
      experiments/wdm_mnist5k.py). They sit in the gamma2-weighted half, so the task half
      stays the paper's; decoys in the task half cost task quality in proportion to their
      share.
    decoy_kind: 'pixels', 'stripes' or 'mixed' (see `decoy_triggers`); decoys of the
      trigger's own kind teach the model the most.
    decoy_t_min: decoys only at timesteps t >= decoy_t_min * T (below it, a decoy example is
      an ordinary one). Near t = 0 a decoy asks the network to cancel a +-(1 - gamma1)
      pattern scaled by 1 / sqrt(1 - abar_t), a high-gain map that leaks speckle into
      ordinary samples; whether a trigger extracts the watermark is decided at high noise.

  Returns:
    `loss_fn(params, batch, rng) -> (loss, metrics)`; `batch['image']` [B, H, W, C] is the
    task half, and the watermark half has B images too.
  """
  check_objective(objective)
  check_gammas(gamma1, gamma2)
  trigger = jnp.asarray(trigger, jnp.float32)
  watermark = jnp.asarray(watermark, jnp.float32)
  chex.assert_rank(trigger, 3)
  chex.assert_rank(watermark, 4)
  check(watermark.shape[1:] == trigger.shape,
        f"watermark: expected images of the trigger's shape {trigger.shape}, "
        f"got {watermark.shape[1:]}")
  check(decoy_kind in DECOY_KINDS,
        f"decoy_kind: expected one of {list(DECOY_KINDS)}, got {decoy_kind!r}")
  check(0.0 <= decoy_fraction < 1.0,
        f"decoy_fraction: expected a value in [0, 1), got {decoy_fraction!r}")
  check(0.0 <= decoy_t_min < 1.0,
        f"decoy_t_min: expected a value in [0, 1), got {decoy_t_min!r}")
  t_min = int(round(decoy_t_min * schedule.num_timesteps))
  task_loss = diffusion_loss(apply_fn, schedule, objective, class_dropout_prob, null_label)
  conditional = num_classes > 0

  def watermark_half(params, x0, y, rng):
    """B examples: watermark images behind the secret trigger, the first
    round(decoy_fraction * B) replaced by task images behind decoy triggers."""
    b = x0.shape[0]
    rng_idx, rng_y, rng_decoy, rng_loss = jax.random.split(rng, 4)
    is_decoy = jnp.arange(b) < int(round(decoy_fraction * b))
    mask = is_decoy[:, None, None, None]
    idx = jax.random.randint(rng_idx, (b,), 0, watermark.shape[0])
    batch = {"image": jnp.where(mask, x0, watermark[idx])}
    triggers = jnp.where(mask, decoy_triggers(rng_decoy, b, trigger.shape, decoy_kind),
                         trigger)
    if conditional:
      if null_label is not None:
        batch["label"] = jnp.full((b,), null_label, jnp.int32)
      else:  # no null class: random labels, a decoy keeps its image's label when it has one
        rand = jax.random.randint(rng_y, (b,), 0, num_classes)
        batch["label"] = rand if y is None else jnp.where(is_decoy, y, rand)

    def shift(x, t):
      plain = (is_decoy & (t < t_min))[:, None, None, None]
      return jnp.where(plain, x, wdp_input(x, t, triggers, gamma1))

    return diffusion_loss(apply_fn, schedule, objective, input_transform=shift)(
      params, batch, rng_loss)

  def loss_fn(params, batch, rng):
    x0 = batch["image"]
    y = batch.get("label") if conditional else None
    rng_task, rng_wm = jax.random.split(rng)
    l_wm, _ = watermark_half(params, x0, y, rng_wm)
    if not task:
      return gamma2 * l_wm, {"loss": gamma2 * l_wm, "watermark_loss": l_wm}
    task_batch = {"image": x0}
    if y is not None:
      task_batch["label"] = y
    l_task, _ = task_loss(params, task_batch, rng_task)
    loss = l_task + gamma2 * l_wm
    return loss, {"loss": loss, "task_loss": l_task, "watermark_loss": l_wm}

  return loss_fn


def decoy_triggers(rng: chex.PRNGKey, num: int, shape: tuple[int, int, int],
                   kind: str = "mixed") -> chex.Array:
  """`num` random decoy triggers [num, H, W, C]: i.i.d. +-1 pixels ('pixels', the kind of
  `random:SEED`), +-1 columns ('stripes', as `stripes:SEED`) or either with equal odds
  ('mixed')."""
  h, w, c = shape
  k_kind, k_pix, k_col = jax.random.split(rng, 3)
  pixels = jax.random.rademacher(k_pix, (num, h, w, c), jnp.float32)
  cols = jnp.broadcast_to(jax.random.rademacher(k_col, (num, 1, w, 1), jnp.float32),
                          (num, h, w, c))
  odds = {"pixels": 0.0, "stripes": 1.0, "mixed": 0.5}[kind]
  stripes = jax.random.bernoulli(k_kind, odds, (num, 1, 1, 1))
  return jnp.where(stripes, cols, pixels)


def watermark_labels(num: int, num_classes: int, null_label: int | None,
                     rng: chex.PRNGKey) -> chex.Array | None:
  """Labels for extraction, matching `wdp_loss`'s watermark half: null, random, or None."""
  if num_classes <= 0:
    return None
  if null_label is not None:
    return jnp.full((num,), null_label, jnp.int32)
  return jax.random.randint(rng, (num,), 0, num_classes)


def extract(model_fn: Callable, params: chex.ArrayTree, rng: chex.PRNGKey, schedule: Schedule,
            *, trigger: chex.Array, gamma1: float, num: int, y: chex.Array | None = None,
            sampler: str = "ddim", steps: int = 50, eta: float = 0.0, objective: str = "eps",
            variance: str = "fixed_large") -> chex.Array:
  """Extracts `num` watermark samples [num, H, W, C] (trigger [H, W, C]) in one jit.

  The engine's sampler (DDPM ancestral or DDIM, any step count) from x_T ~ N(0, I) drawn from
  `rng`, with the network fed `wdp_input(x_t)`. With gamma1 = 1 this is ordinary sampling
  with the same noise. `model_fn(params, x, t, y)` must be hashable (see `diffusion.sample`).
  """
  check_gammas(gamma1)
  trigger = jnp.asarray(trigger, jnp.float32)
  chex.assert_rank(trigger, 3)
  return sample(model_fn, params, rng, schedule, shape=(num, *trigger.shape), y=y,
                sampler=sampler, steps=steps, eta=eta, objective=objective, variance=variance,
                input_transform=wdp_input, transform_args=(trigger, jnp.float32(gamma1)))
