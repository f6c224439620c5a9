"""DiffFit: the ImageNet-256 DiT-XL/2 fine-tuned to 512 px (64x64 latents, 1024 tokens).

Run with `wdmjax finetune --peft difffit --base <the 256 workdir>`: the learning rate is
the base's times 10 (1e-3), as in the DiffFit paper, and `pos_coord_scale` 2 stretches the
2-D position embedding so the 64x64 grid spans the coordinates the base learned on 32x32
(DiffFit's positional-embedding trick). Only biases, norms, gammas and the class embedding
train (0.25% of the parameters, most of it the 1001 x 1152 class table), so the frozen
weights dominate the memory: fsdp 4 shards them together with the small trainable state.
"""

import ml_collections

from wdmjax.configs import dit_xl2_imagenet256


def get_config() -> ml_collections.ConfigDict:
  cfg = dit_xl2_imagenet256.get_config()
  cfg.data.name = "imagenet_latents/512"
  cfg.data.resolution = 64
  cfg.model.pos_coord_scale = 2.0
  cfg.train.steps = 30_000
  cfg.train.lr = 1e-3
  cfg.mesh.fsdp = 4
  return cfg
