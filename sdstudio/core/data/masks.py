"""Training masks of a dataset: one ``name.mask.png`` beside each image (single-channel L, the image's size
as displayed, 255 = train on this pixel, 0 = ignore it; values between weigh the pixel).

Masks are made from the image's alpha channel or from a text prompt with a segmentation model
(``clipseg.ClipSegSegmenter``), or painted in the app. Every write goes through the dataset's undo journal
(``sdstudio dataset undo`` restores the old masks byte for byte and deletes the ones a run created), and each
file is written atomically, so a crash leaves every mask old or new.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from sdstudio.core.data.mask_files import mask_path
from sdstudio.core.data.scan import scan_dataset
from sdstudio.core.data.undo_journal import JournalEntry
from sdstudio.core.errors import UserError
from sdstudio.core.events import Progress

MODES = ("replace", "skip")
# A mask function: per image, in order, its mask or a sentence saying why it cannot make one.
MaskMaker = Callable[[list[Image.Image]], list["Image.Image | str"]]


def open_image(path: Path) -> Image.Image:
    """The image as training sees it (EXIF rotation applied), fully loaded."""
    with Image.open(path) as im:
        im.load()
        return ImageOps.exif_transpose(im)


def read_mask(image: Path, size: tuple[int, int] | None = None) -> Image.Image | None:
    """The mask of ``image`` as an L image (None when it has none); resized to ``size`` when given and
    different (a mask painted on another version of the picture still lines up)."""
    path = mask_path(image)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except (OSError, ValueError) as exc:
        raise UserError(f"mask {path} cannot be read ({exc}); delete it or paint it again.") from exc
    if size is not None and mask.size != tuple(size):
        mask = mask.resize(size, Image.Resampling.NEAREST)
    return mask


def encode_mask(mask: Image.Image) -> bytes:
    """PNG bytes of a mask, always single-channel 8-bit."""
    buffer = io.BytesIO()
    mask.convert("L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_masks(root: Path | str, masks: Mapping[Path, Image.Image], label: str,
                entry: JournalEntry | None = None) -> JournalEntry:
    """Write the masks of these images (``image path -> mask``) through the undo journal; returns the entry
    (pass it back to add more masks to the same undo step)."""
    if entry is None:
        entry = JournalEntry.create(Path(root), label)
    entry.write({mask_path(image): encode_mask(mask) for image, mask in masks.items()})
    return entry


def delete_masks(root: Path | str, images: Iterable[Path], label: str = "masks: delete") -> JournalEntry | None:
    """Remove the masks of these images (undoable); None when none of them had one."""
    existing = [mask_path(i) for i in images if mask_path(i).is_file()]
    if not existing:
        return None
    entry = JournalEntry.create(Path(root), label)
    entry.record(existing)
    for path in existing:
        path.unlink()
    return entry


def mask_from_alpha(image: Image.Image) -> Image.Image | str:
    """The alpha channel as the mask (transparent = not trained), or why there is none."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = image.getchannel("A")
        if alpha.getextrema() == (255, 255):
            return "its alpha channel is fully opaque (the mask would be all white)"
        return alpha
    return "it has no alpha channel"


def masks_from_alpha(images: list[Image.Image]) -> list[Image.Image | str]:
    return [mask_from_alpha(im) for im in images]


@dataclass
class MaskJobResult:
    written: int = 0
    skipped_existing: int = 0  # images that already had a mask (mode skip)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    journal: str | None = None  # the undo entry, None when nothing was written
    stopped: bool = False


def run_mask_job(root: Path | str, make: MaskMaker, *, label: str, mode: str = "skip",
                 images: Iterable[Path] | None = None, batch_size: int = 8,
                 progress: Callable[[Progress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> MaskJobResult:
    """Make and write the masks of the dataset's images (or of ``images`` only), ``batch_size`` at a time,
    all in one undo step. ``mode`` says what happens to an image that has a mask: ``replace`` or ``skip``."""
    if mode not in MODES:
        raise UserError(f"mask mode {mode!r} is not one of {', '.join(MODES)}.")
    scan = scan_dataset(root)
    wanted = {Path(p).absolute() for p in images} if images is not None else None
    result = MaskJobResult()
    todo: list[Path] = []
    for record in scan.records:
        if wanted is not None and record.path not in wanted:
            continue
        if mode == "skip" and mask_path(record.path).exists():
            result.skipped_existing += 1
        else:
            todo.append(record.path)
    entry: JournalEntry | None = None
    total, step = len(todo), max(1, batch_size)
    if progress:
        progress(Progress(0, total, "masks"))
    for start in range(0, total, step):
        if should_stop is not None and should_stop():
            result.stopped = True
            break
        batch, pictures = [], []
        for path in todo[start:start + step]:
            try:
                pictures.append(open_image(path))
                batch.append(path)
            except (OSError, ValueError) as exc:
                result.failed.append((path, str(exc)))
        made: dict[Path, Image.Image] = {}
        for path, picture, mask in zip(batch, pictures, make(pictures) if batch else [], strict=True):
            if isinstance(mask, str):
                result.failed.append((path, mask))
            elif mask.size != picture.size:
                result.failed.append((path, f"the mask is {mask.size}, the image {picture.size}"))
            else:
                made[path] = mask
        if made:
            entry = write_masks(scan.root, made, label, entry)
            result.journal = entry.name
            result.written += len(made)
        if progress:
            progress(Progress(min(start + step, total), total, "masks"))
    return result
