"""A tiny DiT on the 8x8 digits: seconds per run, for tests."""

import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      data=dict(name="digits", resolution=8, channels=1),
      model=dict(name="dit", patch_size=2, width=32, depth=2, num_heads=2, num_classes=10,
                 class_dropout_prob=0.1),
      diffusion=dict(num_timesteps=100),
      train=dict(steps=20, batch_size=16, lr=1e-3, warmup_steps=0, log_every=5, ckpt_every=10,
                 sample_every=0),
      sample=dict(steps=10, num=20),
  ))
