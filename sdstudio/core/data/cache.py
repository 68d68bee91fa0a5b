"""A disk cache of encoded features (VAE latents, text embeddings), reused across runs.

An entry's key is a sha256 over everything that decides its value: the encoder's identity (the cache's
``namespace``), the image file's content hash, the bucket size, the crop position, the flip, the other
preparation parameters and ``PREPARATION_VERSION``; for text, the caption. Change any of them and the key
changes, so a stale entry is never found. Entries are safetensors files written to a temporary name and
renamed into place; each stores a checksum of its tensors, and one that fails to load or to match is
deleted and rebuilt, never used.

Layout: ``<root>/<namespace slug>-<hash>/<key[:2]>/<key>.safetensors``; ``root`` defaults to the
platformdirs cache folder's ``latents/``. Deleting any of it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .. import paths
from ..atomic import write_bytes_atomic
from ..checksums import sha256_file
from ..errors import UserError
from .filememo import FileMemo
from .images import load_with_info
from .training_masks import MaskSource, find_mask, load_mask, mask_content_sha256
from .transforms import AugmentSettings, center_crop_position, fit_to_size, to_tensor_array

log = logging.getLogger("sdstudio")

CACHE_FORMAT = "sdstudio-feature-cache/1"
# Bump when resizing / cropping / decoding changes the pixels an entry was computed from.
PREPARATION_VERSION = 1

Features = dict[str, torch.Tensor]
EncodeFn = Callable[[Any], "torch.Tensor | Features"]


# -- keys ----------------------------------------------------------------------------------------------


class ContentHashes:
    """sha256 of files, remembered in ``<root>/file-hashes.json`` so a later run does not read every image
    again (a changed file is always re-hashed: see ``filememo``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.memo = FileMemo((root or default_root()) / "file-hashes.json")

    def sha256(self, path: Path | str) -> str:
        digest = self.memo.get(path)
        if digest is None:
            digest = sha256_file(path)
            self.memo.put(path, digest)
        return digest

    def many(self, files: Sequence[Path]) -> list[str]:
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
            out = list(pool.map(self.sha256, files))
        self.memo.save()
        return out


class CacheWriteError(UserError):
    """A cache entry could not be written (disk full, not writable): the message says where and how much."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class ImageItem:
    """One image as an encoder sees it: which file (by content), at which size, crop and flip."""

    path: Path
    content_sha256: str
    size: tuple[int, int]  # (width, height): the bucket
    crop_top_left: tuple[int, int]  # (y, x) in the resized image, before any flip
    flip: bool = False
    original_size: tuple[int, int] = (0, 0)  # (height, width) as displayed
    params: tuple[tuple[str, Any], ...] = ()  # other preparation parameters, e.g. the background colour
    # masked training: the loss mask's source ("file" | "alpha", path) and content hash; the entry then also
    # holds the mask at latent size ("mask")
    mask_kind: str = ""
    mask_path: str = ""
    mask_sha256: str = ""

    def key_parts(self) -> dict[str, Any]:
        parts = {"kind": "image", "sha256": self.content_sha256, "size": list(self.size),
                 "crop": list(self.crop_top_left), "flip": self.flip, "params": [list(p) for p in self.params],
                 "prep": PREPARATION_VERSION}
        if self.mask_sha256:  # (absent without a mask: entries of unmasked runs keep their keys)
            parts["mask"] = self.mask_sha256
        return parts

    def group(self) -> tuple[int, int]:
        return self.size


@dataclass(frozen=True)
class TextItem:
    text: str

    def key_parts(self) -> dict[str, Any]:
        return {"kind": "text", "text": self.text}

    def group(self) -> str:
        return "text"


CacheItem = ImageItem | TextItem


def image_items(records: Sequence[Any], sizes: Sequence[tuple[int, int]] | None, resolution: int, *,
                flip_variants: bool = False, background: tuple[int, int, int] = (255, 255, 255),
                hashes: ContentHashes | None = None, masked: bool = False,
                mask_from_alpha: bool = False) -> list[ImageItem]:
    """Cache items for scanned records (centre crop at each record's bucket, or the square resolution);
    with ``flip_variants`` a flipped twin follows each item. ``masked``: each image's loss mask (see
    ``training_masks.find_mask``) is cached with it, its content part of the key."""
    hashes = hashes or ContentHashes()
    digests = hashes.many([r.path for r in records])
    params = (("background", tuple(background)),)
    items = []
    for i, (record, digest) in enumerate(zip(records, digests, strict=True)):
        width, height = sizes[i] if sizes is not None else (resolution, resolution)
        crop = center_crop_position(record.width, record.height, width, height)
        source = find_mask(Path(record.path), from_alpha=mask_from_alpha) if masked else None
        mask = (source.kind, str(source.path), mask_content_sha256(source)) if source is not None else ("", "", "")
        for flip in (False, True) if flip_variants else (False,):
            items.append(ImageItem(Path(record.path), digest, (width, height), crop, flip,
                                   (record.height, record.width), params, *mask))
    return items


def load_item_pixels(item: ImageItem) -> torch.Tensor:
    """The 3xHxW float tensor in [-1, 1] the encoder gets for ``item`` (same preparation as training); an
    item with a loss mask gets it as a 4th channel in [0, 1], cropped and flipped the same way."""
    from PIL import Image

    background = dict(item.params).get("background", (255, 255, 255))
    width, height = item.size
    info, img = load_with_info(item.path, background=tuple(background), min_size=(width + 1, height + 1))
    img, _ = fit_to_size(img, width, height, crop=item.crop_top_left, original=(info.width, info.height))
    mask = None
    if item.mask_sha256:
        full = load_mask(MaskSource(item.mask_kind, Path(item.mask_path)), (info.width, info.height))
        mask, _ = fit_to_size(full, width, height, crop=item.crop_top_left, original=(info.width, info.height))
    if item.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
    import numpy as np

    pixels = torch.from_numpy(to_tensor_array(np.asarray(img, dtype=np.uint8)))
    if mask is None:
        return pixels
    return torch.cat([pixels, torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]])


# -- the cache -----------------------------------------------------------------------------------------


def default_root() -> Path:
    return paths.cache_dir() / "latents"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "encoder"


def tensors_digest(tensors: Features) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    return header.get("__metadata__") or {}


@dataclass
class BuildStats:
    total: int = 0
    reused: int = 0
    built: int = 0
    rebuilt: int = 0  # of ``built``: entries that existed but were corrupt
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = f"{self.total} cached features: {self.reused} reused, {self.built} computed"
        if self.rebuilt:
            text += f" ({self.rebuilt} corrupt entries rebuilt)"
        return text + f" in {self.seconds:.1f} s"


class FeatureCache:
    """Encoded features on disk, one namespace per encoder identity (model file hash + dtype + ...)."""

    def __init__(self, namespace: str, root: Path | None = None) -> None:
        if not namespace:
            raise ValueError("FeatureCache needs a namespace: the encoder's identity")
        self.namespace = namespace
        self.root = root or default_root()
        ns_hash = hashlib.sha256(namespace.encode("utf-8")).hexdigest()[:16]
        self.folder = self.root / f"{_slug(namespace)}-{ns_hash}"
        self.corrupt_found = 0
        self.verified: set[str] = set()  # keys whose checksum matched in this process (``get`` skips it after)

    def key(self, item: CacheItem) -> str:
        parts = {"format": CACHE_FORMAT, "namespace": self.namespace, **item.key_parts()}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, item: CacheItem) -> Features | None:
        """The entry's tensors; None when missing, or corrupt (then it is deleted, to be rebuilt). The checksum
        of the tensors is checked the first time an entry is read in this process (``verify_in_background``
        does that for a whole run at cache load); a later read only parses the file."""
        key = self.key(item)
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("feature cache entry %s cannot be read (%s); it is recomputed", path, exc)
            return None
        try:
            meta = _metadata(data)
            tensors = load_safetensors(data)
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                raise ValueError("written for another key")
            if key not in self.verified:
                if meta.get("sha256") != tensors_digest(tensors):
                    raise ValueError("checksum mismatch")
                self.verified.add(key)
        except Exception as exc:  # noqa: BLE001 - any failure to parse means the entry cannot be trusted
            self.corrupt_found += 1
            log.warning("feature cache entry %s is corrupt (%s); it is deleted and rebuilt", path,
                        str(exc) or type(exc).__name__)
            path.unlink(missing_ok=True)
            return None
        return tensors

    def put(self, item: CacheItem, tensors: torch.Tensor | Features) -> Path:
        if isinstance(tensors, torch.Tensor):
            tensors = {"features": tensors}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        key = self.key(item)
        meta = {"format": CACHE_FORMAT, "key": key, "sha256": tensors_digest(tensors), "namespace": self.namespace}
        path = self.path_for(key)
        blob = save_safetensors(tensors, metadata=meta)
        try:
            write_bytes_atomic(path, blob, fsync=False)  # a cache entry lost to a crash is recomputed
        except OSError as exc:
            raise CacheWriteError(f"{path}: cannot write a cache entry ({exc.strerror or exc}); free space in "
                                  f"{self.folder} (each entry needs about {len(blob) / 1e3:.1f} kB) or make it "
                                  "writable, or turn the cache off (data.cache_latents / "
                                  "data.cache_text_embeddings)", exc.errno) from exc
        return path

    def verify_in_background(self, items: Sequence[CacheItem]) -> threading.Thread:
        """Checks every entry's checksum once in a daemon thread (a corrupt one is deleted, to be re-encoded when
        training meets it), so the training thread reads verified entries without hashing them."""

        def run() -> None:
            for item in items:
                if self.key(item) not in self.verified:
                    self.get(item)

        thread = threading.Thread(target=run, name="sdstudio-cache-verify", daemon=True)
        thread.start()
        return thread

    def __contains__(self, item: CacheItem) -> bool:
        return self.path_for(self.key(item)).is_file()

    def build(self, items: Iterable[CacheItem], encode_fn: EncodeFn, *,
              load_fn: Callable[[ImageItem], torch.Tensor] = load_item_pixels, batch_size: int = 8,
              progress: Callable[[int, int], None] | None = None, verify: bool = True,
              threads: int = 0) -> BuildStats:
        """Compute and store every entry that is missing (or corrupt, when ``verify``).

        ``encode_fn`` gets a batch: a Bx3xHxW tensor in [-1, 1] of one size (images) or a list of strings
        (text), and returns a tensor or a dict of tensors with the batch first. ``progress(done, total)``
        is called as entries are checked and built. ``threads``: image decoding threads (0: a few).
        """
        started = time.perf_counter()
        items = list(dict.fromkeys(items))
        stats = BuildStats(total=len(items))
        done = 0
        if progress:
            progress(0, len(items))
        missing: list[CacheItem] = []
        corrupt_before = self.corrupt_found
        for item in items:
            present = self.get(item) is not None if verify else item in self
            if present:
                stats.reused += 1
                done += 1
                if progress and done % 64 == 0:
                    progress(done, len(items))
            else:
                missing.append(item)
        stats.rebuilt = self.corrupt_found - corrupt_before
        groups: dict[Any, list[CacheItem]] = {}
        for item in missing:
            groups.setdefault(item.group(), []).append(item)
        batches = [group[i:i + batch_size] for group in groups.values()
                   for i in range(0, len(group), batch_size)]
        workers = threads or min(4, (os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:

            def submit(k: int) -> list[Any] | None:
                # decode the next batch's images while this one is encoded
                if k >= len(batches) or not isinstance(batches[k][0], ImageItem):
                    return None
                return [pool.submit(load_fn, item) for item in batches[k]]

            pending = submit(0)
            for k, batch in enumerate(batches):
                current, pending = pending, submit(k + 1)
                with torch.no_grad():
                    if current is None:
                        encoded = encode_fn([i.text for i in batch])  # type: ignore[union-attr]
                    else:
                        encoded = encode_fn(torch.stack([f.result() for f in current]))
                for j, item in enumerate(batch):
                    self.put(item, _row(encoded, j))
                stats.built += len(batch)
                done += len(batch)
                if progress:
                    progress(done, len(items))
        if progress:
            progress(len(items), len(items))
        stats.seconds = time.perf_counter() - started
        return stats

    def get_or_compute(self, item: CacheItem, encode_fn: EncodeFn,
                       load_fn: Callable[[ImageItem], torch.Tensor] = load_item_pixels) -> Features:
        """The entry, computing and storing it first when it is missing or corrupt."""
        found = self.get(item)
        if found is not None:
            return found
        self.build([item], encode_fn, load_fn=load_fn, verify=False)
        found = self.get(item)
        if found is None:
            raise OSError(f"feature cache entry for {item} could not be written under {self.folder}")
        return found

    def clear(self) -> None:
        """Delete this namespace's entries (other encoders' entries stay)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _row(encoded: torch.Tensor | Features, j: int) -> Features:
    if isinstance(encoded, torch.Tensor):
        return {"features": encoded[j]}
    return {name: value[j] for name, value in encoded.items()}


# -- what a cache leaves of the augmentations ------------------------------------------------------------


def augmentations_with_cache(data: Any, *, latents: bool = True, text: bool = False,
                             flip_variants: bool = False) -> tuple[list[str], list[str]]:
    """(augmentations that still apply per step, one warning per augmentation the cache switches off).

    Cached latents are computed once from one centre crop: the flip applies only when the flipped image
    is cached as a second variant; random crop / scale, rotation and colour jitter change pixels before
    the encoder, so they cannot apply. Cached text embeddings fix each caption's text: alternative
    captions and caption dropout still apply (every alternative and the empty caption are cached), tag
    shuffling does not.
    """
    aug = AugmentSettings.from_config(data)
    applies: list[str] = []
    warnings: list[str] = []
    off = "does not apply with the latent cache (it changes pixels before the VAE): turn the cache off to use it"
    if latents:
        if aug.flip_p:
            if flip_variants:
                applies.append(f"flip p={aug.flip_p} (both variants cached)")
            else:
                warnings.append("data.flip_p: the flip does not apply with the latent cache unless flipped "
                                "images are cached too (the cache's flip variants)")
        for name, value, label in (("center_crop", not aug.center_crop, "random crop"),
                                   ("random_scale", aug.random_scale, "random scale"),
                                   ("rotation_degrees", aug.rotation_degrees, "rotation"),
                                   ("color_jitter", aug.color_jitter, "colour jitter"),
                                   ("hue_jitter", aug.hue_jitter, "hue jitter")):
            if value:
                warnings.append(f"data.{name}: {label} {off}")
    else:
        applies += aug.describe()
    shuffle = getattr(data, "shuffle_tags", False)
    dropout = getattr(data, "caption_dropout", 0.0)
    if dropout:
        applies.append(f"caption dropout {dropout}")
    if shuffle:
        if text:
            warnings.append("data.shuffle_tags: shuffled tags do not apply with the text-embedding cache "
                            "(each caption is encoded once): turn that cache off to use it")
        else:
            applies.append("tag shuffling")
    return applies, warnings
