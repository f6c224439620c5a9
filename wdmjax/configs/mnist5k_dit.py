"""A small class-conditional DiT on the 5,000 embedded MNIST digits: the CPU starting point.

49 tokens of 4x4 pixels: about 0.3 s per step of 48 images on 2 CPU cores. On short CPU
budgets the v objective gives recognisable digits several times sooner than eps: with eps,
x0 = (x_t - s eps) / a amplifies the network's error by 1 / sqrt(abar_t) (about 160x at
t = T - 1), so the early, global steps of sampling go astray.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=dict(name="mnist5k", resolution=28, channels=1),
      model=dict(name="dit", patch_size=4, width=128, depth=6, num_heads=4, num_classes=10,
                 class_dropout_prob=0.1, learn_sigma=False),
      diffusion=dict(objective="v"),
      train=dict(steps=4000, batch_size=48, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                 log_every=50, ckpt_every=250, sample_every=1000),
      sample=dict(sampler="ddim", steps=50, num=100, guidance_scale=2.0),
  ))
