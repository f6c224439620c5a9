"""Trains the base model that `wdmjax demo` ships and exports it to wdmjax/assets/.

  python experiments/make_demo_base.py --workdir runs/mnist5k_dit

Trains (or resumes, or finds finished) the shipped config `mnist5k_dit`
(wdmjax/configs/mnist5k_dit.py) in the workdir, about 27 minutes on a 2-core CPU (see
experiments/results/mnist5k_dit.md), then writes its EMA weights as float16 (3.7 MB instead of
7.5 MB; sampling is unchanged within noise) to wdmjax/assets/demo_base.npz and its config to
wdmjax/assets/demo_base.json.
"""

from __future__ import annotations

import argparse
import os

from wdmjax.configs import load_config
from wdmjax.models import save_params_npz
from wdmjax.train import load_trained, train
from wdmjax.train.export import save_config_json

ASSETS = os.path.join(os.path.dirname(__file__), "..", "wdmjax", "assets")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/mnist5k_dit")
  args = ap.parse_args()
  cfg = load_config("mnist5k_dit")
  state = train(cfg, args.workdir, log=print)
  print(f"base model at step {int(state.step)}")
  cfg, params = load_trained(args.workdir, ema=True)
  save_params_npz(params, os.path.join(ASSETS, "demo_base.npz"))
  save_config_json(cfg, os.path.join(ASSETS, "demo_base.json"))
  print(f"exported to {os.path.abspath(ASSETS)}")


if __name__ == "__main__":
  main()
