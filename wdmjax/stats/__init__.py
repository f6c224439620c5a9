"""Statistics of watermark verification: exact binomial tails and rank tests in log space."""

from wdmjax.stats.binomial import binom_log10_sf, min_agreeing_bits
from wdmjax.stats.ranks import rank_sum_log10_p

__all__ = ["binom_log10_sf", "min_agreeing_bits", "rank_sum_log10_p"]
