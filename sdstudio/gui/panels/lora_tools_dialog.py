"""LoRA tools, the app's face of `sdstudio lora merge | resize | extract`: one tab each, the core's tool runs
on a pool thread, and its summary (modules, rank, the error kept) shows under the tabs. Opened from the export
dialog ("LoRA tools…") or on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QThreadPool
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.errors import UserError
from sdstudio.core.export.formats import DTYPE_NAMES, torch_dtype
from sdstudio.core.lora_tools.ops import ToolReport, extract_lora, merge_loras, resize_lora

from ..background import run_in_background
from ..widgets.failure_dialog import show_error

RESIZE_MODES = {"rank": "Rank", "sv_ratio": "Singular-value ratio (keep above max / X)",
                "sv_fro": "Frobenius fraction kept (0-1]"}


def _path_row(edit: QLineEdit, parent: QWidget, *, save: bool = False, folder_ok: bool = False) -> QHBoxLayout:
    button = QPushButton("Browse…")

    def browse() -> None:
        if save:
            chosen, _ = QFileDialog.getSaveFileName(parent, "Output", edit.text(), "safetensors (*.safetensors)")
        elif folder_ok and not edit.text().endswith(".safetensors"):
            chosen = QFileDialog.getExistingDirectory(parent, "Model folder", edit.text())
        else:
            chosen, _ = QFileDialog.getOpenFileName(parent, "File", edit.text(), "safetensors (*.safetensors)")
        if chosen:
            edit.setText(chosen)

    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    row.addWidget(button)
    return row


class LoraToolsDialog(QDialog):
    """Merge / Resize / Extract; ``start()`` runs the current tab's tool (tests call it and ``wait_idle``)."""

    def __init__(self, parent: QWidget | None = None, *, folder: Path | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("LoRA tools")
        self.setObjectName("loraToolsDialog")
        self.folder = folder or Path.home()
        self.busy = False
        self.report: ToolReport | None = None
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self.tabs = QTabWidget()
        self.tabs.addTab(self._merge_tab(), "Merge")
        self.tabs.addTab(self._resize_tab(), "Resize")
        self.tabs.addTab(self._extract_tab(), "Extract")
        self.dtype = QComboBox()
        self.dtype.addItems(list(DTYPE_NAMES))
        self.overwrite = QComboBox()
        self.overwrite.addItems(["Keep an existing output (fail)", "Overwrite an existing output"])
        common = QFormLayout()
        common.addRow("Dtype", self.dtype)
        common.addRow("Existing output", self.overwrite)
        self.busy_bar = QProgressBar()
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setVisible(False)
        self.status = QLabel("Every output's header names the files it was made from.")
        self.status.setWordWrap(True)
        self.run_button = QPushButton("Run")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        close = QPushButton("Close")
        close.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.run_button)
        buttons.addWidget(close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.tabs)
        layout.addLayout(common)
        layout.addWidget(self.busy_bar)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.setMinimumWidth(760)

    # -- tabs ------------------------------------------------------------------------------------------------
    def _merge_tab(self) -> QWidget:
        page = QWidget()
        self.merge_table = QTableWidget(0, 2)
        self.merge_table.setHorizontalHeaderLabels(["LoRA / LyCORIS file", "Weight"])
        self.merge_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        add, remove = QPushButton("Add files…"), QPushButton("Remove")
        add.clicked.connect(self._add_files)
        remove.clicked.connect(lambda: self.merge_table.removeRow(self.merge_table.currentRow()))
        row = QHBoxLayout()
        row.addWidget(add)
        row.addWidget(remove)
        row.addStretch(1)
        self.merge_rank = QSpinBox()
        self.merge_rank.setRange(0, 1024)
        self.merge_rank.setSpecialValueText("concatenate the ranks (exact)")
        self.merge_rank.setToolTip("0: the ranks are concatenated (exact); N: the weighted sum is reduced to rank N "
                                   "by SVD (LyCORIS files need this, or a base model)")
        self.merge_into = QLineEdit()
        self.merge_into.setPlaceholderText("optional: a base model file or folder to merge into")
        self.merge_out = QLineEdit()
        form = QFormLayout()
        form.addRow("Rank", self.merge_rank)
        form.addRow("Into base model", _path_row(self.merge_into, self, folder_ok=True))
        form.addRow("Output", _path_row(self.merge_out, self, save=True))
        layout = QVBoxLayout(page)
        layout.addWidget(self.merge_table)
        layout.addLayout(row)
        layout.addLayout(form)
        return page

    def add_merge_input(self, path: Path, weight: float = 1.0) -> None:
        row = self.merge_table.rowCount()
        self.merge_table.insertRow(row)
        self.merge_table.setItem(row, 0, QTableWidgetItem(str(path)))
        spin = QDoubleSpinBox()
        spin.setRange(-10.0, 10.0)
        spin.setSingleStep(0.1)
        spin.setValue(weight)
        self.merge_table.setCellWidget(row, 1, spin)

    def merge_inputs(self) -> list[tuple[Path, float]]:
        out = []
        for row in range(self.merge_table.rowCount()):
            item = self.merge_table.item(row, 0)
            spin = self.merge_table.cellWidget(row, 1)
            if item is not None and item.text().strip():
                out.append((Path(item.text().strip()).expanduser(), float(spin.value())))  # type: ignore[union-attr]
        return out

    def _add_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "LoRA files", str(self.folder), "safetensors (*.safetensors)")
        for f in files:
            self.add_merge_input(Path(f))

    def _resize_tab(self) -> QWidget:
        page = QWidget()
        self.resize_in, self.resize_out = QLineEdit(), QLineEdit()
        self.resize_mode = QComboBox()
        for key, label in RESIZE_MODES.items():
            self.resize_mode.addItem(label, key)
        self.resize_value = QDoubleSpinBox()
        self.resize_value.setDecimals(4)
        self.resize_value.setRange(0.0001, 1024)
        self.resize_value.setValue(8)
        form = QFormLayout(page)
        form.addRow("LoRA file", _path_row(self.resize_in, self))
        form.addRow("Rule", self.resize_mode)
        form.addRow("Value", self.resize_value)
        form.addRow("Output", _path_row(self.resize_out, self, save=True))
        return page

    def _extract_tab(self) -> QWidget:
        page = QWidget()
        self.extract_base, self.extract_tuned, self.extract_out = QLineEdit(), QLineEdit(), QLineEdit()
        self.extract_rank = QSpinBox()
        self.extract_rank.setRange(1, 1024)
        self.extract_rank.setValue(32)
        form = QFormLayout(page)
        form.addRow("Base model", _path_row(self.extract_base, self, folder_ok=True))
        form.addRow("Fine-tuned model", _path_row(self.extract_tuned, self, folder_ok=True))
        form.addRow("Rank", self.extract_rank)
        form.addRow("Output", _path_row(self.extract_out, self, save=True))
        return page

    # -- running ---------------------------------------------------------------------------------------------
    def job(self) -> Any:
        """The current tab's tool as a call (a UserError says what is missing)."""
        dtype, force = torch_dtype(self.dtype.currentText()), self.overwrite.currentIndex() == 1
        tab = self.tabs.currentIndex()
        if tab == 0:
            inputs, out = self.merge_inputs(), self.merge_out.text().strip()
            if not inputs or not out:
                raise UserError("Merge: add at least one LoRA file and choose an output")
            into = Path(self.merge_into.text().strip()).expanduser() if self.merge_into.text().strip() else None
            rank = self.merge_rank.value() or None
            return lambda: merge_loras(inputs, Path(out).expanduser(), rank=rank, into=into, dtype=dtype, force=force)
        if tab == 1:
            src, out = self.resize_in.text().strip(), self.resize_out.text().strip()
            if not src or not out:
                raise UserError("Resize: choose the LoRA file and an output")
            mode, value = self.resize_mode.currentData(), self.resize_value.value()
            how = {"rank": int(value)} if mode == "rank" else {mode: float(value)}
            return lambda: resize_lora(Path(src).expanduser(), Path(out).expanduser(), dtype=dtype, force=force,
                                       **how)
        base, tuned, out = (e.text().strip() for e in (self.extract_base, self.extract_tuned, self.extract_out))
        if not base or not tuned or not out:
            raise UserError("Extract: choose the base model, the fine-tuned model and an output")
        rank = self.extract_rank.value()
        return lambda: extract_lora(Path(base).expanduser(), Path(tuned).expanduser(), Path(out).expanduser(),
                                    rank=rank, dtype=dtype, force=force)

    def start(self) -> bool:
        if self.busy:
            return False
        try:
            fn = self.job()
        except UserError as exc:
            self.status.setText(str(exc))
            return False
        self.busy, self.report = True, None
        self.busy_bar.setVisible(True)
        self.run_button.setEnabled(False)
        self.status.setText(f"{self.tabs.tabText(self.tabs.currentIndex())}…")
        run_in_background(fn, self._done, self._failed, pool=self._pool)
        return True

    def _done(self, report: ToolReport) -> None:
        self.busy, self.report = False, report
        self.busy_bar.setVisible(False)
        self.run_button.setEnabled(True)
        self.status.setText("\n".join([report.summary(), *report.notes]))

    def _failed(self, message: str, details: str) -> None:
        self.busy = False
        self.busy_bar.setVisible(False)
        self.run_button.setEnabled(True)
        self.status.setText(f"Failed: {message}")
        if details:
            show_error(self, "LoRA tool failed", message, details=details)

    def wait_idle(self, msecs: int = 120_000) -> bool:
        return self._pool.waitForDone(msecs)

    def reject(self) -> None:
        if self.busy:
            self.status.setText("Still running; the dialog closes when it is done.")
            return
        super().reject()
