"""Attacks on watermarked models (weights, sampling) and on their images (the edits of
`wdmjax.imaging`, which the methods share)."""

from wdmjax.attacks.model import kernel_sparsity, prune, quantize, quantize_int8, weight_noise
from wdmjax.attacks.spec import (
  ATTACKS,
  FINETUNE_LR,
  Attack,
  apply_attacks,
  apply_weight_attack,
  parse_attack,
)
from wdmjax.imaging import (  # the image attacks, shared with signature (training)
  brightness,
  center_crop,
  compose,
  contrast,
  gaussian_blur,
  gaussian_noise,
  jpeg,
  jpeg_ste,
  random_crop,
  resize,
  rotate,
)

__all__ = [
  "ATTACKS", "FINETUNE_LR", "Attack", "apply_attacks", "apply_weight_attack", "brightness",
  "center_crop", "compose", "contrast", "gaussian_blur", "gaussian_noise", "jpeg", "jpeg_ste",
  "kernel_sparsity", "parse_attack", "prune", "quantize", "quantize_int8", "random_crop",
  "resize", "rotate", "weight_noise",
]
