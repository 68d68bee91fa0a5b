"""Aspect-ratio bucketing: a set of training sizes of about the same area, and which image goes where.

Each image trains at the bucket whose aspect ratio is closest to its own (resized to cover it, then
cropped), and every batch holds images of one bucket. A bucket with fewer images per epoch than a batch
could never fill one, so it is merged into its closest-aspect neighbour (see ``plan_buckets``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .scan import ImageRecord

DEFAULT_STEP = 64
SMALL_RESOLUTION = 128  # below this, a step of 64 leaves no choice of sizes: use SMALL_STEP
SMALL_STEP = 8


class BucketSize(NamedTuple):
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def effective_step(resolution: int, step: int = DEFAULT_STEP) -> int:
    """The size step: ``step``, or 8 for resolutions under 128 (tiny test models)."""
    return SMALL_STEP if resolution < SMALL_RESOLUTION and step > SMALL_STEP else step


def make_buckets(resolution: int, step: int = DEFAULT_STEP, min_side: int = 0,
                 max_side: int = 0) -> list[BucketSize]:
    """Sizes with sides a multiple of ``step`` and an area of at most resolution^2, both orientations.

    min_side / max_side default to half and twice the resolution (kohya's 256..1024 at 512 px).
    For each width the height is the largest step multiple that keeps the area within the target.
    """
    step = max(1, step)
    area = resolution * resolution
    low = max(step, _round_up(min_side or resolution // 2, step))
    high = max(low, (max_side or resolution * 2) // step * step)
    sizes = {BucketSize(resolution // step * step or step, resolution // step * step or step)}
    width = low
    while width <= high:
        height = min(high, area // width // step * step)
        if height >= low:
            sizes.add(BucketSize(width, height))
            sizes.add(BucketSize(height, width))
        width += step
    return sorted(sizes, key=lambda b: (b.aspect, b.width))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def closest_bucket(width: int, height: int, buckets: Sequence[BucketSize]) -> BucketSize:
    """The bucket whose aspect ratio is nearest (in log scale; ties: the larger, then the wider)."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b.aspect) - target), 9), -b.width * b.height,
                                       -b.width))


@dataclass
class BucketPlan:
    """Which bucket each record (by index) trains at."""

    buckets: list[BucketSize]  # the full set
    sizes: list[BucketSize]  # per record
    merged: dict[BucketSize, BucketSize] = field(default_factory=dict)  # small bucket -> where it went
    step: int = DEFAULT_STEP

    def stats(self, records: Sequence[ImageRecord]) -> list[dict[str, Any]]:
        """Per used bucket: width, height, aspect, images and images per epoch (with repeats)."""
        return bucket_stats(records, self.sizes)

    def describe(self, records: Sequence[ImageRecord]) -> list[str]:
        lines = format_bucket_stats(self.stats(records))
        for small, into in sorted(self.merged.items()):
            lines.append(f"bucket {small} had fewer images than a batch: its images train at {into}")
        return lines


def plan_buckets(records: Sequence[ImageRecord], resolution: int, *, step: int = DEFAULT_STEP,
                 min_side: int = 0, max_side: int = 0, min_images: int = 1) -> BucketPlan:
    """Assign every record its closest bucket; then merge buckets with fewer than ``min_images`` images
    per epoch (counting repeats) into their closest-aspect used neighbour, smallest first, until each
    remaining bucket can fill a batch (or one bucket is left)."""
    step = effective_step(resolution, step)
    buckets = make_buckets(resolution, step, min_side, max_side)
    sizes = [closest_bucket(r.width, r.height, buckets) for r in records]
    merged: dict[BucketSize, BucketSize] = {}
    while True:
        per_epoch: Counter[BucketSize] = Counter()
        for record, size in zip(records, sizes, strict=True):
            per_epoch[size] += max(1, record.repeats)
        small = [b for b in per_epoch if per_epoch[b] < min_images]
        if not small or len(per_epoch) < 2:
            break
        victim = min(small, key=lambda b: (per_epoch[b], b.aspect, b.width))
        others = [b for b in per_epoch if b != victim]
        into = closest_bucket(victim.width, victim.height, others)
        for source, target in list(merged.items()):
            if target == victim:
                merged[source] = into
        merged[victim] = into
        sizes = [into if s == victim else s for s in sizes]
    return BucketPlan(buckets, sizes, merged, step)


def bucket_stats(records: Sequence[ImageRecord], sizes: Sequence[BucketSize]) -> list[dict[str, Any]]:
    """Counts per bucket, widest aspect last: ``{"width", "height", "aspect", "images", "per_epoch"}``."""
    images: Counter[BucketSize] = Counter(sizes)
    per_epoch: Counter[BucketSize] = Counter()
    for record, size in zip(records, sizes, strict=True):
        per_epoch[size] += max(1, record.repeats)
    return [{"width": b.width, "height": b.height, "aspect": round(b.aspect, 3), "images": images[b],
             "per_epoch": per_epoch[b]} for b in sorted(images, key=lambda b: (b.aspect, b.width))]


def format_bucket_stats(stats: Sequence[dict[str, Any]], batch: int = 0) -> list[str]:
    """One line per bucket, e.g. ``  640x384 (1.67): 12 images, 24 per epoch``."""
    lines = []
    for row in stats:
        line = f"  {row['width']}x{row['height']} ({row['aspect']:.2f}): {row['images']} images"
        if row["per_epoch"] != row["images"]:
            line += f", {row['per_epoch']} per epoch"
        if batch:
            full, left = divmod(row["per_epoch"], batch)
            line += f" -> {full} batches" + (f", {left} left over each epoch" if left else "")
        lines.append(line)
    return lines


def plan_from_config(records: Sequence[ImageRecord], data: Any, global_batch: int) -> BucketPlan | None:
    """The run's bucket plan, or None when ``data.bucketing`` is off."""
    if not data.bucketing:
        return None
    return plan_buckets(records, data.resolution, step=data.bucket_step,
                        min_side=data.min_bucket_side, max_side=data.max_bucket_side,
                        min_images=global_batch)
