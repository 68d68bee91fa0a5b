"""Every model family sdstudio knows, found by name or by looking at a model file or folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .family import ModelFamily
from .pixel.family import PixelFamily
from .sd.family import SD1Family, SD2Family, SDXLFamily

# Order matters only for recognition: the first family that claims a path wins (sdstudio's own pixel
# exports are diffusers folders too, so they are asked about first).
_FAMILIES: tuple[ModelFamily, ...] = (PixelFamily(), SD1Family(), SD2Family(), SDXLFamily())
_BY_NAME = {family.name: family for family in _FAMILIES}
FAMILY_NAMES: tuple[str, ...] = tuple(_BY_NAME)


def families() -> tuple[ModelFamily, ...]:
    return _FAMILIES


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (model.family), or a UserError listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UserError(f"model.family = {name!r} is not known; use {', '.join(FAMILY_NAMES)}") from None


def recognise_model(path: Path) -> ModelFamily | None:
    """The family of a model file or folder, None when no family claims it (ModelFileError when unreadable)."""
    return next((family for family in _FAMILIES if family.recognise(path)), None)


def family_of_lora(metadata: dict[str, str]) -> ModelFamily | None:
    """The family a LoRA file says it was trained for, None when it does not say: kohya's
    ss_base_model_version first (what kohya-based tools go by), then modelspec.architecture."""
    base = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    for family in _FAMILIES:
        prefix = family.lora_metadata_markers[0]
        if prefix and base.startswith(prefix):
            return family
    for family in _FAMILIES:
        part = family.lora_metadata_markers[1]
        if part and part in arch:
            return family
    return None
