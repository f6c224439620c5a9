"""Owner keys: the secret behind Stable Signature messages and Deep Serial Numbers.

An owner key is at least 128 bits of secret text, read from a file only its owner can read
(`--key-file`) or from the environment (`WDMJAX_OWNER_KEY_FILE` names such a file;
`WDMJAX_OWNER_KEY` holds the key itself; WDM's integer `WDMJAX_KEY` is another thing). It is
never defaulted, printed or written to a workdir. From it:

    derive_bits(key, label, n)     n secret bits for one purpose (a user's message, ...)
    derive_int(key, label, high)   a secret integer in [0, high)
    key_id(key)                    a public fingerprint: which key a file belongs to
    seal(record, key)              an HMAC-SHA256 over a record's canonical JSON
    check_seal(record, key, what)  refuses a record not sealed by this key, in one line

Derivation is HMAC-SHA256 in counter mode (NIST SP 800-108), so knowing the outputs of one
label tells nothing about another's, nor about the key; a forged or foreign record fails
its seal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from typing import Any

import numpy as np

from wdmjax.errors import WdmjaxError, check

KEY_ENV, KEY_FILE_ENV = "WDMJAX_OWNER_KEY", "WDMJAX_OWNER_KEY_FILE"
# For a flag's help: where the key comes from.
KEY_HELP = (f"the owner key's file (`wdmjax keygen FILE`; default ${KEY_FILE_ENV}, or the key "
            f"itself in ${KEY_ENV})")
MIN_KEY_CHARS = 16  # 128 bits as 32 hex digits, or at least 16 characters of a passphrase
SEAL = "seal"


def _check_text(text: str, where: str) -> bytes:
  key = text.strip()
  check(len(key) >= MIN_KEY_CHARS, f"{where}: expected an owner key of at least "
                                   f"{MIN_KEY_CHARS} characters, got {len(key)}")
  return key.encode()


def read_key_file(path: str | os.PathLike, name: str = "key_file") -> bytes:
  """The owner key in the file `path`: a regular file that only its owner may read or
  write (mode 600 or 400), not a symbolic link."""
  path = os.fspath(path)
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  except FileNotFoundError:
    raise WdmjaxError(f"{name}: expected a key file, got nothing at {path!r} (make one "
                      f"with `wdmjax keygen {path}`)") from None
  except OSError as e:
    raise WdmjaxError(f"{name}: expected a readable regular file, got {path!r} "
                      f"({e.strerror})") from None
  with os.fdopen(fd, "rb") as f:
    st = os.fstat(f.fileno())
    check(stat.S_ISREG(st.st_mode), f"{name}: expected a regular file, got {path!r}")
    check(not st.st_mode & 0o077, f"{name}: expected a file only its owner can read (chmod "
                                  f"600 {path}), got mode {stat.S_IMODE(st.st_mode):o}")
    check(st.st_size <= 4096, f"{name}: expected a key file of at most 4096 bytes, got "
                              f"{st.st_size:,}")
    data = f.read()
  try:
    return _check_text(data.decode("utf-8"), name)
  except UnicodeDecodeError:
    raise WdmjaxError(f"{name}: expected a UTF-8 text key in {path!r}") from None


def owner_key(key_file: str | os.PathLike | None = None, name: str = "key_file") -> bytes:
  """The owner key: from `key_file`, else from the file `$WDMJAX_OWNER_KEY_FILE`, else from
  `$WDMJAX_OWNER_KEY`; refused in one line naming `name` when there is none."""
  if key_file is not None:
    return read_key_file(key_file, name)
  if os.environ.get(KEY_FILE_ENV):
    return read_key_file(os.environ[KEY_FILE_ENV], KEY_FILE_ENV)
  if os.environ.get(KEY_ENV):
    return _check_text(os.environ[KEY_ENV], KEY_ENV)
  raise WdmjaxError(f"{name}: expected the owner key's file (or ${KEY_FILE_ENV}, or the key "
                    f"in ${KEY_ENV}), got none; `wdmjax keygen FILE` makes one")


def new_key_file(path: str | os.PathLike) -> str:
  """Writes a fresh 256-bit owner key (64 hex digits) to `path` with mode 600; refuses to
  overwrite an existing file (a lost key cannot be recovered). Returns the key's id."""
  path = os.fspath(path)
  key = secrets.token_hex(32)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
  except FileExistsError:
    raise WdmjaxError(f"path: expected a new file, got the existing {path!r} (a key is "
                      f"never overwritten)") from None
  with os.fdopen(fd, "w") as f:
    os.fchmod(f.fileno(), 0o600)
    f.write(key + "\n")
  return key_id(key.encode())


def _stream(key: bytes, label: str, nbytes: int) -> bytes:
  out, counter = b"", 0
  while len(out) < nbytes:
    counter += 1
    out += hmac.new(key, counter.to_bytes(4, "big") + label.encode() + b"\0" +
                    (8 * nbytes).to_bytes(8, "big"), hashlib.sha256).digest()
  return out[:nbytes]


def derive_bits(key: bytes, label: str, n: int) -> np.ndarray:
  """`n` secret bits [n] (uint8, 0 or 1) for the purpose `label`."""
  check(isinstance(n, int) and n >= 1, f"n: expected a positive integer, got {n!r}")
  raw = np.frombuffer(_stream(key, label, (n + 7) // 8), np.uint8)
  return np.unpackbits(raw)[:n].astype(np.uint8)


def derive_int(key: bytes, label: str, high: int) -> int:
  """A secret integer in [0, high) for the purpose `label` (uniform: 64 extra bits)."""
  check(isinstance(high, int) and high >= 1, f"high: expected a positive integer, got {high!r}")
  nbytes = (high.bit_length() + 7) // 8 + 8
  return int.from_bytes(_stream(key, label, nbytes), "big") % high


def key_id(key: bytes) -> str:
  """A public 16-hex-digit fingerprint of `key` (says which key, reveals nothing of it)."""
  return hmac.new(key, b"wdmjax key id", hashlib.sha256).hexdigest()[:16]


def _canonical(record: dict) -> bytes:
  body = {k: v for k, v in record.items() if k != SEAL}
  return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(record: dict, key: bytes) -> dict:
  """`record` with `key_id` and `seal` (an HMAC-SHA256 under `key` of the rest) added."""
  body = {**{k: v for k, v in record.items() if k != SEAL}, "key_id": key_id(key)}
  return {**body, SEAL: hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()}


def check_seal(record: Any, key: bytes, what: str) -> dict:
  """`record` if it was sealed by `key` and not changed since; otherwise one line naming
  `what` (the file): a record of another key says so, a changed one says it was altered."""
  check(isinstance(record, dict) and isinstance(record.get(SEAL), str),
        f"{what}: expected a record sealed by the owner key, got one without a seal")
  check(record.get("key_id") == key_id(key),
        f"{what}: expected a record of this owner key (id {key_id(key)}), got one of key id "
        f"{str(record.get('key_id'))[:16]!r}")
  want = hmac.new(key, _canonical(record), hashlib.sha256).hexdigest()
  check(hmac.compare_digest(want, record[SEAL]),
        f"{what}: expected the record as the owner key sealed it, got an altered one (its "
        f"seal does not match)")
  return record
