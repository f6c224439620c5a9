"""Serial numbers from the owner's key (`wdmjax.keys`), never from a default or a small seed.

A serial workdir (or a locked model) has a random public `nonce`; with the owner key it fixes
everything secret about the workdir:

    derive_serials(key, nonce, num, bits)   the first `num` distinct valid serials [num, k]
    owner_prng(key, nonce, purpose)         a JAX PRNG key for one purpose (a student's
                                            training, the invalid serials of an evaluation)
    max_serials(bits)                       how many serials of `bits` bits are issued at most

Each serial is HMAC-derived (`keys.derive_bits`) from the key, the nonce and the customer's
number: knowing some customers' serials tells nothing of another's, one key serves many
workdirs with unrelated serials, and the draw is prefix-stable (issuing more customers later
keeps the earlier serials).

How long a serial must be: exhaustive search (`attacks.search_serials`) scores every pattern
on a few labelled images. With an mnist5k-sized student and 20 digits, the 65,536 patterns of
16 bits took 6 s to 5 minutes on 2-core CPUs (about 11,000 to 205 patterns/s): 16 bits are
no secret. The 1.8e19 patterns of 64 bits would take 5e7 to 3e9 years at those rates, and
58,000 years at 1e7 patterns/s.
"""

from __future__ import annotations

import math
import secrets

import jax
import numpy as np

from wdmjax.errors import check
from wdmjax.keys import derive_bits, derive_int

SECURE_BITS = 64  # the default stamp's length: too many patterns to search
_MAX_TRIES = 10_000  # draws per serial before giving up (only near max_serials(bits))


def new_nonce() -> str:
  """A fresh random nonce (32 hex digits): one per serial workdir or locked model."""
  return secrets.token_hex(16)


def _label(nonce: str, purpose: str) -> str:
  return f"wdmjax serial number {nonce} {purpose}"


def max_serials(bits: int) -> int:
  """How many valid serials of `bits` bits are issued at most: half the patterns, and no
  more than the balanced ones (k / 4 to 3k / 4 one-bits), so the draws stay quick."""
  return min(2 ** (bits - 1), int(sum(math.comb(bits, j)
                                      for j in range(bits // 4, 3 * bits // 4 + 1))))


def derive_serials(key: bytes, nonce: str, num: int, bits: int) -> np.ndarray:
  """The first `num` distinct valid serial numbers [num, bits] uint8 of `key` and `nonce`.

  Serial i is the first of the draws `derive_bits(key, label(nonce, i, try))`, try = 0,
  1, ..., with between k / 4 and 3k / 4 one-bits (far from a blank corner) that differs
  from serials 0 .. i - 1. Deterministic and prefix-stable.
  """
  check(isinstance(num, int) and 1 <= num <= max_serials(bits),
        f"num: expected between 1 and {max_serials(bits)} serials of {bits} bits, got {num!r}")
  out: list[np.ndarray] = []
  seen: set[bytes] = set()
  for i in range(num):
    for attempt in range(_MAX_TRIES):
      b = derive_bits(key, _label(nonce, f"customer {i} try {attempt}"), bits)
      ones = int(b.sum())
      if bits // 4 <= ones <= 3 * bits // 4 and b.tobytes() not in seen:
        break
    else:  # pragma: no cover - only when almost every balanced pattern is issued
      raise RuntimeError(f"no new serial of {bits} bits in {_MAX_TRIES} draws")
    seen.add(b.tobytes())
    out.append(b)
  return np.stack(out)


def owner_prng(key: bytes, nonce: str, purpose: str) -> jax.Array:
  """A JAX PRNG key for `purpose` (e.g. 'student 3', 'invalid'), derived from the owner key
  and the nonce: reproducible by the owner, unpredictable to anyone else."""
  return jax.random.PRNGKey(derive_int(key, _label(nonce, purpose), 2 ** 32))
