"""Statistics of watermark verification: exact binomial tails in log space."""

from wdmjax.stats.binomial import binom_log10_sf, min_agreeing_bits

__all__ = ["binom_log10_sf", "min_agreeing_bits"]
