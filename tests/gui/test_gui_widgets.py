"""Smaller pieces: plot buffers and redraws, samples view, schedule preview, icon, app start, Qt guard."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PySide6.QtCore import QTimer
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QApplication

from sdstudio.core import events as ev
from sdstudio.core.config import DiffusionConfig


def test_series_grow_by_doubling_and_truncate() -> None:
    from sdstudio.gui.widgets.series import Series, SmoothedSeries

    series = Series(capacity=4)
    capacities = set()
    for i in range(1000):
        series.append(i, i * 2.0)
        capacities.add(series.capacity)
    assert capacities == {4, 8, 16, 32, 64, 128, 256, 512, 1024}
    assert len(series) == 1000 and series.y[-1] == 1998.0
    series.truncate_after(499)
    assert len(series) == 500 and series.x[-1] == 499
    smooth = SmoothedSeries(0.9)
    for i in range(50):
        smooth.add(i, 1.0)
    assert np.allclose(smooth.y, 1.0), "debiased: a constant stays constant from the first point"


def test_plots_stay_fast_with_100000_points(qtbot) -> None:
    from sdstudio.gui.panels.plots import PlotsPanel

    panel = PlotsPanel()
    qtbot.addWidget(panel)
    panel.resize(1000, 700)
    panel.show()
    t0 = time.perf_counter()
    for step in range(1, 100_001):
        panel.add_event(ev.StepMetrics(step, step // 1000, 1.0 / step + 0.05, 1e-3, 1.0, 200.0, 100_000, 0.0))
    appended = time.perf_counter() - t0
    for step in range(1000, 100_001, 1000):
        panel.add_event(ev.ValidationResult(step, step // 1000, 0.06))
    t0 = time.perf_counter()
    panel.redraw()
    qtbot.wait(1)
    first = time.perf_counter() - t0
    panel.add_event(ev.StepMetrics(100_001, 100, 0.05, 1e-3, 1.0, 200.0, 100_001, 0.0))
    t0 = time.perf_counter()
    panel.redraw()
    qtbot.wait(1)
    again = time.perf_counter() - t0
    assert panel.point_count() == 100_001 and len(panel.val_loss) == 100
    assert appended < 5.0 and first < 2.0 and again < 1.0, (appended, first, again)
    curve = panel.curves["loss"][0]
    assert curve.opts["autoDownsample"] and curve.opts["downsampleMethod"] == "peak" and curve.opts["clipToView"]
    panel.set_log_scale(True)
    assert panel.loss_plot.getAxis("left").logMode
    assert panel.timer.interval() == 100


def test_samples_view_scrubs_enlarges_and_saves(qtbot, tmp_path: Path) -> None:
    from sdstudio.gui.panels.samples import SamplesPanel

    panel = SamplesPanel()
    qtbot.addWidget(panel)
    panel.show()
    for step, colour in ((10, 40), (20, 120), (30, 220)):
        panel.add_grid(ev.SampleGrid(step, step // 10, np.full((32, 64, 3), colour, np.uint8), ("a", "b"), (0, 1)))
    assert panel.slider.maximum() == 2 and panel.slider.value() == 2
    assert "step 30" in panel.position.text()
    panel.slider.setValue(0)
    assert panel.current().step == 10 and "step 10" in panel.position.text()
    panel.add_grid(ev.SampleGrid(40, 4, np.zeros((32, 64, 3), np.uint8), ("a", "b"), (0, 1)))
    assert panel.current().step == 10, "scrubbing back stays put while new grids arrive"
    panel.view.clicked.emit()
    assert panel.enlarged.isVisible()
    panel.enlarged.close()
    target = tmp_path / "grid.png"
    assert panel.save_current(target)
    saved = QImage(str(target))
    assert (saved.width(), saved.height()) == (64, 32) and saved.pixelColor(0, 0).red() == 40


def test_schedule_preview_follows_the_schedule_settings(qtbot, tiny_dataset: Path) -> None:
    from sdstudio.gui.panels.schedule import SchedulePanel, parse_timesteps

    panel = SchedulePanel()
    qtbot.addWidget(panel)
    image = min(tiny_dataset.glob("*.png"))
    panel.set_inputs(DiffusionConfig(), resolution=16, image=image)
    panel.update_now()
    cosine_last = panel.alpha_curve.yData[-1]
    assert len(panel.alpha_curve.yData) == 1000 and panel.strip.pixmap() is not None
    assert "cosine" in panel.summary.text()
    panel.set_inputs(DiffusionConfig(schedule="linear", num_timesteps=200, zero_terminal_snr=True))
    qtbot.waitUntil(lambda: len(panel.alpha_curve.yData) == 200, timeout=5_000)
    assert panel.alpha_curve.yData[-1] != cosine_last and "zero terminal SNR" in panel.summary.text()
    assert parse_timesteps("0, 50, 5000", 200) == ([0, 50, 199], "timesteps clipped to 0…199")


def test_icon_is_drawn_at_every_size(qtbot) -> None:
    from sdstudio.gui.icon import ICON_SIZES, app_icon, draw_icon

    image = draw_icon(256)
    assert (image.width(), image.height()) == (256, 256)
    assert image.pixelColor(0, 0).alpha() == 0 and image.pixelColor(128, 128).alpha() == 255
    assert sorted(s.width() for s in app_icon().availableSizes()) == sorted(ICON_SIZES)


def test_qt_guard_pins_none_on_old_pythons() -> None:
    from sdstudio.gui import qt_compat

    assert qt_compat.pin_singletons() == qt_compat.needs_pinning()
    if qt_compat.needs_pinning():
        assert sys.getrefcount(None) > 1 << 39


def test_run_app_opens_the_window_and_quits(qtbot) -> None:
    from sdstudio.gui.app import run_app
    from sdstudio.gui.main_window import MainWindow

    import gc

    seen: list[bool] = []

    def close_window() -> None:
        seen.append(gc.isenabled())
        for widget in QApplication.topLevelWidgets():
            if isinstance(widget, MainWindow) and widget.isVisible():
                assert widget.windowTitle() == "sdstudio" and not widget.windowIcon().isNull()
                widget.close()

    gc.enable()  # as in a fresh process (the GUI tests' fixture turns it off)
    QTimer.singleShot(1500, close_window)
    assert run_app([]) == 0
    assert QApplication.organizationName() == "sdstudio"
    # while the app ran, garbage was collected on the GUI thread's timer only, never by a worker thread
    assert seen == [False] and gc.isenabled()


def test_run_summary_reads_state_from_metrics_and_lock(tmp_path: Path) -> None:
    import json

    from sdstudio.gui.panels.runs import summarize_run

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000004").mkdir(parents=True)
    (run / "checkpoints" / "step-00000004" / "manifest.json").write_text("{}")
    (run / "config.toml").write_text("")
    rows = [{"step": 0, "epoch": 0, "kind": "event", "event": "started"},
            {"step": 2, "epoch": 0, "kind": "train", "loss": 0.5},
            {"step": 4, "epoch": 0, "kind": "train", "loss": 0.25},
            {"step": 4, "epoch": 0, "kind": "val", "val_loss": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "kin')
    (run / "lock").write_text("999999999")  # a crashed writer: no such process
    summary = summarize_run(run)
    assert summary.state == "interrupted" and summary.resumable
    assert (summary.last_step, summary.last_loss, summary.best_val) == (4, 0.25, 0.3)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('\n{"step": 4, "epoch": 0, "kind": "event", "event": "completed"}\n')
    (run / "lock").unlink()
    assert summarize_run(run).state == "completed" and not summarize_run(run).resumable
