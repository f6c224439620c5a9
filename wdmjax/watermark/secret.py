"""The owner's secret: what it takes to extract and verify a WDM watermark.

It is stored as `secret.json` in the watermarked workdir, apart from config.json and the
metrics, so that a shipped model (config + checkpoint) never carries it.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from wdmjax.errors import WdmjaxError, check
from wdmjax.watermark.triggers import (
  ImageShape,
  check_block,
  keyed_targets,
  make_trigger,
  make_watermark,
)
from wdmjax.watermark.wdp import GAMMA1, GAMMA2, check_gammas

SECRET_FILE = "secret.json"


@dataclasses.dataclass(frozen=True)
class Secret:
  """Trigger and watermark specs (see triggers.py), the key (None: unkeyed, decoy test),
  the WDP mix gamma1, the watermark loss weight gamma2 and the bit block size."""
  trigger: str
  watermark: str
  key: int | None = None
  gamma1: float = GAMMA1
  gamma2: float = GAMMA2
  block: int = 4

  def __post_init__(self):
    check(isinstance(self.trigger, str) and bool(self.trigger),
          f"trigger: expected a spec string, got {self.trigger!r}")
    check(isinstance(self.watermark, str) and bool(self.watermark),
          f"watermark: expected a spec string, got {self.watermark!r}")
    check(self.key is None or (isinstance(self.key, int) and self.key >= 0),
          f"key: expected a non-negative integer or None, got {self.key!r}")
    check_gammas(self.gamma1, self.gamma2)
    check(isinstance(self.block, int) and self.block >= 1,
          f"block: expected a positive integer, got {self.block!r}")

  def images(self, shape: ImageShape, data_dir: str | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trigger [H, W, C], watermark [N, H, W, C], learned targets [N, H, W, C]) for `shape`."""
    check_block(self.block, shape)
    trigger = make_trigger(self.trigger, shape)
    watermark = make_watermark(self.watermark, shape, self.block, data_dir)
    return trigger, watermark, keyed_targets(watermark, self.key, self.block)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)

  @classmethod
  def from_json(cls, text: str, source: str = SECRET_FILE) -> Secret:
    """The secret in `text` (what `to_json` writes). Errors name `source` and the fields at
    fault, never a value: the file holds the key."""
    try:
      d = json.loads(text)
    except json.JSONDecodeError as e:  # its message holds a position, not the text
      raise WdmjaxError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno})"
                        ) from None
    fields = [f.name for f in dataclasses.fields(cls)]
    check(isinstance(d, dict), f"{source}: expected a JSON object with the fields {fields}, "
                               f"got a {type(d).__name__}")
    missing = [f for f in ("trigger", "watermark") if f not in d]
    extra = sorted(k for k in d if k not in fields)
    check(not missing and not extra, f"{source}: expected the fields {fields}; "
          + "; ".join(([f"missing {missing}"] if missing else [])
                      + ([f"unexpected {extra}"] if extra else [])))
    bad = [name for name, ok in (
      ("trigger", isinstance(d["trigger"], str)), ("watermark", isinstance(d["watermark"], str)),
      ("key", d.get("key") is None or _is_int(d["key"])),
      ("gamma1", _is_number(d.get("gamma1", GAMMA1))),
      ("gamma2", _is_number(d.get("gamma2", GAMMA2))), ("block", _is_int(d.get("block", 4))))
      if not ok]
    check(not bad, f"{source}: wrong type of the fields {bad}")
    try:
      return cls(**d)
    except WdmjaxError as e:  # its message holds the value
      name = str(e).partition(":")[0]
      raise WdmjaxError(f"{source}: invalid value of the field "
                        f"{name if name in fields else 'unknown'!r}") from None


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)
