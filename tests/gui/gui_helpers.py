"""Helpers shared by the GUI tests (imported as tests.gui.gui_helpers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import TINY_OVERRIDES

GUI_OVERRIDES: dict[str, Any] = {**TINY_OVERRIDES, "train.threads": 1}


def tiny_run_config(dataset: Path, **overrides: Any):
    from sdstudio.core.config import RunConfig

    return RunConfig().with_overrides({**GUI_OVERRIDES, "data.path": str(dataset), **overrides})


def use_tiny_settings(win: Any, dataset: Path, **overrides: Any) -> None:
    win.presets.apply_config(tiny_run_config(dataset, **overrides), "tiny")
    assert win.form.problems() == [], win.form.problems()
