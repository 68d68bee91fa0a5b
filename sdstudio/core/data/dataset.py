"""The torch side of the data: a dataset of scanned records, a resumable seeded batch order, the
validation split. Every random choice derives from (seed, epoch, position), so the order and the
augmentations are identical after a resume and independent of data-loader workers."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import RunConfig
from ..errors import DatasetError
from .images import load_image_rgb
from .scan import ImageRecord, process_caption
from .transforms import AugmentSettings, prepare_image, to_tensor_array


@dataclass(frozen=True)
class SampleKey:
    index: int  # record index
    epoch: int
    position: int  # position within the epoch (distinguishes repeats)


def _rng(*parts: int) -> random.Random:
    return random.Random(hash(parts) & 0xFFFFFFFFFFFF)


class ImageCaptionDataset(Dataset):
    """Items are dicts with ``pixels`` (3xHxW float32 in [-1, 1]) and ``caption``."""

    def __init__(self, records: Sequence[ImageRecord], config: RunConfig, *, train: bool = True) -> None:
        self.records = list(records)
        self.config = config
        self.train = train
        self.aug = AugmentSettings.from_config(config.data)
        self.seed = config.train.seed
        self._cache: dict[int, np.ndarray] = {}
        self.cache_enabled = config.data.cache_in_memory

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> Image.Image:
        record = self.records[index]
        try:
            img = load_image_rgb(record.path, tuple(self.config.data.background))  # type: ignore[arg-type]
        except (OSError, DatasetError) as exc:
            raise DatasetError(f"{record.path}: cannot be loaded ({exc})") from exc
        return img

    def image(self, index: int, rng: random.Random | None) -> np.ndarray:
        """Prepared HxWx3 uint8; kept in memory when nothing random touches it (``cache_in_memory``)."""
        static = rng is None or self.aug.is_identity
        if static and self.cache_enabled and index in self._cache:
            return self._cache[index]
        arr = prepare_image(self._load(index), self.aug, None if static else rng)
        if static and self.cache_enabled:
            self._cache[index] = arr
        return arr

    def caption(self, index: int, rng: random.Random | None) -> str:
        caps = self.records[index].captions
        if not caps:
            return ""
        if rng is None:
            return caps[0]
        text = caps[rng.randrange(len(caps))] if len(caps) > 1 else caps[0]
        d = self.config.data
        return process_caption(text, rng, shuffle_tags=d.shuffle_tags, keep_tokens=d.keep_tokens,
                               dropout=d.caption_dropout if self.train else 0.0)

    def __getitem__(self, key: SampleKey | int) -> dict[str, object]:
        if isinstance(key, int):
            key = SampleKey(key, 0, key)
        rng = _rng(self.seed, key.epoch, key.position, key.index) if self.train else None
        image = self.image(key.index, rng)
        return {"pixels": torch.from_numpy(to_tensor_array(image)), "caption": self.caption(key.index, rng)}


def collate(items: list[dict[str, object]]) -> dict[str, object]:
    return {"pixels": torch.stack([i["pixels"] for i in items]),  # type: ignore[misc]
            "captions": [i["caption"] for i in items]}


class EpochOrder:
    """The seeded permutation of one epoch, with kohya repeats, cut into global batches."""

    def __init__(self, records: Sequence[ImageRecord], global_batch: int, seed: int) -> None:
        self.expanded = [i for i, r in enumerate(records) for _ in range(max(1, r.repeats))]
        self.global_batch = global_batch
        self.seed = seed
        if len(self.expanded) < global_batch:
            raise DatasetError(f"train.batch_size: a step needs {global_batch} images (batch size x processes x "
                               f"gradient accumulation) but the dataset has {len(self.expanded)} per epoch; "
                               "lower train.batch_size or add images / repeats")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.expanded) // self.global_batch

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[list[SampleKey]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.expanded), generator=gen).tolist()
        for b in range(start_batch, self.batches_per_epoch):
            chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
            yield [SampleKey(self.expanded[p], epoch, b * self.global_batch + k) for k, p in enumerate(chunk)]


def split_validation(records: Sequence[ImageRecord], fraction: float, seed: int) -> tuple[list[ImageRecord],
                                                                                           list[ImageRecord]]:
    """(train, val): a fixed-seed fraction held out; at least one training image always remains."""
    records = list(records)
    n_val = int(round(len(records) * fraction))
    if fraction <= 0 or len(records) < 4 or n_val == 0:
        return records, []
    n_val = min(n_val, len(records) - 1)
    chosen = set(random.Random(seed).sample(range(len(records)), n_val))
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def dataset_root_label(path: Path) -> str:
    return path.name or str(path)
