"""The Masks dialog: make the training masks (``name.mask.png``) of the selected images or the whole dataset,
from each image's alpha channel or from a text prompt with a local CLIPSeg model folder; off the GUI thread,
with progress, Stop and Undo (the brush editor for one image is ``mask_dialog.py``)."""

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


class MasksDialog(DatasetJobDialog):
    """Make masks in ``folder``; ``masks_changed`` fires after a run or an undo wrote files."""

    masks_changed = Signal()

    def __init__(self, folder: Path, parent: QWidget | None = None, *,
                 selection: list[Path] | None = None) -> None:
        super().__init__(folder, parent, selection=selection, title=f"Masks for {Path(folder).name}",
                         run_label="Make masks", working="Making masks",
                         stop_tip="Stop after the current batch; the masks written so far are kept (undoable)",
                         undo_tip="Put back the masks (or captions) from before the last run or edit")
        self.source = QComboBox()
        self.source.addItems([ALPHA, PROMPT])
        self.source.currentIndexChanged.connect(self._source_changed)
        self.prompt = QLineEdit()
        self.prompt.setPlaceholderText("what to keep, e.g. a dog")
        self.model_folder = QLineEdit()
        self.model_folder.setPlaceholderText("a CLIPSeg model folder (e.g. a copy of CIDAS/clipseg-rd64-refined)")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)  # a bound method: a lambda holding self would tie the
        # dialog into a reference cycle, left to the cyclic collector (which must not delete Qt objects)
        self._model_row = QWidget()
        model_row = QHBoxLayout(self._model_row)
        model_row.setContentsMargins(0, 0, 0, 0)
        model_row.addWidget(self.model_folder, 1)
        model_row.addWidget(browse)
        self.threshold = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0, singleStep=0.05, value=0.4)
        self.threshold.setToolTip("Pixels the model finds more likely than this belong to the prompt's object")
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
        self.finish_layout(f"Writes <i>name.mask.png</i> beside the images in <b>{self.folder}</b> (white = "
                           "trained, black = left out). Every run can be undone; paint single masks with "
                           "<b>Paint mask…</b>.", form)
        self._source_changed()

    def _source_changed(self) -> None:
        prompt = self.source.currentText() == PROMPT
        for widget in (self.prompt, self._model_row, self.threshold):
            self._form.setRowVisible(widget, prompt)

    def _browse(self) -> None:
        self.browse_folder(self.model_folder, "CLIPSeg model folder")

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
        mode, images = MODES[self.mode.currentText()], self.chosen_images()

        def job(report: Any) -> Any:
            from sdstudio.core.data.masks import run_mask_job

            make, label = make_mask_maker(choices)
            return run_mask_job(self.folder, make, label=label, mode=mode, images=images,
                                batch_size=choices["batch_size"], progress=report, should_stop=self.should_stop)

        self.run_job(job, "Loading the model…" if not choices["alpha"] else "Reading the images…")

    def show_result(self, result: Any) -> list[str]:
        parts = [f"{result.written} mask(s) written"]
        if result.skipped_existing:
            parts.append(f"{result.skipped_existing} existing mask(s) left alone")
        if result.failed:
            image, why = result.failed[0]
            more = f" and {len(result.failed) - 1} more" if len(result.failed) > 1 else ""
            parts.append(f"no mask for {image.name}: {why}{more}")
        if result.stopped:
            parts.append("stopped")
        return parts

    def files_changed(self) -> None:
        self.masks_changed.emit()
