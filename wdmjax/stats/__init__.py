"""Statistics of watermark verification: exact binomial tails, identification among keys,
rank tests, and the multivariate normal CDF (Genz) behind the robustness estimators."""

from wdmjax.stats.binomial import (
  Identification,
  binomial_log10_sf,
  exact_binomial_log10_sf,
  identify,
  log_betainc,
  threshold_for_fpr,
)
from wdmjax.stats.genz import mvn_cdf
from wdmjax.stats.ranks import rank_sum_log10_p

__all__ = ["Identification", "binomial_log10_sf", "exact_binomial_log10_sf", "identify",
           "log_betainc", "mvn_cdf", "rank_sum_log10_p", "threshold_for_fpr"]
