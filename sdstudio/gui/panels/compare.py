"""Compare runs: a sweep folder (its summary.json) or runs picked in the Runs tab, as a sortable table (run,
swept or differing settings, best / final validation loss, FID / KID, steps, time) and their loss curves
overlaid. Files are read on a pool thread."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QThreadPool, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core import paths
from sdstudio.core.errors import UserError
from sdstudio.core.runs import RunFolder, is_run_dir, load_run_config, smooth_ema
from sdstudio.core.sweeps.plan import format_value
from sdstudio.core.sweeps.summary import FINAL_LOSS_ROWS, SUMMARY_JSON

from ..background import run_in_background
from .plots import live_curve
from .runs import PALETTE, summarize_run
from .train_bar import format_duration

COLUMNS = ("#", "Run", "Status", "Settings", "Best val loss", "Final val loss", "Final loss", "FID", "KID",
           "Steps", "Time")
NOT_COMPARED = {"schema_version", "name"}  # differ between runs without saying anything about them


@dataclass
class CompareRow:
    """One run of the comparison; metric values are None when the run did not log them."""

    index: int
    path: Path | None  # None: a sweep combination that has not run yet
    label: str
    status: str
    overrides: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    best_val: float | None = None
    final_val: float | None = None
    final_loss: float | None = None
    fid: float | None = None
    kid: float | None = None
    kid_std: float | None = None
    steps: int = 0
    seconds: float | None = None
    train_steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    train_loss: np.ndarray = field(default_factory=lambda: np.empty(0))
    val_steps: np.ndarray = field(default_factory=lambda: np.empty(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.empty(0))

    def describe(self) -> str:
        return ", ".join(f"{key}={format_value(value)}" for key, value in self.overrides.items())


@dataclass
class Comparison:
    title: str
    rows: list[CompareRow]
    source: Path | None = None  # the sweep folder, when it is one
    importances: dict[str, float] | None = None  # a [search] sweep's parameter importances (Optuna)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_run_row(run_dir: Path, index: int, label: str | None = None) -> CompareRow:
    """A run's curves and figures from its metrics.jsonl (rows without val_loss, such as FID/KID rows, are fine)."""
    summary = summarize_run(run_dir)
    curves = RunFolder(run_dir).curves()
    fid = curves.fid[-1][1] if curves.fid else None
    kid, kid_std = (curves.kid[-1][1], curves.kid[-1][2]) if curves.kid else (None, None)
    finite_val = summary.val_loss[np.isfinite(summary.val_loss)] if len(summary.val_loss) else summary.val_loss
    tail = summary.loss[-FINAL_LOSS_ROWS:]
    return CompareRow(
        index, run_dir, label or run_dir.name, summary.state,
        best_val=float(finite_val.min()) if len(finite_val) else None,
        final_val=float(finite_val[-1]) if len(finite_val) else None,
        final_loss=float(tail.mean()) if len(tail) else None,
        fid=fid, kid=kid, kid_std=kid_std, steps=summary.last_step, seconds=curves.seconds,
        train_steps=summary.steps, train_loss=summary.loss, val_steps=summary.val_steps, val_loss=summary.val_loss)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_settings(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Per run, the config keys whose values differ between the runs (what a comparison is about)."""
    flats: list[dict[str, Any] | None] = []
    for run_dir in run_dirs:
        try:
            flats.append(_flat(load_run_config(run_dir).to_dict()))
        except UserError:
            flats.append(None)
    known = [f for f in flats if f is not None]
    keys = sorted({k for f in known for k in f} - NOT_COMPARED)
    differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in known}) > 1]
    return [{k: f.get(k) for k in differ} if f is not None else {} for f in flats]


def load_runs(run_dirs: list[Path], title: str = "") -> Comparison:
    rows = [read_run_row(path, i) for i, path in enumerate(run_dirs)]
    for row, overrides in zip(rows, differing_settings(run_dirs), strict=True):
        row.overrides = overrides
    return Comparison(title or "Runs compared", rows)


def load_sweep_folder(folder: Path) -> Comparison:
    """A sweep folder (summary.json, see docs/sweeps.md): its rows, with each run's curves and KID."""
    summary_file = folder / SUMMARY_JSON
    try:
        data = json.loads(summary_file.read_text(encoding="utf-8"))
        rows_in = list(data["rows"])
        keys = [str(k) for k in data.get("keys", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{summary_file}: cannot be read as a sweep summary ({exc}); choose a folder made by "
                        "`sdstudio sweep`") from None
    rows = []
    for raw in rows_in:
        index = int(raw.get("index", len(rows)))
        run_rel = str(raw.get("run_dir") or "")
        run_dir = folder / run_rel if run_rel else None
        if run_dir is not None and run_dir.is_dir():
            row = read_run_row(run_dir, index, label=run_rel)
        else:
            row = CompareRow(index, None, run_rel or f"{index} (not run)", str(raw.get("status", "pending")))
        row.status = str(raw.get("status") or row.status)
        row.message = str(raw.get("message") or "")
        row.overrides = {k: raw.get(k) for k in keys}
        for attr, key in (("best_val", "best_val_loss"), ("final_val", "final_val_loss"),
                          ("final_loss", "final_loss"), ("fid", "final_fid"), ("seconds", "seconds")):
            value = _number(raw.get(key))
            if value is not None:
                setattr(row, attr, value)
        row.steps = max(row.steps, int(_number(raw.get("steps")) or 0))
        rows.append(row)
    importances = data.get("importances") if isinstance(data.get("importances"), dict) else None
    return Comparison(f"sweep {data.get('name') or folder.name}", rows, folder,
                      {str(k): float(v) for k, v in importances.items()} if importances else None)


def find_sweeps(root: Path | None = None) -> list[Path]:
    """Sweep folders (with a summary.json) under ``<runs folder>/sweeps``, newest first."""
    base = (root or paths.runs_dir()) / "sweeps"
    if not base.is_dir():
        return []
    found = [p for p in base.iterdir() if (p / SUMMARY_JSON).is_file()]
    return sorted(found, key=lambda p: (p / SUMMARY_JSON).stat().st_mtime, reverse=True)


class SortItem(QTableWidgetItem):
    """A cell that sorts by a number (missing values last), not by its text."""

    def __init__(self, text: str, key: float | None) -> None:
        super().__init__(text)
        self.key = math.inf if key is None else key
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, SortItem):
            return self.key < other.key
        return super().__lt__(other)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def color_for(i: int, n: int) -> tuple[int, int, int] | Any:
    return PALETTE[i] if n <= len(PALETTE) else pg.intColor(i, hues=max(n, 6), values=1, maxValue=200)


class ComparePanel(QWidget):
    """The Compare tab. ``set_runs`` / ``open_sweep`` load in the background; ``loaded`` fires after."""

    loaded = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.comparison: Comparison | None = None
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._token = 0

        self.sweeps = QComboBox()
        self.sweeps.setMinimumWidth(260)
        self.sweeps.setToolTip("Sweep folders (with a summary.json) in the runs folder")
        self.sweeps.activated.connect(self._sweep_chosen)
        find = QPushButton("Find sweeps")
        find.setToolTip("Look for sweep folders in the runs folder again")
        find.clicked.connect(self.refresh_sweeps)
        open_button = QPushButton("Open folder…")
        open_button.setToolTip("Open a sweep folder (with summary.json) or a single run folder")
        open_button.clicked.connect(self._pick_folder)
        self.log_scale = QCheckBox("Log scale")
        self.log_scale.toggled.connect(self._log_scale)
        self.title = QLabel("Pick a sweep, or select runs in the Runs tab and click Compare.")
        self.title.setWordWrap(True)
        top = QHBoxLayout()
        top.addWidget(QLabel("Sweep:"))
        top.addWidget(self.sweeps)
        top.addWidget(find)
        top.addWidget(open_button)
        top.addStretch(1)
        top.addWidget(self.log_scale)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # long run names keep both ends
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)  # run names give way to the numbers
        self.table.itemSelectionChanged.connect(self._draw)

        self.plot = pg.PlotWidget(title="Smoothed training loss (solid) and validation loss (dashed, dots)")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "step")
        self.plot.addLegend(offset=(-10, 10))
        splitter = QSplitter(Qt.Orientation.Vertical)
        table_box = QWidget()
        table_layout = QVBoxLayout(table_box)
        table_layout.setContentsMargins(0, 0, 0, 0)
        table_layout.addWidget(self.title)
        self.importances = QLabel("")
        self.importances.setWordWrap(True)
        self.importances.setToolTip("How much each searched setting explains the validation loss of the completed "
                                    "trials (Optuna's parameter importances; they sum to 1)")
        table_layout.addWidget(self.importances)
        table_layout.addWidget(self.table, 1)
        splitter.addWidget(table_box)
        splitter.addWidget(self.plot)
        splitter.setSizes([260, 480])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(splitter, 1)
        self.refresh_sweeps()

    # -- sources ---------------------------------------------------------------------------------------------
    def refresh_sweeps(self) -> None:
        current = self.sweeps.currentData()
        self.sweeps.clear()
        self.sweeps.addItem("(choose a sweep)", None)
        for folder in find_sweeps():
            self.sweeps.addItem(folder.name, str(folder))
        index = self.sweeps.findData(current)
        self.sweeps.setCurrentIndex(max(0, index))

    def _sweep_chosen(self, index: int) -> None:
        data = self.sweeps.itemData(index)
        if data:
            self.open_sweep(Path(data))

    def _pick_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a sweep or run folder", str(paths.runs_dir()))
        if folder:
            self.open_folder(Path(folder))

    def open_folder(self, folder: Path) -> None:
        if (folder / SUMMARY_JSON).is_file():
            self.open_sweep(folder)
        elif is_run_dir(folder):
            self.set_runs([folder])
        else:
            self.title.setText(f"{folder} is neither a sweep folder (no {SUMMARY_JSON}) nor a run folder.")

    def open_sweep(self, folder: Path) -> None:
        self._load(lambda: load_sweep_folder(folder), f"Reading the sweep {folder.name}…")

    def set_runs(self, run_dirs: list[Path], title: str = "") -> None:
        run_dirs = list(run_dirs)
        self._load(lambda: load_runs(run_dirs, title), f"Reading {len(run_dirs)} runs…")

    def _load(self, fn: Any, text: str) -> None:
        self._token += 1
        token = self._token
        self.title.setText(text)
        run_in_background(lambda: (token, fn()), self._loaded, self._failed, pool=self._pool)

    def _loaded(self, result: tuple[int, Comparison]) -> None:
        token, comparison = result
        if token != self._token:
            return
        self.show_comparison(comparison)
        self.loaded.emit()

    def _failed(self, message: str, details: str) -> None:
        self.title.setText(f"Could not read it: {message}")

    # -- showing ---------------------------------------------------------------------------------------------
    def show_comparison(self, comparison: Comparison) -> None:
        self.comparison = comparison
        rows = comparison.rows
        where = f" in {comparison.source}" if comparison.source else ""
        done = sum(r.status == "completed" for r in rows)
        pruned = sum(r.status == "pruned" for r in rows)
        self.title.setText(f"<b>{comparison.title}</b>: {len(rows)} runs ({done} completed"
                           f"{f', {pruned} pruned' if pruned else ''}){where}. Click a "
                           "column to sort; select rows to highlight their curves.")
        ranked = sorted((comparison.importances or {}).items(), key=lambda kv: -kv[1])
        self.importances.setText("Parameter importances: " + ", ".join(f"<b>{k}</b> {v:.2f}" for k, v in ranked)
                                 if ranked else "")
        self.importances.setVisible(bool(ranked))
        table = self.table
        table.setSortingEnabled(False)
        table.clearContents()
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            kid = "–" if row.kid is None else (f"{row.kid:.4f}" + (f" ± {row.kid_std:.4f}" if row.kid_std is not None
                                                                  else ""))
            cells = [SortItem(str(row.index), row.index), QTableWidgetItem(row.label),
                     QTableWidgetItem(row.status), QTableWidgetItem(row.describe() or "–"),
                     SortItem(_fmt(row.best_val), row.best_val), SortItem(_fmt(row.final_val), row.final_val),
                     SortItem(_fmt(row.final_loss), row.final_loss), SortItem(_fmt(row.fid, 2), row.fid),
                     SortItem(kid, row.kid), SortItem(str(row.steps), row.steps),
                     SortItem("–" if row.seconds is None else format_duration(row.seconds), row.seconds)]
            for c, item in enumerate(cells):
                item.setData(Qt.ItemDataRole.UserRole, r)  # the row's position in comparison.rows
                item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                if c in (1, 2, 3):
                    item.setToolTip("\n".join(x for x in (str(row.path or ""), row.describe(), row.message) if x))
                if row.status == "pruned":  # stopped early by the search: greyed, the reason in the tooltip
                    item.setForeground(QColor(128, 128, 128))
                    if c == 2:
                        item.setText("✂ pruned")
                table.setItem(r, c, item)
        table.setSortingEnabled(True)
        table.sortByColumn(0, Qt.SortOrder.AscendingOrder)
        self._draw()

    def row_texts(self) -> list[list[str]]:
        """The table as shown (sorted), for tests and screenshots."""
        return [[self.table.item(r, c).text() for c in range(self.table.columnCount())]
                for r in range(self.table.rowCount())]

    def _selected_rows(self) -> set[int]:
        return {int(item.data(Qt.ItemDataRole.UserRole)) for item in self.table.selectedItems()}

    def _draw(self) -> None:
        self.plot.clear()
        if self.comparison is None:
            return
        selected = self._selected_rows()
        rows = self.comparison.rows
        for i, row in enumerate(rows):
            color = color_for(i, len(rows))
            width = 3 if i in selected else (1.5 if selected else 2)
            name = f"{row.index}: {row.describe()}" if row.overrides else row.label
            if len(name) > 48:
                name = name[:47] + "…"
            if len(row.train_loss):
                curve = live_curve(self.plot.getPlotItem(), color, width=width, name=name)
                curve.setData(row.train_steps, smooth_ema(row.train_loss))
            finite = np.isfinite(row.val_loss)
            if finite.any():
                val = live_curve(self.plot.getPlotItem(), color, symbol="o")
                val.setPen(pg.mkPen(color=color, width=max(1, width - 1), style=Qt.PenStyle.DashLine))
                val.setData(row.val_steps[finite], row.val_loss[finite])

    def _log_scale(self, on: bool) -> None:
        self.plot.getPlotItem().setLogMode(x=False, y=on)

    def shutdown(self) -> None:
        self._token += 1
        self._pool.waitForDone(5000)
