"""One process of a multi-process test run: joins the run, trains the phases it is given and
dumps what each process holds, so the test can compare processes and process counts.

    python tests/multihost/worker.py SPEC.json PROCESS_ID

SPEC: {"coordinator": "localhost:PORT" | null, "num_processes": P, "config": PATH,
       "phases": [{"name": ..., "workdir": ..., "set": ["train.steps=4", ...],
                   "base": WORKDIR (optional: a DiffFit fine-tune of it),
                   "embed": true (optional: with "base", a WDM watermark embedded into it)}],
       "out": DIR}
"""

import json
import os
import sys

import jax
import numpy as np


def main(spec_path: str, process_id: int) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  from wdmjax.configs import load_config
  from wdmjax.peft import PeftSpec, finetune
  from wdmjax.runs import embed, load_model
  from wdmjax.train import train
  from wdmjax.train.distributed import initialize
  from wdmjax.train.sharding import bytes_per_device, to_host
  from wdmjax.watermark import Secret

  if spec["num_processes"] > 1:
    initialize(spec["coordinator"], spec["num_processes"], process_id, heartbeat_timeout=20)
  for phase in spec["phases"]:
    cfg = load_config(spec["config"], phase["set"])
    if phase.get("embed"):
      secret = Secret("random:1", "keyed:2", key=3, block=2)
      steps = int(cfg.train.steps)
      state = embed(phase["workdir"], secret, base=phase["base"], steps=steps,
                    overrides=phase["set"], progress=False).state
    elif phase.get("base"):
      state = finetune(cfg, phase["workdir"], phase["base"], load_model(phase["base"]).params,
                       PeftSpec("difffit"), progress=False)
    else:
      state = train(cfg, phase["workdir"], progress=False)
    leaves = jax.tree.leaves(state.params)
    dump = {f"host_{i}": v for i, v in enumerate(jax.tree.leaves(to_host(state.params)))}
    # Every device's own copy of each replicated leaf, read locally (no collective), so that
    # "identical across processes" compares what the processes really hold.
    for i, leaf in enumerate(leaves):
      if leaf.sharding.is_fully_replicated:
        dump[f"local_{i}"] = np.stack([np.asarray(s.data) for s in leaf.addressable_shards])
    per_dev = bytes_per_device(state)
    dump["bytes_per_device"] = np.asarray(sorted(per_dev.values()))
    dump["step"] = np.asarray(int(state.step))
    name = f"{phase['name']}_p{jax.process_index()}.npz"
    np.savez(os.path.join(spec["out"], name), **dump)
  print(json.dumps({"process": jax.process_index(), "of": jax.process_count(),
                    "devices": jax.device_count()}), flush=True)
  from wdmjax.train.distributed import exit_run
  exit_run(0)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]))
