"""Image edits shared by the methods: the attacks a watermark must survive (evaluation) and
their differentiable versions (training a watermark extractor through them)."""

from wdmjax.imaging.edits import (
  SUBSAMPLING,
  ImageAttack,
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
  "SUBSAMPLING", "ImageAttack", "brightness", "center_crop", "compose", "contrast",
  "gaussian_blur", "gaussian_noise", "jpeg", "jpeg_ste", "random_crop", "resize", "rotate",
]
