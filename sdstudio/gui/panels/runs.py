"""Past runs: found in the runs folder, curves reloaded from metrics.jsonl, two runs overlaid, resume a
stopped run, open its folder, export it, compare several. Metric files are read in the background."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QThreadPool, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSplitter,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core import paths
from sdstudio.core.runs import RunFolder, list_runs, smooth_ema

from ..background import run_in_background
from ..widgets.failure_dialog import show_error
from .plots import live_curve

PALETTE = [(25, 85, 190), (220, 90, 20), (40, 140, 60), (140, 60, 160)]
MAX_COMPARED = 2


@dataclass
class RunSummary:
    path: Path
    state: str  # completed | stopped | running | interrupted | empty
    last_step: int = 0
    last_loss: float = float("nan")
    best_val: float = float("nan")
    has_checkpoint: bool = False
    steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    loss: np.ndarray = field(default_factory=lambda: np.empty(0))
    val_steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def resumable(self) -> bool:
        return self.has_checkpoint and self.state in ("stopped", "interrupted")


def summarize_run(run_dir: Path) -> RunSummary:
    run = RunFolder(run_dir)
    curves = run.curves()
    has_checkpoint = run.has_checkpoint()
    if run.is_locked_by_live_process():
        state = "running"
    elif curves.events and curves.events[-1] in ("completed", "stopped", "early_stopped"):
        state = "stopped" if curves.events[-1] == "stopped" else "completed"  # early stopping ends a run as planned
    else:
        state = "interrupted" if has_checkpoint else "empty"
    summary = RunSummary(run_dir, state, has_checkpoint=has_checkpoint, last_step=curves.last_step,
                         steps=curves.train_steps, loss=curves.train_loss,
                         val_steps=curves.val_steps, val_loss=curves.val_loss)
    if len(summary.loss):
        summary.last_loss = float(summary.loss[-1])
    if len(summary.val_loss):
        summary.best_val = float(np.nanmin(summary.val_loss))
    return summary


class RunsPanel(QWidget):
    resume_requested = Signal(Path)
    samples_requested = Signal(Path)
    run_selected = Signal(object)  # Path of the current run, or None
    export_requested = Signal(Path)
    compare_requested = Signal(list)  # list[Path]

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.summaries: dict[str, RunSummary] = {}
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._token = 0
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Run (tick two to compare)", "State", "Steps", "Last loss", "Best val loss"])
        self.tree.setRootIsDecorated(False)
        self.tree.setColumnWidth(0, 260)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.tree.itemSelectionChanged.connect(self._selection_changed)
        self.tree.itemChanged.connect(self._checked)
        self.tree.currentItemChanged.connect(lambda *_: self._selection_changed())
        self._check_order: list[str] = []
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        self.resume_button = QPushButton("Resume")
        self.resume_button.clicked.connect(self._resume)
        self.open_button = QPushButton("Open folder")
        self.open_button.clicked.connect(self._open_folder)
        self.samples_button = QPushButton("Show samples")
        self.samples_button.clicked.connect(self._samples)
        self.export_button = QPushButton("Export…")
        self.export_button.clicked.connect(self._export)
        self.compare_button = QPushButton("Compare…")
        self.compare_button.clicked.connect(self._compare)
        self.grid_button = QPushButton("Checkpoint grid…")
        self.grid_button.setToolTip("Sample every checkpoint with the same prompts and seeds; pick one and export it")
        self.grid_button.clicked.connect(self.open_grid)
        buttons = QHBoxLayout()
        for button in (refresh, self.resume_button, self.open_button, self.samples_button, self.export_button,
                       self.compare_button, self.grid_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        self.status = QLabel("")
        self.plot = pg.PlotWidget(title="Smoothed training loss (solid) and validation loss (dots)")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "step")
        self.plot.addLegend(offset=(-10, 10))
        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addLayout(buttons)
        top_layout.addWidget(self.tree, 1)
        top_layout.addWidget(self.status)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(self.plot)
        splitter.setSizes([260, 440])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(splitter)
        self._selection_changed()

    # -- loading ---------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        self._token += 1
        token = self._token
        root = paths.runs_dir()
        self.status.setText(f"Reading runs in {root}…")
        run_in_background(lambda: (token, [summarize_run(p) for p in list_runs(root)]), self._loaded,
                          self._failed, pool=self._pool)

    def _loaded(self, result: tuple[int, list[RunSummary]]) -> None:
        token, summaries = result
        if token != self._token:
            return
        checked = [key for key in self._check_order if any(str(s.path) == key for s in summaries)]
        selected = self.selected_path()
        self.summaries = {str(s.path): s for s in summaries}
        self.tree.blockSignals(True)
        self.tree.clear()
        for summary in summaries:
            item = QTreeWidgetItem([summary.path.name, summary.state, str(summary.last_step),
                                    _fmt(summary.last_loss), _fmt(summary.best_val)])
            item.setData(0, Qt.ItemDataRole.UserRole, str(summary.path))
            item.setToolTip(0, str(summary.path))
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(0, Qt.CheckState.Checked if str(summary.path) in checked else Qt.CheckState.Unchecked)
            self.tree.addTopLevelItem(item)
            if selected is not None and summary.path == selected:
                self.tree.setCurrentItem(item)
        self.tree.blockSignals(False)
        self._check_order = checked
        self.status.setText(f"{len(summaries)} runs in {paths.runs_dir()}" if summaries else
                            f"No runs yet in {paths.runs_dir()}; start one with Train.")
        self._selection_changed()

    def _failed(self, message: str, details: str) -> None:
        self.status.setText(f"Could not read the runs: {message}")

    # -- selection and comparison ---------------------------------------------------------------------------
    def selected_path(self) -> Path | None:
        item = self.tree.currentItem()
        return Path(item.data(0, Qt.ItemDataRole.UserRole)) if item is not None else None

    def set_compared(self, paths_: list[Path]) -> None:
        """Tick these runs (at most two) for comparison."""
        self.tree.blockSignals(True)
        wanted = {str(p) for p in paths_[:MAX_COMPARED]}
        for i in range(self.tree.topLevelItemCount()):
            item = self.tree.topLevelItem(i)
            key = item.data(0, Qt.ItemDataRole.UserRole)
            item.setCheckState(0, Qt.CheckState.Checked if key in wanted else Qt.CheckState.Unchecked)
        self.tree.blockSignals(False)
        self._check_order = [str(p) for p in paths_[:MAX_COMPARED]]
        self._draw()

    def compared(self) -> list[Path]:
        return [Path(key) for key in self._check_order]

    def _checked(self, item: QTreeWidgetItem, column: int) -> None:
        if column != 0:
            return
        key = item.data(0, Qt.ItemDataRole.UserRole)
        if item.checkState(0) == Qt.CheckState.Checked:
            self._check_order = [k for k in self._check_order if k != key] + [key]
            if len(self._check_order) > MAX_COMPARED:
                self.set_compared([Path(k) for k in self._check_order[-MAX_COMPARED:]])
                return
        else:
            self._check_order = [k for k in self._check_order if k != key]
        self._draw()

    def selected_paths(self) -> list[Path]:
        """Every selected run (Ctrl/Shift-click selects several), in list order."""
        rows = sorted(self.tree.indexOfTopLevelItem(item) for item in self.tree.selectedItems())
        return [Path(self.tree.topLevelItem(row).data(0, Qt.ItemDataRole.UserRole)) for row in rows]

    def compare_candidates(self) -> list[Path]:
        """What Compare shows: the selected runs when several are selected, else the ticked ones."""
        selected = self.selected_paths()
        return selected if len(selected) >= 2 else (self.compared() or selected)

    def _selection_changed(self) -> None:
        summary = self.summaries.get(str(self.selected_path()))
        self.run_selected.emit(summary.path if summary is not None else None)
        self.export_button.setEnabled(summary is not None and summary.has_checkpoint)
        if summary is None:
            self.export_button.setToolTip("Select a run")
        elif summary.has_checkpoint:
            self.export_button.setToolTip(f"Export {summary.path.name} (LoRA file, single file or diffusers "
                                          "folder, as the run allows)")
        else:
            self.export_button.setToolTip(f"{summary.path.name} has no checkpoint yet: nothing to export")
        self.open_button.setEnabled(summary is not None)
        self.grid_button.setEnabled(summary is not None and summary.has_checkpoint)
        self.samples_button.setEnabled(summary is not None)
        self.resume_button.setEnabled(summary is not None and summary.resumable)
        if summary is None:
            self.resume_button.setToolTip("Select a run")
        elif summary.resumable:
            self.resume_button.setToolTip(f"Continue {summary.path.name} from its newest checkpoint")
        else:
            self.resume_button.setToolTip(f"This run is {summary.state}"
                                          f"{'' if summary.has_checkpoint else ' and has no checkpoint'}; only a "
                                          "stopped or interrupted run with a checkpoint can be resumed")
        self._draw()

    def _draw(self) -> None:
        self.compare_button.setEnabled(bool(self.compare_candidates()))
        self.compare_button.setToolTip("Compare the selected runs (Ctrl-click to select several) or the ticked "
                                       "ones: a table and their curves overlaid")
        self.plot.clear()
        keys = self._check_order or ([str(self.selected_path())] if self.selected_path() else [])
        for i, key in enumerate(keys):
            summary = self.summaries.get(key)
            if summary is None:
                continue
            color = PALETTE[i % len(PALETTE)]
            if len(summary.loss):
                curve = live_curve(self.plot.getPlotItem(), color, width=2, name=summary.path.name)
                curve.setData(summary.steps, smooth_ema(summary.loss))
            if len(summary.val_loss):
                val = live_curve(self.plot.getPlotItem(), color, symbol="o")
                val.setPen(pg.mkPen(color=color, width=1, style=Qt.PenStyle.DashLine))
                val.setData(summary.val_steps, summary.val_loss)

    # -- actions ---------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.selected_path()
        if path is not None:
            self.resume_requested.emit(path)

    def _export(self) -> None:
        path = self.selected_path()
        if path is not None:
            self.export_requested.emit(path)

    def open_grid(self) -> QWidget | None:
        from sdstudio.core.errors import UserError

        from .checkpoint_grid import CheckpointGridDialog

        path = self.selected_path()
        if path is None:
            return None
        try:
            dialog = CheckpointGridDialog(path, self)
        except UserError as exc:
            show_error(self, "No checkpoint grid", str(exc), hint="Choose a run folder made by sdstudio.")
            return None
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.grid_dialog = dialog
        dialog.open()
        return dialog

    def _compare(self) -> None:
        candidates = self.compare_candidates()
        if candidates:
            self.compare_requested.emit(candidates)

    def _samples(self) -> None:
        path = self.selected_path()
        if path is not None:
            self.samples_requested.emit(path)

    def _open_folder(self) -> None:
        path = self.selected_path()
        if path is None:
            return
        if not path.is_dir() or not QDesktopServices.openUrl(QUrl.fromLocalFile(os.fspath(path))):
            show_error(self, "Folder not opened", f"Could not open {path} with the file manager.",
                       hint="Open it yourself; the path can be copied from the run's tooltip.")

    def shutdown(self) -> None:
        self._token += 1
        self._pool.waitForDone(5000)


def _fmt(value: float) -> str:
    return "–" if np.isnan(value) else f"{value:.4f}"
