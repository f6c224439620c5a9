"""Local robustness to Gaussian noise: Monte Carlo and the analytic Taylor, MMSE and
multivariate-sigmoid estimators, per input, per class, and the most vulnerable inputs."""

from wdmjax.robustness.estimators import (
  METHODS,
  most_vulnerable,
  p_robust,
  robustness_by_class,
  taylor_z_and_cov,
)

__all__ = ["METHODS", "most_vulnerable", "p_robust", "robustness_by_class",
           "taylor_z_and_cov"]
