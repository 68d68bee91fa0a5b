"""Memorisation and collapse signals from image features (pure: numpy in, numbers and warnings out).

- **Features** are L2-normalised, so every distance lies in [0, 2] whatever made them: pixels (the images
  scaled to 32 x 32, each centred on its own mean: a copy detector that needs no weights), the FID Inception's
  2048-d pool features, or a CLIP vision model's image embeddings (``core/metrics/clip_features.py``).
- **Copying:** each generated image's distance to its nearest training image, divided by the training set's own
  typical nearest-neighbour distance (the median over training images of the distance to the nearest *other*
  training image). A model that reproduces its training images draws samples far closer to one of them than
  the training images are to each other: ``copy_ratio`` (the median of those ratios over the samples) falls
  towards 0; ``copy_fraction`` is the share of samples whose ratio is below the threshold.
- **Diversity:** for each prompt, the mean pairwise distance between its images at different seeds, averaged
  over the prompts. The reference it is compared with is the smaller of its first measured value and the
  training set's own mean pairwise distance (early samples are mostly noise, whose diversity no trained model
  keeps), so a healthy run that goes from noise to pictures does not look collapsed.
- **The alarm** (``MemorisationAlarm``) says each problem once, with the step it began; its state is rebuilt
  from metrics.jsonl rows on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PIXEL_SIZE = 32


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); a zero row stays zero."""
    feats = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def pixel_features(images: np.ndarray, size: int = PIXEL_SIZE) -> np.ndarray:
    """uint8 (N, H, W, 3) images as unit vectors of their ``size`` x ``size`` RGB pixels, each image centred on
    its own mean (so brightness shifts alone do not count as a difference)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="area" if x.shape[-1] >= size else "bilinear",
                          align_corners=None if x.shape[-1] >= size else False)
    flat = x.reshape(len(x), -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return normalise(flat.numpy())


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of two normalised feature arrays: (len(a), len(b))."""
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sq = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * a64 @ b64.T
    return np.sqrt(np.clip(sq, 0.0, None))


def nearest_distances(query: np.ndarray, reference: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
    """Each query row's distance to its nearest reference row (the reference in chunks: bounded memory)."""
    best = np.full(len(query), np.inf)
    for start in range(0, len(reference), chunk):
        best = np.minimum(best, pairwise_distances(query, reference[start:start + chunk]).min(axis=1))
    return best


def training_nn_distances(train: np.ndarray) -> np.ndarray:
    """Each training image's distance to its nearest *other* training image (needs >= 2 images).

    Exact duplicates in the training set (distance 0) are left out, so they do not make every sample look
    like a copy; when only duplicates remain the result is empty."""
    if len(train) < 2:
        return np.zeros(0)
    out = np.empty(len(train))
    for start in range(0, len(train), 1024):
        d = pairwise_distances(train[start:start + 1024], train)
        for i in range(len(d)):
            d[i, start + i] = np.inf
            nonzero = d[i][d[i] > 1e-6]
            out[start + i] = nonzero.min() if len(nonzero) else np.nan
    return out[np.isfinite(out)]


def mean_pairwise_distance(features: np.ndarray) -> float | None:
    """The mean distance over all pairs of rows (None below two rows)."""
    n = len(features)
    if n < 2:
        return None
    d = pairwise_distances(features, features)
    return float(d[np.triu_indices(n, k=1)].mean())


def seed_diversity(features: np.ndarray, groups: int) -> float | None:
    """The mean, over ``groups`` prompts, of the mean pairwise distance between one prompt's images at its seeds;
    rows are prompt-major (prompt 0's seeds first). None when a prompt has fewer than two seeds."""
    if groups < 1 or len(features) % groups:
        raise ValueError(f"{len(features)} images are not {groups} prompts x the same number of seeds")
    per = len(features) // groups
    values = [mean_pairwise_distance(features[g * per:(g + 1) * per]) for g in range(groups)]
    if any(v is None for v in values):
        return None
    return float(np.mean([v for v in values if v is not None]))


@dataclass
class TrainingReference:
    """What generated images are compared with: the training images' features and their own spread."""

    features: np.ndarray
    nn_median: float  # typical distance of a training image to its nearest other one
    diversity: float | None  # mean pairwise distance over the training set

    @classmethod
    def from_features(cls, features: np.ndarray, *, max_pairs_images: int = 2048) -> TrainingReference:
        feats = normalise(features)
        nn = training_nn_distances(feats)
        # the diversity of a large set from an evenly spaced subset: the same answer on every call
        subset = feats[np.linspace(0, len(feats) - 1, min(len(feats), max_pairs_images)).astype(int)]
        return cls(feats, float(np.median(nn)) if len(nn) else float("nan"), mean_pairwise_distance(subset))


def measure(generated: np.ndarray, groups: int, reference: TrainingReference, *,
            copy_threshold: float) -> dict[str, Any]:
    """The numbers of one sample point (metrics.jsonl keys): ``memo_nearest`` (median distance of a sample to
    its nearest training image), ``memo_ratio`` (median of that distance over the training set's typical
    nearest-neighbour distance), ``memo_copies`` (share of samples with a ratio below ``copy_threshold``) and
    ``diversity`` (mean pairwise distance across seeds, per prompt)."""
    gen = normalise(generated)
    nearest = nearest_distances(gen, reference.features)
    out: dict[str, Any] = {"memo_nearest": float(np.median(nearest)), "memo_ratio": None, "memo_copies": None,
                           "diversity": seed_diversity(gen, groups)}
    scale = reference.nn_median
    if np.isfinite(scale) and scale > 0:
        ratios = nearest / scale
        out["memo_ratio"] = float(np.median(ratios))
        out["memo_copies"] = float(np.mean(ratios < copy_threshold))
    return out


@dataclass
class MemorisationAlarm:
    """Raises each alarm once, remembering the step it began.

    ``copy_threshold``: ``memo_ratio`` below it means samples reproduce training images; ``collapse_fraction``:
    ``diversity`` below this fraction of the reference (see the module doc) means the samples collapsed to one
    look."""

    copy_threshold: float
    collapse_fraction: float
    train_diversity: float | None = None
    first_diversity: float | None = None
    copying_since: int | None = None
    collapsed_since: int | None = None
    _said: set[str] = field(default_factory=set)

    def diversity_reference(self) -> float | None:
        known = [v for v in (self.first_diversity, self.train_diversity) if v is not None and v > 0]
        return min(known) if known else None

    def observe(self, step: int, numbers: dict[str, Any], *, announce: bool = True) -> list[str]:
        """Take one sample point's numbers; returns the warnings that are new at this step."""
        ratio, diversity = numbers.get("memo_ratio"), numbers.get("diversity")
        new: list[str] = []
        if isinstance(ratio, (int, float)):
            if ratio < self.copy_threshold:
                if self.copying_since is None:
                    self.copying_since = step
                if "copy" not in self._said:
                    self._said.add("copy")
                    new.append(
                        f"memorisation: from step {self.copying_since} the samples reproduce training images (their "
                        f"distance to the nearest training image is {ratio:.2f} x the training images' own "
                        f"nearest-neighbour distance, below eval.memorisation_threshold = {self.copy_threshold}); "
                        f"pick an earlier checkpoint, or train with fewer steps, a lower learning rate or more "
                        f"images")
            else:
                self.copying_since = None
        if isinstance(diversity, (int, float)):
            if self.first_diversity is None:
                self.first_diversity = float(diversity)
            ref = self.diversity_reference()
            if ref is not None and diversity < self.collapse_fraction * ref:
                if self.collapsed_since is None:
                    self.collapsed_since = step
                if "collapse" not in self._said:
                    self._said.add("collapse")
                    new.append(
                        f"collapse: from step {self.collapsed_since} the samples of one prompt look alike across "
                        f"seeds (diversity {diversity:.3f}, below eval.collapse_fraction = {self.collapse_fraction} "
                        f"of its reference {ref:.3f}); pick an earlier checkpoint, or lower the learning rate")
            else:
                self.collapsed_since = None
        return new if announce else []

    def replay(self, rows: Iterable[dict[str, Any]]) -> None:
        """Rebuild the state from earlier metrics rows (resume): alarms already raised are not said again."""
        for row in rows:
            if row.get("kind") == "sample" and isinstance(row.get("step"), int):
                self.observe(int(row["step"]), row, announce=False)
            if row.get("kind") == "event" and row.get("event") in ("memorisation", "collapse"):
                self._said.add("copy" if row["event"] == "memorisation" else "collapse")

    def alarms(self) -> dict[str, int | None]:
        return {"memorisation": self.copying_since, "collapse": self.collapsed_since}
