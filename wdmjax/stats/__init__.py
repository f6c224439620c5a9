"""Statistics of watermark verification: exact binomial tails, identification among keys,
rank, permutation and key-flip randomization tests, and the multivariate normal CDF (Genz)
behind the robustness estimators."""

from wdmjax.stats.binomial import (
  Identification,
  binomial_log10_sf,
  exact_binomial_log10_sf,
  identify,
  log_betainc,
  threshold_for_fpr,
)
from wdmjax.stats.genz import mvn_cdf
from wdmjax.stats.randomization import two_point_log10_sf, two_point_pmf
from wdmjax.stats.ranks import permutation_log10_p, rank_sum_log10_p

__all__ = ["Identification", "binomial_log10_sf", "exact_binomial_log10_sf", "identify",
           "log_betainc", "mvn_cdf", "permutation_log10_p", "rank_sum_log10_p",
           "threshold_for_fpr", "two_point_log10_sf", "two_point_pmf"]
