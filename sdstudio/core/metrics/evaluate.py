"""FID/KID of generated samples against real images, as one result dict for logs, metrics.jsonl and sweeps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fid import (
    FID_MIN_SAMPLES,
    KID_NOISY_BELOW,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    FidEvaluator,
    fid_from_features,
    kid,
)
from .inception import CONFIG_KEY, WEIGHTS_FILENAME, load_fid_inception

DISABLED_NOTE = (f"disabled: no Inception weights (set {CONFIG_KEY} to the pt_inception-2015-12-05 file, "
                 f"{WEIGHTS_FILENAME})")


def _result(n_generated: int, n_real: int, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"enabled": True, "fid": None, "fid_meaningful": False, "kid_mean": None,
                            "kid_std": None, "kid_subsets": 0, "kid_subset_size": 0,
                            "n_generated": n_generated, "n_real": n_real, "note": ""}
    base.update(fields)
    return base


def disabled_result(n_generated: int = 0, n_real: int = 0) -> dict[str, Any]:
    """The result when no weights are configured: every metric None, the note says how to enable it."""
    return _result(n_generated, n_real, enabled=False, note=DISABLED_NOTE)


def compare_features(generated: np.ndarray, real: np.ndarray, *, kid_subsets: int = KID_SUBSETS,
                     kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict[str, Any]:
    """FID and KID between two (N, 2048) feature arrays, with the sample-size caveats in ``note``.

    Cache the real images' features and call this directly to avoid re-running Inception on them.
    """
    n_gen, n_real = len(generated), len(real)
    notes: list[str] = []
    if min(n_gen, n_real) < 2:
        return _result(n_gen, n_real, note=f"not computed: FID and KID need at least 2 images per set "
                                           f"(got {n_gen} generated, {n_real} real)")
    fid = fid_from_features(generated, real)
    meaningful = min(n_gen, n_real) >= FID_MIN_SAMPLES
    if not meaningful:
        notes.append(f"FID from fewer than {FID_MIN_SAMPLES} images per set is not meaningful (strongly biased by "
                     f"the sample count); use KID")
    kid_mean, kid_std = kid(generated, real, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    size = min(kid_subset_size, n_gen, n_real)
    one_subset = math.isnan(kid_std)
    if one_subset:
        notes.append("KID from the whole sets (one subset): no spread estimate")
    if size < KID_NOISY_BELOW:
        notes.append(f"KID from {size} images per set is noisy")
    return _result(n_gen, n_real, fid=fid, fid_meaningful=meaningful, kid_mean=kid_mean,
                   kid_std=None if one_subset else kid_std, kid_subsets=1 if one_subset else kid_subsets,
                   kid_subset_size=size, note="; ".join(notes))


def evaluate_samples(generated: np.ndarray, real: np.ndarray, weights_path: str | Path | None, *,
                     device: str | torch.device = "cpu", batch_size: int = 32, seed: int = 0,
                     evaluator: FidEvaluator | None = None) -> dict[str, Any]:
    """FID/KID of uint8 (N, H, W, C) generated images against real ones.

    With no ``weights_path`` (None or "") and no ``evaluator`` the metric is disabled: the result says so and
    holds no numbers. A path that is set but wrong raises InceptionWeightsError (check it at start-up with
    ``load_fid_inception``). Pass ``evaluator`` to reuse a loaded network across evaluations.
    """
    n_gen, n_real = len(generated), len(real)
    if evaluator is None:
        if not weights_path:
            return disabled_result(n_gen, n_real)
        evaluator = FidEvaluator(load_fid_inception(weights_path), device=device, batch_size=batch_size)
    result = compare_features(evaluator.features(generated), evaluator.features(real), seed=seed)
    if weights_path:
        result["weights"] = str(weights_path)
    return result
