"""A small unconditional latent DiT on photos32 (32x32 crops of natural photographs), as
latents of wdmjax's autoencoder: `mnist5k_ldm`'s recipe on 8x8x4 latents (64 tokens).

First `wdmjax autoencoder train --workdir AE --data photos32`, then train with
`--set data.data_dir=AE/tfds`; `wdmjax autoencoder generate --ldm WORKDIR` decodes samples.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=dict(name="ae_latents/photos32", resolution=8, channels=4, data_dir=None),
      model=dict(name="dit", patch_size=1, width=128, depth=6, num_heads=4, num_classes=0,
                 class_dropout_prob=0.0, learn_sigma=False),
      diffusion=dict(objective="v"),
      train=dict(steps=4000, batch_size=48, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                 log_every=50, ckpt_every=250, sample_every=0),
      sample=dict(sampler="ddim", steps=50, num=64, guidance_scale=None),
  ))
