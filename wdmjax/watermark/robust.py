"""Embedding a WDM watermark that survives a thief's clean fine-tuning.

Fine-tuning-aware embedding (`finetune_aware_loss`): each embedding step also simulates the
thief. From the current weights theta it runs k updates of clean fine-tuning (the task loss
alone, a fresh optimizer: what `wdmjax attack finetune:N` does), theta -> theta_k, inside a
`lax.scan`, and adds the watermark loss at theta_k:

  L(theta) = L_task(theta) + gamma2 L_wm(theta) + weight * gamma2 L_wm(theta_k(theta)).

`order='first'` treats the displacement theta_k - theta as a constant (the gradient of the
last term is grad L_wm at theta_k, as in first-order MAML: k + 1 extra gradient
evaluations per step); `order='full'` differentiates through the k updates (second order,
as in MAML; a few times dearer). Either way the watermark is trained to hold at the point the
thief's first updates lead to, not only where the owner stops.

Gradient surgery (`surgery_loss`; PCGrad, Yu et al. 2020, "Gradient Surgery for Multi-Task
Learning"): the watermark's gradient loses its component along the task's gradient whenever
the two conflict. The joint loss can stop where grad L_task = -gamma2 grad L_wm, a compromise
at which the clean task's gradient points against the watermark and a thief's fresh
optimizer would follow it; with the conflicting component removed, a stationary point has
grad L_task = 0 (if g + gamma2 g_w' = 0 with g_w' orthogonal to g, then |g|^2 = 0). It costs
what the plain loss does (two half-batch gradients). On mnist5k the premise does not hold
(the watermarked model's mean task gradient is the base's, at cosine +0.07 with the
watermark's) and surgery does not help: experiments/results/wdm_finetune_robustness.md.

Task-Fisher anchoring (`fisher_diagonal`, `anchor_penalty`): a penalty
lambda sum_i F_i (theta_i - theta0_i)^2 with F the clean task's diagonal Fisher at the base
(normalised to mean 1), so the watermark's weight change stays out of the directions the
clean task, and hence a clean fine-tune, pushes hardest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import optax

from wdmjax.errors import check, check_number
from wdmjax.train.state import make_optimizer

LossFn = Callable[[chex.ArrayTree, dict, chex.PRNGKey], tuple[chex.Array, dict]]
ORDERS = ("first", "full")
KINDS = ("finetune", "surgery", "fisher")
# Under the simulated thief's square root: (eps)^2 of Adam's eps = 1e-8, so the updates stay
# the thief's to within float rounding wherever |g| >> 1e-8, and their derivative is finite
# at an exact zero gradient entry (which some CPUs' kernels produce and others do not).
THIEF_EPS_ROOT = 1e-16


def thief_optimizer(lr: float, grad_clip: float | None) -> optax.GradientTransformation:
  """The simulated thief's optimizer: a fresh AdamW at `lr` with `grad_clip`, no warm-up
  and no weight decay (what `wdmjax attack finetune:N` uses), differentiable everywhere
  (`THIEF_EPS_ROOT`)."""
  return make_optimizer(lr, 0, 0.0, grad_clip, eps_root=THIEF_EPS_ROOT)


@dataclasses.dataclass(frozen=True)
class RobustSpec:
  """How an embedding guards against clean fine-tuning: `kind` 'finetune' (the
  fine-tuning-aware loss: `steps` simulated updates at `lr`, their loss weighted by
  `weight`, differentiated to `order`), 'surgery' (the watermark's gradient projected off
  the task's where they conflict; no other field applies) or 'fisher' (the task-Fisher
  anchor, strength `weight`)."""
  kind: str = "finetune"
  steps: int = 1
  lr: float = 3e-3  # of the measured inner rates (1e-3, 3e-3) the one that kept more
  weight: float = 1.0
  order: str = "first"

  def __post_init__(self):
    check(self.kind in KINDS, f"robust: expected one of {list(KINDS)}, got {self.kind!r}")
    check_robust_args(self.steps, self.lr, self.weight, self.order)


def inner_finetune(task_loss: LossFn, tx: optax.GradientTransformation,
                   params: chex.ArrayTree, batch: dict, rng: chex.PRNGKey, steps: int
                   ) -> chex.ArrayTree:
  """`steps` updates of clean fine-tuning from `params` with a fresh state of `tx`, in one
  `lax.scan`: update i uses `batch` with the key `jax.random.split(rng, steps)[i]`.

  Differentiable in `params` (through the optimizer's updates). Returns the weights after
  the last update, shaped like `params`.
  """
  check(isinstance(steps, int) and steps >= 1, f"steps: expected a positive integer, "
                                               f"got {steps!r}")

  def body(carry, key):
    p, state = carry
    grads = jax.grad(lambda q: task_loss(q, batch, key)[0])(p)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), None

  (out, _), _ = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(rng, steps))
  return out


def check_robust_args(steps: int, lr: float, weight: float, order: str) -> None:
  check(isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 64,
        f"robust_steps: expected an integer in [1, 64], got {steps!r}")
  check_number(lr, "robust_lr", 0.0, 1.0, low_open=True)
  check_number(weight, "robust_weight", 0.0, low_open=True)
  check(order in ORDERS, f"robust_order: expected one of {list(ORDERS)}, got {order!r}")


def finetune_aware_loss(wdm_loss: LossFn, watermark_loss: LossFn, task_loss: LossFn,
                        tx: optax.GradientTransformation, *, steps: int = 1,
                        weight: float = 1.0, order: str = "first") -> LossFn:
  """The fine-tuning-aware WDM loss (see the module docstring).

  Args:
    wdm_loss: the joint WDP loss (`wdp_loss`), the owner's objective at theta.
    watermark_loss: its watermark half alone (`wdp_loss(..., task=False)`: gamma2 L_wm).
    task_loss: the clean loss the thief fine-tunes with (`diffusion_loss`).
    tx: the thief's optimizer (its learning rate is the simulated one).
    steps, weight, order: k inner updates, the weight of the loss after them, and
      'first' or 'full' differentiation through them.

  Returns:
    `loss_fn(params, batch, rng) -> (loss, metrics)`, metrics with `watermark_loss_after`
    (L_wm at theta_k, without gamma2) and `inner_moved` (the L2 norm of theta_k - theta).
  """
  check_robust_args(steps, 1e-3, weight, order)  # the rate lives in tx

  def loss_fn(params, batch, rng):
    r_now, r_inner, r_after = jax.random.split(rng, 3)
    loss, metrics = wdm_loss(params, batch, r_now)
    moved = inner_finetune(task_loss, tx, params, batch, r_inner, steps)
    delta = jax.tree.map(jnp.subtract, moved, params)
    if order == "first":
      moved = jax.tree.map(lambda p, d: p + jax.lax.stop_gradient(d), params, delta)
    after, after_metrics = watermark_loss(moved, batch, r_after)
    norm = jnp.sqrt(sum(jnp.sum(d ** 2) for d in jax.tree.leaves(delta)))
    loss = loss + weight * after
    return loss, {**metrics, "loss": loss,
                  "watermark_loss_after": after_metrics.get("watermark_loss", after),
                  "inner_moved": jax.lax.stop_gradient(norm)}

  return loss_fn


def _vdot(a: chex.ArrayTree, b: chex.ArrayTree) -> chex.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                             strict=True))


def surgery_loss(task_loss: LossFn, watermark_loss: LossFn) -> LossFn:
  """The joint loss L_task + L_wm (`watermark_loss`: gamma2 times the watermark half, as
  `wdp_loss(..., task=False)`) whose gradient is g + g_w', with g_w' = g_w - min(0, g_w.g)
  / |g|^2 g (see the module docstring). The value is the joint loss's; the gradient is
  delivered through a linear surrogate, so any optimizer or train step takes it as is.

  Returns `loss_fn(params, batch, rng) -> (loss, metrics)`, metrics with `task_loss`,
  `watermark_loss` (without gamma2) and `conflict` (the cosine of g_w and g when negative,
  else 0).
  """

  def loss_fn(params, batch, rng):
    r_task, r_wm = jax.random.split(rng)
    (l_t, m_t), g_t = jax.value_and_grad(task_loss, has_aux=True)(params, batch, r_task)
    (l_w, m_w), g_w = jax.value_and_grad(watermark_loss, has_aux=True)(params, batch, r_wm)
    dot, nt = _vdot(g_w, g_t), _vdot(g_t, g_t)
    coef = jnp.minimum(dot, 0.0) / jnp.maximum(nt, 1e-30)
    g = jax.tree.map(lambda t, w: t + w - coef * t, g_t, g_w)
    g = jax.lax.stop_gradient(g)
    surrogate = _vdot(g, params)
    value = l_t + l_w
    loss = surrogate + jax.lax.stop_gradient(value - surrogate)
    cos = jnp.minimum(dot, 0.0) / jnp.maximum(jnp.sqrt(nt * _vdot(g_w, g_w)), 1e-30)
    return loss, {"loss": value, "task_loss": l_t,
                  "watermark_loss": m_w.get("watermark_loss", l_w), "conflict": cos}

  return loss_fn


def fisher_diagonal(task_loss: LossFn, params: chex.ArrayTree, batches: list[dict],
                    rng: chex.PRNGKey) -> chex.ArrayTree:
  """The clean task's empirical diagonal Fisher E[g^2] over `batches` (one gradient each),
  normalised to mean 1 over all parameters; shaped like `params`."""
  check(len(batches) >= 1, "batches: expected at least one batch")
  grad = jax.jit(jax.grad(lambda p, b, r: task_loss(p, b, r)[0]))
  total = jax.tree.map(jnp.zeros_like, params)
  for i, b in enumerate(batches):
    g = grad(params, b, jax.random.fold_in(rng, i))
    total = jax.tree.map(lambda t, x: t + x ** 2, total, g)
  count = sum(x.size for x in jax.tree.leaves(total))
  mean = sum(jnp.sum(x) for x in jax.tree.leaves(total)) / count
  return jax.tree.map(lambda t: t / jnp.maximum(mean, 1e-30), total)


def anchor_penalty(params: chex.ArrayTree, anchor: chex.ArrayTree, weights: chex.ArrayTree
                   ) -> chex.Array:
  """sum_i w_i (theta_i - anchor_i)^2 over every parameter (a scalar)."""
  return sum(jnp.sum(w * (p - a) ** 2) for p, a, w in zip(
    jax.tree.leaves(params), jax.tree.leaves(anchor), jax.tree.leaves(weights), strict=True))


def anchored_loss(loss: LossFn, anchor: chex.ArrayTree, weights: chex.ArrayTree,
                  strength: float) -> LossFn:
  """`loss` plus strength * `anchor_penalty` (e.g. with the task Fisher as weights)."""
  check_number(strength, "robust_weight", 0.0, low_open=True)

  def loss_fn(params, batch, rng):
    value, metrics = loss(params, batch, rng)
    pen = anchor_penalty(params, anchor, weights)
    value = value + strength * pen
    return value, {**metrics, "loss": value, "anchor_penalty": pen}

  return loss_fn
