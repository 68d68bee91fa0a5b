"""The feature caches of a training session (latent models): latents and text embeddings computed once into
the disk cache, and the conditioning and clean latents of a batch read back from them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

from ..config import RunConfig
from ..data.cache import FeatureCache, TextItem, augmentations_with_cache, image_items
from ..data.cached import CachedLatentDataset, collate_cached, resolve_features
from ..data.scan import ImageRecord
from ..diffusion import mask_to_model_space
from ..models.bundle import ModelBundle
from .batches import TrainingBatches

log = logging.getLogger("sdstudio")


class FeatureCaches:
    """The latent and text-embedding caches of one run (each None until built); without them a batch's
    conditioning and latents are computed by the model's own encoders."""

    def __init__(self, config: RunConfig, bundle: ModelBundle, accelerator: Accelerator) -> None:
        self.config, self.bundle, self.accelerator = config, bundle, accelerator
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.feature_cache: Any = None
        self.text_cache: Any = None
        self._text_memo: dict[str, dict[str, torch.Tensor]] = {}
        self.warnings: list[str] = []  # augmentations the latent cache cannot apply
        self.frozen_parts: Any = None  # FrozenParts (train.offload_frozen): parked encoders come back to encode

    def cache_latents(self, batches: TrainingBatches) -> Iterator[tuple[int, int]]:
        """Latent models with ``data.cache_latents``: encode missing entries (yields progress), then
        ``batches`` train from the cache. Entries are keyed by file content, VAE identity, size, crop and flip."""
        cfg = self.config.data
        if self.bundle.model_family.pixel_space or not cfg.cache_latents:
            return
        applies, warnings = augmentations_with_cache(cfg, latents=True, flip_variants=cfg.cache_flip_variants)
        self.warnings = warnings
        self.feature_cache = FeatureCache(self.bundle.encoder_identity())
        sizes = batches.buckets.sizes if batches.buckets else None
        items = image_items(batches.data.train, sizes, cfg.resolution, flip_variants=cfg.cache_flip_variants,
                            background=tuple(cfg.background),  # type: ignore[arg-type]
                            masked=self.config.loss.masked, mask_from_alpha=cfg.mask_from_alpha)
        todo = [i for i in items if i not in self.feature_cache]
        if self.is_main and todo:
            progress: list[tuple[int, int]] = []
            stats = self.feature_cache.build(items, self.encode_latents, batch_size=self.config.train.batch_size,
                                             progress=lambda done, total: progress.append((done, total)))
            yield from progress
            log.info("latent cache: %s", stats)
        self.accelerator.wait_for_everyone()
        self.feature_cache.verify_in_background(items)  # training reads then skip the checksum per item
        if applies:
            log.info("per-step augmentations with the latent cache: %s", ", ".join(applies))
        batches.train_from(CachedLatentDataset(batches.images, self.feature_cache, items), collate_cached)

    def cache_text(self, records: list[ImageRecord]) -> Iterator[tuple[int, int]]:
        """With ``data.cache_text_embeddings``: encode every caption variant known now (alternatives and the
        empty caption of caption dropout) into the disk cache; others are added when first met."""
        if not self.bundle.model_family.text_embeddings_cacheable or not self.config.data.cache_text_embeddings:
            return
        self.text_cache = FeatureCache(self.bundle.text_encoder_identity())  # type: ignore[attr-defined]
        texts = sorted({c for r in records for c in r.captions} | {""})
        items = [TextItem(t) for t in texts]
        if self.is_main and any(i not in self.text_cache for i in items):
            progress: list[tuple[int, int]] = []
            stats = self.text_cache.build(items, self._encode_text, batch_size=self.config.train.batch_size,
                                          progress=lambda done, total: progress.append((done, total)))
            yield from progress
            log.info("text-embedding cache: %s", stats)
        self.accelerator.wait_for_everyone()

    def _encode_text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.frozen_parts is not None:
            with self.frozen_parts.on_device():
                feats = self.bundle.text_features(list(texts), self.device)  # type: ignore[attr-defined]
            return {k: v.float().to("cpu") for k, v in feats.items()}
        feats = self.bundle.text_features(list(texts), self.device)  # type: ignore[attr-defined]
        return {k: v.float().to("cpu") for k, v in feats.items()}

    def read_text_from(self, cache: Any) -> None:
        """Condition batches from ``cache`` (a FeatureCache or a stand-in with ``get_or_compute``)."""
        self.text_cache = cache

    def condition(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The model's conditioning of a batch: from the text cache when there is one."""
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
        features = {k: self.to_device(torch.stack([r[k] for r in rows])) for k in rows[0]}
        sizes = self.bundle.batch_sizes(batch)  # type: ignore[attr-defined]  # None without size facts
        return self.bundle.assemble(features, self.device, sizes)  # type: ignore[attr-defined]

    def clean_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clean model-space samples of a batch: read from the latent cache or encoded now."""
        if "features" in batch:
            features = resolve_features(batch, self.encode_latents, self.feature_cache)
            if "mask" in features:  # masked training: the loss masks cached with the latents
                batch["masks"] = features["mask"]
            return self.to_device(features["latents"])
        if self.frozen_parts is not None:  # e.g. validation images (not in the latent cache) with a parked VAE
            return self.encode_latents(batch["pixels"])["latents"].to(self.device)
        return self.bundle.to_model_space(batch["pixels"].to(self.device, non_blocking=True))

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device without making the host wait for the GPU: from pinned memory
        (the loader's pinned batch, or pinned here) with a non-blocking copy. A pageable copy would wait for every
        kernel queued before it, i.e. for the previous step."""
        if self.device.type != "cuda" or tensor.device.type != "cpu":
            return tensor.to(self.device)
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def encode_latents(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latents of a batch; a 4th channel is the loss mask (``load_item_pixels``), stored at latent size.
        With train.offload_frozen the parked VAE comes back to the device for the call."""
        if self.frozen_parts is not None:
            with self.frozen_parts.on_device():
                return self._encode(pixels)
        return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if pixels.shape[1] == 4:
            latents = self.bundle.to_model_space(pixels[:, :3].to(self.device)).to("cpu")
            return {"latents": latents, "mask": mask_to_model_space(pixels[:, 3:], tuple(latents.shape[-2:]))}
        return {"latents": self.bundle.to_model_space(pixels.to(self.device)).to("cpu")}

