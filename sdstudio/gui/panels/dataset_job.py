"""The frame the dataset tools' dialogs share (Caption, Masks): one job over a dataset folder, run off the GUI
thread, on the whole dataset or the datasets panel's selection, with a progress bar, a status line and the buttons
Run / Stop / Undo last / Close. A subclass builds its form (placing ``self.scope`` where it belongs), says what its
job does, and turns the job's result into status parts; the undo journal (``core/data/undo_journal.py``) makes
every run undoable, whatever wrote it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QThreadPool
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.data.undo_journal import list_entries, undo_last
from sdstudio.core.events import Progress

from ..background import run_in_background


class DatasetJobDialog(QDialog):
    """Subclasses call ``__init__`` with their labels, build their form, then ``finish_layout(intro, form)``;
    they override ``files_changed`` (emit their signal) and call ``run_job`` / ``show_result``."""

    def __init__(self, folder: Path, parent: QWidget | None, *, selection: list[Path] | None, title: str,
                 run_label: str, stop_tip: str, undo_tip: str, working: str, selected_from: int = 1) -> None:
        """``working``: the status while the job runs ("Captioning: 3/10"); ``selected_from``: how many
        selected images make "Selected images only" the default (a single click selects one image)."""
        super().__init__(parent)
        self.folder = Path(folder)
        self.selection = list(selection or [])  # the datasets panel's selected images
        self.setWindowTitle(title)
        self._working = working
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._stop = threading.Event()
        self.running = False

        self.scope = QComboBox()
        self.scope.addItems(["The whole dataset", f"Selected images only ({len(self.selection)})"])
        if self.selection:
            self.scope.setCurrentIndex(1 if len(self.selection) >= selected_from else 0)
        else:
            self.scope.model().item(1).setEnabled(False)  # nothing selected in the datasets panel

        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.run_button = QPushButton(run_label)
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip(stop_tip)
        self.stop_button.clicked.connect(self._stop.set)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip(undo_tip)
        self.undo_button.clicked.connect(self.undo)

    def finish_layout(self, intro_html: str, form: QFormLayout) -> None:
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.stop_button, self.undo_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        intro = QLabel(intro_html)
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self._update_buttons()

    # -- what a subclass provides --------------------------------------------------------------------------
    def start(self) -> None:
        raise NotImplementedError

    def files_changed(self) -> None:
        """A run or an undo wrote files: the subclass emits its signal."""
        raise NotImplementedError

    # -- shared behaviour ----------------------------------------------------------------------------------
    def chosen_images(self) -> list[Path] | None:
        """The selected images when the scope says so, else None (the whole dataset)."""
        return self.selection if self.scope.currentIndex() == 1 else None

    def browse_folder(self, target: QLineEdit, title: str) -> None:
        chosen = QFileDialog.getExistingDirectory(self, title, target.text())
        if chosen:
            target.setText(chosen)

    def run_job(self, job: Callable[[Callable[[Progress], None]], Any], status: str) -> None:
        """Runs ``job(report)`` off the GUI thread (``report`` takes the core's Progress events); the dialog is
        busy until it ends. ``job`` must not touch widgets: read the form before."""
        if self.running:
            return
        self._stop.clear()
        self.running = True
        self._update_buttons()
        self.progress.setRange(0, 0)
        self.status.setText(status)

        def background(progress: Any) -> Any:
            return job(lambda event: progress(event.done, event.total))

        run_in_background(background, self._done, self._failed, on_progress=self._progress, pool=self._pool)

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def show_result(self, result: Any) -> list[str]:
        """The status parts of a finished job's result (``written`` files first)."""
        raise NotImplementedError

    def _update_buttons(self) -> None:
        self.run_button.setEnabled(not self.running)
        self.stop_button.setEnabled(self.running)
        self.undo_button.setEnabled(not self.running and bool(list_entries(self.folder)))

    def _progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.status.setText(f"{self._working}: {done}/{total}")

    def _done(self, result: Any) -> None:
        self.running = False
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText("; ".join(self.show_result(result)) + ".")
        self._update_buttons()
        if result.written:
            self.files_changed()

    def _failed(self, message: str, _details: str) -> None:
        self.running = False
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText(message)
        self._update_buttons()

    def undo(self) -> None:
        result = undo_last(self.folder)
        self.status.setText(f"Undone: {result.label} ({len(result.restored)} restored, "
                            f"{len(result.removed)} removed).")
        self._update_buttons()
        self.files_changed()

    def closeEvent(self, event: Any) -> None:
        self._stop.set()  # a running job ends after its batch; what it wrote stays undoable
        self._pool.waitForDone(60_000)
        super().closeEvent(event)
