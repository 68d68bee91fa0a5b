"""Open dataset images the same way everywhere: headers only, fully decoded, or as training-ready RGB."""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdstudio.core.errors import DatasetError

_EXIF_ORIENTATION = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees: the displayed width is the stored height.
_SWAPS_AXES = {5, 6, 7, 8}
# What a malformed EXIF block raises inside Pillow.
_EXIF_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, SyntaxError, struct.error)

_FIXES = {
    "zero_byte": "The file is empty (0 bytes): copy it again from the original, or delete it.",
    "not_an_image": "This is not an image despite its extension: rename or remove it.",
    "unreadable": "Check that the file can be opened and that you have permission to read it; "
    "re-save it as PNG or JPEG if another program opens it.",
    "truncated": "The file is cut short (an interrupted download or copy): copy it again, or remove it.",
    "decompression_bomb": "The image is larger than Pillow's safety limit: downscale it "
    "(training resizes it anyway), or remove it.",
}


class ImageProblem(DatasetError):
    """An image file that cannot be used; ``kind`` is one of the scan's problem kinds.

    ``reason`` completes a sentence that starts with the file's name ("is empty (0 bytes)"), so a caller
    can name the file its own way (the scan uses the path relative to the dataset folder).
    """

    def __init__(self, kind: str, path: Path | str, reason: str, fix: str | None = None) -> None:
        self.kind = kind
        self.path = Path(path)
        self.reason = reason
        self.message = f"{self.path} {reason}."
        self.fix = fix if fix is not None else _FIXES.get(kind, "")
        super().__init__(f"{self.message} {self.fix}".strip())


@dataclass(frozen=True)
class ImageInfo:
    """What an image's headers say; width and height are as displayed (after EXIF rotation)."""

    width: int
    height: int
    mode: str
    format: str
    n_frames: int


def _bomb(path: Path, exc: Exception) -> ImageProblem:
    return ImageProblem("decompression_bomb", path, f"is too large to open safely ({str(exc).rstrip('.')})")


def _open(path: Path, fp: BinaryIO | None = None) -> Image.Image:
    """Open headers only, turning every way this fails into an ImageProblem that names the file."""
    try:
        if fp is None and os.stat(path).st_size == 0:
            raise ImageProblem("zero_byte", path, "is empty (0 bytes)")
        return Image.open(fp if fp is not None else path)
    except ImageProblem:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb(path, exc) from exc
    except UnidentifiedImageError as exc:
        raise ImageProblem("not_an_image", path, "is not an image Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem("unreadable", path, f"cannot be read ({exc})") from exc


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation without decoding pixels (PNG's getexif() would decode the whole image)."""
    try:
        if img.format == "PNG":
            raw = img.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = img.getexif()
        value = exif.get(_EXIF_ORIENTATION, 1)
        return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1
    except _EXIF_ERRORS:  # broken EXIF is common and harmless: the image is used unrotated
        return 1


def _info(img: Image.Image) -> ImageInfo:
    width, height = img.size
    if _orientation(img) in _SWAPS_AXES:
        width, height = height, width
    return ImageInfo(
        width=width,
        height=height,
        mode=img.mode,
        format=img.format or "",
        n_frames=int(getattr(img, "n_frames", 1)),
    )


def _decode(img: Image.Image, path: Path) -> None:
    """Decode the first frame's pixels; a truncated or corrupt file fails here, not at open."""
    try:
        img.seek(0)  # animated GIF / WebP / APNG: the first frame
        img.load()
    except Image.DecompressionBombError as exc:
        raise _bomb(path, exc) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text:
            raise ImageProblem("truncated", path, f"is truncated or corrupt ({text})") from exc
        raise ImageProblem("unreadable", path, f"cannot be decoded ({text})") from exc


def probe_image(path: Path | str) -> ImageInfo:
    """Read only the headers (fast); raises ImageProblem for an empty, non-image or oversized file."""
    path = Path(path)
    with _open(path) as img:
        return _info(img)


def verify_decodes(path: Path | str, *, reduced: bool = False) -> ImageInfo:
    """Fully decode the first frame; raises ImageProblem (``truncated`` etc.) when that fails.

    ``reduced``: a JPEG is decoded at 1/8 scale, which still reads (and checks) all of its data.
    """
    path = Path(path)
    with _open(path) as img:
        if reduced and img.format == "JPEG":
            info = _info(img)
            _draft(img, (1, 1))
            _decode(img, path)
            return info
        _decode(img, path)
        return _info(img)  # after decoding: a PNG's EXIF block may follow its pixels


def _to_uint8(array: np.ndarray, *, unit_range: bool) -> np.ndarray:
    """Scale high-bit-depth pixels down to 8 bits (dividing, never clipping 16-bit values to 255)."""
    array = array.astype(np.float64)
    peak = float(array.max()) if array.size else 0.0
    if unit_range and peak <= 1.0:
        array = array * 255.0
    elif peak > 65535.0:
        array = array * (255.0 / peak)
    elif peak > 255.0:
        array = array / 257.0  # 65535 -> 255 exactly
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        if mode != "I;16":
            img = img.convert("F" if mode == "F" else "I")
        gray = _to_uint8(np.asarray(img), unit_range=mode == "F")
        return Image.fromarray(gray).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    # CMYK, YCbCr, L, 1 and P without transparency: Pillow's own conversion is right for these.
    return img if mode == "RGB" else img.convert("RGB")


def _draft(img: Image.Image, min_size: tuple[int, int]) -> bool:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (DCT scaling: much faster) while it still covers
    ``min_size`` (width, height as displayed). Other formats are decoded in full."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return False
    width, height = min_size
    if _orientation(img) in _SWAPS_AXES:
        width, height = height, width
    return img.draft(img.mode, (max(1, width), max(1, height))) is not None


def load_with_info(
    path: Path | str, data: bytes | None = None, background: tuple[int, int, int] = (255, 255, 255),
    *, min_size: tuple[int, int] | None = None,
) -> tuple[ImageInfo, Image.Image]:
    """The header facts and the training-ready RGB image from one open.

    ``data``: the file's bytes when the caller already read them (to hash them); ``path`` then only
    names the file in errors. ``min_size``: (width, height) the caller needs at least; a large JPEG may
    then be decoded at a reduced scale (the info still gives its full size).
    """
    path = Path(path)
    if data is not None and not data:
        raise ImageProblem("zero_byte", path, "is empty (0 bytes)")
    with _open(path, io.BytesIO(data) if data is not None else None) as img:
        info = _info(img)  # before a draft shrinks it
        drafted = min_size is not None and _draft(img, min_size)
        _decode(img, path)
        if not drafted:
            info = _info(img)  # after decoding: a PNG's EXIF block may follow its pixels
        try:
            oriented = ImageOps.exif_transpose(img) or img
        except _EXIF_ERRORS:  # a broken EXIF block: use the pixels as stored
            oriented = img
        try:
            rgb = _to_rgb(oriented, background)
            rgb = rgb.copy() if rgb is img else rgb
            rgb.load()
        except (OSError, ValueError) as exc:
            raise ImageProblem("unreadable", path, f"cannot be converted to RGB ({exc})") from exc
    return info, rgb


def load_image_rgb(path: Path | str, background: tuple[int, int, int] = (255, 255, 255), *,
                   min_size: tuple[int, int] | None = None) -> Image.Image:
    """The first frame as 8-bit RGB, EXIF-rotated, transparency composited on ``background``.

    ``min_size``: see ``load_with_info`` (a JPEG may come back smaller than stored, never below it).
    """
    return load_with_info(path, background=background, min_size=min_size)[1]


def difference_hash(img: Image.Image) -> int:
    """64-bit dHash: which of each row's neighbouring pixels is brighter, on a 9x8 thumbnail.

    Robust to re-encoding, resizing and brightness changes, so re-saved copies land within a few bits.
    """
    small = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def normalized_thumbnail(img: Image.Image, size: int = 16) -> np.ndarray:
    """A zero-mean, unit-length grey thumbnail: the dot product of two is their pixel correlation.

    Confirms dHash matches, which alone mistake simple shapes on flat backgrounds for copies.
    """
    small = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    small = (small - small.mean()).ravel()
    norm = float(np.linalg.norm(small))
    return small / norm if norm > 0 else small
