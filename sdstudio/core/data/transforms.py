"""Per-image preparation: resize to cover a target size, crop, augment, normalise.

Deterministic for a given random.Random. Every prepared image says where it came from (original size and
crop position), which SDXL's size conditioning needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from ..config import DataConfig

# Pillow's resize first box-reduces by whole factors while the image is > this many times the target:
# several times faster on large photos, visually the same as a full Lanczos resize.
REDUCING_GAP = 3.0


@dataclass(frozen=True)
class AugmentSettings:
    resolution: int
    center_crop: bool
    flip_p: float
    rotation_degrees: float
    color_jitter: float
    hue_jitter: float
    random_scale: float

    @classmethod
    def from_config(cls, data: DataConfig) -> AugmentSettings:
        return cls(data.resolution, data.center_crop, data.flip_p, data.rotation_degrees, data.color_jitter,
                   data.hue_jitter, data.random_scale)

    @property
    def is_identity(self) -> bool:
        return (self.center_crop and not self.flip_p and not self.rotation_degrees and not self.color_jitter
                and not self.hue_jitter and not self.random_scale)

    def describe(self) -> list[str]:
        out = []
        if not self.center_crop:
            out.append("random crop")
        if self.flip_p:
            out.append(f"flip p={self.flip_p}")
        if self.rotation_degrees:
            out.append(f"rotation +-{self.rotation_degrees} deg")
        if self.color_jitter:
            out.append(f"colour jitter {self.color_jitter}")
        if self.hue_jitter:
            out.append(f"hue jitter {self.hue_jitter}")
        if self.random_scale:
            out.append(f"random scale {self.random_scale}")
        return out


@dataclass(frozen=True)
class Prepared:
    """A training-ready image and where it came from; sizes and positions are (height, width) / (y, x)."""

    array: np.ndarray  # HxWx3 uint8
    original_size: tuple[int, int]  # the image as loaded (EXIF-rotated)
    crop_top_left: tuple[int, int]  # the crop's corner in the resized image (mirrored when flipped)
    flipped: bool = False
    mask: np.ndarray | None = None  # HxW uint8 loss mask, cropped / rotated / flipped with the image

    @property
    def target_size(self) -> tuple[int, int]:
        return self.array.shape[0], self.array.shape[1]


def cover_size(width: int, height: int, target_w: int, target_h: int, zoom: float = 1.0) -> tuple[int, int]:
    """The size an image is resized to so that it covers ``target`` (times ``zoom``), aspect kept."""
    scale = max(target_w / width, target_h / height) * zoom
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def center_crop_position(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(y, x) of the centre crop of an image of this size at ``target`` (in the resized image)."""
    rw, rh = cover_size(width, height, target_w, target_h)
    return (rh - target_h) // 2, (rw - target_w) // 2


def fit_to_size(img: Image.Image, width: int, height: int, *, crop: tuple[int, int] | None = None,
                rng: random.Random | None = None, zoom: float = 1.0,
                original: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover width x height (times ``zoom``) and crop to exactly that; returns (image, (y, x)).

    ``crop``: the corner to use; else a random one from ``rng``; else the centre. The resize only reads the
    cropped region of the source (Pillow's ``box``), so a wide image is not resized in full to be cut.
    ``original``: (width, height) the layout is computed from when ``img`` was decoded at a reduced scale
    (JPEG draft), so positions do not depend on how it was decoded.
    """
    w, h = img.size
    rw, rh = cover_size(*(original or (w, h)), width, height, zoom)
    if crop is not None:
        y, x = min(max(0, crop[0]), rh - height), min(max(0, crop[1]), rw - width)
    elif rng is not None:
        y, x = rng.randint(0, rh - height), rng.randint(0, rw - width)
    else:
        y, x = (rh - height) // 2, (rw - width) // 2
    sx, sy = w / rw, h / rh
    box = (x * sx, y * sy, (x + width) * sx, (y + height) * sy)
    if (rw, rh) == (w, h):
        return img.crop((x, y, x + width, y + height)), (y, x)
    shrinking = rw < w
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    out = img.resize((width, height), resample, box=box, reducing_gap=REDUCING_GAP if shrinking else None)
    return out, (y, x)


def prepare(img: Image.Image, aug: AugmentSettings, rng: random.Random | None,
            size: tuple[int, int] | None = None, *, flip: bool | None = None,
            original: tuple[int, int] | None = None, mask: Image.Image | None = None) -> Prepared:
    """Resized, cropped, augmented image at ``size`` = (width, height) (default: the square resolution).

    ``rng=None``: no randomness (validation, caches): centre crop, no augmentation; ``flip`` then forces the
    horizontal flip on or off (a cache's second variant). ``original``: the image's full (width, height)
    when ``img`` was decoded at a reduced scale. ``mask``: an L image at ``original`` size, given exactly the
    same crop, zoom, rotation and flip (not the colour jitter); the random draws are the same with or
    without it.
    """
    width, height = size or (aug.resolution, aug.resolution)
    ow, oh = original or img.size
    zoom = 1.0
    if rng is not None and aug.random_scale:
        # zoom in: the crop covers 1 - s .. 1 of the image's side
        zoom = 1.0 / (1.0 - rng.uniform(0.0, aug.random_scale))
    random_crop = rng if rng is not None and not aug.center_crop else None
    img, (y, x) = fit_to_size(img, width, height, rng=random_crop, zoom=zoom, original=(ow, oh))
    if mask is not None:
        mask, _ = fit_to_size(mask, width, height, crop=(y, x), zoom=zoom, original=(ow, oh))
    flipped = bool(flip)
    if rng is not None:
        img, mask = augment(img, aug, rng, mask)
        flipped = bool(aug.flip_p) and rng.random() < aug.flip_p
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
        x = cover_size(ow, oh, width, height, zoom)[0] - x - width  # the corner in the mirrored image
    return Prepared(np.asarray(img, dtype=np.uint8), (oh, ow), (y, x), flipped,
                    None if mask is None else np.asarray(mask, dtype=np.uint8))


def augment(img: Image.Image, aug: AugmentSettings, rng: random.Random,
            mask: Image.Image | None = None) -> tuple[Image.Image, Image.Image | None]:
    """Rotation and colour jitter (the flip is applied by ``prepare``, which tracks the crop position); a
    loss mask turns with the image (the corners the rotation fills are not trained: 0)."""
    if aug.rotation_degrees:
        angle = rng.uniform(-aug.rotation_degrees, aug.rotation_degrees)
        img = img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=img.getpixel((0, 0)))
        if mask is not None:
            mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    if aug.color_jitter:
        s = aug.color_jitter
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(1 - s, 1 + s))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(1 - s, 1 + s))
        img = ImageEnhance.Color(img).enhance(rng.uniform(1 - s, 1 + s))
    if aug.hue_jitter:
        shift = int(rng.uniform(-aug.hue_jitter, aug.hue_jitter) * 255)
        hsv = np.asarray(img.convert("HSV"), dtype=np.uint8).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img, mask


def to_tensor_array(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1]."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0
