"""Named configs shipped with the package (the files in experiments/configs/ return these)."""

from __future__ import annotations

import ml_collections

from wdmjax.train.config import default_config, merge


def _config(**sections) -> ml_collections.ConfigDict:
  return merge(default_config(), sections)


# On short CPU budgets the v objective gives recognisable digits several times sooner than
# eps: with eps, x0 = (x_t - s eps) / a amplifies the network's error by 1 / sqrt(abar_t)
# (about 160x at t = T - 1), so the early, global steps of sampling go astray.
_FAST_DIFFUSION = dict(objective="v")


def mnist5k_dit() -> ml_collections.ConfigDict:
  """A small class-conditional DiT on the 5,000 embedded MNIST digits: the CPU starting point."""
  return _config(
      data=dict(name="mnist5k", resolution=28, channels=1),
      # 49 tokens of 4x4 pixels: about 0.3 s per step of 48 images on 2 CPU cores.
      model=dict(name="dit", patch_size=4, width=128, depth=6, num_heads=4, num_classes=10,
                 class_dropout_prob=0.1, learn_sigma=False),
      diffusion=_FAST_DIFFUSION,
      train=dict(steps=4000, batch_size=48, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                 log_every=50, ckpt_every=250, sample_every=1000),
      sample=dict(sampler="ddim", steps=50, num=100, guidance_scale=2.0),
  )


def mnist5k_unet() -> ml_collections.ConfigDict:
  """A small class-conditional UNet on the embedded MNIST digits (slower on CPU: conv grads)."""
  return _config(
      data=dict(name="mnist5k", resolution=28, channels=1),
      model=dict(name="unet", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(7,),
                 dropout=0.0, num_classes=10, class_dropout_prob=0.1, num_groups=8),
      diffusion=_FAST_DIFFUSION,
      train=dict(steps=6000, batch_size=64, lr=5e-4, warmup_steps=200, ema_decay=0.999,
                 log_every=50, ckpt_every=500, sample_every=2000),
      sample=dict(sampler="ddim", steps=50, num=100, guidance_scale=2.0),
  )


def cifar10_unet() -> ml_collections.ConfigDict:
  """The DDPM CIFAR-10 UNet (35.7M parameters), for accelerators."""
  return _config(
      data=dict(name="cifar10", resolution=32, channels=3),
      model=dict(name="unet", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, num_classes=0),
      train=dict(steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                 grad_clip=1.0, log_every=100, ckpt_every=10_000, sample_every=50_000),
      sample=dict(sampler="ddim", steps=100, num=64),
  )


def cifar10_dit_s2() -> ml_collections.ConfigDict:
  """DiT-S/2 on CIFAR-10 (32x32x3, 256 tokens), class-conditional with guidance."""
  return _config(
      data=dict(name="cifar10", resolution=32, channels=3),
      model=dict(name="dit", patch_size=2, width=384, depth=12, num_heads=6, num_classes=10,
                 class_dropout_prob=0.1),
      train=dict(steps=400_000, batch_size=128, lr=1e-4, warmup_steps=1000, ema_decay=0.9999,
                 log_every=100, ckpt_every=10_000, sample_every=50_000),
      sample=dict(sampler="ddim", steps=50, num=100, guidance_scale=1.5),
  )


def dit_xl2_imagenet256() -> ml_collections.ConfigDict:
  """DiT-XL/2 on ImageNet-256 latents: the DiT paper's recipe, for a TPU pod or GPU cluster.

  AdamW at 1e-4 without weight decay, warm-up or clipping, global batch 256, EMA 0.9999,
  class dropout 0.1 for classifier-free guidance, linear betas over 1000 steps. Data:
  `imagenet_latents/256` (see `wdmjax.data.latents`), read batch by batch, each host only its
  own examples. Differences from the paper: sigma is not learned (no L_vlb term; DDIM and
  DDPM sampling with fixed variances need none), and 400k steps rather than 7M.
  The state (params, EMA, two Adam moments) is 10.8 GB in float32: it fits a 32 GB v4 chip
  replicated; on 16 GB v5e chips shard it with `--set mesh.fsdp=4` (or 8).
  """
  return _config(
      data=dict(name="imagenet_latents/256", resolution=32, channels=4, in_memory=False),
      model=dict(name="dit", preset="XL/2", num_classes=1000, class_dropout_prob=0.1,
                 learn_sigma=False),
      diffusion=dict(schedule="linear", num_timesteps=1000, objective="eps"),
      train=dict(steps=400_000, batch_size=256, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                 grad_clip=None, ema_decay=0.9999, log_every=100, ckpt_every=5_000,
                 keep_checkpoints=3, sample_every=0, async_checkpoint=True),
      sample=dict(sampler="ddpm", steps=250, num=64, guidance_scale=1.5),
      mesh=dict(data=-1, fsdp=1),
  )


def difffit_dit_xl2_512() -> ml_collections.ConfigDict:
  """DiffFit: the ImageNet-256 DiT-XL/2 fine-tuned to 512 px (64x64 latents, 1024 tokens).

  Run with `wdmjax finetune --peft difffit --base <the 256 workdir>`: the learning rate is
  the base's times 10 (1e-3), as in the DiffFit paper, and `pos_coord_scale` 2 stretches the
  2-D position embedding so the 64x64 grid spans the coordinates the base learned on 32x32
  (DiffFit's positional-embedding trick). Only biases, norms, gammas and the class embedding
  train (0.25% of the parameters, most of it the 1001 x 1152 class table), so the frozen
  weights dominate the memory: fsdp 4 shards them together with the small trainable state.
  """
  cfg = dit_xl2_imagenet256()
  with cfg.unlocked():
    cfg.data.name = "imagenet_latents/512"
    cfg.data.resolution = 64
    cfg.model.pos_coord_scale = 2.0
    cfg.train.steps = 30_000
    cfg.train.lr = 1e-3
    cfg.mesh.fsdp = 4
  return cfg


def demo() -> ml_collections.ConfigDict:
  """`wdmjax demo`: 2,000 steps of the mnist5k DiT, where digits become recognisable
  (about 8 to 15 minutes on 2 CPU cores)."""
  cfg = mnist5k_dit()
  with cfg.unlocked():
    cfg.train.steps = 2000
    cfg.train.sample_every = 0
    cfg.train.ckpt_every = 100
  return cfg


PRESETS = {"mnist5k_dit": mnist5k_dit, "mnist5k_unet": mnist5k_unet,
           "cifar10_unet": cifar10_unet, "cifar10_dit_s2": cifar10_dit_s2, "demo": demo,
           "dit_xl2_imagenet256": dit_xl2_imagenet256, "difffit_dit_xl2_512": difffit_dit_xl2_512}
