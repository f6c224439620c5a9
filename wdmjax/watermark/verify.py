"""Verification of an extracted watermark: block bit votes and the binomial tests.

Keyed test (exact): the embedded bits are w XOR r, with r a block bit mask drawn from the
owner's key. Take the per-block majority vote of m extracted samples, count the k of n
blocks that agree with w XOR r. A model that does not know r agrees on each block with
probability exactly 1/2 whatever it draws, so p = P(Binomial(n, 1/2) >= k) is exact. A tie in
the vote counts as a disagreement, which only makes the test conservative.

Decoy test (approximate, for an unkeyed logo or image set): nothing makes the agreement a fair
coin, so the null agreement rate is estimated on the suspect model itself by extracting with
decoy triggers (random triggers it was never trained on), and p = P(Binomial(n, p0) >= k)
with p0 the pooled decoy rate (add-one smoothed). The report names the test it used.
"""

from __future__ import annotations

import math

import numpy as np

from wdmjax.errors import check
from wdmjax.stats import binom_log10_sf
from wdmjax.watermark.triggers import ImageShape, block_signs, key_mask, reference_bits

ALPHA = 1e-6
EXACT_TEST = "exact-binomial"
DECOY_TEST = "decoy-calibrated-binomial"


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


def decoy_test(samples: np.ndarray, decoy_samples: list[np.ndarray], watermark: np.ndarray,
               block: int, alpha: float = ALPHA) -> dict:
  """The decoy-calibrated test of an unkeyed watermark (see the module docstring)."""
  check(len(decoy_samples) >= 1, "decoys: expected at least one decoy trigger")
  want = expected_bits(watermark, None, block)
  k, n = agreement(vote_bits(samples, block), want)
  decoy_k = [agreement(vote_bits(d, block), want)[0] for d in decoy_samples]
  p0 = (sum(decoy_k) + 1.0) / (len(decoy_k) * n + 2.0)
  out = report(DECOY_TEST, k, n, p0, alpha, num_samples=len(samples), block=block)
  out["decoy_agreements"] = [dk / n for dk in decoy_k]
  return out


def report(test: str, k: int, n: int, p_null: float, alpha: float, **extra) -> dict:
  """The verification report: what `wdmjax verify --json` prints.

  Keys: test, log10_p_value, verified (p <= alpha), bit_agreement (k / n), agreeing_bits,
  bits, null_agreement (the per-bit agreement rate under the null), alpha, plus `extra`.
  """
  check(0.0 < alpha < 1.0, f"alpha: expected a level in (0, 1), got {alpha!r}")
  log10_p = binom_log10_sf(k, n, p_null)
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
