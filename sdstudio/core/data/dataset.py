"""The torch side of the data: a dataset of scanned records, a resumable seeded batch order, the
validation split. Every random choice derives from (seed, epoch, position), so the order and the
augmentations are identical after a resume and independent of data-loader workers."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import RunConfig
from ..errors import DatasetError
from .buckets import BucketSize
from .captions import decorate_caption, folder_trigger, process_caption
from .images import load_with_info
from .scan import ImageRecord
from .training_masks import MaskSource, find_mask, load_mask
from .transforms import AugmentSettings, Prepared, prepare, to_tensor_array


@dataclass(frozen=True)
class SampleKey:
    index: int  # record index
    epoch: int
    position: int  # position within the epoch (distinguishes repeats)
    size: BucketSize | None = None  # (width, height) to train at; None = the square resolution


def _rng(*parts: int) -> random.Random:
    return random.Random(hash(parts) & 0xFFFFFFFFFFFF)


class ImageCaptionDataset(Dataset):
    """Items are dicts: ``pixels`` (3xHxW float32 in [-1, 1]), ``caption``, and for SDXL's size
    conditioning ``original_size`` (h, w), ``crop_top_left`` (y, x), ``target_size`` (h, w)."""

    def __init__(self, records: Sequence[ImageRecord], config: RunConfig, *, train: bool = True,
                 decorate: bool = True) -> None:
        self.records = list(records)
        self.decorate = decorate  # trigger word / prefix / suffix (not on DreamBooth class images)
        self.config = config
        self.train = train
        self.aug = AugmentSettings.from_config(config.data)
        self.seed = config.train.seed
        self._cache: dict[tuple[int, BucketSize | None], Prepared] = {}
        self.cache_enabled = config.data.cache_in_memory
        # masked training (loss.masked): each record's mask, None where it has none (it then trains fully)
        self.masked = bool(config.loss.masked) and train
        self.mask_sources: list[MaskSource | None] = (
            [find_mask(r.path, from_alpha=config.data.mask_from_alpha) for r in self.records] if self.masked else [])

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
        """The RGB image and its full (width, height): a JPEG may be decoded at 1/2..1/8 scale when that
        still covers the (zoomed) crop."""
        record = self.records[index]
        zoom = 1.0 / (1.0 - self.aug.random_scale) if self.train else 1.0
        needed = (int(size[0] * zoom) + 1, int(size[1] * zoom) + 1)
        background: tuple[int, int, int] = tuple(self.config.data.background)  # type: ignore[assignment]
        try:
            info, img = load_with_info(record.path, background=background, min_size=needed)
        except (OSError, DatasetError) as exc:
            raise DatasetError(f"{record.path}: cannot be loaded ({exc})") from exc
        return img, (info.width, info.height)

    def prepared(self, index: int, rng: random.Random | None, size: BucketSize | None = None) -> Prepared:
        """The prepared image; kept in memory when nothing random touches it (``cache_in_memory``)."""
        static = rng is None or self.aug.is_identity
        cache_key = (index, size)
        if static and self.cache_enabled and cache_key in self._cache:
            return self._cache[cache_key]
        target = size or BucketSize(self.aug.resolution, self.aug.resolution)
        img, original = self._load(index, target)
        source = self.mask_sources[index] if self.masked else None
        mask = load_mask(source, original) if source is not None else None
        result = prepare(img, self.aug, None if static else rng, target, original=original, mask=mask)
        if static and self.cache_enabled:
            self._cache[cache_key] = result
        return result

    def caption(self, index: int, rng: random.Random | None, epoch: int = 0) -> str:
        """The caption of record ``index`` for one step: one of its alternative captions (one line each),
        picked once per epoch from (seed, epoch, index), so every repeat of an epoch and a resumed run pick
        the same; then the folder trigger word, prefix and suffix; then dropout, tag shuffling and tag
        dropout from ``rng``. ``rng=None`` (validation, previews): the first caption, decorated, as written."""
        record = self.records[index]
        caps = record.captions
        d = self.config.data
        if rng is None or len(caps) < 2:
            text = caps[0] if caps else ""
        else:
            text = caps[_rng(self.seed, epoch, index, 0x5EED).randrange(len(caps))]
        if self.decorate:
            folder_tag = folder_trigger(record.concept) if d.folder_trigger else ""
            if folder_tag and record.caption_source == "folder":
                text = ""  # the folder's name is the caption already: it becomes the trigger tag, once
            text = decorate_caption(text, prefix=d.caption_prefix, suffix=d.caption_suffix,
                                    folder_tag=folder_tag)
        if rng is None or not text:
            return text
        return process_caption(text, rng, shuffle_tags=d.shuffle_tags, keep_tokens=d.keep_tokens,
                               dropout=d.caption_dropout if self.train else 0.0, tag_dropout=d.tag_dropout)

    def __getitem__(self, key: SampleKey | int) -> dict[str, object]:
        if isinstance(key, int):
            key = SampleKey(key, 0, key)
        rng = _rng(self.seed, key.epoch, key.position, key.index) if self.train else None
        item = self.prepared(key.index, rng, key.size)
        out: dict[str, object] = {"pixels": torch.from_numpy(to_tensor_array(item.array)),
                                  "caption": self.caption(key.index, rng, key.epoch),
                                  "original_size": item.original_size, "crop_top_left": item.crop_top_left,
                                  "target_size": item.target_size, "index": key.index}
        if self.masked:  # 1xHxW in [0, 1]; all ones for an image without a mask
            out["mask"] = (torch.from_numpy(item.mask.astype("float32") / 255.0)[None] if item.mask is not None
                           else torch.ones((1, *item.array.shape[:2])))
        return out


def collate(items: list[dict[str, object]]) -> dict[str, object]:
    """Stack items of one size: ``pixels`` (Bx3xHxW), ``captions`` (list), and the SDXL size conditioning
    ``original_size`` / ``crop_top_left`` / ``target_size`` as Bx2 int64 tensors ((h, w) / (y, x) / (h, w))."""
    shapes = {tuple(i["pixels"].shape) for i in items}  # type: ignore[union-attr]
    if len(shapes) > 1:
        raise DatasetError(f"a batch mixes image sizes {sorted(shapes)}; batches must come from one bucket")
    out = {"pixels": torch.stack([i["pixels"] for i in items]),  # type: ignore[misc]
           "captions": [i["caption"] for i in items],
           "original_size": torch.tensor([i["original_size"] for i in items], dtype=torch.long),
           "crop_top_left": torch.tensor([i["crop_top_left"] for i in items], dtype=torch.long),
           "target_size": torch.tensor([i["target_size"] for i in items], dtype=torch.long),
           "indices": [int(i.get("index", -1)) for i in items]}  # type: ignore[call-overload]
    if "mask" in items[0]:  # masked training: Bx1xHxW
        out["masks"] = torch.stack([i["mask"] for i in items])  # type: ignore[misc]
    return out


class EpochOrder:
    """The seeded order of one epoch, with kohya repeats, cut into global batches.

    With ``buckets`` (one size per record) every batch holds one bucket: each bucket's images are shuffled
    and cut into full batches, the leftover (fewer than a batch) is dropped for this epoch (the next
    epoch's shuffle drops others), and the batches of all buckets are shuffled together.
    """

    def __init__(self, records: Sequence[ImageRecord], global_batch: int, seed: int,
                 buckets: Sequence[BucketSize] | None = None) -> None:
        self.expanded = [i for i, r in enumerate(records) for _ in range(max(1, r.repeats))]
        self.global_batch = global_batch
        self.seed = seed
        if len(self.expanded) < global_batch:
            raise DatasetError(f"train.batch_size: a step needs {global_batch} images (batch size x processes x "
                               f"gradient accumulation) but the dataset has {len(self.expanded)} per epoch; "
                               "lower train.batch_size or add images / repeats")
        self.buckets = [BucketSize(*b) for b in buckets] if buckets is not None else None
        self.groups: dict[BucketSize, list[int]] = {}  # bucket -> positions in ``expanded``
        if self.buckets is not None:
            if len(self.buckets) != len(records):
                raise ValueError("EpochOrder: one bucket per record")
            for p, index in enumerate(self.expanded):
                self.groups.setdefault(self.buckets[index], []).append(p)
            self.groups = dict(sorted(self.groups.items()))
            if self.batches_per_epoch < 1:
                raise DatasetError(f"train.batch_size: no aspect-ratio bucket has {global_batch} images per epoch "
                                   "(batch size x processes x gradient accumulation); lower train.batch_size or "
                                   "turn data.bucketing off")

    @property
    def batches_per_epoch(self) -> int:
        if self.buckets is None:
            return len(self.expanded) // self.global_batch
        return sum(len(g) // self.global_batch for g in self.groups.values())

    @property
    def images_dropped_per_epoch(self) -> int:
        """Images of an epoch that fill no batch (the remainder; with buckets, per bucket)."""
        return len(self.expanded) - self.batches_per_epoch * self.global_batch

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[SampleKey]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        gb = self.global_batch
        if self.buckets is None:
            perm = torch.randperm(len(self.expanded), generator=gen).tolist()
            for b in range(start_batch, self.batches_per_epoch):
                chunk = perm[b * gb:(b + 1) * gb]
                yield [SampleKey(self.expanded[p], epoch, b * gb + k) for k, p in enumerate(chunk)]
            return
        cut: list[tuple[BucketSize, list[int]]] = []
        for size, positions in self.groups.items():
            perm = torch.randperm(len(positions), generator=gen).tolist()
            cut += [(size, [positions[perm[j]] for j in range(n * gb, (n + 1) * gb)])
                    for n in range(len(positions) // gb)]
        order = torch.randperm(len(cut), generator=gen).tolist()
        for b in range(start_batch, len(cut)):
            size, chunk = cut[order[b]]
            yield [SampleKey(self.expanded[p], epoch, b * gb + k, size) for k, p in enumerate(chunk)]


def split_validation(records: Sequence[ImageRecord], fraction: float, seed: int) -> tuple[list[ImageRecord],
                                                                                           list[ImageRecord]]:
    """(train, val): a fixed-seed fraction held out; at least one training image always remains."""
    records = list(records)
    n_val = round(len(records) * fraction)
    if fraction <= 0 or len(records) < 4 or n_val == 0:
        return records, []
    n_val = min(n_val, len(records) - 1)
    chosen = set(random.Random(seed).sample(range(len(records)), n_val))
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def dataset_root_label(path: Path) -> str:
    return path.name or str(path)
