"""Fit my GPU in the app: the core's fit probe on a worker thread with a stand-in budget (no GPU here), its table
as the trials finish, the winner applied to the settings form and undone again."""

from __future__ import annotations

import os
from pathlib import Path

from PySide6.QtCore import QThread
from PySide6.QtWidgets import QApplication

from sdstudio.gui.panels import fit_dialog
from tests.gui.gui_helpers import use_tiny_settings

# the tiny model's estimated peak: ~43 MiB as configured, ~14 MiB with gradient checkpointing; 0.02 GiB less the
# 10 % margin (18.4 MiB) lets the second candidate through and not the first
BUDGET_GB = 0.02


def _shot(widget, name: str) -> None:
    folder = os.environ.get("SDSTUDIO_SCREENSHOTS")
    if folder:
        widget.grab().save(str(Path(folder) / name))


def test_fit_button_runs_the_probe_off_the_gui_thread_applies_and_undoes(window, qtbot, tiny_dataset: Path,
                                                                          monkeypatch) -> None:
    win = window
    use_tiny_settings(win, tiny_dataset)
    assert not win.form.value("train.gradient_checkpointing")
    threads: list[bool] = []
    real_fit = fit_dialog.fit

    def recording_fit(*args, **kwargs):
        threads.append(QThread.currentThread() is not QApplication.instance().thread())
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(fit_dialog, "fit", recording_fit)
    assert win.fit_bar.fit_button.isEnabled()
    dialog = win.fit_bar.open_dialog()
    assert dialog is not None and dialog.isVisible()
    assert not dialog.use_free.isEnabled() and dialog.where.isVisible()  # no GPU: the budget stands in
    dialog.budget.setValue(BUDGET_GB)
    dialog.steps.setValue(1)
    dialog.start_button.click()
    assert dialog.is_running() and not dialog.start_button.isEnabled() and dialog.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not dialog.is_running(), timeout=240_000)
    assert threads == [True], "the probe ran on the worker thread"
    rows = [[dialog.table.item(r, c).text() for c in range(dialog.table.columnCount())]
            for r in range(dialog.table.rowCount())]
    assert [r[0] for r in rows] == ["as configured", "+ gradient checkpointing"]
    assert [r[3] for r in rows] == ["no", "yes"]
    assert all(r[1].endswith("MiB") and r[2].endswith(" s") for r in rows)
    assert dialog.result is not None and dialog.result.winner is dialog.trials[1]
    assert dialog.selected_trial() is dialog.trials[1] and dialog.apply_button.isEnabled()
    assert "gradient checkpointing" in dialog.status.text()
    _shot(dialog, "fit-dialog.png")
    dialog.table.selectRow(0)  # a row that does not fit cannot be applied
    assert not dialog.apply_button.isEnabled()
    dialog.table.selectRow(1)
    dialog.apply_button.click()
    assert not dialog.isVisible()
    assert win.form.value("train.gradient_checkpointing") is True
    assert win.form.config() is not None and win.form.config().train.gradient_checkpointing
    assert win.fit_bar.undo_button.isVisible() and "gradient checkpointing" in win.fit_bar.note.text()
    _shot(win, "fit-applied.png")
    win.fit_bar.undo_button.click()
    assert win.form.value("train.gradient_checkpointing") is False
    assert not win.fit_bar.undo_button.isVisible()


def test_stop_ends_the_search_after_the_trial_in_progress(window, qtbot, tiny_dataset: Path) -> None:
    win = window
    use_tiny_settings(win, tiny_dataset)
    dialog = win.fit_bar.open_dialog()
    assert dialog is not None
    dialog.budget.setValue(0.001)  # nothing fits: without Stop every candidate would be tried
    dialog.steps.setValue(1)
    dialog.start_button.click()
    dialog.stop_button.click()
    qtbot.waitUntil(lambda: not dialog.is_running(), timeout=120_000)
    assert dialog.table.rowCount() <= 1
    assert dialog.result is not None and dialog.result.winner is None
    assert "Stopped" in dialog.status.text() and not dialog.apply_button.isEnabled()
    dialog.reject()
    assert not dialog.isVisible()
