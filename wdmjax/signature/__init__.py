"""Stable Signature (Fernandez, Couairon, Jegou, Douze, Furon, ICCV 2023): bit watermarks
rooted in a latent decoder, read by a HiDDeN extractor, detected with an exact binomial test.

- `hidden`: the HiDDeN encoder and extractor (Zhu et al. 2018), `embed`.
- `whitening`: PCA whitening of the extractor's logits on clean images.
- `detect`: messages from a key, detection at a false-positive rate, identification among
  users.
"""

from wdmjax.signature.detect import Detection, detect, identify_users, message_bits
from wdmjax.signature.hidden import HiddenEncoder, HiddenExtractor, embed
from wdmjax.signature.whitening import Whitening, fit_whitening, whiten

__all__ = ["Detection", "HiddenEncoder", "HiddenExtractor", "Whitening", "detect", "embed",
           "fit_whitening", "identify_users", "message_bits", "whiten"]
