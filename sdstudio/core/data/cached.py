"""Training items from the feature cache instead of pixels (latent models).

The same keys, captions and randomness as ``ImageCaptionDataset``; the image is replaced by its cached
features (flip picked per step when both variants are cached). An entry that vanished or turned out
corrupt mid-run yields its pixels instead; ``resolve_features`` encodes those in the training process
(where the encoder lives) and stores them again, so a bad entry costs one encode, never a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from .cache import EncodeFn, FeatureCache, Features, ImageItem, load_item_pixels
from .dataset import ImageCaptionDataset, SampleKey, _rng
from .transforms import cover_size


class CachedLatentDataset(Dataset):
    """Items: ``features`` (dict of tensors) or, for a missing entry, ``pixels``; plus ``caption``,
    ``original_size``, ``crop_top_left``, ``target_size`` and ``cache_item``."""

    def __init__(self, base: ImageCaptionDataset, cache: FeatureCache, items: Sequence[ImageItem]) -> None:
        self.base = base
        self.cache = cache
        self.by_record: list[dict[bool, ImageItem]] = [{} for _ in base.records]
        by_path = {str(r.path): i for i, r in enumerate(base.records)}
        for item in items:
            self.by_record[by_path[str(item.path)]][item.flip] = item
        self.flip_variants = all(True in variants for variants in self.by_record)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        if isinstance(key, int):
            key = SampleKey(key, 0, key)
        rng = _rng(self.base.seed, key.epoch, key.position, key.index) if self.base.train else None
        caption = self.base.caption(key.index, rng, key.epoch)
        flip_p = self.base.aug.flip_p
        flip = bool(rng is not None and self.flip_variants and flip_p and rng.random() < flip_p)
        item = self.by_record[key.index][flip]
        y, x = item.crop_top_left
        width, height = item.size
        if flip:
            x = cover_size(item.original_size[1], item.original_size[0], width, height)[0] - x - width
        out: dict[str, Any] = {"caption": caption, "original_size": item.original_size, "crop_top_left": (y, x),
                               "target_size": (height, width), "cache_item": item, "index": key.index}
        features = self.cache.get(item)
        if features is None:
            out["pixels"] = load_item_pixels(item)
        else:
            out["features"] = features
        return out


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Like ``collate``; ``features`` is a list (None where ``pixels`` holds the image instead); ``stacked``: the
    features stacked (name -> Bx...) when every item has them, so the loader (its workers, its pin-memory
    thread) does the stacking and pinning, not the training thread."""
    rows = [i.get("features") for i in items]
    stacked = None
    if rows and all(r is not None for r in rows):
        stacked = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}  # type: ignore[index]
    return {"features": rows, "stacked": stacked,
            "pixels": {k: i["pixels"] for k, i in enumerate(items) if "pixels" in i},
            "cache_items": [i["cache_item"] for i in items],
            "captions": [i["caption"] for i in items],
            "original_size": torch.tensor([i["original_size"] for i in items], dtype=torch.long),
            "crop_top_left": torch.tensor([i["crop_top_left"] for i in items], dtype=torch.long),
            "target_size": torch.tensor([i["target_size"] for i in items], dtype=torch.long),
            "indices": [int(i.get("index", -1)) for i in items]}


def resolve_features(batch: dict[str, Any], encode_fn: EncodeFn, cache: FeatureCache) -> Features:
    """The batch's features stacked (name -> Bx...): missing ones encoded now and stored in the cache."""
    if batch.get("stacked") is not None:  # every entry was in the cache: stacked (and pinned) by the loader
        return batch["stacked"]
    rows: list[Features | None] = list(batch["features"])
    missing = sorted(batch["pixels"])
    if missing:
        with torch.no_grad():
            encoded = encode_fn(torch.stack([batch["pixels"][k] for k in missing]))
        if isinstance(encoded, torch.Tensor):
            encoded = {"features": encoded}
        for j, k in enumerate(missing):
            row = {name: value[j].detach().cpu() for name, value in encoded.items()}
            cache.put(batch["cache_items"][k], row)
            rows[k] = row
    names = rows[0].keys()  # type: ignore[union-attr]
    return {name: torch.stack([r[name] for r in rows]) for name in names}  # type: ignore[index]


__all__ = ["CachedLatentDataset", "collate_cached", "load_item_pixels", "resolve_features"]
