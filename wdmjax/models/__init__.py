"""Score networks (Flax linen, NHWC, images in [-1, 1]): UNet and DiT."""

from wdmjax.models.autoencoder import (
  Decoder,
  Encoder,
  autoencoder_loss,
  autoencoder_modules,
  init_autoencoder,
)
from wdmjax.models.build import (
  MODELS,
  build_model,
  count_params,
  dummy_inputs,
  init_params,
  param_count_from_config,
)
from wdmjax.models.dit import DIT_PRESETS, DiT, DiTBlock, FinalLayer
from wdmjax.models.layers import (
  NULL_LABEL,
  LabelEmbedder,
  QKVDense,
  SelfAttention,
  TimestepEmbedder,
  attention,
  drop_labels,
  get_2d_sincos_pos_embed,
  timestep_embedding,
)
from wdmjax.models.lenet import LeNet, pretrained_lenet
from wdmjax.models.params_io import load_params_npz, save_params_npz
from wdmjax.models.unet import UNet

__all__ = [
  "DIT_PRESETS",
  "Decoder",
  "Encoder",
  "MODELS",
  "NULL_LABEL",
  "DiT",
  "DiTBlock",
  "FinalLayer",
  "LabelEmbedder",
  "LeNet",
  "QKVDense",
  "SelfAttention",
  "TimestepEmbedder",
  "UNet",
  "attention",
  "autoencoder_loss",
  "autoencoder_modules",
  "build_model",
  "count_params",
  "drop_labels",
  "dummy_inputs",
  "get_2d_sincos_pos_embed",
  "init_autoencoder",
  "init_params",
  "load_params_npz",
  "param_count_from_config",
  "pretrained_lenet",
  "save_params_npz",
  "timestep_embedding",
]
