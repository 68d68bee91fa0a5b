"""Where sdstudio keeps things: platformdirs folders (or SDSTUDIO_HOME) and the bundled resources."""

from __future__ import annotations

import os
import sys
from importlib import resources as _resources
from pathlib import Path

import platformdirs

APP_NAME = "sdstudio"


def _home_override() -> Path | None:
    home = os.environ.get("SDSTUDIO_HOME")
    return Path(home).expanduser() if home else None


def config_dir() -> Path:
    """User presets and settings."""
    home = _home_override()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    """Runs and the dataset registry."""
    home = _home_override()
    return home / "data" if home else Path(platformdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Latent / text-embedding caches and thumbnails (safe to delete)."""
    home = _home_override()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME))


def runs_dir() -> Path:
    return data_dir() / "runs"


def user_presets_dir() -> Path:
    return config_dir() / "presets"


def resources_dir() -> Path:
    """The bundled resources (presets, demo dataset, model configs, tokenizers).

    Shipped as the package ``sdstudio.resources`` (top-level ``resources/`` in the source tree), so it is
    found in an editable install, a wheel and a PyInstaller bundle alike.
    """
    frozen_root = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and frozen_root:
        return Path(frozen_root) / "sdstudio" / "resources"  # the PyInstaller bundle (packaging/sdstudio.spec)
    try:
        return Path(str(_resources.files("sdstudio.resources")))
    except ModuleNotFoundError:
        # a source checkout on sys.path without an install: resources/ sits beside sdstudio/
        return Path(__file__).resolve().parents[2] / "resources"


def builtin_presets_dir() -> Path:
    return resources_dir() / "presets"


def demo_dataset_dir() -> Path:
    return resources_dir() / "demo"


def training_data_dir(data_path: str) -> Path:
    """The folder a run's ``data.path`` names; the bundled demo dataset when it is empty."""
    return Path(data_path).expanduser() if data_path else demo_dataset_dir()
