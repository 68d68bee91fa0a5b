"""The feature caches of a training session (latent models): latents and text embeddings computed once into
the disk cache, and the conditioning of a batch read back from it. A mixin of TrainingSession, which owns
the state it uses (config, bundle, device, data, loader, accelerator)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.cache import FeatureCache, TextItem, augmentations_with_cache, image_items
from ..data.cached import CachedLatentDataset, collate_cached

log = logging.getLogger("sdstudio")


class FeatureCachingMixin:
    config: Any
    bundle: Any
    device: torch.device
    data: Any
    buckets: Any
    keys: Any
    is_main: bool
    accelerator: Any
    dataset: Any
    loader: Any
    feature_cache: Any
    text_cache: Any
    cache_warnings: list[str]
    _text_memo: dict[str, dict[str, torch.Tensor]]

    def cache_latents(self) -> Iterator[tuple[int, int]]:
        """Latent models with ``data.cache_latents``: encode missing entries (yields progress), then train
        from the cache. Entries are keyed by file content, VAE identity, size, crop and flip."""
        cfg = self.config.data
        if self.bundle.family == "pixel" or not cfg.cache_latents:
            return
        applies, warnings = augmentations_with_cache(cfg, latents=True, flip_variants=cfg.cache_flip_variants)
        self.cache_warnings = warnings
        self.feature_cache = FeatureCache(self.bundle.encoder_identity())
        sizes = self.buckets.sizes if self.buckets else None
        items = image_items(self.data.train, sizes, cfg.resolution, flip_variants=cfg.cache_flip_variants,
                            background=tuple(cfg.background))  # type: ignore[arg-type]
        todo = [i for i in items if i not in self.feature_cache]
        if self.is_main and todo:
            progress: list[tuple[int, int]] = []
            stats = self.feature_cache.build(items, self._encode_latents, batch_size=self.config.train.batch_size,
                                             progress=lambda done, total: progress.append((done, total)))
            yield from progress
            log.info("latent cache: %s", stats)
        self.accelerator.wait_for_everyone()
        if applies:
            log.info("per-step augmentations with the latent cache: %s", ", ".join(applies))
        self.dataset = CachedLatentDataset(self.dataset, self.feature_cache, items)
        workers = cfg.num_workers
        self.loader = DataLoader(self.dataset, batch_sampler=self.keys, collate_fn=collate_cached,
                                 num_workers=workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0)

    def cache_text(self) -> Iterator[tuple[int, int]]:
        """With ``data.cache_text_embeddings``: encode every caption variant known now (alternatives and the
        empty caption of caption dropout) into the disk cache; others are added when first met."""
        if self.bundle.family == "pixel" or not self.config.data.cache_text_embeddings:
            return
        self.text_cache = FeatureCache(self.bundle.text_encoder_identity())  # type: ignore[attr-defined]
        texts = sorted({c for r in self.data.train for c in r.captions} | {""})
        items = [TextItem(t) for t in texts]
        if self.is_main and any(i not in self.text_cache for i in items):
            progress: list[tuple[int, int]] = []
            stats = self.text_cache.build(items, self._encode_text, batch_size=self.config.train.batch_size,
                                          progress=lambda done, total: progress.append((done, total)))
            yield from progress
            log.info("text-embedding cache: %s", stats)
        self.accelerator.wait_for_everyone()

    def _encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        feats = self.bundle.text_features(list(texts), self.device)  # type: ignore[attr-defined]
        return {k: v.float().to("cpu") for k, v in feats.items()}

    def _condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.text_cache is None:
            return self.bundle.encode_batch(batch, self.device)
        rows = []
        for caption in batch["captions"]:
            row = self._text_memo.get(caption)
            if row is None:
                row = self.text_cache.get_or_compute(TextItem(caption), self._encode_text)
                if len(self._text_memo) < 4096:
                    self._text_memo[caption] = row
            rows.append(row)
        features = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        sizes = self.bundle.batch_sizes(batch) if self.bundle.family == "sdxl" else None  # type: ignore[attr-defined]
        return self.bundle.assemble(features, self.device, sizes)  # type: ignore[attr-defined]

    def _encode_latents(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"latents": self.bundle.to_model_space(pixels.to(self.device)).to("cpu")}

