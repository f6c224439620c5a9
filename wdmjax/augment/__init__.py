"""Uncertainty-based data augmentation (Wu, Zhang, Valiant, Re: "On the Generalization
Effects of Linear Transformations in Data Augmentation", ICML 2020).

    from wdmjax.augment import Augmentation, uncertainty_augment, random_augment, TRANSFORMS

- `transforms`: the family of image transformations, each `(key, x, magnitude) -> x` on
  NHWC batches in [-1, 1] (mixup and cutmix also mix the targets).
- `policy`: compositions of L random transformations (the random-sampling baseline) and
  `Augmentation`, a validated policy ("none", "random", "uncertainty") with L, C, S.
- `uncertainty`: C candidates per example, one forward pass, keep the S with highest loss.
- `ridge`: the paper's theory in closed form (over-parametrized ridge regression).
"""

from wdmjax.augment.policy import (
  POLICIES,
  Augmentation,
  augment_candidates,
  random_augment,
  shifted,
)
from wdmjax.augment.ridge import (
  augment_label_preserving,
  augment_mixup,
  error_curves,
  label_preserving_drop,
  matching_ridge_strength,
  random_problem,
  ridge,
)
from wdmjax.augment.transforms import (
  DIGIT_FAMILY,
  FAMILY,
  MAX_STRENGTH,
  MIXING,
  TRANSFORMS,
  autocontrast,
  blur,
  brightness,
  contrast,
  cutmix,
  cutout,
  equalize,
  flip,
  mixup,
  posterize,
  rotate,
  scale,
  sharpness,
  shear_x,
  shear_y,
  solarize,
  translate_x,
  translate_y,
)
from wdmjax.augment.uncertainty import (
  SELECTIONS,
  Selection,
  select_proportional,
  select_top,
  uncertainty_augment,
)

__all__ = [
  "DIGIT_FAMILY", "FAMILY", "MAX_STRENGTH", "MIXING", "POLICIES", "SELECTIONS", "TRANSFORMS",
  "Augmentation", "Selection", "augment_candidates", "augment_label_preserving",
  "augment_mixup", "autocontrast", "blur", "brightness", "contrast", "cutmix", "cutout",
  "equalize", "error_curves", "flip", "label_preserving_drop", "matching_ridge_strength",
  "mixup", "posterize", "random_augment", "random_problem", "ridge", "rotate", "scale",
  "select_proportional", "select_top", "sharpness", "shear_x", "shear_y", "shifted",
  "solarize", "translate_x", "translate_y", "uncertainty_augment",
]
