"""Start the desktop app: ``run_app(argv)`` (``sdstudio`` with no arguments calls it)."""

from __future__ import annotations

import gc
import os
import sys

from PySide6.QtCore import QCoreApplication, Qt
from PySide6.QtWidgets import QApplication

from . import qt_compat  # noqa: F401 - first: guards PySide6 6.12.0 on Python < 3.12
from .app_settings import APPLICATION, ORGANIZATION


def create_application(argv: list[str]) -> QApplication:
    QCoreApplication.setOrganizationName(ORGANIZATION)
    QCoreApplication.setApplicationName(APPLICATION)
    existing = QApplication.instance()
    if isinstance(existing, QApplication):
        return existing
    QApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
    app = QApplication([sys.argv[0] if sys.argv else "sdstudio", *argv])
    app.setApplicationDisplayName("sdstudio")
    app.setDesktopFileName("sdstudio")
    from .icon import app_icon

    app.setWindowIcon(app_icon())
    return app


def collect_garbage_in_gui_thread() -> object:
    """Python's cyclic garbage collector runs in whichever thread happens to allocate; when that is a worker
    (training, a dataset scan) and the garbage holds Qt objects, Qt crashes (seen: a segfault while a scan thread
    collected). pyqtgraph's GarbageCollector turns automatic collection off and collects on a GUI-thread timer
    instead. Keep the returned object alive as long as the app runs."""
    from pyqtgraph.util.garbage_collector import GarbageCollector

    return GarbageCollector(interval=1.0)


def run_app(argv: list[str]) -> int:
    """Open the main window and run the event loop; returns the process exit code."""
    app = create_application(argv)
    from .main_window import MainWindow  # after the QApplication: importing pyqtgraph needs one

    collector = collect_garbage_in_gui_thread()

    window = MainWindow()
    window.restore_session()
    app.aboutToQuit.connect(window.shutdown_for_quit)
    window.show()
    code = app.exec()
    if window.runner.is_running():
        # "Quit anyway" after a stop request went unanswered: a QThread cannot be killed, and destroying
        # it while it runs aborts the process; leave at once (the newest checkpoint on disk stays valid).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)
    window.deleteLater()
    del window, collector
    gc.enable()
    return code
