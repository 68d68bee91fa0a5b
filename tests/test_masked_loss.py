"""Masked training (loss.masked): where masks come from, that they are cropped / flipped / rotated exactly
like their image into every bucket and scaled to the model's size, cached with the latents (keyed by their
content), that a full mask gives exactly the unmasked loss, that the health check names missing and
wrong-sized masks, and that a run whose masked-out half is noise learns the kept half as well as without it."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core.config import LossConfig, RunConfig
from sdstudio.core.data.cache import FeatureCache, image_items, load_item_pixels
from sdstudio.core.data.dataset import ImageCaptionDataset, SampleKey, collate
from sdstudio.core.data.report import build_report
from sdstudio.core.data.scan import scan_dataset
from sdstudio.core.data.training_masks import find_mask
from sdstudio.core.data.transforms import AugmentSettings, prepare
from sdstudio.core.diffusion import diffusion_loss, mask_to_model_space, per_sample_loss, training_scheduler


# -- the loss -------------------------------------------------------------------------------------------
def test_a_full_mask_is_exactly_the_unmasked_loss() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    sched = training_scheduler(RunConfig().diffusion, pixel_space=False)
    t = torch.tensor([10, 500, 900])
    for kind in ("mse", "l1", "huber"):
        for gamma in (0.0, 5.0):
            cfg = LossConfig(kind=kind, min_snr_gamma=gamma)
            plain = diffusion_loss(pred, target, t, sched, cfg)
            full = diffusion_loss(pred, target, t, sched, cfg, torch.ones(3, 1, 8, 8))
            assert torch.equal(plain, full), (kind, gamma)


def test_the_mask_weighs_pixels_and_is_normalised_per_image() -> None:
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :4] = 1.0
    got = per_sample_loss(pred, target, LossConfig(), mask=mask)
    want = ((pred - target) ** 2)[..., :4].mean(dim=(1, 2, 3))
    assert torch.allclose(got, want)
    changed = target.clone()
    changed[..., 4:] += 100.0  # what happens under the masked-out half does not count
    assert torch.allclose(per_sample_loss(pred, changed, LossConfig(), mask=mask), got)
    some = per_sample_loss(pred, changed, LossConfig(unmasked_weight=0.1), mask=mask)
    assert (some > got * 10).all(), "unmasked_weight keeps some of the background"
    pooled = mask_to_model_space(torch.ones(1, 1, 64, 64).tril(), (8, 8))
    assert pooled.shape == (1, 1, 8, 8) and 0 < float(pooled[0, 0, 0, 0]) < 1, "latent cells average the pixels"


# -- where masks come from --------------------------------------------------------------------------------
def _image(path: Path, size=(32, 24), alpha: bool = False) -> Path:
    mode = "RGBA" if alpha else "RGB"
    img = Image.new(mode, size, (200, 10, 10, 255) if alpha else (200, 10, 10))
    if alpha:
        img.putalpha(_half(size))
    img.save(path)
    return path


def _half(size) -> Image.Image:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[:, : size[0] // 2] = 255
    return Image.fromarray(m, "L")


def test_masks_beside_in_a_masks_folder_or_from_alpha(tmp_path: Path) -> None:
    a, b, c, d = (_image(tmp_path / "a.png"), _image(tmp_path / "b.jpg"), _image(tmp_path / "c.png", alpha=True),
                  _image(tmp_path / "d.png"))
    _half((32, 24)).save(tmp_path / "a.mask.png")
    (tmp_path / "masks").mkdir()
    _half((32, 24)).save(tmp_path / "masks" / "b.png")
    assert find_mask(a).path == tmp_path / "a.mask.png"
    assert find_mask(b).path == tmp_path / "masks" / "b.png"
    assert find_mask(c) is None and find_mask(c, from_alpha=True).kind == "alpha"
    assert find_mask(d, from_alpha=True) is None
    scan = scan_dataset(tmp_path)
    assert sorted(r.path.name for r in scan.records) == ["a.png", "b.jpg", "c.png", "d.png"], \
        "neither name.mask.png nor the masks/ folder are training images"


def test_the_health_check_names_missing_and_wrong_sized_masks(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    _image(tmp_path / "c.png")
    _half((32, 24)).save(tmp_path / "a.mask.png")
    _half((10, 30)).save(tmp_path / "b.mask.png")  # painted on another version of the picture
    scan = scan_dataset(tmp_path)
    plain = build_report(scan)
    assert plain["masks"]["wrong_size"] == ["b.mask.png"] and plain["masks"]["missing"] == []
    report = build_report(scan, masked=True)
    assert report["masks"]["missing"] == ["c.png"]
    kinds = {p["kind"]: p for p in report["problems"]}
    assert "c.png" in kinds["missing_mask"]["message"]
    assert "b.mask.png is 10x30 but b.png is 32x24" in kinds["mask_size"]["message"]
    assert report["counts"]["problems_by_kind"]["missing_mask"] == 1


def test_dataset_check_cli_lists_missing_masks(tmp_path: Path, capsys) -> None:
    from sdstudio.cli import main

    _image(tmp_path / "a.png")
    assert main(["dataset", "check", str(tmp_path), "--masked"]) == 0
    assert "a.png has no training mask" in capsys.readouterr().out


# -- masks follow their image -----------------------------------------------------------------------------
def _pattern(size=(48, 32)) -> tuple[Image.Image, Image.Image]:
    """An image whose red channel equals its mask (a shape nothing symmetric can fake)."""
    rng = np.random.default_rng(0)
    m = np.zeros((size[1], size[0]), np.uint8)
    m[4:20, 6:30] = 255
    m[22:30, 30:44] = 255
    m = np.maximum(m, (rng.random(m.shape) > 0.97) * 255).astype(np.uint8)
    rgb = np.stack([m, np.zeros_like(m), np.zeros_like(m)], -1)
    return Image.fromarray(rgb, "RGB"), Image.fromarray(m, "L")


@pytest.mark.parametrize("bucket", [(32, 32), (48, 24), (24, 40)])
def test_the_mask_is_cropped_scaled_flipped_and_rotated_with_its_image(bucket) -> None:
    img, mask = _pattern()
    aug = AugmentSettings(32, False, 0.5, 10.0, 0.0, 0.0, 0.2)
    flips = set()
    for seed in range(8):
        out = prepare(img, aug, random.Random(seed), bucket, mask=mask)
        without = prepare(img, aug, random.Random(seed), bucket)
        assert np.array_equal(out.array, without.array), "the mask changes no random draw"
        assert out.mask.shape == out.array.shape[:2] == (bucket[1], bucket[0])
        diff = np.abs(out.mask.astype(int) - out.array[..., 0].astype(int))[6:-6, 6:-6]  # not the filled corners
        assert diff.mean() < 6, f"mask and image line up (seed {seed})"
        flips.add(out.flipped)
    assert flips == {True, False}


def test_dataset_items_carry_masks_and_images_without_one_train_fully(tmp_path: Path) -> None:
    img, mask = _pattern((32, 32))
    img.save(tmp_path / "a.png")
    mask.save(tmp_path / "a.mask.png")
    img.save(tmp_path / "b.png")
    records = scan_dataset(tmp_path).records
    cfg = RunConfig().with_overrides({"loss.masked": True, "data.resolution": 16, "data.flip_p": 0.5})
    ds = ImageCaptionDataset(records, cfg)
    batch = collate([ds[SampleKey(0, 0, 0)], ds[SampleKey(1, 0, 1)]])
    assert batch["masks"].shape == (2, 1, 16, 16)
    red = (batch["pixels"][0, 0] + 1) / 2
    assert (batch["masks"][0, 0] - red).abs().mean() < 0.05
    assert torch.equal(batch["masks"][1], torch.ones(1, 16, 16))
    off = ImageCaptionDataset(records, RunConfig().with_overrides({"data.resolution": 16}))
    assert "mask" not in off[SampleKey(0, 0, 0)]


# -- the latent cache ---------------------------------------------------------------------------------------
def test_cached_latents_carry_the_mask_and_its_content_is_in_the_key(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    img, mask = _pattern((32, 32))
    img.save(data / "a.png")
    mask.save(data / "a.mask.png")
    records = scan_dataset(data).records
    plain = image_items(records, None, 16)[0]
    masked = image_items(records, None, 16, masked=True, flip_variants=True)
    cache = FeatureCache("test-vae", root=tmp_path / "cache")
    assert cache.key(plain) != cache.key(masked[0])
    pixels = load_item_pixels(masked[1])  # the flipped variant
    assert pixels.shape == (4, 16, 16)
    assert (pixels[3] - (pixels[0] + 1) / 2).abs().mean() < 0.05, "the mask is flipped with the image"
    assert load_item_pixels(plain).shape == (3, 16, 16)
    Image.fromarray(255 - np.asarray(mask), "L").save(data / "a.mask.png")
    repainted = image_items(records, None, 16, masked=True)[0]
    assert cache.key(repainted) != cache.key(masked[0]), "a repainted mask is a new entry"


def test_latent_cache_run_trains_with_the_cached_masks(tiny_sd1: Path, tmp_path: Path, monkeypatch) -> None:
    """SD1 with data.cache_latents: masks are cached at latent size and reach the loss."""
    from sdstudio.core import diffusion
    from sdstudio.core.train import objective
    from tests.sd_helpers import losses, sd_config

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        img, mask = _pattern((64, 64))
        img.save(data / f"{i}.png")
        mask.save(data / f"{i}.mask.png")
        (data / f"{i}.txt").write_text("a red shape", encoding="utf-8")
    seen: list[torch.Tensor | None] = []
    real = diffusion.diffusion_loss_per_sample  # the instance loss (its mean is the training loss)

    def spy(pred, target, t, sched, cfg, mask=None):
        seen.append(mask)
        return real(pred, target, t, sched, cfg, mask)

    monkeypatch.setattr(objective, "diffusion_loss_per_sample", spy)
    cfg = sd_config("sd15-lora", tiny_sd1, data, **{"loss.masked": True, "data.cache_latents": True,
                                                     "train.max_steps": 2})
    assert len(losses(cfg, tmp_path / "run")) == 2
    assert all(m is not None and m.shape == (4, 1, 8, 8) for m in seen)
    assert 0.05 < float(seen[0].mean()) < 0.6, "the masks, not all ones"


# -- a tiny run: noise under the mask is ignored -------------------------------------------------------------
def _halves_dataset(root: Path, noisy: bool) -> Path:
    root.mkdir()
    rng = np.random.default_rng(7)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20)}
    for i in range(16):
        name = list(colours)[i % 4]
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[:, :8] = colours[name]
        arr[:, 8:] = rng.integers(0, 256, (16, 8, 3)) if noisy else 128
        Image.fromarray(arr, "RGB").save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square", encoding="utf-8")
        Image.fromarray(np.where(np.arange(16)[None, :] < 8, 255, 0).repeat(16, 0).astype(np.uint8), "L").save(
            root / f"{i:02d}.mask.png")
    return root


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two short runs: ~1 min on an idle 2-core CPU
def test_noise_under_the_mask_does_not_hurt_learning_the_kept_half(tiny_config, tmp_path: Path) -> None:
    from sdstudio.core import events as ev
    from sdstudio.core.train.loop import train

    def run(data: Path, name: str) -> list[float]:
        cfg = tiny_config.with_overrides({"data.path": str(data), "data.val_split": 0.0, "loss.masked": True,
                                          "train.max_steps": 30, "train.learning_rate": 3e-3,
                                          "checkpoint.every_steps": 0, "data.caption_dropout": 0.0})
        return [e.loss for e in train(cfg, run_dir=tmp_path / name) if isinstance(e, ev.StepMetrics)]

    clean = run(_halves_dataset(tmp_path / "clean", noisy=False), "a")
    noisy = run(_halves_dataset(tmp_path / "noisy", noisy=True), "b")
    # the same seed: the same timesteps and noise at every step, the loss measured on the kept half only
    late_clean, late_noisy = float(np.mean(clean[-10:])), float(np.mean(noisy[-10:]))
    assert late_clean < 0.7 * float(np.mean(clean[:5])), "the kept half is learned"
    assert late_noisy < 1.25 * late_clean, (late_clean, late_noisy)
