"""Data pipeline throughput: decode + resize + crop at 512 px, as training runs it, and reading the cache.

Generates synthetic JPEGs (smooth colour noise, ~1024x768, quality 90) in a temporary folder and measures
images/s through the training path (``ImageCaptionDataset`` + ``EpochOrder`` keys + the DataLoader the
session builds) with 0, 1 and 2 worker processes; then builds a feature cache with a fake encoder
(8x average pooling to a 4x64x64 fp16 "latent", the size of SD's) and measures reading it back, and the
effect of JPEG reduced-scale decoding on large photos. Nothing is written outside the temporary folder.

    python benchmarks/data_pipeline.py [--images 200] [--batch 8] [--large 16] [--workers 0,1,2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdstudio.core.config import RunConfig
from sdstudio.core.data.cache import ContentHashes, FeatureCache, image_items
from sdstudio.core.data.cached import CachedLatentDataset, collate_cached
from sdstudio.core.data.dataset import EpochOrder, ImageCaptionDataset, collate
from sdstudio.core.data.images import load_with_info
from sdstudio.core.data.scan import scan_dataset
from sdstudio.core.data.transforms import AugmentSettings, prepare

RESOLUTION = 512


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_jpegs(folder: Path, count: int, size: tuple[int, int], prefix: str) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        grid = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
        img.save(folder / f"{prefix}{i:04d}.jpg", quality=90)
        (folder / f"{prefix}{i:04d}.txt").write_text(f"image {i}", encoding="utf-8")


def loader_rate(config: RunConfig, records: list, workers: int, batch: int) -> float:
    """Images/s through the training loader for one epoch, timed from the first batch (worker start-up,
    a one-off per run with persistent workers, is left out)."""
    dataset = ImageCaptionDataset(records, config, train=True)
    order = EpochOrder(records, batch, seed=0)
    loader = DataLoader(dataset, batch_sampler=list(order.batches(0)), collate_fn=collate, num_workers=workers,
                        pin_memory=False)
    it = iter(loader)
    next(it)
    start, images = time.perf_counter(), 0
    for b in it:
        images += b["pixels"].shape[0]
    return images / (time.perf_counter() - start)


def fake_vae(pixels: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1).half()


def large_photo_rates(folder: Path, aug: AugmentSettings) -> dict[str, float]:
    """Per-image rate on big photos, decoding in full vs at a reduced JPEG scale (what training does)."""
    files = sorted(folder.glob("large*.jpg"))
    out = {}
    for label, min_size in (("full_decode", None), ("reduced_decode", (RESOLUTION + 1, RESOLUTION + 1))):
        start = time.perf_counter()
        for path in files:
            info, img = load_with_info(path, min_size=min_size)
            prepare(img, aug, None, original=(info.width, info.height))
        out[label] = len(files) / (time.perf_counter() - start)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--large", type=int, default=16, help="4032x3024 photos for the reduced-decode figure")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to measure")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, object] = {
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "torch": torch.__version__, "pillow": Image.__version__,
                    "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "resolution": RESOLUTION, "images": args.images, "source_size": "1024x768 JPEG q90",
    }
    with tempfile.TemporaryDirectory(prefix="sdstudio-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        t0 = time.perf_counter()
        make_jpegs(data, args.images, (1024, 768), "img")
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        config = RunConfig().with_overrides({"data.path": str(data), "data.resolution": RESOLUTION,
                                             "data.cache_in_memory": False})
        records = scan_dataset(data).records
        rates = {}
        for workers in (int(w) for w in args.workers.split(",")):
            rates[f"workers_{workers}"] = loader_rate(config, records, workers, args.batch)
            print(f"  {workers} workers: {rates[f'workers_{workers}']:.1f} img/s", file=sys.stderr)
        results["decode_resize_crop_img_per_s"] = rates

        cache = FeatureCache("benchmark-fake-vae", root=root / "cache")
        items = image_items(records, None, RESOLUTION, hashes=ContentHashes(root / "cache"))
        build = cache.build(items, fake_vae, batch_size=args.batch)
        base = ImageCaptionDataset(records, config, train=True)
        cached = CachedLatentDataset(base, cache, items)
        order = EpochOrder(records, args.batch, seed=0)
        start = time.perf_counter()
        count = 0
        for keys in order.batches(0):
            batch = collate_cached([cached[k] for k in keys])
            count += len(batch["features"])
        read = count / (time.perf_counter() - start)
        results["feature_cache"] = {"build_img_per_s": build.total / build.seconds, "read_img_per_s": read,
                                    "entry": "4x64x64 fp16", "entry_bytes": cache.path_for(cache.key(items[0]))
                                    .stat().st_size}
        print(f"  cache build {build.total / build.seconds:.1f} img/s, read {read:.1f} img/s", file=sys.stderr)

        if args.large:
            big = root / "large"
            big.mkdir()
            make_jpegs(big, args.large, (4032, 3024), "large")
            aug = AugmentSettings.from_config(config.data)
            results["large_4032x3024_img_per_s"] = large_photo_rates(big, aug)

    rows = [(f"decode+resize+crop, {k.split('_')[1]} workers", v)
            for k, v in results["decode_resize_crop_img_per_s"].items()]  # type: ignore[union-attr]
    fc = results["feature_cache"]
    rows += [("feature cache: build (decode + fake encode + write)", fc["build_img_per_s"]),  # type: ignore[index]
             ("feature cache: read", fc["read_img_per_s"])]  # type: ignore[index]
    for k, v in results.get("large_4032x3024_img_per_s", {}).items():  # type: ignore[union-attr]
        rows.append((f"4032x3024 photo, {k.replace('_', ' ')} (1 thread)", v))
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['nproc']} cores; {RESOLUTION} px from {results['source_size']}")  # type: ignore[index]
    print(f"{'pipeline':<58} {'img/s':>8}")
    for label, value in rows:
        print(f"{label:<58} {value:8.1f}")
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":  # required: DataLoader workers re-import this file on Windows / macOS
    raise SystemExit(main())
