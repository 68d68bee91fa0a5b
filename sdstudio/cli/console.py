"""What the log shows on the console: each message once.

The ``sdstudio`` logger feeds run.log (everything, INFO up); the commands print their own lines for what the
engine reports as events (checkpoints, samples, warnings, the failure). So the console handler shows only
warnings, never sdstudio's INFO lines or errors (the command prints the error itself, once), and remembers
the sdstudio warnings it showed so the command can skip an event that says the same thing again.
"""

from __future__ import annotations

import logging
from collections import deque

from .common import say

ENGINE_LOGGER = "sdstudio"


def _is_engine(record: logging.LogRecord) -> bool:
    return record.name == ENGINE_LOGGER or record.name.startswith(ENGINE_LOGGER + ".")


class ConsoleLogHandler(logging.Handler):
    """stderr (through tqdm, so progress bars stay intact): library warnings as ``WARNING text``, sdstudio's
    own as ``warning: text`` like the commands' event lines; sdstudio's errors are left to the command."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.shown: deque[str] = deque(maxlen=64)

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_is_engine(record) and record.levelno >= logging.ERROR) and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if _is_engine(record):
                self.shown.append(text)
                say(f"warning: {text}")
            else:
                say(f"{record.levelname} {text}")
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def already_shown(self, text: str) -> bool:
        """Whether a warning with exactly this text went to the console from the log (a Warning event that
        the engine also logged)."""
        return text in self.shown


_console: ConsoleLogHandler | None = None


def install_console_log() -> ConsoleLogHandler:
    """Route warnings to the console once per process (replaces an earlier console handler of ours)."""
    global _console
    root = logging.getLogger()
    if _console is not None:
        root.removeHandler(_console)
    _console = ConsoleLogHandler()
    root.addHandler(_console)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    return _console


def warning_already_shown(text: str) -> bool:
    return _console is not None and _console.already_shown(text)
