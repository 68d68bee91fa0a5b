"""The Caption dialog: caption a dataset with a local WD14 tagger or image-to-text model, off the GUI thread,
with progress, Stop (a stopped run continues next time) and Undo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from .dataset_job import DatasetJobDialog

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


class CaptionDialog(DatasetJobDialog):
    """Caption ``folder``; ``captions_changed`` fires after a run or an undo wrote files."""

    captions_changed = Signal()

    def __init__(self, folder: Path, parent: QWidget | None = None, *,
                 selection: list[Path] | None = None) -> None:
        super().__init__(folder, parent, selection=selection, title=f"Caption {Path(folder).name}",
                         run_label="Caption", working="Captioning", selected_from=2,
                         stop_tip="Stop after the current batch; captioning again continues from there",
                         undo_tip="Restore the captions from before the last captioning run or tag edit")
        self.kind = QComboBox()
        self.kind.addItems([TAGGER, CAPTIONER])
        self.kind.currentIndexChanged.connect(self._kind_changed)
        self.model_folder = QLineEdit()
        self.model_folder.setPlaceholderText("the model's folder")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)  # a bound method: a lambda holding self would tie the
        # dialog into a reference cycle, left to the cyclic collector (which must not delete Qt objects)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_folder, 1)
        model_row.addWidget(browse)
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
        self.finish_layout(f"Writes captions in <b>{self.folder}</b> in the dataset's own convention (sidecar "
                           "files or metadata.jsonl). Every run can be undone.", form)
        self._kind_changed()

    def _kind_changed(self) -> None:
        tagger = self.kind.currentText() == TAGGER
        for widget, visible in ((self.threshold, tagger), (self.character_threshold, tagger),
                                (self.exclude, tagger), (self.prompt, not tagger)):
            self._form.setRowVisible(widget, visible)

    def _browse(self) -> None:
        self.browse_folder(self.model_folder, "Model folder")

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
        mode, trigger = MODES[self.mode.currentText()], self.trigger.text().strip() or None
        choices, images = self._choices(), self.chosen_images()

        def job(report: Any) -> Any:
            from sdstudio.core.captioning.job import run_caption_job

            labeler = make_labeler(choices)  # loading can take a while: off the GUI thread too
            return run_caption_job(self.folder, labeler, mode=mode, trigger=trigger, images=images,
                                   progress=report, should_stop=self.should_stop)

        self.run_job(job, "Loading the model…")

    def show_result(self, result: Any) -> list[str]:
        parts = [f"{result.written} caption(s) written"]
        if result.resumed:
            parts.append(f"continued a stopped run ({result.already_done} done before)")
        if result.skipped_existing:
            parts.append(f"{result.skipped_existing} existing caption(s) left alone")
        if result.failed:
            parts.append(f"{len(result.failed)} image(s) skipped ({result.failed[0][0].name}: {result.failed[0][1]})")
        if result.stopped:
            parts.append("stopped: Caption again to continue")
        return parts

    def files_changed(self) -> None:
        self.captions_changed.emit()
