"""Image grids for people to look at: [-1, 1] float batches -> one PNG."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from wdmjax.files import atomic_open


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[B, H, W, C] in [-1, 1] -> uint8 [B, H, W, C]."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2,
              upscale: int = 1) -> np.ndarray:
  """Tiles [B, H, W, C] (float in [-1, 1] or uint8) into one uint8 image [H', W', C]."""
  x = images if images.dtype == np.uint8 else to_uint8(images)
  b, h, w, c = x.shape
  nrow = nrow or math.ceil(math.sqrt(b))
  ncol = math.ceil(b / nrow)
  grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
  for i in range(b):
    r, q = divmod(i, nrow)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  if upscale > 1:
    grid = grid.repeat(upscale, 0).repeat(upscale, 1)
  return grid


def save_grid(images: np.ndarray, path: str, nrow: int | None = None, upscale: int = 1) -> str:
  """Writes the grid as PNG atomically (a crash never leaves a half-written file)."""
  grid = make_grid(np.asarray(images), nrow=nrow, upscale=upscale)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with atomic_open(path) as f:
    img.save(f, format="PNG")
  return path


def save_panels(panels: list[tuple[str, np.ndarray]], path: str, gap: int = 12,
                per_row: int | None = None) -> str:
  """Grids (uint8 [H, W, C], see `make_grid`) each under its title, `per_row` to a row (all
  in one row by default), written as one PNG atomically."""
  title_h = 18
  per_row = per_row or len(panels)
  rows = [panels[i:i + per_row] for i in range(0, len(panels), per_row)]
  # PIL's default bitmap font is about 6 px per character: a title never overlaps the next.
  width = lambda t, g: max(g.shape[1], 6 * len(t))
  row_w = [sum(width(t, g) for t, g in r) + gap * (len(r) + 1) for r in rows]
  row_h = [max(g.shape[0] for _, g in r) + title_h + gap for r in rows]
  canvas = Image.new("RGB", (max(row_w), sum(row_h)), "white")
  draw = ImageDraw.Draw(canvas)
  top = 0
  for r, h in zip(rows, row_h, strict=True):
    left = gap
    for title, grid in r:
      rgb = grid.repeat(3, -1) if grid.shape[-1] == 1 else grid
      canvas.paste(Image.fromarray(rgb), (left, top + title_h))
      draw.text((left, top + 3), title, fill="black")
      left += width(title, grid) + gap
    top += h
  with atomic_open(path) as f:
    canvas.save(f, format="PNG")
  return path
