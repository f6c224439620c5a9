"""Trains the LeNet-5 of the robustness estimators on mnist5k and ships it as an asset.

  python experiments/train_lenet.py [--steps 3000] [--out wdmjax/assets/lenet_mnist5k.npz]

Pixels in [0, 1]; 4,000 of the 5,000 digits train, 1,000 are held out
(`wdmjax.data.mnist5k_split`).
Writes the parameters (float32 .npz, read by `wdmjax.models.pretrained_lenet`) and
experiments/results/lenet_mnist5k.{json,md} (held-out accuracy, time).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from wdm_mnist5k import write_json_and_markdown

from wdmjax.data import mnist5k_split
from wdmjax.metrics.classifier import classifier_accuracy, train_classifier
from wdmjax.models import save_params_npz
from wdmjax.models.lenet import LeNet, lenet_asset_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=3000)
  ap.add_argument("--out", default=lenet_asset_path())
  ap.add_argument("--results", default=RESULTS)
  args = ap.parse_args()
  x, y, x_test, y_test = mnist5k_split()
  t0 = time.time()
  model, params = train_classifier(x, y, jax.random.PRNGKey(0),
                                   steps=args.steps, model=LeNet(), progress=True)
  seconds = time.time() - t0
  res = {"steps": args.steps, "train_images": len(x), "held_out": len(x_test),
         "train_accuracy": classifier_accuracy(model, params, x, y),
         "held_out_accuracy": classifier_accuracy(model, params, x_test, y_test),
         "seconds": seconds, "params": int(sum(v.size for v in jax.tree.leaves(params))),
         "backend": jax.default_backend()}
  save_params_npz(params, args.out, dtype=np.float32)
  md = ("# LeNet-5 on mnist5k\n\n`python experiments/train_lenet.py` "
        f"({res['backend']}): {res['params']:,} parameters, {args.steps} Adam steps of 64 "
        f"on {len(x)} digits in {seconds:.0f} s; accuracy {res['train_accuracy']:.4f}"
        f" on them, **{res['held_out_accuracy']:.4f}** on the {res['held_out']} held out.\n")
  write_json_and_markdown(os.path.join(args.results, "lenet_mnist5k"), res, md)
  print(md)


if __name__ == "__main__":
  main()
