"""The log view: the ``sdstudio`` logger's records (from any thread, delivered through a queued signal)
and the run's status changes, warnings and failures."""

from __future__ import annotations

import functools
import logging
import time

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QPlainTextEdit, QVBoxLayout, QWidget

MAX_LINES = 20_000


class _Bridge(QObject):
    record = Signal(str)


class QtLogHandler(logging.Handler):
    """Forwards formatted records to the GUI thread; emitting a Qt signal is safe from any thread."""

    def __init__(self, bridge: _Bridge) -> None:
        super().__init__(logging.INFO)
        self.bridge = bridge
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.bridge.record.emit(self.format(record))


class LogView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setMaximumBlockCount(MAX_LINES)
        mono = QFont("DejaVu Sans Mono")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        self.text.setFont(mono)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.text)
        self._bridge = _Bridge(self)
        self._bridge.record.connect(self.append)
        self.handler = QtLogHandler(self._bridge)
        logger = logging.getLogger("sdstudio")
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self.handler)
        # a bound method would no longer be callable once the view is gone
        self.destroyed.connect(functools.partial(logger.removeHandler, self.handler))

    def append(self, line: str) -> None:
        self.text.appendPlainText(line)

    def note(self, text: str) -> None:
        self.append(f"{time.strftime('%H:%M:%S')} {text}")

    def lines(self) -> list[str]:
        return self.text.toPlainText().splitlines()

    def detach(self) -> None:
        logging.getLogger("sdstudio").removeHandler(self.handler)
