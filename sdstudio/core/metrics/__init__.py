"""Sample-quality metrics: FID and KID on the FID Inception-v3's features (see docs/metrics.md)."""

from __future__ import annotations

from .evaluate import DISABLED_NOTE, compare_features, disabled_result, evaluate_samples
from .fid import (
                  FID_MIN_SAMPLES,
                  KID_NOISY_BELOW,
                  KID_SUBSET_SIZE,
                  KID_SUBSETS,
                  FidEvaluator,
                  feature_stats,
                  fid_from_features,
                  frechet_distance,
                  kid,
)
from .inception import (
                  CONFIG_KEY,
                  WEIGHTS_FILENAME,
                  WEIGHTS_URL,
                  FidInceptionV3,
                  InceptionWeightsError,
                  download_fid_weights,
                  load_fid_inception,
)

__all__ = [
    "CONFIG_KEY", "DISABLED_NOTE", "FID_MIN_SAMPLES", "KID_NOISY_BELOW", "KID_SUBSETS", "KID_SUBSET_SIZE",
    "WEIGHTS_FILENAME", "WEIGHTS_URL", "FidEvaluator", "FidInceptionV3", "InceptionWeightsError",
    "compare_features", "disabled_result", "download_fid_weights", "evaluate_samples", "feature_stats",
    "fid_from_features",
    "frechet_distance", "kid", "load_fid_inception",
]
