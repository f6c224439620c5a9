"""WDM: watermarks embedded through the Watermark Diffusion Process, extracted, verified."""

from wdmjax.watermark.secret import Secret
from wdmjax.watermark.triggers import (
  ImageShape,
  keyed_targets,
  make_trigger,
  make_watermark,
)
from wdmjax.watermark.verify import (
  ALPHA,
  DECOY_TEST,
  EXACT_TEST,
  decoy_test,
  expected_bits,
  keyed_test,
  vote_bits,
)
from wdmjax.watermark.wdp import (
  GAMMA1,
  GAMMA2,
  extract,
  watermark_labels,
  wdp_input,
  wdp_loss,
  wdp_moments,
  wdp_q_sample,
)

__all__ = [
  "ALPHA",
  "DECOY_TEST",
  "EXACT_TEST",
  "GAMMA1",
  "GAMMA2",
  "ImageShape",
  "Secret",
  "decoy_test",
  "expected_bits",
  "extract",
  "keyed_targets",
  "keyed_test",
  "make_trigger",
  "make_watermark",
  "vote_bits",
  "watermark_labels",
  "wdp_input",
  "wdp_loss",
  "wdp_moments",
  "wdp_q_sample",
]
