"""Deep Serial Number (Tang, Du and Hu, "Deep Serial Number: Computational Watermarking for
DNN Intellectual Property Protection", 2020): a student distilled from a private teacher
works only when its input carries a valid serial-number stamp.

- `stamps`: serial numbers (hex), their stamps, valid and invalid sets from a PRNG key.
- `owner`: serial numbers and PRNG keys derived from the owner key (what workdirs use).
- `losses`: the gradient-reversal layer, the soft nearest neighbour loss (SNNL), the
  distillation, lock and domain losses.
- `student`: the student (G_e, G_y, G_d behind the reversal) and its jitted distillation.
- `attacks`: fine-tuning without the stamp, reverse engineering of the serial number by
  gradient descent, and exhaustive search.
- `locked`: beyond the paper, a diffusion model that generates only with a valid stamp.
"""

from wdmjax.serial.attacks import (
  ReverseEngineered,
  SearchResult,
  finetune_unlocked,
  reverse_engineer_serial,
  search_serials,
)
from wdmjax.serial.locked import locked_loss, serial_input, stamp_overlay
from wdmjax.serial.losses import (
  distillation_loss,
  domain_loss,
  gradient_reversal,
  lock_loss,
  soft_nearest_neighbor_loss,
)
from wdmjax.serial.owner import (
  SECURE_BITS,
  derive_serials,
  max_serials,
  new_nonce,
  owner_prng,
)
from wdmjax.serial.stamps import (
  CORNERS,
  StampSpec,
  draw_invalid,
  draw_serials,
  format_serial,
  invalid_batch,
  near_misses,
  parse_serial,
  read_stamp,
  stamp,
)
from wdmjax.serial.student import (
  SerialStudent,
  StudentConfig,
  StudentState,
  accuracy,
  distill_student,
  predict,
  student_for,
)

__all__ = [
  "CORNERS", "SECURE_BITS", "ReverseEngineered", "SerialStudent", "StampSpec", "StudentConfig",
  "StudentState", "accuracy", "derive_serials", "distill_student", "distillation_loss",
  "domain_loss", "draw_invalid", "draw_serials", "finetune_unlocked", "format_serial",
  "gradient_reversal", "invalid_batch", "lock_loss", "locked_loss", "max_serials",
  "near_misses", "new_nonce", "owner_prng", "parse_serial", "predict", "read_stamp",
  "reverse_engineer_serial", "SearchResult", "search_serials", "serial_input",
  "soft_nearest_neighbor_loss", "stamp", "stamp_overlay", "student_for",
]
