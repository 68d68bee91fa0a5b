"""Per-image loss in the dataset view: the images of a run's ``image_loss.json``, sortable by score (1.0 = as
hard as a typical image at the same timestep), outliers flagged; double-click an image to open its caption."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.errors import UserError
from sdstudio.core.runs import RunFolder, list_runs

PATH_ROLE = Qt.ItemDataRole.UserRole + 7


class _Number(QTableWidgetItem):
    """Sorts by value, not by text."""

    def __init__(self, value: float, text: str) -> None:
        super().__init__(text)
        self.value = value
        self.setData(Qt.ItemDataRole.UserRole, value)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        return self.value < getattr(other, "value", 0.0)


def runs_of_dataset(folder: Path) -> list[Path]:
    """Runs (newest first) that trained on ``folder`` and wrote an image_loss.json."""
    target = os.path.normcase(os.path.abspath(folder))
    found = []
    for run in list_runs():
        folder_ = RunFolder(run)
        if not folder_.image_loss_file.is_file():
            continue
        try:
            data_path = folder_.load_config().data.path
        except UserError:
            continue
        if data_path and os.path.normcase(os.path.abspath(Path(data_path).expanduser())) == target:
            found.append(run)
    return found


class ImageLossPanel(QWidget):
    image_selected = Signal(Path)  # absolute path of an image: the dataset view selects it (caption editor)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.folder: Path | None = None
        self.runs = QComboBox()
        self.runs.setToolTip("The run whose per-image loss is shown")
        self.runs.currentIndexChanged.connect(lambda _i: self.show_run(self.runs.currentData()))
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(lambda: self.set_dataset(self.folder))
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["image", "loss", "seen"])
        self.table.horizontalHeaderItem(1).setToolTip("Mean loss relative to images at the same timestep (1.0 = "
                                                      "typical); ⚠ = an outlier: check its caption, crop or file")
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSortingEnabled(True)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellDoubleClicked.connect(self._open)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.runs, 1)
        row.addWidget(refresh)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.note)

    def set_dataset(self, folder: Path | None) -> None:
        self.folder = folder
        self.runs.blockSignals(True)
        self.runs.clear()
        for run in runs_of_dataset(folder) if folder is not None else []:
            self.runs.addItem(run.name, str(run))
        self.runs.blockSignals(False)
        self.show_run(self.runs.currentData())

    def show_run(self, run: str | None) -> None:
        self.table.setSortingEnabled(False)
        self.table.setRowCount(0)
        if run is None:
            self.note.setText("No run of this dataset has per-image losses yet (a run writes them with each "
                              "checkpoint).")
            return
        data = RunFolder(Path(run)).read_image_loss() or {"images": {}, "outliers": []}
        outliers = set(data.get("outliers") or [])
        root = Path(self.folder) if self.folder is not None else Path(".")
        for name, entry in data["images"].items():
            r = self.table.rowCount()
            self.table.insertRow(r)
            label = QTableWidgetItem(("⚠ " if name in outliers else "") + name)
            label.setData(PATH_ROLE, str(root / name))
            if name in outliers:
                label.setToolTip("An outlier: the model keeps failing on this image. Often a wrong caption, a bad "
                                 "crop or a file that does not belong. Double-click to open its caption.")
            self.table.setItem(r, 0, label)
            loss = float(entry.get("loss", 0.0))
            self.table.setItem(r, 1, _Number(loss, f"{loss:.3f}"))
            n = int(entry.get("n", 0))
            self.table.setItem(r, 2, _Number(n, str(n)))
        self.table.setSortingEnabled(True)
        self.table.sortItems(1, Qt.SortOrder.DescendingOrder)
        self.note.setText(f"{len(data['images'])} images, {len(outliers)} outliers (step {data.get('step', '?')}); "
                          "double-click an image to edit its caption")

    def rows(self) -> list[tuple[str, float]]:
        """(name as shown, loss) in the table's current order."""
        return [(self.table.item(r, 0).text(), float(self.table.item(r, 1).value))  # type: ignore[attr-defined]
                for r in range(self.table.rowCount())]

    def _open(self, row: int, _column: int) -> None:
        item = self.table.item(row, 0)
        if item is not None:
            self.image_selected.emit(Path(item.data(PATH_ROLE)))
