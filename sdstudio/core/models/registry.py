"""Every model family sdstudio knows, found by name or by looking at a model file or folder."""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

from ..errors import UserError
from .family import ModelFamily

# The families are plug-ins: each is the class named here, in its own sub-package, imported when first asked
# for. The registry (and through it the config, the exports, the loop) never imports a family statically, so a
# family may use every layer of the core (loading, sampling, its own export writers) without a cycle; the
# import-linter layers in pyproject.toml put the `*.family` modules on top. Adding a family is a sub-package
# and a line here. Order matters only for recognition: the first family that claims a path wins (sdstudio's
# own pixel exports are diffusers folders too, so they are asked about first).
_PLUGINS: dict[str, str] = {
    "pixel": "sdstudio.core.models.pixel.family:PixelFamily",
    "sd1": "sdstudio.core.models.sd.family:SD1Family",
    "sd2": "sdstudio.core.models.sd.family:SD2Family",
    "sdxl": "sdstudio.core.models.sd.family:SDXLFamily",
    # Chroma before Flux: its files have Flux's block keys too (plus the approximator's)
    "chroma": "sdstudio.core.models.chroma.family:ChromaFamily",
    # schnell first: its LoRA marker ("flux1_schnell") is more specific than dev's ("flux1")
    "flux-schnell": "sdstudio.core.models.flux.family:FluxSchnellFamily",
    "flux-dev": "sdstudio.core.models.flux.family:FluxDevFamily",
    "sd3": "sdstudio.core.models.sd3.family:SD3Family",
}
FAMILY_NAMES: tuple[str, ...] = tuple(_PLUGINS)


@cache
def _load(name: str) -> ModelFamily:
    module, _, cls = _PLUGINS[name].partition(":")
    family = getattr(importlib.import_module(module), cls)()
    if family.name != name:
        raise RuntimeError(f"{_PLUGINS[name]} says its name is {family.name!r}, registered as {name!r}")
    return family


def families() -> tuple[ModelFamily, ...]:
    return tuple(_load(name) for name in FAMILY_NAMES)


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (model.family), or a UserError listing the known ones."""
    if name not in _PLUGINS:
        raise UserError(f"model.family = {name!r} is not known; use {', '.join(FAMILY_NAMES)}")
    return _load(name)


def recognise_model(path: Path) -> ModelFamily | None:
    """The family of a model file or folder, None when no family claims it (ModelFileError when unreadable)."""
    return next((family for family in families() if family.recognise(path)), None)


def family_of_lora(metadata: dict[str, str]) -> ModelFamily | None:
    """The family a LoRA file says it was trained for, None when it does not say: kohya's
    ss_base_model_version first (what kohya-based tools go by), then modelspec.architecture."""
    base = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    for family in families():
        prefix = family.lora_metadata_markers[0]
        if prefix and base.startswith(prefix):
            return family
    for family in families():
        part = family.lora_metadata_markers[1]
        if part and part in arch:
            return family
    return None
