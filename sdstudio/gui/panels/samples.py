"""Sample grids as they arrive: a slider scrubs through them by step/epoch; click to enlarge; save as PNG."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core import events as ev
from sdstudio.core.runs import RunFolder

from ..widgets.failure_dialog import show_error
from ..widgets.image_view import ImageView, array_to_qimage


@dataclass
class SampleEntry:
    step: int
    epoch: int
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    path: Path | None
    image: QImage | None = None  # loaded lazily for grids read from a run folder

    def qimage(self) -> QImage:
        if self.image is None and self.path is not None:
            self.image = QImage(str(self.path))
        return self.image if self.image is not None else QImage()


def read_run_samples(run_dir: Path) -> list[SampleEntry]:
    """The sample grids a run folder holds (samples/step-N.png with their .json), oldest first."""
    entries = []
    for png in RunFolder(run_dir).sample_grids():
        meta: dict[str, object] = {}
        try:
            meta = json.loads(png.with_suffix(".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        try:
            step = int(meta.get("step", png.stem.split("-")[-1]))  # type: ignore[call-overload]
        except ValueError:
            continue
        entries.append(SampleEntry(step, int(meta.get("epoch", 0)),  # type: ignore[call-overload]
                                   tuple(meta.get("prompts", ())), tuple(meta.get("seeds", ())),  # type: ignore[arg-type]
                                   png))
    return entries


class SamplesPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.entries: list[SampleEntry] = []
        self.view = ImageView(placeholder="Sample grids appear here as training makes them "
                              "(rows: prompts, columns: seeds).")
        self.view.setToolTip("Click to enlarge")
        self.view.clicked.connect(self.enlarge)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setEnabled(False)
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.valueChanged.connect(self._show)
        self.position = QLabel("no samples yet")
        self.prompts = QLabel("")
        self.prompts.setWordWrap(True)
        self.prompts.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.save_button = QPushButton("Save image…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(self._ask_save)
        top = QHBoxLayout()
        top.addWidget(QLabel("Step:"))
        top.addWidget(self.slider, 1)
        top.addWidget(self.position)
        top.addWidget(self.save_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.prompts)

    def add_grid(self, event: ev.SampleGrid) -> None:
        following = self.slider.value() >= len(self.entries) - 1
        self.entries.append(SampleEntry(event.step, event.epoch, tuple(event.prompts), tuple(event.seeds),
                                        event.path, array_to_qimage(np.asarray(event.image))))
        self._update_slider(follow=following)

    def set_entries(self, entries: list[SampleEntry]) -> None:
        self.entries = list(entries)
        self._update_slider(follow=True)
        if not self.entries:
            self.view.set_image(None)
            self.position.setText("no samples yet")
            self.prompts.setText("")

    def truncate_after(self, step: int) -> None:
        self.set_entries([e for e in self.entries if e.step <= step])

    def _update_slider(self, *, follow: bool) -> None:
        count = len(self.entries)
        self.slider.blockSignals(True)
        self.slider.setRange(0, max(0, count - 1))
        self.slider.setEnabled(count > 1)
        if follow:
            self.slider.setValue(count - 1)
        self.slider.blockSignals(False)
        self.save_button.setEnabled(count > 0)
        if count:
            self._show(self.slider.value())

    def current(self) -> SampleEntry | None:
        if not self.entries:
            return None
        return self.entries[min(self.slider.value(), len(self.entries) - 1)]

    def _show(self, _index: int) -> None:
        entry = self.current()
        if entry is None:
            return
        self.view.set_image(entry.qimage())
        self.position.setText(f"step {entry.step} · epoch {entry.epoch + 1} "
                              f"({self.slider.value() + 1} of {len(self.entries)})")
        if entry.prompts:
            rows = " · ".join(f"{i + 1}: {p}" for i, p in enumerate(entry.prompts))
            self.prompts.setText(f"Rows: {rows}; seeds {', '.join(map(str, entry.seeds))}")

    def enlarge(self) -> None:
        entry = self.current()
        if entry is None:
            return
        dialog = QDialog(self)
        dialog.setWindowTitle(f"Samples at step {entry.step}")
        big = ImageView()
        big.set_image(entry.qimage())
        layout = QVBoxLayout(dialog)
        layout.addWidget(big)
        dialog.resize(900, 900)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.enlarged = dialog
        dialog.open()

    def save_current(self, path: Path) -> bool:
        entry = self.current()
        if entry is None:
            return False
        if not entry.qimage().save(str(path)):
            show_error(self, "Image not saved", f"Could not write {path}.",
                       hint="Choose a folder you can write to and a .png or .jpg name.")
            return False
        return True

    def _ask_save(self) -> None:
        entry = self.current()
        if entry is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save sample grid", str(Path.home() / f"samples-step-"
                                              f"{entry.step}.png"), "Images (*.png *.jpg)")
        if path:
            self.save_current(Path(path))
