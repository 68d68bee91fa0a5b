"""GUI test fixtures: the real main window, offscreen, with tiny training settings.

QSettings go to an INI file under the per-test SDSTUDIO_HOME (sdstudio.gui.app_settings), so tests never
touch the real home folder; torch runs on one thread (two cores are shared with other test runs).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import sdstudio.gui.qt_compat  # noqa: F401 - before any Qt call (PySide6 6.12.0 on Python < 3.12)


@pytest.fixture(autouse=True)
def garbage_collected_in_the_gui_thread(qapp) -> Iterator[None]:
    """As the app does (sdstudio.gui.app.collect_garbage_in_gui_thread): no automatic collection while a GUI
    test runs (a worker thread collecting Qt objects crashes Qt), a full collection in this thread after it."""
    import gc

    gc.disable()
    try:
        yield
    finally:
        gc.collect()
        gc.enable()


@pytest.fixture
def tiny_copy(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny dataset (the session fixture must never change)."""
    target = tmp_path / "shapes"
    shutil.copytree(tiny_dataset, target)
    return target


@pytest.fixture
def window(qtbot, tiny_dataset: Path) -> Iterator[Any]:
    """The main window as run_app builds it, opened on the tiny dataset; closed (run stopped) afterwards."""
    from sdstudio.gui.app_settings import app_settings
    from sdstudio.gui.main_window import CLOSE_STOP, MainWindow

    settings = app_settings()
    settings.setValue("last/dataset", str(tiny_dataset))
    settings.sync()
    win = MainWindow()
    # never a blocking question in a test; tests that check the question replace this
    win.ask_close_choice = lambda: CLOSE_STOP  # type: ignore[method-assign]
    win.restore_session()
    win.show()
    qtbot.waitUntil(lambda: win.datasets.report is not None and not win.datasets.progress.isVisible(),
                    timeout=20_000)
    yield win
    # not qtbot.addWidget: pytest-qt would close the window before a run still going was stopped
    if win.runner.is_running():
        win.runner.shutdown(60_000)
    win.close()
    win.deleteLater()
    qtbot.wait(10)
