"""Where an image's training mask lives: ``cat.png`` -> ``cat.mask.png`` beside it (single-channel, 255 =
train on this pixel). Kept apart from ``masks.py`` so the scan can recognise mask files without importing
the code that makes them."""

from __future__ import annotations

import os
from pathlib import Path

MASK_SUFFIX = ".mask.png"


def mask_path(image: Path) -> Path:
    """The mask file of ``image`` (``a/cat.jpg`` -> ``a/cat.mask.png``)."""
    image = Path(image)
    return image.with_name(os.path.splitext(image.name)[0] + MASK_SUFFIX)


def is_mask_file(name: str) -> bool:
    """True for ``*.mask.png`` (any case): masks are never training images themselves."""
    return name.lower().endswith(MASK_SUFFIX)
