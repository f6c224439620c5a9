"""Metrics: Frechet distance between feature Gaussians and the digit classifier behind it."""

from wdmjax.metrics.classifier import (
  ClassifierState,
  DigitClassifier,
  classifier_accuracy,
  classifier_features,
  classifier_logits,
  train_classifier,
)
from wdmjax.metrics.frechet import (
  frechet_distance,
  frechet_distance_from_features,
  gaussian_stats,
)

__all__ = [
  "ClassifierState",
  "DigitClassifier",
  "classifier_accuracy",
  "classifier_features",
  "classifier_logits",
  "frechet_distance",
  "frechet_distance_from_features",
  "gaussian_stats",
  "train_classifier",
]
