"""Aspect-ratio buckets, the per-bucket epoch order, and the crop bookkeeping SDXL's time ids need."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.core.data.buckets import (
    BucketSize,
    closest_bucket,
    format_bucket_stats,
    make_buckets,
    plan_buckets,
    plan_from_config,
)
from sdstudio.core.data.dataset import EpochOrder, ImageCaptionDataset, SampleKey, collate
from sdstudio.core.data.images import load_with_info
from sdstudio.core.data.report import build_report, format_report
from sdstudio.core.data.scan import ImageRecord, scan_dataset
from sdstudio.core.data.transforms import AugmentSettings, prepare
from sdstudio.core.errors import DatasetError

try:
    from conftest_data import make_aspect_folder, with_data_keys, write_exif_rotated_jpeg
except ImportError:  # tests/ imported as a package
    from tests.conftest_data import make_aspect_folder, with_data_keys, write_exif_rotated_jpeg


def _record(i: int, w: int, h: int, repeats: int = 1) -> ImageRecord:
    return ImageRecord(Path(f"/x/{i}.png"), (f"c{i}",), repeats, "", w, h)


def test_bucket_set_at_512_is_kohyas() -> None:
    buckets = make_buckets(512)
    assert BucketSize(512, 512) in buckets
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert b.width * b.height <= 512 * 512
        assert 256 <= min(b) and max(b) <= 1024
        assert BucketSize(b.height, b.width) in buckets  # both orientations
    assert {BucketSize(640, 384), BucketSize(768, 320), BucketSize(1024, 256)} <= set(buckets)


def test_small_resolutions_use_a_step_of_8() -> None:
    buckets = make_buckets(16, 8)
    assert BucketSize(16, 16) in buckets and BucketSize(24, 8) in buckets and BucketSize(8, 32) in buckets
    assert plan_buckets([_record(0, 30, 10)], 16).step == 8


def test_each_image_goes_to_its_closest_aspect() -> None:
    buckets = make_buckets(512)
    assert closest_bucket(1920, 1080, buckets) == BucketSize(640, 384)  # 1.67 vs 16:9 = 1.78
    assert closest_bucket(1000, 1000, buckets) == BucketSize(512, 512)
    assert closest_bucket(1080, 1920, buckets) == BucketSize(384, 640)
    assert closest_bucket(4000, 100, buckets) == BucketSize(1024, 256)  # the widest there is


def test_buckets_too_small_for_a_batch_are_merged_into_a_neighbour() -> None:
    records = [_record(i, 64, 64) for i in range(6)] + [_record(6, 128, 64), _record(7, 120, 64)]
    plan = plan_buckets(records, 16, min_images=4)
    assert len(set(plan.sizes)) == 1, plan.sizes  # the two wide ones cannot fill a batch of 4
    assert plan.merged and "fewer images than a batch" in "\n".join(plan.describe(records))
    # repeats count: 2 wide images x 2 repeats fill a batch of 4
    records = records[:6] + [_record(6, 128, 64, 2), _record(7, 120, 64, 2)]
    plan = plan_buckets(records, 16, min_images=4)
    assert len(set(plan.sizes)) == 2 and not plan.merged
    stats = plan.stats(records)
    assert sum(s["images"] for s in stats) == 8 and sum(s["per_epoch"] for s in stats) == 10
    assert "per epoch" in "\n".join(format_bucket_stats(stats, batch=4))


def test_bucketed_epoch_order_batches_one_size_and_resumes_exactly() -> None:
    rng = random.Random(0)
    shapes = [(64, 64), (128, 64), (64, 128)]
    records = [_record(i, *shapes[i % 3], repeats=1 + i % 2) for i in range(30)]
    plan = plan_buckets(records, 64, step=8, min_images=4)
    order = EpochOrder(records, 4, seed=7, buckets=plan.sizes)
    assert order.batches_per_epoch == sum(s["per_epoch"] // 4 for s in plan.stats(records))
    first = list(order.batches(0))
    assert len(first) == order.batches_per_epoch
    for batch in first:
        assert len(batch) == 4 and len({k.size for k in batch}) == 1
        assert all(plan.sizes[k.index] == k.size for k in batch)
    assert len({k.position for b in first for k in b}) == 4 * len(first)  # positions unique in an epoch
    assert list(EpochOrder(records, 4, seed=7, buckets=plan.sizes).batches(0)) == first  # deterministic
    start = rng.randrange(1, len(first))
    assert list(order.batches(0, start)) == first[start:]  # resume mid-epoch
    assert list(order.batches(1)) != first  # another epoch, another order
    seen = {k.index for e in range(6) for b in order.batches(e) for k in b}
    assert seen == set(range(30)), "leftovers rotate: every image is trained on within a few epochs"
    assert len({k.size for b in first for k in b}) == 3  # buckets are mixed across batches


def test_no_bucket_with_a_full_batch_is_a_clear_error() -> None:
    records = [_record(i, 64, 64) for i in range(3)] + [_record(3 + i, 128, 64) for i in range(3)]
    sizes = [BucketSize(16, 16)] * 3 + [BucketSize(24, 8)] * 3
    with pytest.raises(DatasetError, match="bucket"):
        EpochOrder(records, 4, seed=0, buckets=sizes)


def test_prepare_reports_original_size_and_crop() -> None:
    aug = AugmentSettings(64, True, 0.0, 0.0, 0.0, 0.0, 0.0)
    img = Image.new("RGB", (200, 100), (10, 20, 30))
    out = prepare(img, aug, None, (64, 32))
    assert out.array.shape == (32, 64, 3) and out.target_size == (32, 64)
    assert out.original_size == (100, 200) and out.crop_top_left == (0, 0)  # same aspect: nothing cut
    out = prepare(img, aug, None)  # square: 128x64 after resizing, centre crop at x = 32
    assert out.array.shape == (64, 64, 3) and out.crop_top_left == (0, 32)
    flipped = prepare(img, aug, None, flip=True)
    assert flipped.flipped and flipped.crop_top_left == (0, 128 - 32 - 64)
    # a JPEG decoded at reduced scale is laid out from its full size: the same crop position
    small = img.resize((50, 25))
    assert prepare(small, aug, None, (32, 32), original=(200, 100)).crop_top_left == \
        prepare(img, aug, None, (32, 32)).crop_top_left


def test_random_crop_stays_inside_and_is_seeded() -> None:
    aug = AugmentSettings(32, False, 0.5, 0.0, 0.0, 0.0, 0.3)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    a = prepare(img, aug, random.Random(5), (48, 24))
    b = prepare(img, aug, random.Random(5), (48, 24))
    assert np.array_equal(a.array, b.array) and a.crop_top_left == b.crop_top_left
    assert a.array.shape == (24, 48, 3)
    y, x = a.crop_top_left
    assert y >= 0 and x >= 0


def test_dataset_items_carry_sizes_and_bucketed_batches_collate(tmp_path: Path, tiny_config) -> None:
    folder = make_aspect_folder(tmp_path / "aspect")
    cfg = with_data_keys(tiny_config, path=str(folder), bucketing=True)
    scan = scan_dataset(folder)
    plan = plan_from_config(scan.records, cfg.data, 4)
    assert plan is not None and len(set(plan.sizes)) == 3
    ds = ImageCaptionDataset(scan.records, cfg, train=True)
    order = EpochOrder(scan.records, 4, seed=0, buckets=plan.sizes)
    shapes = set()
    for keys in order.batches(0):
        batch = collate([ds[k] for k in keys])
        h, w = batch["pixels"].shape[-2:]
        shapes.add((w, h))
        assert batch["target_size"].tolist() == [[h, w]] * 4
        assert batch["original_size"].shape == (4, 2) and batch["crop_top_left"].shape == (4, 2)
    assert shapes == {(16, 16), (24, 8), (8, 24)}
    item = ImageCaptionDataset(scan.records, cfg, train=False)[0]  # validation: square
    assert item["pixels"].shape == (3, 16, 16) and item["target_size"] == (16, 16)
    with pytest.raises(DatasetError, match="one bucket"):
        collate([ds[SampleKey(0, 0, 0, BucketSize(16, 16))], ds[SampleKey(1, 0, 1, BucketSize(24, 8))]])
    assert plan_from_config(scan.records, tiny_config.data, 4) is None  # off by default


def test_report_lists_buckets(tmp_path: Path) -> None:
    folder = make_aspect_folder(tmp_path / "aspect")
    report = build_report(scan_dataset(folder), resolution=512)
    rows = report["buckets"]["bins"]
    assert {(r["width"], r["height"]) for r in rows} == {(512, 512), (704, 320), (320, 704)}
    assert sum(r["images"] for r in rows) == 12
    assert "Buckets" in format_report(report)


def test_reduced_jpeg_decoding_keeps_orientation_and_covers_the_target(tmp_path: Path) -> None:
    path = write_exif_rotated_jpeg(tmp_path / "rotated.jpg")  # shown 64x96, red block top-right
    info, img = load_with_info(path, min_size=(12, 20))
    assert (info.width, info.height) == (64, 96), "the info gives the full size"
    assert img.size == (16, 24), "decoded at 1/4 scale, still covering 12x20"
    r, g, b = img.getpixel((img.width - 2, 1))
    assert r > 180 and g < 90 and b < 90, "EXIF rotation applied to the reduced image"
    assert load_with_info(path, min_size=(40, 60))[1].size == (64, 96)  # 1/2 would not cover it
