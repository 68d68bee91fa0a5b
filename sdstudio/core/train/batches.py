"""The data of a run and how it is fed: the scanned and split images, the aspect-ratio buckets, the epoch
order (the same on every process, exact after a resume), the datasets (training, validation, DreamBooth
class images) and the loader of this process's share of each batch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import RunConfig
from ..data.buckets import BucketSize
from ..data.dataset import EpochOrder, ImageCaptionDataset, SampleKey, collate
from ..data.prefetch import prefetch
from ..errors import DatasetError
from .setup import PreparedData, prepare_data

log = logging.getLogger("sdstudio")


class _KeySource:
    """The batch sampler the DataLoader iterates: this rank's slice of each global batch."""

    def __init__(self, order: EpochOrder, batch: int, rank: int) -> None:
        self.order, self.batch, self.rank = order, batch, rank
        self.epoch, self.start = 0, 0

    def seek(self, epoch: int, start: int) -> None:
        """The next iteration walks epoch ``epoch`` from its batch ``start``."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for keys in self.order.batches(self.epoch, self.start):
            yield keys[self.rank * self.batch:(self.rank + 1) * self.batch]

    def __len__(self) -> int:
        return self.order.batches_per_epoch - self.start


class TrainingBatches:
    """Scans and prepares the data at construction (problems go to ``warn``; no usable image or an
    impossible gradient accumulation raise DatasetError naming the setting)."""

    def __init__(self, config: RunConfig, *, world: int, rank: int, pin_memory: bool,
                 warn: Callable[[str], None]) -> None:
        from ..data.buckets import plan_from_config
        from ..data.verify import verify_prepared

        cfg = config
        self.world, self.rank, self.pin_memory = world, rank, pin_memory
        self.accum = cfg.train.gradient_accumulation
        self.global_batch = cfg.train.batch_size * world * self.accum
        self.data: PreparedData = prepare_data(cfg, warn)
        verify_prepared(self.data, cfg, warn)  # a truncated file: one warning, not a failed run
        self.buckets = plan_from_config(self.data.train, cfg.data, cfg.train.batch_size * world)
        self.order = EpochOrder(self.data.train, cfg.train.batch_size * world, cfg.train.seed,
                                buckets=self.buckets.sizes if self.buckets else None)
        self.steps_per_epoch = self.order.batches_per_epoch // self.accum
        if self.steps_per_epoch < 1:
            raise DatasetError(f"train.gradient_accumulation: {self.accum} batches of {cfg.train.batch_size * world}"
                               f" images per step need more than the {len(self.order.expanded)} images of an epoch; "
                               "lower train.gradient_accumulation or train.batch_size")
        self.images = ImageCaptionDataset(self.data.train, cfg, train=True)  # what the latent cache encodes
        self.reg_dataset: ImageCaptionDataset | None = None
        if cfg.data.reg_path:
            from ..data.scan import scan_dataset

            reg = scan_dataset(Path(cfg.data.reg_path).expanduser(), resolution=cfg.data.resolution,
                               instance_prompt=cfg.data.class_prompt or None)
            if not reg.records:
                raise DatasetError(f"data.reg_path {cfg.data.reg_path}: no usable class image; fix the folder or "
                                   "leave data.reg_path empty")
            self.reg_dataset = ImageCaptionDataset(reg.records, cfg, train=True, decorate=False)
            log.info("DreamBooth: %d class images, prior loss weight %g", len(reg.records),
                     cfg.loss.prior_loss_weight)
        if self.images.masked:
            missing = [r.path for r, m in zip(self.images.records, self.images.mask_sources, strict=True) if m is None]
            if missing:
                warn(f"loss.masked: {len(missing)} of {len(self.images.records)} images have no mask (e.g. "
                     f"{missing[0].name}); they train on every pixel. The dataset check with masked training on "
                     "lists them")
        self.val_dataset = ImageCaptionDataset(self.data.val, cfg, train=False)
        self.seed = cfg.train.seed
        self.keys = _KeySource(self.order, cfg.train.batch_size, rank)
        self.workers = cfg.data.num_workers
        self.read_ahead = cfg.data.prefetch_batches if self.workers == 0 else 0  # workers prefetch on their own
        self.loader = self._loader(self.images, collate)
        if self.images.aug.describe():
            log.info("per-step augmentations: %s", ", ".join(self.images.aug.describe()))
        if self.buckets:
            log.info("aspect-ratio buckets (%d images per epoch left over):\n%s", self.order.images_dropped_per_epoch,
                     "\n".join(self.buckets.describe(self.data.train)))

    @property
    def images_per_epoch(self) -> int:
        return self.order.batches_per_epoch * self.global_batch

    def _loader(self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], dict[str, Any]]) -> DataLoader[Any]:
        return DataLoader(dataset, batch_sampler=self.keys, collate_fn=collate_fn, num_workers=self.workers,
                          pin_memory=self.pin_memory, persistent_workers=self.workers > 0)

    def train_from(self, dataset: Dataset[Any], collate_fn: Callable[[list[Any]], dict[str, Any]]) -> None:
        """Train from ``dataset`` instead (the latent cache's view of the same keys)."""
        self.loader = self._loader(dataset, collate_fn)

    def batch_groups(self, epoch: int, step_in_epoch: int) -> Iterator[list[dict[str, Any]]]:
        """The rest of epoch ``epoch`` from step ``step_in_epoch`` as groups of ``gradient_accumulation`` batches."""
        self.keys.seek(epoch, step_in_epoch * self.accum)
        group: list[dict[str, Any]] = []
        remaining = self.steps_per_epoch - step_in_epoch
        with closing(prefetch(self.loader, self.read_ahead)) as batches:  # data.prefetch_batches
            for batch in batches:
                group.append(batch)
                if len(group) == self.accum:
                    yield group
                    group = []
                    remaining -= 1
                    if remaining <= 0:
                        return

    def shapes_ahead(self, epoch: int, step_in_epoch: int, steps: int) -> list[BucketSize | None]:
        """The distinct bucket sizes of the next ``steps`` optimizer steps from ``step_in_epoch`` of epoch
        ``epoch``, in the order they come up (None: no bucketing, every batch at the square resolution). Walks
        the seeded epoch order only (no image is read); stops once every bucket that fills a batch was met."""
        if steps <= 0:
            return []
        if self.order.buckets is None:
            return [None]
        gb = self.order.global_batch
        fillable = {size for size, positions in self.order.groups.items() if len(positions) >= gb}
        used = self.steps_per_epoch * self.accum  # batch_groups leaves the batches past the last full group
        seen: list[BucketSize | None] = []
        left, start = steps * self.accum, step_in_epoch * self.accum
        while left > 0 and len(seen) < len(fillable):
            for b, keys in enumerate(self.order.batches(epoch, start), start):
                if b >= used or left <= 0 or len(seen) == len(fillable):
                    break
                if keys[0].size not in seen:
                    seen.append(keys[0].size)
                left -= 1
            epoch, start = epoch + 1, 0
        return seen

    def shape_batch(self, size: BucketSize | None) -> dict[str, Any]:
        """A micro-batch of this process at bucket ``size`` as the loader would give it (the first images of the
        bucket, read through the loader's dataset: cached latents when the cache is in use), for compiling that
        shape before training; the epoch order is not touched."""
        gb, b = self.order.global_batch, self.keys.batch
        positions = self.order.groups[size] if size is not None else range(len(self.order.expanded))
        chunk = list(positions)[:gb]
        keys = [SampleKey(self.order.expanded[p], 0, k, size) for k, p in enumerate(chunk)]
        dataset, collate_fn = self.loader.dataset, self.loader.collate_fn
        return collate_fn([dataset[k] for k in keys[self.rank * b:(self.rank + 1) * b]])

    def class_batch(self, step: int, micro: int, size: int) -> dict[str, Any] | None:
        """DreamBooth class images for a micro-batch: a seeded walk through the class set (exact after
        resume); None without ``data.reg_path``."""
        if self.reg_dataset is None:
            return None
        n = len(self.reg_dataset)
        first = ((step * self.accum + micro) * self.world + self.rank) * size
        keys = []
        for g in range(first, first + size):
            cycle, pos = divmod(g, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7 + cycle))
            keys.append(SampleKey(int(perm[pos]), cycle, g))
        return collate([self.reg_dataset[k] for k in keys])
