"""Short background jobs (scans, metric files, image loads) on a QThreadPool, results on the GUI thread.

Results arrive through queued signals to bound methods of QObjects that live on the GUI thread, so slots
never run on the pool thread. An exception in the job reaches ``on_error`` with its message and traceback,
never silently dropped.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

from sdstudio.core.errors import UserError


class _JobSignals(QObject):
    done = Signal(object)
    error = Signal(str, str)  # message for people, details (traceback)
    progress = Signal(int, int)


_live: set[_JobSignals] = set()  # keeps each job's signal object alive until its result was delivered


class _Job(QRunnable):
    def __init__(self, fn: Callable[..., Any], signals: _JobSignals, with_progress: bool) -> None:
        super().__init__()
        self.fn, self.signals, self.with_progress = fn, signals, with_progress

    @Slot()
    def run(self) -> None:
        try:
            result = self.fn(self.signals.progress.emit) if self.with_progress else self.fn()
        except UserError as exc:
            self.signals.error.emit(str(exc), "")
        except Exception as exc:  # noqa: BLE001 - delivered to the GUI thread and shown to the user
            self.signals.error.emit(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            self.signals.done.emit(result)


def run_in_background(fn: Callable[..., Any], on_done: Callable[[Any], None],
                      on_error: Callable[[str, str], None], *, on_progress: Callable[[int, int], None] | None = None,
                      pool: QThreadPool | None = None) -> None:
    """Run ``fn()`` (or ``fn(progress)`` when ``on_progress`` is given) on the pool.

    The callbacks must be bound methods of QObjects living on the GUI thread (queued delivery).
    """
    signals = _JobSignals()
    _live.add(signals)

    def release(*_: object) -> None:
        _live.discard(signals)

    signals.done.connect(on_done)
    signals.error.connect(on_error)
    # connected after the user's slots: runs after them, in emission order
    signals.done.connect(signals.deleteLater)
    signals.error.connect(signals.deleteLater)
    signals.destroyed.connect(release)
    if on_progress is not None:
        signals.progress.connect(on_progress)
    (pool or QThreadPool.globalInstance()).start(_Job(fn, signals, on_progress is not None))
