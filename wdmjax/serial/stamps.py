"""Serial-number stamps: k bits written as a small square of +-1 pixels in a corner.

A serial number of k bits (k a perfect square, a multiple of 4) is written as hex, k / 4
digits ("9f3a" for 16 bits), and stamped into an image as a sqrt(k) x sqrt(k) grid of cells
of `cell` x `cell` pixels in one corner: bit 1 -> +1 (white), bit 0 -> -1 (black), in every
channel. The default, 64 bits of one pixel at the bottom right, is an 8x8 px square: 29% of
an mnist5k digit's width, 8% of its area (the paper: about 10% of the width). Shorter serials
are found by trying them all (`attacks.search_serials`: 16 bits take minutes on a CPU; see
`owner`); 64 bits are too many patterns to try. An issued stamp may cover at most half of
the image's side (`StampSpec.check_small`): 64 bits fit 28x28 digits, not the 8x8 ones, whose
16 bits at most can be searched.

A valid serial number has between k / 4 and 3k / 4 one-bits, so it differs from a blank
corner (all -1, which is what an unstamped digit shows) in at least k / 4 cells.
"""

from __future__ import annotations

import dataclasses
import math
import string

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
_BLOCK = 256  # serials drawn per round: a fixed size keeps the draws prefix-stable


@dataclasses.dataclass(frozen=True)
class StampSpec:
  """Where and how big a serial-number stamp is.

  Attributes:
    bits: k, a perfect square and a multiple of 4 (the serial is k / 4 hex digits); the
      default 64 is too long to search exhaustively.
    cell: pixels per bit along each side.
    corner: one of CORNERS.
  """
  bits: int = 64
  cell: int = 1
  corner: str = "bottom_right"

  def __post_init__(self):
    k = self.bits
    check(isinstance(k, int) and not isinstance(k, bool) and k >= 4 and k % 4 == 0
          and math.isqrt(k) ** 2 == k,
          f"bits: expected a perfect square that is a multiple of 4 (4, 16, 36, 64, ...), "
          f"got {k!r}")
    check(isinstance(self.cell, int) and not isinstance(self.cell, bool) and self.cell >= 1,
          f"cell: expected a positive integer, got {self.cell!r}")
    check(self.corner in CORNERS, f"corner: expected one of {list(CORNERS)}, "
                                  f"got {self.corner!r}")

  @property
  def grid(self) -> int:
    """Cells per side of the stamp."""
    return math.isqrt(self.bits)

  @property
  def side(self) -> int:
    """Pixels per side of the stamp."""
    return self.grid * self.cell

  def origin(self, height: int, width: int) -> tuple[int, int]:
    """(row, column) of the stamp's top-left pixel in an image of `height` x `width`."""
    check(self.side <= min(height, width),
          f"stamp: expected a stamp no larger than the image, got a {self.side}x{self.side} "
          f"stamp ({self.bits} bits of {self.cell} px) for {height}x{width} images")
    row = 0 if self.corner.startswith("top") else height - self.side
    col = 0 if self.corner.endswith("left") else width - self.side
    return row, col

  def check_small(self, height: int, width: int) -> None:
    """Refuses, in one line naming `stamp`, a stamp longer than half the shorter side of
    `height` x `width` images: a larger one covers most of the image (the whole of it at
    64 bits on 8x8 digits), leaving the model little to classify or generate."""
    most = min(height, width) // 2
    grid = most // self.cell - (most // self.cell) % 2  # an even grid: bits a multiple of 4
    fewer = (f"at most {grid * grid} bits fit with {self.cell} px cells" if grid else
             "no stamp fits with cells this large")
    check(self.side <= most,
          f"stamp: expected a stamp of at most half the image's side ({most} px for {height}x"
          f"{width} images), got {self.side}x{self.side} px ({self.bits} bits of {self.cell} px)"
          f"; {fewer} (serials under 64 bits can be searched exhaustively)")

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> StampSpec:
    check(isinstance(d, dict) and set(d) == {"bits", "cell", "corner"},
          f"stamp: expected a dict with bits, cell and corner, got {d!r}")
    return cls(**d)


def parse_serial(text: str, bits: int) -> np.ndarray:
  """A serial number as hex (k / 4 digits, most significant bit first) -> bits [k] uint8."""
  n = bits // 4
  ok = isinstance(text, str) and len(text) == n and all(c in string.hexdigits for c in text)
  example = ("9f3a0c5e" * (n // 8 + 1))[:n]
  check(ok, f"serial: expected {n} hex digit{'s' if n > 1 else ''} ({bits} bits), e.g. "
            f"{example!r}, got {text!r}")
  return np.array([int(b) for c in text.lower() for b in f"{int(c, 16):04b}"], np.uint8)


def format_serial(bits: np.ndarray) -> str:
  """bits [k] of 0/1 -> the hex serial number (inverse of `parse_serial`)."""
  b = np.asarray(bits).astype(np.uint8).reshape(-1)
  check(b.size % 4 == 0 and set(np.unique(b).tolist()) <= {0, 1},
        f"bits: expected 0/1 bits, a multiple of 4 of them, got {b.tolist()}")
  return "".join(f"{int(''.join(map(str, b[i:i + 4])), 2):x}" for i in range(0, b.size, 4))


def stamp_pattern(bits: chex.Array, spec: StampSpec) -> chex.Array:
  """bits [..., k] (0/1 or values in [0, 1]) -> the stamp [..., side, side] in [-1, 1]."""
  g, c = spec.grid, spec.cell
  cells = 2.0 * jnp.asarray(bits, jnp.float32).reshape(*jnp.shape(bits)[:-1], g, g) - 1.0
  return jnp.repeat(jnp.repeat(cells, c, axis=-2), c, axis=-1)


def stamp(images: chex.Array, bits: chex.Array, spec: StampSpec) -> chex.Array:
  """Writes the serial number's stamp into images.

  Args:
    images: [B, H, W, C].
    bits: [k] (one serial for all) or [B, k], 0/1 (values in [0, 1] give grey cells, which
      a reverse-engineering attack optimises over).
    spec: the stamp's size and corner.

  Returns:
    [B, H, W, C]: the images with the stamp's pixels replaced, every channel alike.
  """
  chex.assert_rank(images, 4)
  b, h, w, ch = images.shape
  row, col = spec.origin(h, w)
  check(jnp.shape(bits)[-1] == spec.bits and jnp.ndim(bits) in (1, 2),
        f"bits: expected [{spec.bits}] or [B, {spec.bits}], got {jnp.shape(bits)}")
  patch = jnp.broadcast_to(stamp_pattern(bits, spec)[..., None],
                           (b, spec.side, spec.side, ch)).astype(images.dtype)
  return jax.lax.dynamic_update_slice(images, patch, (0, row, col, 0))


def read_stamp(images: chex.Array, spec: StampSpec) -> chex.Array:
  """The stamp region of images [B, H, W, C] -> [B, side, side, C] (to check or show it)."""
  row, col = spec.origin(*images.shape[1:3])
  return images[:, row:row + spec.side, col:col + spec.side]


def _balanced(bits: np.ndarray) -> np.ndarray:
  k = bits.shape[-1]
  ones = bits.sum(-1)
  return (ones >= k // 4) & (ones <= 3 * k // 4)


def _draw_distinct(key: chex.PRNGKey, num: int, bits: int, seen: set[tuple],
                   balanced: bool) -> np.ndarray:
  """`num` distinct bit patterns [num, k] not in `seen`, in rounds of _BLOCK draws from
  `fold_in(key, round)` (so the first n of a draw of N > n are the draw of n)."""
  out: list[np.ndarray] = []
  rnd = 0
  while len(out) < num:
    draw = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, rnd), 0.5,
                                           (_BLOCK, bits)), np.uint8)
    rnd += 1
    for r in draw[_balanced(draw)] if balanced else draw:
      t = tuple(r.tolist())
      if t not in seen and len(out) < num:
        seen.add(t)
        out.append(r)
  return np.stack(out)


def draw_serials(key: chex.PRNGKey, num: int, bits: int,
                 exclude: np.ndarray | None = None) -> np.ndarray:
  """`num` distinct valid serial numbers [num, k] uint8 from `key`.

  Each has between k / 4 and 3k / 4 one-bits (far from a blank corner); none is in
  `exclude` [M, k]. Deterministic in `key`, and prefix-stable: the first n of a draw of
  N > n are the draw of n, so issuing more customers later keeps the earlier serials.
  """
  check(isinstance(num, int) and num >= 1, f"num: expected a positive integer, got {num!r}")
  seen = {tuple(r) for r in (np.zeros((0, bits), np.uint8) if exclude is None else exclude)}
  check(num + len(seen) <= 2 ** (bits - 1),
        f"num: expected at most {2 ** (bits - 1) - len(seen)} serials of {bits} bits (this "
        f"library's cap: half of all patterns)")
  return _draw_distinct(key, num, bits, seen, balanced=True)


def draw_invalid(key: chex.PRNGKey, valid: np.ndarray, num: int) -> np.ndarray:
  """`num` distinct invalid serial numbers [num, k] uint8: uniform over all 2^k patterns
  except the valid ones [M, k] (unbalanced ones included: anything a user may type)."""
  valid = np.asarray(valid, np.uint8).reshape(-1, np.shape(valid)[-1])
  bits = valid.shape[-1]
  check(isinstance(num, int) and 1 <= num <= 2 ** bits - len(valid),
        f"num: expected between 1 and {2 ** bits - len(valid)} invalid serials of {bits} "
        f"bits, got {num!r}")
  return _draw_distinct(key, num, bits, {tuple(r.tolist()) for r in valid}, balanced=False)


def near_misses(valid: np.ndarray) -> np.ndarray:
  """The k serial numbers one bit away from `valid` [k] -> [k, k] uint8 (the hardest
  invalid ones: a typo)."""
  v = np.asarray(valid, np.uint8).reshape(-1)
  return np.bitwise_xor(v[None], np.eye(v.size, dtype=np.uint8))


def invalid_batch(rng: chex.PRNGKey, valid: chex.Array, num: int,
                  near_fraction: float = 0.5) -> chex.Array:
  """`num` invalid stamps' bits [num, k] float32, drawn inside a jitted step.

  A `near_fraction` share are near misses (the valid serial with 1 to 3 bits flipped); the
  rest are uniform patterns, half of them hard bits and half grey (every cell a value in
  [0, 1], the inputs a reverse-engineering attack tries). A draw that equals `valid` gets one bit
  flipped, so none is valid.
  """
  valid = jnp.asarray(valid, jnp.float32)
  k = valid.shape[-1]
  k_n, k_flip, k_u, k_g, k_mix, k_fix = jax.random.split(rng, 6)
  n_flips = jax.random.randint(k_n, (num, 1), 1, 4)
  order = jnp.argsort(jax.random.uniform(k_flip, (num, k)), axis=-1)
  flip = (jnp.argsort(order, axis=-1) < n_flips).astype(jnp.float32)  # n_flips random cells
  near = jnp.abs(valid[None] - flip)
  hard = jax.random.bernoulli(k_u, 0.5, (num, k)).astype(jnp.float32)
  grey = jax.random.uniform(k_g, (num, k))
  uniform = jnp.where(jax.random.bernoulli(k_mix, 0.5, (num, 1)), hard, grey)
  out = jnp.where((jnp.arange(num) < int(round(near_fraction * num)))[:, None], near, uniform)
  same = jnp.all(out == valid[None], axis=-1, keepdims=True)
  fix = jax.nn.one_hot(jax.random.randint(k_fix, (num,), 0, k), k)
  return jnp.where(same, jnp.abs(out - fix), out)
