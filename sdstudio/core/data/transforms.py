"""Per-image preparation: resize, crop, augment, normalise. Deterministic for a given random.Random."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from ..config import DataConfig


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


def resize_shorter(img: Image.Image, side: int) -> Image.Image:
    """Resize so the shorter side is ``side`` (Lanczos when shrinking, bicubic when enlarging)."""
    w, h = img.size
    scale = side / min(w, h)
    if abs(scale - 1.0) < 1e-9:
        return img
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)


def prepare_image(img: Image.Image, aug: AugmentSettings, rng: random.Random | None) -> np.ndarray:
    """Resized, cropped, augmented HxWx3 uint8. ``rng=None`` = no randomness (validation, cache)."""
    res = aug.resolution
    if rng is not None and aug.random_scale:
        # crop a random sub-square (1 - s .. 1 of the shorter side), then resize to the resolution
        w, h = img.size
        frac = 1.0 - rng.uniform(0.0, aug.random_scale)
        side = max(1, int(min(w, h) * frac))
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        img = img.crop((x0, y0, x0 + side, y0 + side))
    img = resize_shorter(img, res)
    w, h = img.size
    if rng is not None and not aug.center_crop:
        x0, y0 = rng.randint(0, w - res), rng.randint(0, h - res)
    else:
        x0, y0 = (w - res) // 2, (h - res) // 2
    img = img.crop((x0, y0, x0 + res, y0 + res))
    if rng is not None:
        img = augment(img, aug, rng)
    return np.asarray(img, dtype=np.uint8)


def augment(img: Image.Image, aug: AugmentSettings, rng: random.Random) -> Image.Image:
    if aug.rotation_degrees:
        angle = rng.uniform(-aug.rotation_degrees, aug.rotation_degrees)
        img = img.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=img.getpixel((0, 0)))
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
    if aug.flip_p and rng.random() < aug.flip_p:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_tensor_array(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1]."""
    return (image.astype(np.float32).transpose(2, 0, 1) / 127.5) - 1.0
