"""Reading a directory (or one file) of PNG / JPEG images for the commands that screen or
test images a user brings."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from wdmjax.errors import WdmjaxError, check
from wdmjax.files import check_file_path


def read_images(path: str, image_shape: tuple, min_side: int | None = None
                ) -> tuple[list[np.ndarray], list[str]]:
  """Every .png/.jpg image in the directory `path` (or the one file `path`) as a list of
  [h, w, C] arrays in [-1, 1], with their names.

  Each must have the channels of `image_shape` (H, W, C) and its size exactly; with
  `min_side`, any size from min_side x min_side up to H x W (a crop or a downscale, read as
  it is)."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path)
                   if n.lower().endswith((".png", ".jpg", ".jpeg")))
    check(names, f"images: expected .png or .jpg files in {path!r}, found none")
    files = [os.path.join(path, n) for n in names]
  else:
    check_file_path(path, "images")
    check(os.path.isfile(path), f"images: no such file or directory {path!r}")
    files, names = [path], [os.path.basename(path)]
  h, w, c = image_shape
  lo_h, lo_w = (h, w) if min_side is None else (min_side, min_side)
  size = (f"{w}x{h} images" if min_side is None else
          f"{w}x{h} images (or crops or downscales of them, at least {min_side}x{min_side})")
  out = []
  for f in files:
    try:
      with Image.open(f) as im:
        a = np.asarray(im.convert("L" if c == 1 else "RGB"))
        mode = im.mode
    except OSError as e:
      raise WdmjaxError(f"images: {f!r} is not a readable image ({e})") from None
    check(lo_h <= a.shape[0] <= h and lo_w <= a.shape[1] <= w
          and (mode in ("L", "1", "I;16") or c == 3),
          f"images: expected {size} with {c} channel{'s' if c > 1 else ''}, got {f!r} of "
          f"{a.shape[1]}x{a.shape[0]} ({mode})")
    out.append(a.reshape(a.shape[0], a.shape[1], c).astype(np.float32) / 127.5 - 1.0)
  return out, names
