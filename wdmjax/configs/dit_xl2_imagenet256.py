"""DiT-XL/2 on ImageNet-256 latents: the DiT paper's recipe, for a TPU pod or GPU cluster.

AdamW at 1e-4 without weight decay, warm-up or clipping, global batch 256, EMA 0.9999,
class dropout 0.1 for classifier-free guidance, linear betas over 1000 steps. Data:
`imagenet_latents/256` (see `wdmjax.data.latents`), read batch by batch, each host only its
own examples. Differences from the paper: sigma is not learned (no L_vlb term; DDIM and
DDPM sampling with fixed variances need none), and 400k steps rather than 7M.
The state (params, EMA, two Adam moments) is 10.8 GB in float32: it fits a 32 GB v4 chip
replicated; on 16 GB v5e chips shard it with `--set mesh.fsdp=4` (or 8).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=dict(name="imagenet_latents/256", resolution=32, channels=4, in_memory=False),
      model=dict(name="dit", preset="XL/2", num_classes=1000, class_dropout_prob=0.1,
                 learn_sigma=False),
      diffusion=dict(schedule="linear", num_timesteps=1000, objective="eps"),
      train=dict(steps=400_000, batch_size=256, lr=1e-4, warmup_steps=0, weight_decay=0.0,
                 grad_clip=None, ema_decay=0.9999, log_every=100, ckpt_every=5_000,
                 keep_checkpoints=3, sample_every=0, async_checkpoint=True),
      sample=dict(sampler="ddpm", steps=250, num=64, guidance_scale=1.5),
      mesh=dict(data=-1, fsdp=1),
  ))
