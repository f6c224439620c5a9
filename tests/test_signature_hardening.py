"""`signature pretrain` under faults: stopped by SIGTERM it keeps its last step, and the same
command again continues from it to the result of a run never stopped; a checkpoint of other
arguments is refused in one line naming the file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from wdmjax import runs
from wdmjax.errors import Terminated, WdmjaxError
from wdmjax.runs.signature import CHECKPOINT, EXTRACTOR, HIDDEN_JSON
from wdmjax.signature import pretrain as pretrain_module

# 2 warm-up steps and 4 with attacks; saved at the warm-up's end and every 3 steps of a phase.
ARGS = dict(steps=6, warmup_steps=2, batch_size=8, channels=4, num_bits=8, extractor_depth=2,
            attacks=("identity", "crop"), selection="uniform", checkpoint_every=3,
            progress=False)


def _arrays(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def test_pretrain_stopped_by_sigterm_resumes_to_the_same_extractor(tmp_path, monkeypatch):
  full = runs.signature_pretrain(str(tmp_path / "full"), **ARGS)
  assert full.resumed_from == 0
  assert not os.path.exists(tmp_path / "full" / CHECKPOINT)  # gone once done

  make = pretrain_module.make_pretrain_step
  calls = []

  def stopped_at_the_fifth_step(*args, **kwargs):
    step = make(*args, **kwargs)

    def run(*a):
      calls.append(1)
      if len(calls) == 5:
        raise Terminated(15)  # what the CLI raises on SIGTERM
      return step(*a)
    return run

  cut = str(tmp_path / "cut")
  monkeypatch.setattr(pretrain_module, "make_pretrain_step", stopped_at_the_fifth_step)
  with pytest.raises(Terminated):
    runs.signature_pretrain(cut, **ARGS)
  monkeypatch.undo()
  # The 4 steps done were saved when it stopped (the last periodic save was at step 2).
  assert sorted(os.listdir(cut)) == [CHECKPOINT]
  meta = json.loads(_arrays(os.path.join(cut, CHECKPOINT))["meta"].tobytes())
  assert (meta["phase"], meta["step"]) == ("attacks", 2)

  with pytest.raises(WdmjaxError, match=r"pretrain_checkpoint.npz: holds an interrupted "
                                        r"pre-training with other arguments \(steps 6, not 8\)"):
    runs.signature_pretrain(cut, **{**ARGS, "steps": 8})
  r = runs.signature_pretrain(cut, **ARGS)
  assert r.resumed_from == 4
  assert not os.path.exists(os.path.join(cut, CHECKPOINT))
  a, b = _arrays(os.path.join(cut, EXTRACTOR)), _arrays(str(tmp_path / "full" / EXTRACTOR))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
  ha, hb = (json.load(open(os.path.join(d, HIDDEN_JSON))) for d in (cut, tmp_path / "full"))
  assert [h["step"] for h in ha["history"]] == [h["step"] for h in hb["history"]]
  assert ha["history"][-1]["attack_counts"] == hb["history"][-1]["attack_counts"]
