"""The Masks dialog: make the training masks (``name.mask.png``) of the selected images or the whole dataset,
from each image's alpha channel or from a text prompt with a local CLIPSeg model folder; off the GUI thread,
with progress, Stop and Undo (the brush editor for one image is ``mask_dialog.py``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from PySide6.QtCore import QThreadPool, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.data.undo_journal import list_entries, undo_last
from sdstudio.core.events import Progress

from ..background import run_in_background

ALPHA, PROMPT = "The image's alpha channel (transparent = not trained)", "A text prompt (CLIPSeg model folder)"
MODES = {"Skip images that have a mask": "skip", "Replace existing masks": "replace"}


def make_mask_maker(choices: dict[str, Any]) -> tuple[Any, str]:
    """The mask function and the undo label for the dialog's choices; loads the model (off the GUI thread)."""
    from sdstudio.core.data.masks import masks_from_alpha

    if choices["alpha"]:
        return masks_from_alpha, "masks (from alpha)"
    from sdstudio.core.data.clipseg import SegmenterOptions, prompt_mask_maker

    make = prompt_mask_maker(choices["folder"], choices["prompt"], SegmenterOptions(
        threshold=choices["threshold"], batch_size=choices["batch_size"]))
    return make, f"masks (prompt {choices['prompt']!r})"


class MasksDialog(QDialog):
    """Make masks in ``folder``; ``masks_changed`` fires after a run or an undo wrote files."""

    masks_changed = Signal()

    def __init__(self, folder: Path, parent: QWidget | None = None, *,
                 selection: list[Path] | None = None) -> None:
        super().__init__(parent)
        self.folder = Path(folder)
        self.selection = list(selection or [])  # the datasets panel's selected images
        self.setWindowTitle(f"Masks for {self.folder.name}")
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._stop = threading.Event()
        self.running = False

        self.source = QComboBox()
        self.source.addItems([ALPHA, PROMPT])
        self.source.currentIndexChanged.connect(self._source_changed)
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("what to keep, e.g. a dog")
        self.model_folder = QLineEdit()
        self.model_folder.setPlaceholderText("a CLIPSeg model folder (e.g. a copy of CIDAS/clipseg-rd64-refined)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self._model_row = QWidget()
        model_row = QHBoxLayout(self._model_row)
        model_row.setContentsMargins(0, 0, 0, 0)
        model_row.addWidget(self.model_folder, 1)
        model_row.addWidget(browse)
        self.threshold = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0, singleStep=0.05, value=0.4)
        self.threshold.setToolTip("Pixels the model finds more likely than this belong to the prompt's object")
        self.scope = QComboBox()
        self.scope.addItems(["The whole dataset", f"Selected images only ({len(self.selection)})"])
        if self.selection:
            self.scope.setCurrentIndex(1)
        else:
            self.scope.model().item(1).setEnabled(False)  # nothing selected in the datasets panel
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.batch_size = QSpinBox(minimum=1, maximum=256, value=8)

        form = QFormLayout()
        form.addRow("Mask from", self.source)
        form.addRow("Prompt", self.prompt)
        form.addRow("Model folder", self._model_row)
        form.addRow("Threshold", self.threshold)
        form.addRow("Images", self.scope)
        form.addRow("Existing masks", self.mode)
        form.addRow("Batch size", self.batch_size)
        self._form = form

        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.run_button = QPushButton("Make masks")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current batch; the masks written so far are kept (undoable)")
        self.stop_button.clicked.connect(self._stop.set)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip("Put back the masks (or captions) from before the last run or edit")
        self.undo_button.clicked.connect(self.undo)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.stop_button, self.undo_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)

        layout = QVBoxLayout(self)
        intro = QLabel(f"Writes <i>name.mask.png</i> beside the images in <b>{self.folder}</b> (white = trained, "
                       "black = left out). Every run can be undone; paint single masks with <b>Paint mask…</b>.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self._source_changed()
        self._update_buttons()

    def _source_changed(self) -> None:
        prompt = self.source.currentText() == PROMPT
        for widget in (self.prompt, self._model_row, self.threshold):
            self._form.setRowVisible(widget, prompt)

    def _browse(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "CLIPSeg model folder", self.model_folder.text())
        if chosen:
            self.model_folder.setText(chosen)

    def _update_buttons(self) -> None:
        self.run_button.setEnabled(not self.running)
        self.stop_button.setEnabled(self.running)
        self.undo_button.setEnabled(not self.running and bool(list_entries(self.folder)))

    def _choices(self) -> dict[str, Any]:
        """The form's values, read on the GUI thread (the job thread never touches widgets)."""
        return {"alpha": self.source.currentText() == ALPHA, "prompt": self.prompt.text().strip(),
                "folder": Path(self.model_folder.text().strip()), "threshold": self.threshold.value(),
                "batch_size": self.batch_size.value()}

    def start(self) -> None:
        if self.running:
            return
        choices = self._choices()
        if not choices["alpha"] and not (choices["prompt"] and self.model_folder.text().strip()):
            self.status.setText("Say what to keep (the prompt) and choose the CLIPSeg model folder first.")
            return
        self._stop.clear()
        self.running = True
        self._update_buttons()
        self.progress.setRange(0, 0)
        self.status.setText("Loading the model…" if not choices["alpha"] else "Reading the images…")
        mode = MODES[self.mode.currentText()]
        images = self.selection if self.scope.currentIndex() == 1 else None

        def job(progress: Any) -> Any:
            from sdstudio.core.data.masks import run_mask_job

            make, label = make_mask_maker(choices)

            def report(event: Progress) -> None:
                progress(event.done, event.total)

            return run_mask_job(self.folder, make, label=label, mode=mode, images=images,
                                batch_size=choices["batch_size"], progress=report, should_stop=self._stop.is_set)

        run_in_background(job, self._done, self._failed, on_progress=self._progress, pool=self._pool)

    def _progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.status.setText(f"Making masks: {done}/{total}")

    def _done(self, result: Any) -> None:
        self.running = False
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        parts = [f"{result.written} mask(s) written"]
        if result.skipped_existing:
            parts.append(f"{result.skipped_existing} existing mask(s) left alone")
        if result.failed:
            image, why = result.failed[0]
            more = f" and {len(result.failed) - 1} more" if len(result.failed) > 1 else ""
            parts.append(f"no mask for {image.name}: {why}{more}")
        if result.stopped:
            parts.append("stopped")
        self.status.setText("; ".join(parts) + ".")
        self._update_buttons()
        if result.written:
            self.masks_changed.emit()

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
        self.masks_changed.emit()

    def closeEvent(self, event: Any) -> None:
        self._stop.set()  # a running job ends after its batch; what it wrote stays undoable
        self._pool.waitForDone(60_000)
        super().closeEvent(event)
