"""LeNet-5 (LeCun et al., 1998), the small classifier of the robustness estimators.

Conv 5x5 (6, SAME) -> ReLU -> 2x2 max pool -> Conv 5x5 (16, VALID) -> ReLU -> 2x2 max pool
-> Dense 120 -> ReLU -> Dense 84 -> ReLU -> Dense num_classes: 61,706 parameters on 28x28x1.
Inputs are pixels in [0, 1], the scale on which the robustness literature states its noise
levels sigma. `pretrained_lenet()` loads the one trained on mnist5k by
experiments/train_lenet.py (shipped in wdmjax/assets) on `wdmjax.data.mnist5k_split`.
"""

from __future__ import annotations

import os
from importlib import resources

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from wdmjax.errors import check
from wdmjax.models.layers import max_pool_2x2
from wdmjax.models.params_io import load_params_npz

LENET_ASSET = "lenet_mnist5k.npz"


class LeNet(nn.Module):
  """LeNet-5 with ReLU and max pooling; images [B, H, W, C] in [0, 1] -> logits [B, K]."""
  num_classes: int = 10
  min_size: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check(x.ndim == 4 and min(x.shape[1:3]) >= self.min_size,
          f"x: expected shape [B, H, W, C] with H, W >= {self.min_size}, got {x.shape}")
    h = nn.relu(nn.Conv(6, (5, 5), padding="SAME", name="conv1")(x.astype(jnp.float32)))
    h = max_pool_2x2(h)
    h = nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(h))
    h = max_pool_2x2(h)
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(nn.Dense(120, name="fc1")(h))
    h = nn.relu(nn.Dense(84, name="fc2")(h))
    return nn.Dense(self.num_classes, name="logits")(h)


def lenet_asset_path() -> str:
  return str(resources.files("wdmjax") / "assets" / LENET_ASSET)


def pretrained_lenet(path: str | None = None) -> tuple[LeNet, chex.ArrayTree]:
  """(LeNet(), params) trained on mnist5k (28x28x1 in [0, 1]) by experiments/train_lenet.py."""
  path = path or lenet_asset_path()
  check(os.path.isfile(path), f"path: no trained LeNet at {path!r}; run "
                              "experiments/train_lenet.py to make one")
  return LeNet(), load_params_npz(path)
