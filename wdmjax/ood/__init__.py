"""Diffusion reconstruction as an out-of-distribution (OOD) detector, after the study of
diffusion and OOD data (MaybeLizzy/Diffusion_OOD_Robustness): noise an input to step t, let
the model reconstruct it, and score it by the reconstruction loss.

- `reconstruction`: `reconstruction_losses` / `reconstruction_score` for any wdmjax
  denoiser and objective (several t and noise draws in one jit, optional DDIM
  reconstruction) and `elbo_score`, the likelihood baseline.
- `aggregate`: one t, the mean over t, or a Gaussian combiner of the per-t losses, chosen
  and calibrated on in-distribution validation data only (`Detector`).
- `metrics`: AUROC, AUPR, FAR95, TPR at a false alarm rate, in JAX.
- `baselines`: maximum softmax probability, energy and Mahalanobis scores of a LeNet.
- `sets`: offline OOD sets (noise, inverted digits, photographs, other digits).
"""

from wdmjax.ood.aggregate import (
    AGGREGATIONS,
    Detector,
    aggregate,
    calibrate,
    candidates,
    fit_gaussian,
    proxy_outliers,
    select,
)
from wdmjax.ood.baselines import (
    Mahalanobis,
    energy_score,
    fit_mahalanobis,
    lenet_outputs,
    mahalanobis_score,
    msp_score,
)
from wdmjax.ood.metrics import (
    aupr,
    auroc,
    detection_report,
    far95,
    far_at_tpr,
    threshold_at_fpr,
    tpr_at_fpr,
)
from wdmjax.ood.reconstruction import (
    METRICS,
    elbo_score,
    elbo_steps,
    reconstruct,
    reconstruction_losses,
    reconstruction_score,
)
from wdmjax.ood.sets import OOD_SETS, class_split, fit_images, load_images, may_share_images

__all__ = [
    "AGGREGATIONS", "METRICS", "OOD_SETS", "Detector", "Mahalanobis", "aggregate", "aupr",
    "auroc", "calibrate", "candidates", "class_split", "detection_report", "elbo_score",
    "elbo_steps", "energy_score", "far95", "far_at_tpr", "fit_gaussian", "fit_images",
    "fit_mahalanobis", "lenet_outputs", "load_images", "mahalanobis_score", "may_share_images",
    "msp_score", "proxy_outliers", "reconstruct", "reconstruction_losses",
    "reconstruction_score", "select", "threshold_at_fpr", "tpr_at_fpr",
]
