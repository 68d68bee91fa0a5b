"""Training from the window: the Train button, live curves and samples, Stop, pause, closing, failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QMessageBox

from sdstudio.core import events as ev
from sdstudio.core.control import TrainingControl
from tests.gui.gui_helpers import tiny_run_config, use_tiny_settings


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "manifest.json").is_file())


def _record(win: Any) -> list[ev.Event]:
    seen: list[ev.Event] = []
    win.runner.event.connect(seen.append)
    return seen


def test_train_button_shows_curves_and_samples_and_stop_leaves_checkpoint(window, qtbot, tiny_dataset) -> None:
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 400, "sample.every_steps": 2,
                                               "checkpoint.every_steps": 0})
    seen = _record(window)
    assert window.train_bar.train_button.isEnabled()
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    assert window.runner.is_running()
    curve = window.plots.curves["loss"][0]
    qtbot.waitUntil(lambda: curve.xData is not None and len(curve.xData) >= 2 and bool(window.samples.entries)
                    and window.latest_sample.pixmap() is not None, timeout=60_000)
    assert window.samples.view.pixmap() is not None
    assert "step" in window.train_bar.progress.text()

    qtbot.mouseClick(window.train_bar.pause_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(isinstance(e, ev.Status) and e.phase == "paused" for e in seen), timeout=30_000)
    assert window.train_bar.resume_button.isEnabled() and not window.train_bar.pause_button.isEnabled()
    qtbot.mouseClick(window.train_bar.resume_button, Qt.MouseButton.LeftButton)

    qtbot.mouseClick(window.train_bar.stop_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=60_000)
    finished = [e for e in seen if isinstance(e, ev.Finished)]
    assert finished and finished[-1].reason == "stopped"
    assert finished[-1].step < 400
    assert _checkpoints(finished[-1].run_dir), "Stop must leave a resumable checkpoint"
    assert window.train_bar.train_button.isEnabled()


def test_event_loop_stall_during_a_run_stays_small(window, qtbot, tiny_dataset, record_property) -> None:
    """The GUI thread keeps turning while the worker trains (loose bound; the real figure is a benchmark)."""
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 16, "sample.every_steps": 4})
    window.tabs.setCurrentWidget(window.training_tab)  # live plots painting during the run
    qtbot.wait(200)
    gaps: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(tick)
    timer.start()
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=90_000)
    timer.stop()
    stall_ms = (max(gaps) - 0.005) * 1000
    record_property("max_event_loop_stall_ms", round(stall_ms, 1))
    print(f"\nlongest event-loop stall during the run: {stall_ms:.1f} ms over {len(gaps)} ticks")
    assert window.plots.point_count() == 16
    assert stall_ms < 500


def test_closing_while_training_asks_then_stops_saves_and_closes(window, qtbot, tiny_dataset) -> None:
    from sdstudio.gui.main_window import CLOSE_KEEP, CLOSE_STOP

    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 400, "checkpoint.every_steps": 0})
    seen = _record(window)
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(isinstance(e, ev.StepMetrics) for e in seen), timeout=60_000)

    asked: list[str] = []
    window.ask_close_choice = lambda: asked.append("keep") or CLOSE_KEEP  # type: ignore[method-assign]
    assert window.close() is False
    assert asked == ["keep"] and window.isVisible() and window.runner.is_running()

    window.ask_close_choice = lambda: asked.append("stop") or CLOSE_STOP  # type: ignore[method-assign]
    window.close()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=60_000)
    assert not window.runner.is_running()
    assert asked == ["keep", "stop"]
    finished = [e for e in seen if isinstance(e, ev.Finished)]
    assert finished and finished[-1].reason == "stopped"
    assert _checkpoints(finished[-1].run_dir)
    assert window.settings.value("last/preset") == "tiny"


def test_a_failure_in_the_worker_shows_a_dialog_with_details(window, qtbot, tiny_dataset, monkeypatch) -> None:
    from sdstudio.gui import worker

    def broken_train(config, control, *, run_dir=None, resume=False):
        yield ev.Status("building", "building the model")
        raise RuntimeError("boom: the engine broke")

    monkeypatch.setattr(worker, "train", broken_train)
    use_tiny_settings(window, tiny_dataset)
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.failure_box is not None and window.failure_box.isVisible(), timeout=30_000)
    box: QMessageBox = window.failure_box
    assert "boom: the engine broke" in box.text()
    assert "RuntimeError" in box.detailedText() and "Traceback" in box.detailedText()
    assert box.informativeText()  # what to do next
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=10_000)
    assert window.train_bar.train_button.isEnabled()
    assert any("boom" in line for line in window.log.lines())
    box.close()


def test_resume_a_stopped_run_from_the_runs_panel(window, qtbot, tiny_dataset) -> None:
    from sdstudio.core.runs import default_run_dir
    from sdstudio.core.train.loop import train

    config = tiny_run_config(tiny_dataset, **{"train.max_steps": 6, "checkpoint.every_steps": 0})
    control = TrainingControl()
    run_dir = default_run_dir("tiny")
    for event in train(config, control, run_dir=run_dir):
        if isinstance(event, ev.StepMetrics) and event.step >= 2:
            control.request_stop()
    assert _checkpoints(run_dir)

    window.runs.refresh()
    qtbot.waitUntil(lambda: str(run_dir) in window.runs.summaries, timeout=20_000)
    assert window.runs.summaries[str(run_dir)].state == "stopped"
    item = window.runs.tree.topLevelItem(0)
    window.runs.tree.setCurrentItem(item)
    assert window.runs.resume_button.isEnabled()
    assert window.runs.export_button.isEnabled() and "Export" in window.runs.export_button.toolTip()
    seen = _record(window)
    qtbot.mouseClick(window.runs.resume_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=60_000)
    started = [e for e in seen if isinstance(e, ev.Started)]
    assert started and started[0].resumed_from_step >= 2
    finished = [e for e in seen if isinstance(e, ev.Finished)]
    assert finished and finished[-1].reason == "completed" and finished[-1].step == 6
    assert list(window.plots.loss.x) == sorted(set(window.plots.loss.x)), "no repeated steps after resume"
    qtbot.waitUntil(lambda: window.runs.summaries.get(str(run_dir)) is not None
                    and window.runs.summaries[str(run_dir)].state == "completed", timeout=20_000)


@pytest.mark.parametrize("choice", ["later"])
def test_quit_when_the_run_ends(window, qtbot, tiny_dataset, choice: str) -> None:
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 8})
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    window.ask_close_choice = lambda: choice  # type: ignore[method-assign]
    window.close()
    assert window.isVisible()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=60_000)
    assert not window.runner.is_running()


def test_quitting_stops_the_run_and_joins_the_thread_promptly(window, qtbot, tiny_dataset) -> None:
    """What the app does on quit (aboutToQuit): stop, wait for the thread, join; no waiting on the GUI thread."""
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 400, "checkpoint.every_steps": 0})
    seen = _record(window)
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(isinstance(e, ev.StepMetrics) for e in seen), timeout=60_000)
    run_dir = window.runner.run_dir
    t0 = time.perf_counter()
    assert window.runner.shutdown(30_000)
    assert time.perf_counter() - t0 < 20
    assert not window.runner.is_running() and window.runner.thread is None
    assert _checkpoints(run_dir)


def _hanging_after_stop(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Replace the worker's train(): once a stop was requested, the run hangs (a step that does not return)
    until the gate opens. Returns (gate, hanging)."""
    from sdstudio.gui import worker

    gate, hanging = threading.Event(), threading.Event()
    real_train = worker.train

    def hanging_train(config, control, *, run_dir=None, resume=False):
        for event in real_train(config, control, run_dir=run_dir, resume=resume):
            yield event
            if control.stop_requested and not gate.is_set():
                hanging.set()
                gate.wait(120)

    monkeypatch.setattr(worker, "train", hanging_train)
    return gate, hanging


def _start_a_run_whose_stop_hangs(window, qtbot, tiny_dataset, monkeypatch):
    """A demo run whose step blocks once a stop is asked for (until ``gate`` is set); the watchdog set to 0.3 s."""
    from sdstudio.gui import close_control

    monkeypatch.setattr(close_control, "STOP_TIMEOUT_MS", 300)
    gate, hanging = _hanging_after_stop(monkeypatch)
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 400, "checkpoint.every_steps": 0})
    seen = _record(window)
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: any(isinstance(e, ev.StepMetrics) for e in seen), timeout=60_000)
    return gate, hanging, seen


def test_a_stop_not_answered_in_time_says_so_and_the_run_stops_once_it_answers(window, qtbot, tiny_dataset,
                                                                               monkeypatch) -> None:
    from sdstudio.gui.panels.runs import summarize_run

    gate, hanging, seen = _start_a_run_whose_stop_hangs(window, qtbot, tiny_dataset, monkeypatch)
    run_dir = window.runner.run_dir
    try:
        qtbot.mouseClick(window.train_bar.stop_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(hanging.is_set, timeout=30_000)
        qtbot.waitUntil(lambda: window.stop_box is not None and window.stop_box.isVisible(), timeout=10_000)
        assert window.runner.is_running()
        box: QMessageBox = window.stop_box
        assert "has not answered the stop request" in box.text() and "Quit anyway" in box.informativeText()
        assert any("has not answered" in line for line in window.log.lines())

        # the window stays responsive: timers fire, tabs switch, the box does not block the event loop
        ticks: list[float] = []
        timer = QTimer()
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start(20)
        qtbot.waitUntil(lambda: len(ticks) >= 5, timeout=5_000)
        timer.stop()
        window.tabs.setCurrentWidget(window.log)
        assert window.tabs.currentWidget() is window.log

        # "Keep waiting": the watchdog asks again later
        keep = next(b for b in box.buttons() if b.text() == "Keep waiting")
        keep.click()
        qtbot.waitUntil(lambda: window.stop_box is None or not window.stop_box.isVisible(), timeout=5_000)
        qtbot.waitUntil(lambda: window.stop_box is not None and window.stop_box.isVisible(), timeout=10_000)
    finally:
        gate.set()  # the step returns: the loop sees the stop request, saves a checkpoint and finishes
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=60_000)
    assert window.runner.thread is None and window.runner.worker is None, "thread joined"
    assert window.stop_box is None, "the question closes itself when the run stops"
    assert window.isVisible() and not window.force_quit
    finished = [e for e in seen if isinstance(e, ev.Finished)]
    assert finished and finished[-1].reason == "stopped"
    assert _checkpoints(run_dir) and summarize_run(run_dir).resumable


def test_quit_anyway_when_the_stop_is_not_answered(window, qtbot, tiny_dataset, monkeypatch) -> None:

    gate, hanging, seen = _start_a_run_whose_stop_hangs(window, qtbot, tiny_dataset, monkeypatch)
    try:
        window.close()  # the fixture answers "Stop, save and quit"
        assert window.isVisible()
        qtbot.waitUntil(lambda: window.stop_box is not None and window.stop_box.isVisible(), timeout=10_000)
        quit_button = next(b for b in window.stop_box.buttons() if b.text() == "Quit anyway")
        quit_button.click()
        qtbot.waitUntil(lambda: not window.isVisible(), timeout=5_000)
        assert window.force_quit and window.runner.is_running(), "the window went; the hung thread is left"
    finally:
        gate.set()
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=60_000)
    finished = [e for e in seen if isinstance(e, ev.Finished)]
    assert finished and finished[-1].reason == "stopped" and _checkpoints(finished[-1].run_dir)


def test_a_worker_exception_after_a_checkpoint_shows_the_failure_and_the_run_is_resumable(
        window, qtbot, tiny_dataset, monkeypatch) -> None:
    from sdstudio.gui import worker

    real_train = worker.train

    def crashing_train(config, control, *, run_dir=None, resume=False):
        run = real_train(config, control, run_dir=run_dir, resume=resume)
        for event in run:
            yield event
            if isinstance(event, ev.CheckpointSaved):
                run.close()  # the engine's own cleanup (lock, log) runs; then the thread's code breaks
                raise RuntimeError("boom after a checkpoint")

    monkeypatch.setattr(worker, "train", crashing_train)
    use_tiny_settings(window, tiny_dataset, **{"train.max_steps": 12, "checkpoint.every_steps": 3})
    seen = _record(window)
    qtbot.mouseClick(window.train_bar.train_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.failure_box is not None and window.failure_box.isVisible(), timeout=60_000)
    box: QMessageBox = window.failure_box
    failed = [e for e in seen if isinstance(e, ev.Failed)]
    assert failed and failed[-1].resumable_from is not None and failed[-1].resumable_from.name == "step-00000003"
    assert "boom after a checkpoint" in box.text() and "RuntimeError" in box.detailedText()
    assert "step-00000003" in box.informativeText() and "Resume" in box.informativeText()
    assert "(resumable)" in window.train_bar.phase.text()
    qtbot.waitUntil(lambda: not window.runner.is_running(), timeout=10_000)
    box.close()
    run_dir = failed[-1].run_dir
    qtbot.waitUntil(lambda: str(run_dir) in window.runs.summaries, timeout=20_000)
    summary = window.runs.summaries[str(run_dir)]
    assert summary.state == "interrupted" and summary.resumable
    window.runs.tree.setCurrentItem(window.runs.tree.topLevelItem(0))
    assert window.runs.resume_button.isEnabled()
