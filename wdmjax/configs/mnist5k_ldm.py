"""A small latent DiT on the 5,000 embedded MNIST digits, as latents of wdmjax's autoencoder.

The latent diffusion counterpart of `mnist5k_dit`: the digits are first encoded by a tiny KL
autoencoder (`wdmjax autoencoder train --workdir AE --data mnist5k`) to 7x7x4 latents of unit
variance, `ae_latents/mnist5k` in AE/tfds; the DiT sees each latent pixel as a token (patch 1,
49 tokens), and `wdmjax autoencoder generate --ldm WORKDIR` decodes its samples. Set the data
dir to the autoencoder's: `--set data.data_dir=AE/tfds`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=dict(name="ae_latents/mnist5k", resolution=7, channels=4, data_dir=None),
      model=dict(name="dit", patch_size=1, width=128, depth=6, num_heads=4, num_classes=10,
                 class_dropout_prob=0.1, learn_sigma=False),
      diffusion=dict(objective="v"),
      train=dict(steps=4000, batch_size=48, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                 log_every=50, ckpt_every=250, sample_every=0),
      sample=dict(sampler="ddim", steps=50, num=100, guidance_scale=2.0),
  ))
