"""Export a run: pick the checkpoint (newest, best, or one of them), a format the run supports, the dtype, EMA
and where to write it; the core's ``export()`` runs on a pool thread while a busy bar turns.

Which formats a run supports is asked of the core's format table with the run's config.toml (its model family
and whether it trained a LoRA): the dialog shows every format, the ones that do not fit disabled with the
family's or the table's reason."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, QThreadPool, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.config import RunConfig
from sdstudio.core.errors import UserError
from sdstudio.core.export.api import export
from sdstudio.core.export.formats import (
    DTYPE_NAMES,
    EXPORT_FORMATS,
    FORMAT_NAMES,
    export_problem,
    get_format,
    torch_dtype,
)
from sdstudio.core.models.registry import get_family
from sdstudio.core.runs import RunFolder, load_run_config
from sdstudio.core.runs.checkpoints import checkpoint_step, is_checkpoint_dir

from ..background import run_in_background
from ..widgets.failure_dialog import show_error

NEWEST, BEST = "newest", "best"


@dataclass(frozen=True)
class FormatChoice:
    fmt: str
    reason: str = ""  # why it is not available for this run; empty = available

    @property
    def available(self) -> bool:
        return not self.reason


def format_choices(config: RunConfig) -> list[FormatChoice]:
    """Every export format with the reason it does not fit this run (empty when it does)."""
    family = get_family(config.model.family)
    return [FormatChoice(fmt, export_problem(fmt, family, config.lora.enabled)) for fmt in FORMAT_NAMES]


def run_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (with a manifest), oldest first."""
    return RunFolder(run_dir).checkpoints()


def best_checkpoint(run_dir: Path) -> Path | None:
    found = RunFolder(run_dir).best_checkpoint()
    return found if found is not None and is_checkpoint_dir(found) else None


def default_destination(run_dir: Path, name: str, tag: str, fmt: str) -> Path:
    """``RUN_DIR/exports/<name>-<tag>-<format>[.safetensors]`` (a folder for diffusers-folder)."""
    return RunFolder(run_dir).export_path(name, tag, fmt, get_format(fmt).suffix)


def destination_in_use(path: Path, fmt: str) -> bool:
    """Would the export overwrite something? (an existing file; a folder that is not empty)"""
    if get_format(fmt).folder:
        return path.exists() and (not path.is_dir() or any(path.iterdir()))
    return path.exists()


def run_export(source: Path, fmt: str, out: Path, *, dtype: str, use_ema: bool, force: bool, best: bool) -> Path:
    """The export itself (a pool thread): the core's one entry point."""
    return export(source, fmt, out, dtype=torch_dtype(dtype), use_ema=use_ema, force=force, best=best)


def _step_of(checkpoint: Path) -> str:
    step = checkpoint_step(checkpoint)
    return str(step) if step is not None else checkpoint.name


class ExportDialog(QDialog):
    """Window-modal, opened with ``open()`` so training events keep arriving behind it."""

    exported = Signal(Path)

    def __init__(self, run_dir: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.run_dir = run_dir
        self.setWindowTitle(f"Export {run_dir.name}")
        self.setObjectName("exportDialog")
        self.config = load_run_config(run_dir)  # UserError for a folder that is not a run: the caller shows it
        self.name = self.config.name or run_dir.name
        self.checkpoints = run_checkpoints(run_dir)
        self.best = best_checkpoint(run_dir)
        self.choices = {c.fmt: c for c in format_choices(self.config)}
        self.busy = False
        self.result_path: Path | None = None
        self.error_box: QMessageBox | None = None
        self._dest_edited = False
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)

        summary = QLabel(self._summary_text())
        summary.setWordWrap(True)
        summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.checkpoint = QComboBox()
        if self.checkpoints:
            self.checkpoint.addItem(f"Newest (step {_step_of(self.checkpoints[-1])})", NEWEST)
        if self.best is not None:
            self.checkpoint.addItem(f"Best by validation loss (step {_step_of(self.best)})", BEST)
        for path in reversed(self.checkpoints):
            self.checkpoint.addItem(f"Step {_step_of(path)}", str(path))
        self.checkpoint.setToolTip("Which checkpoint to export: the newest, the one marked best by validation "
                                   "loss (checkpoints/best.json), or a specific one")

        formats_box = QGroupBox("Format")
        formats_layout = QVBoxLayout(formats_box)
        self.format_group = QButtonGroup(self)
        self.format_buttons: dict[str, QRadioButton] = {}
        for fmt in FORMAT_NAMES:
            choice = self.choices[fmt]
            button = QRadioButton(EXPORT_FORMATS[fmt].label)
            button.setEnabled(choice.available)
            button.setToolTip(choice.reason or _format_tip(fmt, self.config))
            self.format_group.addButton(button)
            self.format_buttons[fmt] = button
            formats_layout.addWidget(button)
        unavailable = [c for c in self.choices.values() if not c.available]
        self.unavailable_note = QLabel("\n".join(f"{c.fmt}: {c.reason}" for c in unavailable))
        self.unavailable_note.setWordWrap(True)
        self.unavailable_note.setStyleSheet("color: #666;")
        self.unavailable_note.setVisible(bool(unavailable))
        formats_layout.addWidget(self.unavailable_note)
        first = next((fmt for fmt in FORMAT_NAMES if self.choices[fmt].available), None)
        if first is not None:
            self.format_buttons[first].setChecked(True)

        self.dtype = QComboBox()
        self.dtype.addItems(list(DTYPE_NAMES))
        self.dtype.setCurrentText(self.config.export.dtype if self.config.export.dtype in DTYPE_NAMES
                                  else DTYPE_NAMES[0])
        self.dtype.setToolTip("Tensor dtype of the exported weights: fp16 is what most tools expect; bf16 keeps "
                              "the range of fp32 at half the size; fp32 is exact")
        self.ema = QCheckBox("Export the EMA weights")
        trained_ema = self.config.train.ema
        self.ema.setEnabled(trained_ema)
        self.ema.setChecked(trained_ema)
        self.ema.setToolTip("The exponential moving average of the weights (what the run's samples show)"
                            if trained_ema else "This run trained without EMA (train.ema = false): there are no "
                            "EMA weights to export")

        self.destination = QLineEdit()
        self.destination.textEdited.connect(self._destination_edited)
        self.browse = QPushButton("Browse…")
        self.browse.clicked.connect(self._browse)
        dest_row = QHBoxLayout()
        dest_row.addWidget(self.destination, 1)
        dest_row.addWidget(self.browse)

        form = QFormLayout()
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Dtype", self.dtype)
        form.addRow("", self.ema)
        form.addRow("Destination", dest_row)

        self.busy_bar = QProgressBar()
        self.busy_bar.setRange(0, 0)  # busy indicator
        self.busy_bar.setTextVisible(False)
        self.busy_bar.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_folder_button = QPushButton("Open folder")
        self.open_folder_button.setVisible(False)
        self.open_folder_button.clicked.connect(self._open_folder)
        self.export_button = QPushButton("Export")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.start_export)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.reject)
        self.lora_tools_button = QPushButton("LoRA tools…")
        self.lora_tools_button.setToolTip("Merge, resize or extract LoRA files (sdstudio lora merge / resize / "
                                          "extract)")
        self.lora_tools_button.clicked.connect(self.open_lora_tools)
        self.lora_tools: QDialog | None = None
        buttons = QHBoxLayout()
        buttons.addWidget(self.lora_tools_button)
        buttons.addWidget(self.open_folder_button)
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.close_button)

        layout = QVBoxLayout(self)
        layout.addWidget(summary)
        layout.addWidget(formats_box)
        layout.addLayout(form)
        layout.addWidget(self.busy_bar)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.setMinimumWidth(860)
        # connected last: filling the widgets above must not react before every widget exists
        self.checkpoint.currentIndexChanged.connect(self._update_default_destination)
        for button in self.format_buttons.values():
            button.toggled.connect(self._format_toggled)
        self._update_default_destination()
        self._update_enabled()

    # -- what the run offers ---------------------------------------------------------------------------------
    def _summary_text(self) -> str:
        spec = get_family(self.config.model.family)
        family = spec.title
        kind = "" if not spec.fine_tunes_base_model else (" LoRA" if self.config.lora.enabled else " full fine-tune")
        if not self.checkpoints:
            count = "no checkpoint yet (nothing to export)"
        else:
            count = f"{len(self.checkpoints)} checkpoint{'s' if len(self.checkpoints) != 1 else ''}"
        return f"<b>{self.run_dir.name}</b>: {family}{kind}, {count}<br><small>{self.run_dir}</small>"

    def selected_format(self) -> str | None:
        return next((fmt for fmt, b in self.format_buttons.items() if b.isChecked() and self.choices[fmt].available),
                    None)

    def set_format(self, fmt: str) -> None:
        if self.choices[fmt].available:
            self.format_buttons[fmt].setChecked(True)

    def select_checkpoint(self, checkpoint: Path) -> bool:
        """Pre-select one checkpoint (the checkpoint grid's chosen column); False when the run has no such one."""
        index = self.checkpoint.findData(str(checkpoint))
        if index >= 0:
            self.checkpoint.setCurrentIndex(index)
        return index >= 0

    def checkpoint_source(self) -> tuple[Path, bool, str]:
        """(what export() gets, best flag, tag for the default file name)."""
        data = self.checkpoint.currentData()
        if data == BEST and self.best is not None:
            return self.run_dir, True, "best"
        if data == NEWEST or data is None:
            tag = f"step{self.checkpoints[-1].name.removeprefix('step-')}" if self.checkpoints else "newest"
            return self.run_dir, False, tag
        path = Path(data)
        return path, False, f"step{path.name.removeprefix('step-')}"

    def destination_path(self) -> Path:
        return Path(self.destination.text().strip()).expanduser()

    # -- reactions -------------------------------------------------------------------------------------------
    def _format_toggled(self, on: bool) -> None:
        if on:
            self._update_default_destination()

    def _destination_edited(self, _text: str) -> None:
        self._dest_edited = True
        self._update_enabled()

    def _update_default_destination(self) -> None:
        fmt = self.selected_format()
        if fmt is None or self._dest_edited:
            self._update_enabled()
            return
        _source, _best, tag = self.checkpoint_source()
        self.destination.setText(str(default_destination(self.run_dir, self.name, tag, fmt)))
        self._update_enabled()

    def _update_enabled(self) -> None:
        fmt = self.selected_format()
        problem = ""
        if not self.checkpoints:
            problem = "This run has no checkpoint yet: train it (or Save now) first."
        elif fmt is None:
            problem = "No export format fits this run."
        elif not self.destination.text().strip():
            problem = "Choose a destination."
        elif not get_format(fmt).folder and self.destination_path().suffix.lower() != get_format(fmt).suffix:
            suffix = get_format(fmt).suffix
            problem = f"A {fmt} export is a {suffix} file: name the destination *{suffix}."
        for widget in (self.checkpoint, self.dtype, self.destination, self.browse,
                       *[b for f, b in self.format_buttons.items() if self.choices[f].available]):
            widget.setEnabled(not self.busy)
        self.ema.setEnabled(not self.busy and self.config.train.ema)
        self.export_button.setEnabled(not self.busy and not problem)
        self.export_button.setToolTip(problem or "Write the export")
        self.close_button.setEnabled(not self.busy)
        if not self.busy and problem and self.result_path is None:
            self.status.setText(problem)

    def _browse(self) -> None:
        fmt = self.selected_format()
        start = str(self.destination_path())
        if fmt is not None and get_format(fmt).folder:
            chosen = QFileDialog.getExistingDirectory(self, "Export into folder", str(Path(start).parent))
        else:
            chosen, _ = QFileDialog.getSaveFileName(self, "Export to file", start, "safetensors (*.safetensors)")
        if chosen:
            self.destination.setText(chosen)
            self._dest_edited = True
            self._update_enabled()

    def confirm_overwrite(self, path: Path) -> bool:
        """Ask before replacing an existing export (tests replace this method)."""
        answer = QMessageBox.question(
            self, "Overwrite the export?", f"{path} exists already. Overwrite it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    # -- the export ------------------------------------------------------------------------------------------
    def start_export(self) -> bool:
        """Start the export on a pool thread; False when nothing was started."""
        fmt = self.selected_format()
        if self.busy or fmt is None or not self.export_button.isEnabled():
            return False
        out = self.destination_path()
        force = False
        if destination_in_use(out, fmt):
            if not self.confirm_overwrite(out):
                self.status.setText("Not exported: the destination exists.")
                return False
            force = True
        source, best, _tag = self.checkpoint_source()
        dtype, use_ema = self.dtype.currentText(), self.ema.isChecked() and self.ema.isEnabled()
        self.busy = True
        self.result_path = None
        self.open_folder_button.setVisible(False)
        self.busy_bar.setVisible(True)
        self.status.setText(f"Exporting {fmt} ({dtype}{', EMA' if use_ema else ''}) to {out}…")
        self._update_enabled()
        run_in_background(lambda: run_export(source, fmt, out, dtype=dtype, use_ema=use_ema, force=force,
                                             best=best), self._done, self._failed, pool=self._pool)
        return True

    def _done(self, path: Path) -> None:
        self.busy = False
        self.busy_bar.setVisible(False)
        self.result_path = Path(path)
        self.status.setText(f"Exported to <b>{path}</b>")
        self.open_folder_button.setVisible(True)
        self._update_enabled()
        self.exported.emit(self.result_path)

    def _failed(self, message: str, details: str) -> None:
        self.busy = False
        self.busy_bar.setVisible(False)
        self.status.setText("Export failed.")
        self._update_enabled()
        hint = ("Fix what the message names (another destination, another format or checkpoint), then export "
                "again." if not details else "The details below say more; the run itself is not affected.")
        self.error_box = show_error(self, "Export failed", message, details=details, hint=hint)

    def _open_folder(self) -> None:
        if self.result_path is None:
            return
        folder = self.result_path if self.result_path.is_dir() else self.result_path.parent
        if not QDesktopServices.openUrl(QUrl.fromLocalFile(os.fspath(folder))):
            show_error(self, "Folder not opened", f"Could not open {folder} with the file manager.")

    def open_lora_tools(self) -> QDialog:
        """The LoRA tools dialog, its merge list holding this run's newest kohya export when there is one."""
        from .lora_tools_dialog import LoraToolsDialog

        dialog = LoraToolsDialog(self, folder=self.run_dir / "exports")
        exports = sorted((self.run_dir / "exports").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        if exports:
            dialog.add_merge_input(exports[-1])
        self.lora_tools = dialog
        dialog.open()
        return dialog

    def reject(self) -> None:
        if self.busy:  # the pool thread still writes; closing now would lose its result
            self.status.setText("The export is still running; the dialog closes when it is done.")
            return
        super().reject()

    def wait_idle(self, msecs: int = 60_000) -> bool:
        return self._pool.waitForDone(msecs)


def _format_tip(fmt: str, config: RunConfig) -> str:
    found = get_format(fmt)
    if found.merges_lora and config.lora.enabled and get_family(config.model.family).supports_lora:
        return f"{found.label}; the LoRA is merged into the base model"
    return found.label


def open_export_dialog(run_dir: Path, parent: QWidget | None) -> ExportDialog | None:
    """Build and open (window-modal, not blocking) the dialog; an unreadable run shows an error instead."""
    try:
        dialog = ExportDialog(run_dir, parent)
    except UserError as exc:
        show_error(parent, "Cannot export", str(exc), hint="Choose a run folder made by sdstudio.")
        return None
    dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    dialog.open()
    return dialog
