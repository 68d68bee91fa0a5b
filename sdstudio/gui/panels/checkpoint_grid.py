"""The checkpoint x prompt grid of a run: every (or every N-th) checkpoint sampled with the same prompts and seeds,
the step, validation loss and KID above each column; pick a column and export that checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PySide6.QtCore import Qt, QThreadPool, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.runs import RunFolder
from sdstudio.core.sampling.checkpoint_grid import CheckpointGrid, checkpoint_grid

from ..background import run_in_background
from ..widgets.failure_dialog import show_error
from .export_dialog import ExportDialog, open_export_dialog


def to_pixmap(image: np.ndarray) -> QPixmap:
    data = np.ascontiguousarray(image[..., :3])
    h, w = data.shape[:2]
    return QPixmap.fromImage(QImage(data.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy())


class CheckpointGridDialog(QDialog):
    grid_ready = Signal(object)

    def __init__(self, run_dir: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir = run_dir
        self.setWindowTitle(f"Checkpoint grid: {run_dir.name}")
        self.setObjectName("checkpointGridDialog")
        self.grid: CheckpointGrid | None = None
        self.export_dialog: ExportDialog | None = None
        self.busy = False
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        config = RunFolder(run_dir).load_config()  # UserError for a folder that is not a run: the caller shows it
        self.prompts = QPlainTextEdit("\n".join(config.sample.prompts))
        self.prompts.setToolTip("One prompt per line: one row each (per seed)")
        self.prompts.setMaximumHeight(80)
        self.seeds = QLineEdit(", ".join(str(s) for s in config.sample.seeds[:2]) or "0")
        self.seeds.setToolTip("Seeds, comma separated: the same noise in every column")
        self.every = QSpinBox()
        self.every.setRange(1, 1000)
        self.every.setToolTip("Every N-th checkpoint, counted back from the newest (which is always shown)")
        self.steps = QSpinBox()
        self.steps.setRange(1, 1000)
        self.steps.setValue(config.sample.steps)
        form = QFormLayout()
        form.addRow("Prompts", self.prompts)
        form.addRow("Seeds", self.seeds)
        form.addRow("Every N-th checkpoint", self.every)
        form.addRow("Sampler steps", self.steps)
        self.make_button = QPushButton("Make grid")
        self.make_button.clicked.connect(self.make_grid)
        self.status = QLabel("")
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        scroll = QScrollArea()
        scroll.setWidget(self.image)
        scroll.setWidgetResizable(True)
        self.column = QComboBox()
        self.column.setToolTip("The checkpoint (column) to keep")
        self.export_button = QPushButton("Export this checkpoint…")
        self.export_button.clicked.connect(self.export_column)
        self.export_button.setEnabled(False)
        pick = QHBoxLayout()
        pick.addWidget(QLabel("Column:"))
        pick.addWidget(self.column, 1)
        pick.addWidget(self.export_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        row = QHBoxLayout()
        row.addWidget(self.make_button)
        row.addWidget(self.status, 1)
        layout.addLayout(row)
        layout.addWidget(scroll, 1)
        layout.addLayout(pick)
        self.resize(900, 640)

    def prompt_list(self) -> list[str]:
        return [line.strip() for line in self.prompts.toPlainText().splitlines() if line.strip()]

    def seed_list(self) -> list[int]:
        try:
            return [int(s) for s in self.seeds.text().replace(",", " ").split()] or [0]
        except ValueError:
            return [0]

    def make_grid(self) -> None:
        prompts = self.prompt_list()
        if not prompts:
            show_error(self, "No grid", "The grid needs at least one prompt.", hint="Type a prompt per line.")
            return
        if self.busy:
            return
        self.busy = True
        self.make_button.setEnabled(False)
        self.status.setText("sampling the checkpoints…")
        seeds, every, steps, run = self.seed_list(), self.every.value(), self.steps.value(), self.run_dir

        def job(progress: Any) -> CheckpointGrid:
            return checkpoint_grid(run, prompts, seeds=seeds, every=every, steps=steps, progress=progress)

        run_in_background(job, self._done, self._failed, on_progress=self._progress, pool=self._pool)

    def _progress(self, done: int, total: int) -> None:
        self.status.setText(f"checkpoint {done} of {total} sampled")

    def _done(self, grid: CheckpointGrid) -> None:
        self.busy = False
        self.make_button.setEnabled(True)
        self.set_grid(grid)
        self.grid_ready.emit(grid)

    def set_grid(self, grid: CheckpointGrid) -> None:
        self.grid = grid
        self.image.setPixmap(to_pixmap(grid.render()))
        self.column.clear()
        for c in grid.columns:
            self.column.addItem(" · ".join(c.label()), str(c.checkpoint))
        best = min(range(len(grid.columns)), default=-1,
                   key=lambda i: grid.columns[i].val_loss if grid.columns[i].val_loss is not None else float("inf"))
        if best >= 0:
            self.column.setCurrentIndex(best)
        self.export_button.setEnabled(bool(grid.columns))
        copying = [str(c.step) for c in grid.columns if c.copying]  # eval.memorisation's measure, per column
        self.status.setText(f"{len(grid.columns)} checkpoints" + (
            f"; <span style='color:#b3261e'>samples copy training images at step {', '.join(copying)}</span>"
            if copying else ""))
        self.status.setToolTip("memo: distance of the samples to their nearest training image over the training "
                               "images' own nearest-neighbour distance (near 0 = copies; COPY below "
                               "eval.memorisation_threshold)")

    def _failed(self, message: str, details: str) -> None:
        self.busy = False
        self.make_button.setEnabled(True)
        self.status.setText("")
        show_error(self, "No grid", message, details=details,
                   hint="Check that the run has checkpoints (the run's folder, checkpoints/).")

    def export_column(self) -> ExportDialog | None:
        data = self.column.currentData()
        if data is None:
            return None
        self.export_dialog = open_export_dialog(self.run_dir, self)
        if self.export_dialog is not None:
            self.export_dialog.select_checkpoint(Path(data))
        return self.export_dialog

    def wait_idle(self, msecs: int = 120_000) -> bool:
        return self._pool.waitForDone(msecs)
