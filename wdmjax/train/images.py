"""Image grids for people to look at: [-1, 1] float batches -> one PNG."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  img.save(tmp, format="PNG")
  os.replace(tmp, path)
  return path
