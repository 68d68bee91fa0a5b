"""Where a training image's loss mask comes from, for masked training (``loss.masked``).

In this order: ``name.mask.png`` beside the image (what the app paints and ``sdstudio dataset mask`` writes),
then a ``masks/`` folder beside the images holding a file of the same name (``masks/cat.png`` for
``cat.png``; any image extension with the same stem, as kohya's ``conditioning_data_dir`` users keep them),
then, with ``data.mask_from_alpha``, the image's own alpha channel. White (255) trains the pixel fully,
black (0) not at all, grey in between. A mask of another size than its image is resized to it (and reported
by the health check: it may no longer line up).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from ..errors import DatasetError
from .mask_files import mask_path

MASKS_FOLDER = "masks"
_MASK_EXTENSIONS = (".png", ".webp", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


@dataclass(frozen=True)
class MaskSource:
    kind: str  # "file" (name.mask.png or masks/name.*) | "alpha" (the image's alpha channel)
    path: Path  # the mask file, or the image itself for "alpha"

    def describe(self) -> str:
        return f"alpha channel of {self.path.name}" if self.kind == "alpha" else str(self.path)


def has_alpha(image: Path) -> bool:
    try:
        with Image.open(image) as im:
            return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    except OSError:
        return False


def find_mask(image: Path, *, from_alpha: bool = False) -> MaskSource | None:
    """The mask of ``image``, or None when it has none."""
    image = Path(image)
    beside = mask_path(image)
    if beside.is_file():
        return MaskSource("file", beside)
    folder = image.parent / MASKS_FOLDER
    if folder.is_dir():
        same = folder / image.name
        if same.is_file():
            return MaskSource("file", same)
        stem = os.path.splitext(image.name)[0]
        for ext in _MASK_EXTENSIONS:
            candidate = folder / (stem + ext)
            if candidate.is_file():
                return MaskSource("file", candidate)
    if from_alpha and has_alpha(image):
        return MaskSource("alpha", image)
    return None


def mask_size(source: MaskSource) -> tuple[int, int]:
    """(width, height) of the mask as displayed (EXIF rotation applied)."""
    with Image.open(source.path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def load_mask(source: MaskSource, size: tuple[int, int]) -> Image.Image:
    """The mask as an 8-bit L image at ``size`` = the image's (width, height) as displayed."""
    try:
        with Image.open(source.path) as im:
            im.load()
            oriented = ImageOps.exif_transpose(im) or im
            if source.kind == "alpha":
                rgba = oriented.convert("RGBA")
                mask = rgba.getchannel("A")
            else:
                mask = oriented.convert("L")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"mask {source.describe()} cannot be read ({exc}); fix or delete it") from exc
    if mask.size != tuple(size):
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    return mask


def mask_content_sha256(source: MaskSource) -> str:
    """What a latent-cache key records of a mask: its file's bytes (for "alpha", the alpha channel's)."""
    if source.kind == "alpha":
        with Image.open(source.path) as im:
            alpha = (ImageOps.exif_transpose(im) or im).convert("RGBA").getchannel("A")
        return "alpha:" + hashlib.sha256(alpha.tobytes()).hexdigest()
    return hashlib.sha256(source.path.read_bytes()).hexdigest()


def mask_problems(records: Sequence[object], *, masked: bool, from_alpha: bool
                  ) -> list[tuple[str, Path, str, str]]:
    """(kind, path, message, fix) of every missing (when ``masked``) or wrong-sized mask of ``records``
    (objects with ``path``, ``width``, ``height``)."""
    out: list[tuple[str, Path, str, str]] = []
    for record in records:
        path = Path(record.path)  # type: ignore[attr-defined]
        size = (int(record.width), int(record.height))  # type: ignore[attr-defined]
        source = find_mask(path, from_alpha=from_alpha)
        if source is None:
            if masked:
                where = f"{mask_path(path).name} beside it or {MASKS_FOLDER}/{path.name}"
                alpha = "" if from_alpha else " (or turn on data.mask_from_alpha for images with transparency)"
                message = f"{path.name} has no training mask ({where}); it trains on every pixel."
                fix = f"Paint or generate a mask for it{alpha}, or ignore this if the whole image should train."
                out.append(("missing_mask", path, message, fix))
            continue
        if source.kind == "alpha":
            continue
        try:
            got = mask_size(source)
        except OSError as exc:
            message = f"mask {source.path.name} of {path.name} cannot be read ({exc})."
            out.append(("mask_size", source.path, message, "Paint the mask again or delete it."))
            continue
        if got != size:
            same_shape = abs(got[0] / got[1] - size[0] / size[1]) < 0.01
            why = ("it is scaled to fit" if same_shape else
                   "it is stretched to fit and no longer lines up with the picture")
            message = f"mask {source.path.name} is {got[0]}x{got[1]} but {path.name} is {size[0]}x{size[1]}; {why}."
            fix = "Repaint the mask on this version of the image, or resize it to the image's size."
            out.append(("mask_size", source.path, message, fix))
    return out
