"""Fit my GPU: the same short trial as `sdstudio fit` (core/train/fit.py), run on a worker QThread, its table of
candidate settings (fits / peak / step time) shown as the trials finish, and the chosen setting applied to the
settings form, with an "Undo fit" that puts the previous values back. The GUI only displays and steers: the
search, the peaks and the verdicts are the core's."""

from __future__ import annotations

import threading
import traceback
from typing import Any

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.config import RunConfig
from sdstudio.core.errors import UserError
from sdstudio.core.train.fit import SAFETY_MARGIN, TRIAL_STEPS, FitResult, Trial, fit, free_device_memory_gb

from ..widgets.failure_dialog import show_error
from .settings_form import SettingsForm

COLUMNS = ("setting", "peak", "step time", "fits", "note")
DEFAULT_BUDGET_GB = 8.0


def peak_text(peak_bytes: float | None) -> str:
    if peak_bytes is None:
        return "–"
    gib = peak_bytes / 2**30
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{peak_bytes / 2**20:.1f} MiB"


class FitWorker(QObject):
    """Runs ``fit`` when ``run`` is invoked on its thread; one signal per finished trial."""

    trial = Signal(object)  # Trial
    finished = Signal(object)  # FitResult
    failed = Signal(str, str)  # message for people, details

    def __init__(self, config: RunConfig, budget_gb: float | None, steps: int) -> None:
        super().__init__()
        self.config, self.budget_gb, self.steps = config, budget_gb, steps
        self.stop_flag = threading.Event()

    @Slot()
    def run(self) -> None:
        try:
            result = fit(self.config, budget_gb=self.budget_gb, steps=self.steps, on_trial=self.trial.emit,
                         should_stop=self.stop_flag.is_set)
        except UserError as exc:
            self.failed.emit(str(exc), "")
        except Exception as exc:  # noqa: BLE001 - shown to the user on the GUI thread
            self.failed.emit(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        else:
            self.finished.emit(result)


class FitDialog(QDialog):
    """Budget, trial length, Start / Stop, the table; ``applied`` carries the chosen trial."""

    applied = Signal(object)  # Trial

    def __init__(self, config: RunConfig, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Fit my GPU")
        self.setObjectName("fitDialog")
        self.config = config
        self.result: FitResult | None = None
        self.trials: list[Trial] = []
        self.thread: QThread | None = None
        self.worker: FitWorker | None = None
        self._close_when_done = False
        free = free_device_memory_gb(config)
        self.free_gb = free

        intro = QLabel("Runs a few training steps of each candidate setting at this run's resolution, from the "
                       "fastest to the most frugal, and stops at the first whose peak memory fits the budget "
                       f"with a {SAFETY_MARGIN:.0%} margin.")
        intro.setWordWrap(True)
        self.use_free = QCheckBox("the GPU's free memory")
        self.budget = QDoubleSpinBox()
        self.budget.setRange(0.001, 1024.0)
        self.budget.setDecimals(3)
        self.budget.setSuffix(" GB")
        self.budget.setToolTip("The memory the run must fit in (GiB); on a machine without a GPU it stands in for "
                               "the free memory, and the peak of each trial is sdstudio's memory estimate")
        if free is not None:
            self.use_free.setChecked(True)
            self.use_free.setText(f"the GPU's free memory ({free:.1f} GB)")
            self.budget.setValue(round(free, 1))
            self.budget.setEnabled(False)
            self.use_free.toggled.connect(lambda on: self.budget.setEnabled(not on))
            where = ""
        else:
            self.use_free.setChecked(False)
            self.use_free.setEnabled(False)
            self.budget.setValue(DEFAULT_BUDGET_GB)
            where = ("No GPU here: the budget stands in for the free memory and each peak is the memory estimate "
                     "of the trial's model (the step time is measured on this CPU).")
        self.steps = QSpinBox()
        self.steps.setRange(1, 20)
        self.steps.setValue(TRIAL_STEPS)
        self.steps.setToolTip("Training steps per trial (the first is warm-up)")
        budget_row = QHBoxLayout()
        budget_row.addWidget(self.budget)
        budget_row.addWidget(self.use_free)
        form = QFormLayout()
        form.addRow("Budget", budget_row)
        form.addRow("Steps per trial", self.steps)
        self.where = QLabel(where)
        self.where.setWordWrap(True)
        self.where.setVisible(bool(where))

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c.capitalize() for c in COLUMNS])
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.start_button = QPushButton("Start")
        self.stop_button = QPushButton("Stop")
        self.apply_button = QPushButton("Apply to the settings")
        self.apply_button.setToolTip("Set the selected row's levers in the settings form (Undo fit puts the "
                                     "previous values back)")
        self.close_button = QPushButton("Close")
        self.start_button.clicked.connect(self.start)
        self.stop_button.clicked.connect(self.stop)
        self.apply_button.clicked.connect(self.apply_selected)
        self.close_button.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.stop_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        for b in (self.apply_button, self.close_button):
            buttons.addWidget(b)

        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.where)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.resize(760, 420)
        self._update_buttons()

    # -- running ---------------------------------------------------------------------------------------------
    def is_running(self) -> bool:
        return self.thread is not None

    def budget_gb(self) -> float | None:
        return None if self.use_free.isChecked() else float(self.budget.value())

    def start(self) -> None:
        if self.is_running():
            return
        self.table.setRowCount(0)
        self.trials, self.result = [], None
        self.status.setText("Trying…")
        thread = QThread(self)
        thread.setObjectName("sdstudio-fit")
        worker = FitWorker(self.config, self.budget_gb(), int(self.steps.value()))
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.trial.connect(self._trial_done)  # queued: the worker lives on the other thread
        worker.finished.connect(self._fit_done)
        worker.failed.connect(self._fit_failed)
        for signal in (worker.finished, worker.failed):
            signal.connect(thread.quit, Qt.ConnectionType.DirectConnection)
        thread.finished.connect(self._joined)
        self.thread, self.worker = thread, worker
        thread.start()
        self._update_buttons()

    def stop(self) -> None:
        """Ends the search after the trial in progress."""
        if self.worker is not None:
            self.worker.stop_flag.set()
            self.status.setText("Stopping after the trial in progress…")

    @Slot(object)
    def _trial_done(self, trial: Trial) -> None:
        self.trials.append(trial)
        row = self.table.rowCount()
        self.table.insertRow(row)
        step = "–" if trial.step_s is None else f"{trial.step_s:.3f} s"
        for col, text in enumerate((trial.name, peak_text(trial.peak_bytes), step, "yes" if trial.fits else "no",
                                    trial.note)):
            item = QTableWidgetItem(text)
            if col in (1, 2):
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            item.setToolTip(", ".join(f"{k} = {v}" for k, v in trial.overrides.items()) or "the settings as they are")
            self.table.setItem(row, col, item)
        self.status.setText(f"{trial.name}: " + ("fits" if trial.fits else "does not fit"))

    @Slot(object)
    def _fit_done(self, result: FitResult) -> None:
        self.result = result
        if result.winner is not None:
            index = self.trials.index(result.winner) if result.winner in self.trials else len(self.trials) - 1
            self.table.selectRow(index)
            self.status.setText(f"Fastest setting that fits: {result.winner.name} "
                                f"(budget {result.budget_bytes / 2**30:.2f} GB, {SAFETY_MARGIN:.0%} kept free).")
        elif self.worker is not None and self.worker.stop_flag.is_set():
            self.status.setText("Stopped. Pick a row that fits, or start again.")
        else:
            self.status.setText("Nothing tried fits: lower data.resolution or lora.rank, or use a larger GPU.")

    @Slot(str, str)
    def _fit_failed(self, message: str, details: str) -> None:
        self.status.setText("The trial failed.")
        show_error(self, "Fit my GPU", message, details=details)

    @Slot()
    def _joined(self) -> None:
        thread, worker = self.thread, self.worker
        self.thread = self.worker = None
        if thread is not None:
            thread.wait()
            thread.deleteLater()
        if worker is not None:
            worker.deleteLater()
        self._update_buttons()
        if self._close_when_done:
            super().reject()

    # -- choosing ----------------------------------------------------------------------------------------
    def selected_trial(self) -> Trial | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        trial = self.trials[rows[0].row()]
        return trial if trial.fits else None

    def apply_selected(self) -> None:
        trial = self.selected_trial()
        if trial is None:
            return
        self.applied.emit(trial)
        self.accept()

    def _update_buttons(self) -> None:
        running = self.is_running()
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running)
        self.apply_button.setEnabled(not running and self.selected_trial() is not None)
        self.steps.setEnabled(not running)
        self.budget.setEnabled(not running and not self.use_free.isChecked())
        self.use_free.setEnabled(not running and self.free_gb is not None)

    def reject(self) -> None:
        if self.is_running():  # closed while trying: stop after the trial in progress, then close
            self._close_when_done = True
            self.stop()
            return
        super().reject()


class FitBar(QWidget):
    """The "Fit my GPU…" button under the presets and, after a fit was applied, "Undo fit"."""

    def __init__(self, form: SettingsForm, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.form = form
        self.dialog: FitDialog | None = None
        self.before: dict[str, Any] = {}  # the values the applied fit replaced
        self.fit_button = QPushButton("Fit my GPU…")
        self.fit_button.setToolTip("Try the memory levers in a short trial and apply the fastest setting that "
                                   "fits (as `sdstudio fit` does)")
        self.undo_button = QPushButton("Undo fit")
        self.undo_button.setToolTip("Put back the settings the applied fit changed")
        self.undo_button.setVisible(False)
        self.note = QLabel("")
        self.note.setObjectName("fitNote")
        self.fit_button.clicked.connect(self.open_dialog)
        self.undo_button.clicked.connect(self.undo)
        form.changed.connect(self._update)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(6, 2, 6, 2)
        layout.addWidget(self.fit_button)
        layout.addWidget(self.undo_button)
        layout.addWidget(self.note, 1)
        self._update()

    def _update(self) -> None:
        ready = self.form.config() is not None and not self.form.problems()
        self.fit_button.setEnabled(ready)
        self.fit_button.setToolTip(self.fit_button.toolTip() if ready else
                                   "Complete the settings first: " + "; ".join(self.form.problems()[:2]))

    def open_dialog(self) -> FitDialog | None:
        config = self.form.config()
        if config is None or self.form.problems():
            return None
        self.dialog = FitDialog(config, self)
        self.dialog.applied.connect(self.apply)
        self.dialog.open()  # window-modal: no training starts while the trial runs
        return self.dialog

    def apply(self, trial: Trial) -> None:
        self.before = {key: self.form.value(key) for key in trial.overrides}
        for key, value in trial.overrides.items():
            self.form.set_value(key, value)
        self.undo_button.setVisible(bool(self.before))
        self.note.setText(f"fit applied: {trial.name}" if trial.overrides else "fits as configured")
        self.note.setToolTip(", ".join(f"{k} = {v}" for k, v in trial.overrides.items()))

    def undo(self) -> None:
        for key, value in self.before.items():
            self.form.set_value(key, value)
        self.before = {}
        self.undo_button.setVisible(False)
        self.note.setText("fit undone")
