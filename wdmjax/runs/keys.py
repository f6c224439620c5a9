"""`wdmjax keygen`: a new owner key file (see `wdmjax.keys`)."""

from __future__ import annotations

import os

from wdmjax.files import check_file_path
from wdmjax.keys import new_key_file


def keygen(path: str | os.PathLike) -> str:
  """Writes a fresh 256-bit owner key to the new file `path` (mode 600; never overwrites);
  returns the key's public id. Keep the file: the signatures and serial numbers made with it
  cannot be checked or made again without it."""
  check_file_path(path, "path")
  return new_key_file(path)
