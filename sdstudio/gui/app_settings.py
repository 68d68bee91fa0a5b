"""Where the app remembers window geometry, the last dataset and preset (QSettings, organisation "sdstudio").

With SDSTUDIO_HOME set (tests, portable installs) the settings are an INI file under its config folder,
so nothing is written to the real home folder or registry."""

from __future__ import annotations

import os

from PySide6.QtCore import QSettings

from sdstudio.core import paths

ORGANIZATION = "sdstudio"
APPLICATION = "sdstudio"


def app_settings() -> QSettings:
    if os.environ.get("SDSTUDIO_HOME"):
        return QSettings(str(paths.config_dir() / "app.ini"), QSettings.Format.IniFormat)
    return QSettings(ORGANIZATION, APPLICATION)
