"""The Caption dialog: caption a dataset with a local WD14 tagger or image-to-text model, off the GUI thread,
with progress, Stop (a stopped run continues next time) and Undo."""

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

TAGGER, CAPTIONER = "WD14 tagger (model.onnx + selected_tags.csv)", "Captioner (BLIP style, or a vision-language model)"
MODES = {"Skip images that have a caption": "skip", "Append to existing captions": "append",
         "Replace existing captions": "replace"}


def make_labeler(choices: dict[str, Any]) -> Any:
    if choices["tagger"]:
        from sdstudio.core.captioning.wd14 import TaggerOptions, WD14Tagger

        return WD14Tagger(choices["folder"], TaggerOptions(
            general_threshold=choices["threshold"], character_threshold=choices["character_threshold"],
            exclude=choices["exclude"], batch_size=choices["batch_size"]))
    from sdstudio.core.captioning.image_to_text import CaptionerOptions
    from sdstudio.core.captioning.vision_language import open_captioner

    return open_captioner(choices["folder"], CaptionerOptions(prompt=choices["prompt"],
                                                              batch_size=choices["batch_size"]))


class CaptionDialog(QDialog):
    """Caption ``folder``; ``captions_changed`` fires after a run or an undo wrote files."""

    captions_changed = Signal()

    def __init__(self, folder: Path, parent: QWidget | None = None, *,
                 selection: list[Path] | None = None) -> None:
        super().__init__(parent)
        self.folder = Path(folder)
        self.selection = list(selection or [])  # the datasets panel's selected images
        self.setWindowTitle(f"Caption {self.folder.name}")
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._stop = threading.Event()
        self.running = False

        self.kind = QComboBox()
        self.kind.addItems([TAGGER, CAPTIONER])
        self.kind.currentIndexChanged.connect(self._kind_changed)
        self.model_folder = QLineEdit()
        self.model_folder.setPlaceholderText("the model's folder")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_folder, 1)
        model_row.addWidget(browse)
        self.scope = QComboBox()
        self.scope.addItems(["The whole dataset", f"Selected images only ({len(self.selection)})"])
        if self.selection:
            self.scope.setCurrentIndex(1 if len(self.selection) > 1 else 0)
        else:
            self.scope.model().item(1).setEnabled(False)  # nothing selected in the datasets panel
        self.mode = QComboBox()
        self.mode.addItems(list(MODES))
        self.trigger = QLineEdit()
        self.trigger.setPlaceholderText("optional, put first in every caption")
        self.threshold = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0, singleStep=0.05, value=0.35)
        self.character_threshold = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0, singleStep=0.05,
                                                  value=0.85)
        self.exclude = QLineEdit()
        self.exclude.setPlaceholderText("tags never written, comma-separated")
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("vision-language model: the instruction (default: Describe this image "
                                       "in one sentence.); BLIP: text the caption starts with")
        self.batch_size = QSpinBox(minimum=1, maximum=256, value=8)

        form = QFormLayout()
        form.addRow("Model", self.kind)
        form.addRow("Folder", model_row)
        form.addRow("Images", self.scope)
        form.addRow("Existing captions", self.mode)
        form.addRow("Trigger word", self.trigger)
        form.addRow("General threshold", self.threshold)
        form.addRow("Character threshold", self.character_threshold)
        form.addRow("Exclude tags", self.exclude)
        form.addRow("Prompt", self.prompt)
        form.addRow("Batch size", self.batch_size)
        self._form = form

        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.run_button = QPushButton("Caption")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current batch; captioning again continues from there")
        self.stop_button.clicked.connect(self._stop.set)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip("Restore the captions from before the last captioning run or tag edit")
        self.undo_button.clicked.connect(self.undo)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.stop_button, self.undo_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)

        layout = QVBoxLayout(self)
        intro = QLabel(f"Writes captions in <b>{self.folder}</b> in the dataset's own convention "
                       "(sidecar files or metadata.jsonl). Every run can be undone.")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self._kind_changed()
        self._update_buttons()

    def _kind_changed(self) -> None:
        tagger = self.kind.currentText() == TAGGER
        for widget, visible in ((self.threshold, tagger), (self.character_threshold, tagger),
                                (self.exclude, tagger), (self.prompt, not tagger)):
            self._form.setRowVisible(widget, visible)

    def _browse(self) -> None:
        chosen = QFileDialog.getExistingDirectory(self, "Model folder", self.model_folder.text())
        if chosen:
            self.model_folder.setText(chosen)

    def _update_buttons(self) -> None:
        self.run_button.setEnabled(not self.running)
        self.stop_button.setEnabled(self.running)
        self.undo_button.setEnabled(not self.running and bool(list_entries(self.folder)))

    def _choices(self) -> dict[str, Any]:
        """The form's values, read on the GUI thread (the job thread never touches widgets)."""
        return {"tagger": self.kind.currentText() == TAGGER, "folder": Path(self.model_folder.text().strip()),
                "threshold": self.threshold.value(), "character_threshold": self.character_threshold.value(),
                "exclude": tuple(t.strip() for t in self.exclude.text().split(",") if t.strip()),
                "prompt": self.prompt.text().strip() or None, "batch_size": self.batch_size.value()}

    def start(self) -> None:
        if self.running:
            return
        if not self.model_folder.text().strip():
            self.status.setText("Choose the model's folder first.")
            return
        self._stop.clear()
        self.running = True
        self._update_buttons()
        self.progress.setRange(0, 0)
        self.status.setText("Loading the model…")
        mode, trigger = MODES[self.mode.currentText()], self.trigger.text().strip() or None
        choices = self._choices()
        images = self.selection if self.scope.currentIndex() == 1 else None

        def job(progress: Any) -> Any:
            from sdstudio.core.captioning.job import run_caption_job

            labeler = make_labeler(choices)  # loading can take a while: off the GUI thread too

            def report(event: Progress) -> None:
                progress(event.done, event.total)

            return run_caption_job(self.folder, labeler, mode=mode, trigger=trigger, images=images,
                                   progress=report, should_stop=self._stop.is_set)

        run_in_background(job, self._done, self._failed, on_progress=self._progress, pool=self._pool)

    def _progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.status.setText(f"Captioning: {done}/{total}")

    def _done(self, result: Any) -> None:
        self.running = False
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        parts = [f"{result.written} caption(s) written"]
        if result.resumed:
            parts.append(f"continued a stopped run ({result.already_done} done before)")
        if result.skipped_existing:
            parts.append(f"{result.skipped_existing} existing caption(s) left alone")
        if result.failed:
            parts.append(f"{len(result.failed)} image(s) skipped ({result.failed[0][0].name}: {result.failed[0][1]})")
        if result.stopped:
            parts.append("stopped: Caption again to continue")
        self.status.setText("; ".join(parts) + ".")
        self._update_buttons()
        if result.written:
            self.captions_changed.emit()

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
        self.captions_changed.emit()

    def closeEvent(self, event: Any) -> None:
        self._stop.set()  # a running job ends after its batch; its progress is kept for next time
        self._pool.waitForDone(60_000)
        super().closeEvent(event)
