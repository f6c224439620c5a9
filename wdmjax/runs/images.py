"""Reading a directory (or one file) of PNG / JPEG images for the commands that screen or
test images a user brings (`signature detect`, `ood score`).

What a user's directory may hold is not trusted: an entry that is not a regular file (a
FIFO named b.png would block the reader forever, a device, a directory) is skipped, and
never opened; an image's size is read from its header and checked before its pixels are
decoded (a 20000 x 20000 PNG is refused in one line, not decoded into 400 megapixels);
16-bit grayscale images (PIL modes I;16 and I) are scaled from 0..65535, not clipped at 255.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
import zlib

import numpy as np
from PIL import Image

from wdmjax.errors import WdmjaxError, check
from wdmjax.runs.arguments import check_count

SUFFIXES = (".png", ".jpg", ".jpeg")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_GRAY = ("L", "1", *_SIXTEEN_BIT)
# What PIL may raise on a damaged or hostile file, beyond OSError (UnidentifiedImageError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error,
                  MemoryError, Image.DecompressionBombError)


def _is_regular(path: str) -> bool:
  """Whether `path` is a regular file (a symbolic link to one counts: the user's own files)."""
  try:
    return stat.S_ISREG(os.stat(path).st_mode)
  except OSError:
    return False


def _files(path: str) -> tuple[list[str], list[str]]:
  """(paths, names) of the images `path` names: the regular .png/.jpg files of a directory
  (sorted by name; anything else skipped), or the one regular file `path`."""
  if os.path.isdir(path):
    candidates = sorted(n for n in os.listdir(path) if n.lower().endswith(SUFFIXES))
    names = [n for n in candidates if _is_regular(os.path.join(path, n))]
    skipped = len(candidates) - len(names)
    check(names, f"images: expected .png or .jpg files in {path!r}, found none"
                 + (f" ({skipped} skipped: not regular files)" if skipped else ""))
    return [os.path.join(path, n) for n in names], names
  check(os.path.lexists(path), f"images: expected a directory or an image file, got nothing "
                               f"at {path!r}")
  check(_is_regular(path), f"images: expected a directory or a regular image file, got "
                           f"{path!r}, which is neither (a FIFO, a device or a broken link)")
  return [path], [os.path.basename(path)]


def _open(path: str):
  """The file at `path`, opened for reading without blocking and checked to be a regular
  file once open (it may have been swapped for a FIFO since it was listed)."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
  try:
    check(stat.S_ISREG(os.fstat(fd).st_mode),
          f"images: expected a regular image file, got {path!r}, which is not one")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")
  except BaseException:
    os.close(fd)
    raise


def _header(f) -> Image.Image:
  """The image in the open file `f`, its header read and its pixels not yet decoded."""
  with warnings.catch_warnings():  # the size is checked by the caller, in one line
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return Image.open(f)


def _pixels(im: Image.Image, c: int, path: str) -> np.ndarray:
  """The decoded image as float32 [h, w, c] in [-1, 1]: 8-bit images from 0..255, 16-bit
  grayscale from 0..65535 (gray repeated for c = 3)."""
  if im.mode in _SIXTEEN_BIT:
    a = np.asarray(im, np.float64)
    check(a.min() >= 0 and a.max() <= 65535,
          f"images: expected 16-bit values in [0, 65535], got [{a.min():g}, {a.max():g}] in "
          f"{path!r}")
    a = (a / 32767.5 - 1.0).astype(np.float32)[..., None]
    return np.repeat(a, c, axis=-1) if c == 3 else a
  a = np.asarray(im.convert("L" if c == 1 else "RGB"))
  return a.reshape(a.shape[0], a.shape[1], c).astype(np.float32) / 127.5 - 1.0


def read_images(path: str, image_shape: tuple, min_side: int | None = None
                ) -> tuple[list[np.ndarray], list[str]]:
  """Every .png/.jpg image in the directory `path` (or the one file `path`) as a list of
  [h, w, C] arrays in [-1, 1], with their names. Entries that are not regular files are
  skipped (and never opened); a path that names no usable image is refused.

  Each must have the channels of `image_shape` (H, W, C) and its size exactly; with
  `min_side`, any size from min_side x min_side up to H x W (a crop or a downscale, read as
  it is). The size is checked from the header, before the pixels are decoded."""
  path = os.fspath(path)
  check(bool(path) and "\0" not in path, f"images: expected a directory or an image file, "
                                         f"got {path!r}")
  files, names = _files(path)
  h, w, c = image_shape
  # Bounded before any decoding: the images, a float32 copy and the model's batches.
  check_count("images", len(files), bytes_each=3 * 4 * h * w * c, what=f"a {w}x{h} image")
  lo_h, lo_w = (h, w) if min_side is None else (min_side, min_side)
  size = (f"{w}x{h} images" if min_side is None else
          f"{w}x{h} images (or crops or downscales of them, at least {min_side}x{min_side})")
  want = f"expected {size} with {c} channel{'s' if c > 1 else ''}"
  out = []
  for f in files:
    try:
      with _open(f) as fh, _header(fh) as im:
        iw, ih = im.size
        check(lo_h <= ih <= h and lo_w <= iw <= w and (im.mode in _GRAY or c == 3),
              f"images: {want}, got {f!r} of {iw}x{ih} ({im.mode})")
        out.append(_pixels(im, c, f))
    except WdmjaxError:
      raise
    except Image.DecompressionBombError:
      raise WdmjaxError(f"images: {want}, got {f!r} of more than "
                        f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except Image.UnidentifiedImageError:
      raise WdmjaxError(f"images: {f!r} is not a readable image (not a PNG or JPEG file)"
                        ) from None
    except _DECODE_ERRORS as e:
      raise WdmjaxError(f"images: {f!r} is not a readable image ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
  return out, names
