"""Start the desktop app: ``run_app(argv)`` (``sdstudio`` with no arguments calls it)."""

from __future__ import annotations

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


def run_app(argv: list[str]) -> int:
    """Open the main window and run the event loop; returns the process exit code."""
    app = create_application(argv)
    from .main_window import MainWindow  # after the QApplication: importing pyqtgraph needs one

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
    del window
    return code
