"""Verification of an extracted watermark: block bit votes and the binomial tests.

Keyed test (exact): the embedded bits are w XOR r, with r a block bit mask drawn from the
owner's key. Take the per-block majority vote of m extracted samples, count the k of n
blocks that agree with w XOR r. A model that does not know r agrees on each block with
probability exactly 1/2 whatever it draws, so p = P(Binomial(n, 1/2) >= k) is exact. A tie in
the vote counts as a disagreement, which only makes the test conservative.

Decoy permutation test (for an unkeyed logo or image set): nothing makes a bit agreement a
fair coin, so the suspect model itself supplies the null. It extracts m samples with each of
D decoy triggers as well as with the secret one; each trigger's statistic is the mean, over
its samples, of their similarity to the watermark (a sample's largest Pearson correlation
with any watermark image), and p = (1 + #{decoys whose statistic >= the secret's}) / (D + 1)
(ties count against the owner). The statistic is per trigger, not per sample, because the
samples of one trigger share that trigger's effect on the model: treating them as
exchangeable with other triggers' samples (a rank-sum test over samples) over-counts the
evidence and is anti-conservative. The test is exact if the secret trigger and the decoys
are exchangeable for a model that never learned the trigger, which holds when the decoys are
drawn by the secret trigger's own generator (`decoy_trigger_specs`); for an image-file
trigger it is not guaranteed, and the report warns. "Exact" is over the owner's random draw
of the secret trigger (its seed unknown to anyone else): for one fixed trigger, repeated over
sample seeds, the p-values of an innocent model are not uniform, since that trigger's own
effect on the model repeats in every run. Its smallest p-value is 1 / (D + 1): with
a practical number of decoys an unkeyed watermark cannot reach a court-grade alpha such as
1e-6 (the report warns), and an exact, strong test needs a key.
Soft keyed test (exact, `soft_keyed_test`): instead of one majority vote per block, every
sample's every block votes, and the statistic is the number S of (sample, block) votes that
agree with w XOR r, i.e. the mean agreement over samples times m n. Its null law is exact
conditionally on the samples (proof in `soft_keyed_test`), so weak but consistent evidence
spread over many samples counts where the majority vote of each block would lose it.
Best-sample test (valid, conservative, `best_sample_test`): after fine-tuning, a watermark
often survives whole in a fraction of the samples while the others turn into ordinary
images; the largest per-sample agreement, Bonferroni-corrected over the m samples, keeps
that evidence where any average dilutes it.
The report names the test it used.
"""

from __future__ import annotations

import math

import numpy as np

from wdmjax.errors import check, check_number
from wdmjax.stats import exact_binomial_log10_sf, permutation_log10_p, two_point_log10_sf
from wdmjax.watermark.secret import Secret
from wdmjax.watermark.triggers import (
  ImageShape,
  block_signs,
  check_block,
  key_mask,
  reference_bits,
)

ALPHA = 1e-6
EXACT_TEST = "exact-binomial"
SOFT_TEST = "exact-key-flip"
BEST_TEST = "best-sample-bonferroni"
DECOY_TEST = "decoy-permutation"


def vote_bits(samples: np.ndarray, block: int) -> np.ndarray:
  """Per-block majority vote of m samples [m, H, W, C] -> [H/block, W/block] in {-1, 0, +1}.

  Each sample votes with the sign of its block mean (over pixels and channels); 0 is a tie.
  """
  samples = np.asarray(samples, np.float32)
  check(samples.ndim == 4, f"samples: expected [m, H, W, C], got shape {samples.shape}")
  check(samples.shape[1] % block == 0 and samples.shape[2] % block == 0,
        f"block: expected a divisor of the image size {samples.shape[1:3]}, got {block}")
  return np.sign(block_signs(samples, block).sum(0)).astype(np.float32)


def expected_bits(watermark: np.ndarray, key: int | None, block: int) -> np.ndarray:
  """The bits [n, n] an extraction should show: the watermark's block bits, XOR the key mask."""
  bits = reference_bits(np.asarray(watermark, np.float32), block)
  if key is None:
    return bits
  _, h, _, c = watermark.shape
  return bits * key_mask(key, ImageShape(h, c), block)


def agreement(votes: np.ndarray, expected: np.ndarray) -> tuple[int, int]:
  """(k agreeing bits, n bits); a tie (0) never agrees."""
  check(votes.shape == expected.shape,
        f"votes: expected shape {expected.shape}, got {votes.shape}")
  return int(np.sum(votes == expected)), int(expected.size)


def keyed_test(samples: np.ndarray, watermark: np.ndarray, key: int, block: int,
               alpha: float = ALPHA) -> dict:
  """The exact test of a keyed watermark; returns the report (see `report`), with a
  `warning` when even full agreement could not reach `alpha`."""
  k, n = agreement(vote_bits(samples, block), expected_bits(watermark, key, block))
  return report(EXACT_TEST, k, n, 0.5, alpha, num_samples=len(samples), block=block,
                warning=_keyed_warning(n, alpha))


def _sample_votes(samples: np.ndarray, watermark: np.ndarray, key: int, block: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(every sample's block signs [m, n, n], the expected bits [n, n]), shapes checked."""
  samples = np.asarray(samples, np.float32)
  check(samples.ndim == 4, f"samples: expected [m, H, W, C], got shape {samples.shape}")
  want = expected_bits(watermark, key, block)
  signs = block_signs(samples, block)
  check(signs.shape[1:] == want.shape,
        f"samples: expected images of the watermark's shape {watermark.shape[1:]}, got "
        f"{samples.shape[1:]}")
  return signs, want


def soft_keyed_test(samples: np.ndarray, watermark: np.ndarray, key: int, block: int,
                    alpha: float = ALPHA, u: float | None = None) -> dict:
  """The exact soft test of a keyed watermark: S = the number of (sample, block) sign votes
  that agree with the expected bits w XOR r, over m samples [m, H, W, C] and n blocks.

  Null law (exact). Let P_b and N_b count the samples whose block b has a positive or a
  negative mean (a zero mean votes for neither and never agrees). Block b's contribution
  to S is P_b when its expected bit e_b = w_b r_b is +1 and N_b when it is -1. Under the
  null hypothesis the model never learned the key's mask r, so the samples, and with them
  every (P_b, N_b), are independent of r; r is uniform on {-1, +1}^n (drawn from the
  owner's key), hence so is e = w r for any fixed w, independently of the samples. Given
  the samples, S is therefore a sum of n independent variables each equal to P_b or N_b
  with probability 1/2: `wdmjax.stats.two_point_log10_sf` computes its tail exactly, and
  p = P(S' >= S | samples) obeys P(p <= alpha | samples) <= alpha for every sample set, so
  also unconditionally. With `u` (uniform in [0, 1], drawn independently) the randomized
  p = P(S' > S) + u P(S' = S) is exactly uniform. The smallest p is 2^-n, as for the
  majority vote: the evidence can never exceed the key's n bits.

  Returns the report (see `report`): bit_agreement is S / (m n), the mean agreement over
  samples; agreeing_bits and bits are S and m n; `blocks` is n.
  """
  signs, want = _sample_votes(samples, watermark, key, block)
  pos = (signs > 0).sum(0).ravel()
  neg = (signs < 0).sum(0).ravel()
  s = int(np.where(want.ravel() > 0, pos, neg).sum())
  m, n = len(signs), want.size
  return report(SOFT_TEST, s, m * n, 0.5, alpha, log10_p=two_point_log10_sf(pos, neg, s, u),
                num_samples=m, block=block, blocks=n, warning=_keyed_warning(n, alpha))


def best_sample_test(samples: np.ndarray, watermark: np.ndarray, key: int, block: int,
                     alpha: float = ALPHA) -> dict:
  """The best-sample test of a keyed watermark: a_j = the blocks of sample j whose sign
  agrees with w XOR r, T = max_j a_j over m samples [m, H, W, C] and n blocks, and
  p = min(1, m P(Binomial(n, 1/2) >= T)).

  Validity. Under the null hypothesis the samples are independent of the key's mask r, so
  for each fixed sample j every block agrees with e_b = w_b r_b with probability exactly
  1/2, independently over blocks (a block with a zero mean never agrees): a_j is at most
  Binomial(n, 1/2) in distribution, and P(T >= t) <= sum_j P(a_j >= t)
  <= m P(Binomial(n, 1/2) >= t) (the union bound). Hence P(p <= alpha) <= alpha: the test
  is valid at every alpha, conservative by at most the factor m (log10 m). It is the test
  for a watermark that survives whole in some samples only; its smallest p is m 2^-n.

  Returns the report (see `report`): agreeing_bits and bits are T and n, bit_agreement is
  T / n; `sample_agreements` lists every a_j.
  """
  signs, want = _sample_votes(samples, watermark, key, block)
  per = (signs == want[None]).sum((1, 2)).astype(int)
  m, n = len(signs), want.size
  t = int(per.max())
  log10_p = min(0.0, math.log10(m) + exact_binomial_log10_sf(t, n))
  return report(BEST_TEST, t, n, 0.5, alpha, log10_p=log10_p, num_samples=m, block=block,
                sample_agreements=per.tolist(), warning=_best_warning(n, m, alpha))


def _best_warning(n: int, m: int, alpha: float) -> str | None:
  _check_alpha(alpha)
  best = math.log10(m) + n * math.log10(0.5)
  if best <= math.log10(alpha):
    return None
  return (f"the best-sample test over {m} samples of {n} bits can never reach alpha {alpha:g} "
          f"(its smallest p is 10^{best:.2f}); use fewer samples or more bits")


# ----------------------------------------------------------------------------- reach


def best_log10_p(secret: Secret, shape: ImageShape, decoys: int | None = None) -> float:
  """The smallest log10 p the secret's test can ever report on a model of `shape`.

  Keyed: n log10(1/2), every one of the n = (resolution / block)^2 bit blocks agreeing.
  Unkeyed: -log10(decoys + 1), the secret trigger beating all `decoys` decoy triggers.
  If it is above log10(alpha), no model can ever be verified with this secret.
  """
  check_block(secret.block, shape)
  if secret.key is not None:
    return (shape.resolution // secret.block) ** 2 * math.log10(0.5)
  check(isinstance(decoys, int) and decoys >= 1,
        f"decoys: expected at least 1 for an unkeyed secret, got {decoys!r}")
  return -math.log10(decoys + 1)


def reach_warning(secret: Secret, shape: ImageShape, alpha: float = ALPHA,
                  decoys: int | None = None) -> str | None:
  """A warning when the secret's test can never reach `alpha` on a model of `shape` (see
  `best_log10_p`), else None: what `embed` and `verify` report."""
  check_block(secret.block, shape)
  if secret.key is not None:
    return _keyed_warning((shape.resolution // secret.block) ** 2, alpha)
  best_log10_p(secret, shape, decoys)  # checks decoys
  return _decoy_warning(decoys, alpha)


def _check_alpha(alpha: float) -> None:
  check_number(alpha, "alpha", 0.0, 1.0, low_open=True, high_open=True)


def _keyed_warning(n: int, alpha: float) -> str | None:
  _check_alpha(alpha)
  best = n * math.log10(0.5)
  if best <= math.log10(alpha):
    return None
  return (f"the secret has {n} bits: its smallest possible p-value is 10^{best:.2f} (every "
          f"bit agreeing), above alpha {alpha:g}, so no model can ever be verified; use a "
          f"smaller block or a higher resolution (at least "
          f"{math.ceil(math.log2(1 / alpha))} bits)")


def _decoy_warning(decoys: int, alpha: float) -> str | None:
  _check_alpha(alpha)
  if 1 / (decoys + 1) <= alpha:
    return None
  return (f"an unkeyed watermark is tested against {decoys} decoy triggers: its smallest "
          f"possible p-value is 1/{decoys + 1} = {1 / (decoys + 1):.3g}, above alpha "
          f"{alpha:g}, so it can never be verified (that would take "
          f"{math.ceil(1 / alpha) - 1} decoys); embed with a key for an exact test")


def watermark_similarity(samples: np.ndarray, watermark: np.ndarray) -> np.ndarray:
  """Each sample's largest Pearson correlation with a watermark image: [m, H, W, C] and
  [N, H, W, C] -> [m] in [-1, 1] (0 for a constant image)."""
  def unit(a):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    a = a - a.mean(1, keepdims=True)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)

  check(samples.shape[1:] == watermark.shape[1:],
        f"samples: expected images of the watermark's shape {watermark.shape[1:]}, "
        f"got {samples.shape[1:]}")
  return (unit(samples) @ unit(watermark).T).max(1)


def decoy_test(samples: np.ndarray, decoy_samples: list[np.ndarray], watermark: np.ndarray,
               block: int, alpha: float = ALPHA) -> dict:
  """The decoy permutation test of an unkeyed watermark (see the module docstring).

  samples: [m, H, W, C] extracted with the secret trigger; decoy_samples: one [m', H, W, C]
  array per decoy trigger, drawn by the secret trigger's generator; watermark:
  [N, H, W, C]. The block bit agreement is reported too, as a description (the p-value
  comes from the permutation test over triggers); `warning` when 1 / (decoys + 1) > alpha.
  """
  check(len(decoy_samples) >= 1, "decoys: expected at least one decoy trigger")
  want = expected_bits(watermark, None, block)
  k, n = agreement(vote_bits(samples, block), want)
  decoy_k = [agreement(vote_bits(d, block), want)[0] for d in decoy_samples]
  stat = float(np.mean(watermark_similarity(samples, watermark)))
  decoy_stats = np.array([np.mean(watermark_similarity(d, watermark)) for d in decoy_samples])
  out = report(DECOY_TEST, k, n, sum(decoy_k) / (len(decoy_k) * n), alpha,
               log10_p=permutation_log10_p(stat, decoy_stats), num_samples=len(samples),
               block=block, warning=_decoy_warning(len(decoy_samples), alpha))
  out["decoys"] = len(decoy_samples)
  out["decoy_agreements"] = [dk / n for dk in decoy_k]
  out["similarity_mean"] = stat
  out["decoy_similarity_means"] = [float(v) for v in decoy_stats]
  out["decoy_samples"] = int(sum(len(d) for d in decoy_samples))
  return out


def report(test: str, k: int, n: int, p_null: float, alpha: float,
           log10_p: float | None = None, warning: str | None = None, **extra) -> dict:
  """The verification report: what `wdmjax verify --json` prints.

  Keys: test, log10_p_value (of Binomial(n, p_null) >= k unless `log10_p` is given),
  verified (p <= alpha), bit_agreement (k / n), agreeing_bits, bits, null_agreement (the
  per-bit agreement rate under the null), alpha, plus `extra`, plus `warning` when one is
  given (see `add_warning`).
  """
  _check_alpha(alpha)
  if log10_p is None:
    log10_p = exact_binomial_log10_sf(k, n, p_null)
  return {
    "test": test,
    "log10_p_value": log10_p,
    "verified": bool(log10_p <= math.log10(alpha)),
    "bit_agreement": k / n,
    "agreeing_bits": k,
    "bits": n,
    "null_agreement": p_null,
    "alpha": alpha,
    **extra,
  } | ({} if warning is None else {"warning": warning})


def add_warning(report: dict, warning: str | None) -> dict:
  """Appends `warning` (a sentence) to the report's `warning`; returns the report."""
  if warning:
    report["warning"] = f"{report['warning']}; {warning}" if report.get("warning") else warning
  return report
