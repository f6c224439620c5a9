"""JSONL metrics: one JSON object per logged step, flushed at once so a crash loses nothing."""

from __future__ import annotations

import json
import os
import time


class MetricsWriter:
  def __init__(self, path: str, enabled: bool = True):
    self.path = path
    self.enabled = enabled
    if enabled:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
