"""WDM: watermarks embedded through the Watermark Diffusion Process, extracted, verified."""

from wdmjax.watermark.secret import Secret
from wdmjax.watermark.triggers import (
  ImageShape,
  decoy_trigger_specs,
  is_generated_trigger,
  keyed_targets,
  make_trigger,
  make_watermark,
)
from wdmjax.watermark.verify import (
  ALPHA,
  DECOY_TEST,
  EXACT_TEST,
  add_warning,
  best_log10_p,
  decoy_test,
  expected_bits,
  keyed_test,
  reach_warning,
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
  "add_warning",
  "best_log10_p",
  "decoy_test",
  "decoy_trigger_specs",
  "expected_bits",
  "extract",
  "is_generated_trigger",
  "keyed_targets",
  "keyed_test",
  "make_trigger",
  "make_watermark",
  "reach_warning",
  "vote_bits",
  "watermark_labels",
  "wdp_input",
  "wdp_loss",
  "wdp_moments",
  "wdp_q_sample",
]
