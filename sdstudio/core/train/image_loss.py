"""Per-image loss: which training images the model struggles with (``image_loss.json`` in the run folder).

The raw loss of a sample depends mostly on its timestep (a sample noised at t = 900 has a loss many times that of
one at t = 50) and on how far training has come, so a raw running mean per image would rank images by the luck of
their timesteps. Each observation is therefore divided by the running mean loss of all images in the same
timestep bucket (ten equal buckets of the training range; an exponential mean, so it follows the loss down as the
model learns) just before it, in log space (a few huge losses do not swamp the mean): the image's score is the
geometric mean of those ratios, scaled so that the median image has 1.0; 1.0 = as hard as a typical image at the
same timestep and the same point of the run; an image the model cannot learn (a wrong caption, a bad crop, a
file that does not belong) stays well above 1. The raw mean is kept too (``raw``).

Outliers: images seen at least ``MIN_OBSERVATIONS`` times whose score lies above the median by more than
``OUTLIER_MADS`` robust standard deviations (1.4826 x the median absolute deviation), and at least
``OUTLIER_RATIO`` x the median.

The loss passed in is the training loss of each sample (Min-SNR weighted when that is on: the weight depends on
the timestep only, so the bucket normalisation divides it out). Observations stay on the device until
``MAX_PENDING`` have gathered (no host sync per step). With several processes each rank sees its own share of
every batch; the main process's share (a random subset of every batch) is what is tracked."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic

BUCKETS = 10
BUCKET_DECAY = 0.8  # exponential mean of the loss per bucket: follows the falling loss over a run
MIN_OBSERVATIONS = 2
OUTLIER_MADS = 3.0
OUTLIER_RATIO = 1.25
MAX_PENDING = 256


class ImageLossTracker:
    """``names``: the relative path of each training record (by record index); ``timesteps``: what the observed
    timesteps run up to (a DDPM schedule's number of training timesteps; 1.0 for flow matching's fractions)."""

    def __init__(self, names: list[str], timesteps: float) -> None:
        self.names = names
        self.timesteps = timesteps if timesteps > 0 else 1
        self.bucket_mean: list[float | None] = [None] * BUCKETS
        self.ratio_sum = [0.0] * len(names)
        self.raw_sum = [0.0] * len(names)
        self.count = [0] * len(names)
        self._pending: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def observe(self, indices: list[int], t: torch.Tensor, loss: torch.Tensor) -> None:
        """The per-sample losses of one micro-batch (``indices``: record indices, -1 = not a training record)."""
        self._pending.append((list(indices), t.detach(), loss.detach().float()))
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for indices, t, loss in pending:
            ts, losses = t.cpu().tolist(), loss.cpu().tolist()
            seen: dict[int, list[float]] = {}
            for index, tk, value in zip(indices, ts, losses, strict=False):
                if not math.isfinite(value) or not 0 <= index < len(self.names):
                    continue
                bucket = min(BUCKETS - 1, max(0, int(tk * BUCKETS // self.timesteps)))
                reference = self.bucket_mean[bucket]
                log_value = math.log(max(value, 1e-12))
                if reference is not None:  # the first sample of a bucket has nothing to compare to
                    self.ratio_sum[index] += log_value - reference
                    self.raw_sum[index] += value
                    self.count[index] += 1
                seen.setdefault(bucket, []).append(log_value)
            for bucket, values in seen.items():  # updated after the batch: no sample is compared with itself
                mean = sum(values) / len(values)
                old = self.bucket_mean[bucket]
                self.bucket_mean[bucket] = mean if old is None else BUCKET_DECAY * old + (1 - BUCKET_DECAY) * mean

    # -- results ------------------------------------------------------------------------------------------
    def scores(self) -> dict[str, dict[str, Any]]:
        """{name: {"loss": score, "n": observations, "raw": raw mean loss}}; the scores are scaled so that the
        median image has 1.0 (the running bucket means lag a falling loss, which lowers every ratio alike)."""
        self.flush()
        geo = {i: math.exp(self.ratio_sum[i] / self.count[i]) for i in range(len(self.names)) if self.count[i]}
        values = sorted(geo.values())
        median = _median(values) if values else 1.0
        return {self.names[i]: {"loss": g / median, "n": self.count[i], "raw": self.raw_sum[i] / self.count[i],
                                "ratio": g}
                for i, g in geo.items()}

    def to_dict(self, step: int) -> dict[str, Any]:
        images = self.scores()
        return {"images": images, "outliers": find_outliers(images), "step": step,
                "method": "mean of loss / running mean loss of the same timestep bucket (1.0 = typical)",
                "state": {"bucket_mean": self.bucket_mean}}

    def write(self, path: Path, step: int) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(step), indent=1, sort_keys=True))

    def load(self, data: dict[str, Any]) -> None:
        """Continue from an ``image_loss.json`` (a resumed run)."""
        index = {name: i for i, name in enumerate(self.names)}
        for name, entry in (data.get("images") or {}).items():
            i = index.get(name)
            if i is None or not isinstance(entry, dict):
                continue
            n = int(entry.get("n", 0))
            self.count[i] = n
            self.ratio_sum[i] = math.log(max(float(entry.get("ratio", entry.get("loss", 1.0))), 1e-12)) * n
            self.raw_sum[i] = float(entry.get("raw", 0.0)) * n
        means = (data.get("state") or {}).get("bucket_mean")
        if isinstance(means, list) and len(means) == BUCKETS:
            self.bucket_mean = [float(m) if m is not None else None for m in means]


def find_outliers(images: dict[str, dict[str, Any]]) -> list[str]:
    """The images far above the others (worst first): see the module's docstring for the rule."""
    seen = {k: float(v["loss"]) for k, v in images.items() if int(v.get("n", 0)) >= MIN_OBSERVATIONS}
    if len(seen) < 3:
        return []
    values = sorted(seen.values())
    median = _median(values)
    mad = _median(sorted(abs(v - median) for v in values))
    spread = max(1.4826 * mad, 1e-6)
    out = [k for k, v in seen.items() if v > median + OUTLIER_MADS * spread and v >= OUTLIER_RATIO * median]
    return sorted(out, key=lambda k: -seen[k])


def _median(values: list[float]) -> float:
    """The median of sorted ``values``."""
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def ranked(data: dict[str, Any]) -> list[tuple[str, float, int]]:
    """(path, score, n) of an image_loss.json's images, worst first."""
    images = data.get("images") or {}
    rows = [(k, float(v.get("loss", 0.0)), int(v.get("n", 0))) for k, v in images.items() if isinstance(v, dict)]
    return sorted(rows, key=lambda r: -r[1])
