"""Loading the model of any workdir: a trained run, an attacked copy or a fine-tune."""

from __future__ import annotations

from typing import NamedTuple

import chex
import ml_collections

from wdmjax.errors import check
from wdmjax.peft import load_finetuned, read_reference
from wdmjax.train import load_trained
from wdmjax.workdir import Workdir


class Model(NamedTuple):
  """A workdir's config and parameters (`wdmjax.train.setup(cfg).model` is the network)."""

  cfg: ml_collections.ConfigDict
  params: chex.ArrayTree


def load_model(workdir: str | Workdir, ema: bool = True) -> Model:
  """The newest checkpoint of `workdir` (EMA weights by default). A parameter-efficient
  fine-tune (a workdir with peft.json) is applied onto its base, which must be unchanged."""
  wd = Workdir(workdir)
  check(wd.exists(), f"workdir: no such directory {wd.path!r}")
  ref = read_reference(wd)
  if ref is None:
    return Model(*load_trained(wd, ema=ema))
  check(Workdir(ref["base"]).exists(),
        f"workdir: the base workdir {ref['base']!r} of the fine-tune {wd.path!r} is gone")
  base = load_model(ref["base"], ema=True)
  return Model(*load_finetuned(wd, base.params, ema=ema))
