"""The DDPM CIFAR-10 UNet (35.7M parameters), for accelerators; CIFAR-10 through TFDS."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=dict(name="cifar10", resolution=32, channels=3),
      model=dict(name="unet", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, num_classes=0),
      train=dict(steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                 grad_clip=1.0, log_every=100, ckpt_every=10_000, sample_every=50_000),
      sample=dict(sampler="ddim", steps=100, num=64),
  ))
