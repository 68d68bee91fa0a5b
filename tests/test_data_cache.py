"""The feature cache with a fake deterministic encoder (average pooling): reuse, invalidation, corruption,
atomic writes, and which augmentations survive it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sdstudio.core import paths
from sdstudio.core.data.cache import (
    CacheWriteError,
    ContentHashes,
    FeatureCache,
    ImageItem,
    TextItem,
    augmentations_with_cache,
    image_items,
)
from sdstudio.core.data.cached import CachedLatentDataset, collate_cached, resolve_features
from sdstudio.core.data.dataset import EpochOrder, ImageCaptionDataset
from sdstudio.core.data.scan import scan_dataset

try:
    from conftest_data import make_aspect_folder, noise_image, save, snapshot, with_data_keys
except ImportError:  # tests/ imported as a package
    from tests.conftest_data import make_aspect_folder, noise_image, save, snapshot, with_data_keys


class FakeVAE:
    """Deterministic 'encoder': 4x average pooling; counts the images it encodes."""

    def __init__(self) -> None:
        self.encoded = 0

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.encoded += pixels.shape[0]
        pooled = torch.nn.functional.avg_pool2d(pixels, 4)
        return {"latents": pooled.half(), "mean": pooled.mean(dim=(1, 2, 3))}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_aspect_folder(tmp_path / "images", per_shape=2)


def _items(folder: Path, resolution: int = 32, flip: bool = False, sizes=None) -> list[ImageItem]:
    records = scan_dataset(folder).records
    return image_items(records, sizes, resolution, flip_variants=flip)


def test_entries_are_reused_across_cache_objects_and_runs(folder: Path) -> None:
    before = snapshot(folder)
    items = _items(folder)
    vae = FakeVAE()
    progress: list[tuple[int, int]] = []
    stats = FeatureCache("fake-vae@1").build(items, vae, progress=lambda d, t: progress.append((d, t)))
    assert stats.built == len(items) == vae.encoded == 6 and stats.reused == 0
    assert progress[0] == (0, 6) and progress[-1] == (6, 6)
    again = FeatureCache("fake-vae@1").build(_items(folder), vae)  # a new object, as in the next run
    assert again.reused == 6 and again.built == 0 and vae.encoded == 6
    entry = FeatureCache("fake-vae@1").get(items[0])
    assert entry is not None and entry["latents"].dtype == torch.float16 and entry["latents"].shape == (3, 8, 8)
    assert str(FeatureCache("x").root).startswith(str(paths.cache_dir()))
    assert snapshot(folder) == before, "caching never writes into the dataset folder"


def test_keys_change_exactly_when_an_input_changes(folder: Path) -> None:
    cache = FeatureCache("fake-vae@1")
    base = _items(folder)[0]
    key = cache.key(base)
    assert cache.key(ImageItem(**base.__dict__)) == key
    assert FeatureCache("fake-vae@2").key(base) != key  # encoder identity
    for change in ({"content_sha256": "0" * 64}, {"size": (48, 16)}, {"crop_top_left": (0, 3)},
                   {"flip": True}, {"params": (("background", (0, 0, 0)),)}):
        assert cache.key(ImageItem(**{**base.__dict__, **change})) != key, change
    # the path and the original size are not part of the key: a moved file keeps its entry
    assert cache.key(ImageItem(**{**base.__dict__, "path": Path("/elsewhere.png")})) == key


def test_changed_file_content_misses_the_cache(folder: Path) -> None:
    vae = FakeVAE()
    FeatureCache("fake-vae@1").build(_items(folder), vae)
    target = min(folder.glob("*.png"))
    save(noise_image(48, 48, seed=999), target)
    os.utime(target, ns=(1, 1))  # even with an old mtime: the content hash decides
    stats = FeatureCache("fake-vae@1").build(_items(folder), vae)
    assert stats.built == 1 and stats.reused == 5


def test_bucket_and_crop_changes_miss_the_cache(folder: Path) -> None:
    vae = FakeVAE()
    FeatureCache("fake-vae@1").build(_items(folder, resolution=32), vae)
    assert FeatureCache("fake-vae@1").build(_items(folder, resolution=16), vae).built == 6
    records = scan_dataset(folder).records
    sizes = [(48, 24) if r.width > r.height else (32, 32) for r in records]
    assert FeatureCache("fake-vae@1").build(_items(folder, sizes=sizes), vae).built == 2  # the wide ones
    assert FeatureCache("fake-vae@1").build(_items(folder, flip=True), vae).built == 6  # flipped twins


def test_truncated_or_altered_entries_are_rebuilt_never_used(folder: Path) -> None:
    vae = FakeVAE()
    cache = FeatureCache("fake-vae@1")
    items = _items(folder)
    cache.build(items, vae)
    good = cache.get(items[0])
    path0, path1 = cache.path_for(cache.key(items[0])), cache.path_for(cache.key(items[1]))
    data = path0.read_bytes()
    path0.write_bytes(data[: len(data) // 2])  # truncated
    raw = bytearray(path1.read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit in the tensor data: safetensors loads it, the checksum does not match
    path1.write_bytes(bytes(raw))
    assert cache.get(items[1]) is None and not path1.exists()
    stats = FeatureCache("fake-vae@1").build(items, vae)
    assert stats.built == 2 and stats.rebuilt == 1 and stats.reused == 4  # items[1] was already removed
    again = cache.get(items[0])
    assert again is not None and torch.equal(again["latents"], good["latents"])


def test_writes_are_atomic(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache("fake-vae@1")
    item = _items(folder)[0]

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CacheWriteError, match="disk full.*turn the cache off"):
        cache.put(item, {"latents": torch.ones(2, 2)})
    monkeypatch.undo()
    assert not cache.path_for(cache.key(item)).exists()
    leftovers = [p for p in cache.folder.rglob("*") if p.is_file()]
    assert leftovers == [], "no temporary file is left behind"
    cache.put(item, torch.ones(3))
    assert torch.equal(cache.get(item)["features"], torch.ones(3))


def test_text_embeddings_are_cached_by_caption() -> None:
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> torch.Tensor:
        calls.append(texts)
        return torch.tensor([[float(len(t)), float(t.count("a"))] for t in texts])

    cache = FeatureCache("fake-te@1")
    items = [TextItem("a cat"), TextItem("a dog"), TextItem(""), TextItem("a cat")]
    assert cache.build(items, encode, batch_size=2).built == 3  # duplicates once
    assert cache.build(items, encode).reused == 3 and len(calls) == 2
    assert cache.get(TextItem("a dog"))["features"].tolist() == [5.0, 1.0]


def test_content_hashes_are_remembered_and_refreshed(tmp_path: Path) -> None:
    file = tmp_path / "f.bin"
    file.write_bytes(b"one")
    hashes = ContentHashes(tmp_path / "cache")
    first = hashes.many([file])[0]
    assert ContentHashes(tmp_path / "cache").memo.get(file) == first
    file.write_bytes(b"two")
    assert ContentHashes(tmp_path / "cache").sha256(file) != first


def test_augmentations_with_cache_say_what_still_applies(tiny_config) -> None:
    cfg = tiny_config.with_overrides({"data.flip_p": 0.5, "data.color_jitter": 0.1, "data.center_crop": False,
                                      "data.shuffle_tags": True, "data.caption_dropout": 0.1})
    applies, warnings = augmentations_with_cache(cfg.data, flip_variants=True)
    assert any("flip" in a for a in applies) and any("dropout" in a for a in applies)
    assert any("tag shuffling" in a for a in applies)
    text = "\n".join(warnings)
    assert "data.color_jitter" in text and "data.center_crop" in text and "flip" not in text
    _, warnings = augmentations_with_cache(cfg.data, flip_variants=False, text=True)
    text = "\n".join(warnings)
    assert "data.flip_p" in text and "data.shuffle_tags" in text
    applies, warnings = augmentations_with_cache(cfg.data, latents=False)
    assert not warnings and "colour jitter 0.1" in applies


def test_cached_dataset_matches_pixels_and_heals_a_lost_entry(folder: Path, tiny_config) -> None:
    cfg = with_data_keys(tiny_config, path=str(folder), flip_p=0.5)
    records = scan_dataset(folder).records
    base = ImageCaptionDataset(records, cfg, train=True)
    items = image_items(records, None, cfg.data.resolution, flip_variants=True)
    vae = FakeVAE()
    cache = FeatureCache("fake-vae@1")
    cache.build(items, vae)
    ds = CachedLatentDataset(base, cache, items)
    assert ds.flip_variants
    keys = next(EpochOrder(records, 4, seed=0).batches(0))
    cache.path_for(cache.key(ds.by_record[keys[0].index][False])).unlink()
    cache.path_for(cache.key(ds.by_record[keys[0].index][True])).unlink()
    batch = collate_cached([ds[k] for k in keys])
    assert 0 in batch["pixels"]
    features = resolve_features(batch, vae, cache)
    assert features["latents"].shape == (4, 3, 4, 4)
    assert all(ds[k].get("features") is not None for k in keys), "the lost entry was stored again"
    # a cached entry holds what the pixel path computes for the same (unflipped, centre-cropped) image
    plain = ImageCaptionDataset(records, cfg, train=False)[0]["pixels"]
    assert torch.allclose(cache.get(items[0])["latents"].float(), vae(plain[None])["latents"][0].float(),
                          atol=1e-2)
