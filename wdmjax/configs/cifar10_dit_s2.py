"""DiT-S/2 on CIFAR-10 (32x32x3, 256 tokens), class-conditional with guidance."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=dict(name="cifar10", resolution=32, channels=3),
      model=dict(name="dit", patch_size=2, width=384, depth=12, num_heads=6, num_classes=10,
                 class_dropout_prob=0.1),
      train=dict(steps=400_000, batch_size=128, lr=1e-4, warmup_steps=1000, ema_decay=0.9999,
                 log_every=100, ckpt_every=10_000, sample_every=50_000),
      sample=dict(sampler="ddim", steps=50, num=100, guidance_scale=1.5),
  ))
