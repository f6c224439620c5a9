"""Verification of an extracted watermark: block bit votes and the binomial tests.

Keyed test (exact): the embedded bits are w XOR r, with r a block bit mask drawn from the
owner's key. Take the per-block majority vote of m extracted samples, count the k of n
blocks that agree with w XOR r. A model that does not know r agrees on each block with
probability exactly 1/2 whatever it draws, so p = P(Binomial(n, 1/2) >= k) is exact. A tie in
the vote counts as a disagreement, which only makes the test conservative.

Decoy rank test (for an unkeyed logo or image set): nothing makes a bit agreement a fair
coin, so the suspect model itself supplies the null. It extracts with decoy triggers (random
triggers it was never trained on) as well as with the secret one; each sample is scored by
its similarity to the watermark (the largest Pearson correlation with any watermark image),
and the one-sided rank-sum test asks whether the secret trigger's samples score higher. This
is exact if all samples are exchangeable under the null, i.e. if a model that never learned
the trigger draws the same distribution whichever random trigger it is given; more decoy
triggers make a trigger-specific quirk matter less. The keyed test needs no such assumption.
The report names the test it used.
"""

from __future__ import annotations

import math

import numpy as np

from wdmjax.errors import check
from wdmjax.stats import exact_binomial_log10_sf, rank_sum_log10_p
from wdmjax.watermark.triggers import ImageShape, block_signs, key_mask, reference_bits

ALPHA = 1e-6
EXACT_TEST = "exact-binomial"
DECOY_TEST = "decoy-rank-sum"


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
  """The exact test of a keyed watermark; returns the report (see `report`)."""
  k, n = agreement(vote_bits(samples, block), expected_bits(watermark, key, block))
  return report(EXACT_TEST, k, n, 0.5, alpha, num_samples=len(samples), block=block)


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
  """The decoy rank test of an unkeyed watermark (see the module docstring).

  samples: [m, H, W, C] extracted with the secret trigger; decoy_samples: one [m', H, W, C]
  array per decoy trigger; watermark: [N, H, W, C]. The block bit agreement is reported too,
  as a description (the p-value comes from the rank test).
  """
  check(len(decoy_samples) >= 1, "decoys: expected at least one decoy trigger")
  want = expected_bits(watermark, None, block)
  k, n = agreement(vote_bits(samples, block), want)
  decoy_k = [agreement(vote_bits(d, block), want)[0] for d in decoy_samples]
  score = watermark_similarity(samples, watermark)
  decoy_score = np.concatenate([watermark_similarity(d, watermark) for d in decoy_samples])
  out = report(DECOY_TEST, k, n, sum(decoy_k) / (len(decoy_k) * n), alpha,
               log10_p=rank_sum_log10_p(score, decoy_score), num_samples=len(samples),
               block=block)
  out["decoy_agreements"] = [dk / n for dk in decoy_k]
  out["similarity_median"] = float(np.median(score))
  out["decoy_similarity_median"] = float(np.median(decoy_score))
  out["decoy_samples"] = int(decoy_score.size)
  return out


def report(test: str, k: int, n: int, p_null: float, alpha: float,
           log10_p: float | None = None, **extra) -> dict:
  """The verification report: what `wdmjax verify --json` prints.

  Keys: test, log10_p_value (of Binomial(n, p_null) >= k unless `log10_p` is given),
  verified (p <= alpha), bit_agreement (k / n), agreeing_bits, bits, null_agreement (the
  per-bit agreement rate under the null), alpha, plus `extra`.
  """
  check(0.0 < alpha < 1.0, f"alpha: expected a level in (0, 1), got {alpha!r}")
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
  }
