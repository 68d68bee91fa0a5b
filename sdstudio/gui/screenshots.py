"""Screenshots of the real window, driven offscreen through a short demo run.

    python -m sdstudio.gui.screenshots OUT_DIR [--steps N]

Writes 01-datasets.png (thumbnails, caption, health report), 02-settings.png (the generated form with an
invalid value highlighted), 03-live-plots.png (mid-training), 04-samples.png, 05-schedule.png,
06-runs.png (two runs overlaid), 07-export.png (the export dialog over the window), 08-sweep.png (the sweep
dialog), 09-queue.png (the sweep's runs queued, one running) and 10-compare.png (the queue's runs compared),
each 1440 px wide. Uses a throw-away SDSTUDIO_HOME unless one is set, so the real home folder is never
touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WIDTH, HEIGHT = 1440, 900


def _spin(ms: int) -> None:
    """Run the event loop for ``ms``. Not QTest.qWait: PySide6 holds the GIL through its sleeps, which
    starves the training thread (a run went 20x slower)."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"screenshots: gave up waiting for {what} after {timeout:.0f} s")
        _spin(50)


def _settle(ms: int = 400) -> None:
    _spin(ms)


def _save(window: object, out: Path, name: str) -> Path:
    from PySide6.QtWidgets import QMainWindow

    assert isinstance(window, QMainWindow)
    _settle()
    path = out / name
    if not window.grab().save(str(path)):
        raise OSError(f"screenshots: could not write {path}")
    print(path)
    return path


def _save_with_dialog(window: object, dialog: object, out: Path, name: str) -> Path:
    """The window with a dialog drawn over it (offscreen Qt has no window manager to compose them), dimmed
    behind the dialog, with a plain title bar."""
    from PySide6.QtCore import QRect, Qt
    from PySide6.QtGui import QColor, QFont, QPainter
    from PySide6.QtWidgets import QMainWindow, QWidget

    assert isinstance(window, QMainWindow) and isinstance(dialog, QWidget)
    _settle()
    base = window.grab()
    shot = dialog.grab()
    title_h = 28
    x = (base.width() - shot.width()) // 2
    y = max(60, (base.height() - shot.height() - title_h) // 3)
    painter = QPainter(base)
    painter.fillRect(base.rect(), QColor(0, 0, 0, 70))
    painter.fillRect(QRect(x - 1, y - 1, shot.width() + 2, shot.height() + title_h + 2), QColor(110, 110, 110))
    painter.fillRect(QRect(x, y, shot.width(), title_h), QColor(232, 232, 236))
    font = QFont(painter.font())
    font.setBold(True)
    painter.setFont(font)
    painter.setPen(QColor(40, 40, 40))
    painter.drawText(QRect(x + 10, y, shot.width() - 20, title_h), Qt.AlignmentFlag.AlignVCenter,
                     dialog.windowTitle())
    painter.drawPixmap(x, y + title_h, shot)
    painter.end()
    path = out / name
    if not base.save(str(path)):
        raise OSError(f"screenshots: could not write {path}")
    print(path)
    return path


def demo_overrides(steps: int, learning_rate: float) -> dict[str, object]:
    """The demo preset, shortened: samples three times per run, one torch thread (shared CI cores)."""
    return {"train.max_steps": steps, "train.log_every": 2, "train.threads": 1,
            "train.learning_rate": learning_rate, "train.warmup_steps": max(1, steps // 15),
            "train.val_every_steps": max(1, steps // 6), "sample.every_epochs": 0,
            "sample.every_steps": max(1, steps // 3), "sample.steps": 15, "checkpoint.every_steps": 0}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdstudio.gui.screenshots")
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=300, help="steps of each demo run (default 300)")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("SDSTUDIO_HOME", tempfile.mkdtemp(prefix="sdstudio-screenshots-"))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    from . import qt_compat  # noqa: F401 - before any Qt call
    from .app import create_application

    app = create_application([])
    from sdstudio.core import events as ev
    from sdstudio.core import presets

    from .main_window import MainWindow

    window = MainWindow()
    window.restore_session()
    window.resize(WIDTH, HEIGHT)
    window.show()
    events: list[ev.Event] = []
    window.runner.event.connect(events.append)

    # 1. the dataset: thumbnails, a selected image's caption, the health report
    window.tabs.setCurrentWidget(window.datasets)
    datasets = window.datasets
    _wait(lambda: datasets.report is not None and not datasets.progress.isVisible(), 120, "the dataset check")
    datasets.select_file(datasets.model.record(5).path)
    _wait(lambda: all(datasets.model.thumbnail_ready(row) for row in range(24)), 60, "thumbnails")
    _save(window, out, "01-datasets.png")

    # 2. the settings form, with one invalid value highlighted and Train disabled with the reason
    form = window.form
    form.sections["train"].set_expanded(False)
    form.sections["diffusion"].set_expanded(True)
    form.editors["train.learning_rate"].input.setText("2")
    _save(window, out, "02-settings.png")
    form.sections["diffusion"].set_expanded(False)
    form.sections["train"].set_expanded(True)

    # 3-5. a short demo run: live plots mid-training, the samples, the schedule preview
    window.presets.apply_config(presets.load_preset("demo").with_overrides(demo_overrides(args.steps, 2e-3)),
                                "demo")
    window.train_bar.train_button.click()
    _wait(lambda: any(isinstance(e, ev.StepMetrics) and e.step >= args.steps * 0.7 for e in events)
          and any(isinstance(e, ev.SampleGrid) for e in events), 1800, "the demo run to get going")
    window.tabs.setCurrentWidget(window.training_tab)
    _save(window, out, "03-live-plots.png")
    _wait(lambda: not window.runner.is_running(), 1800, "the demo run to end")
    window.tabs.setCurrentWidget(window.samples)
    _save(window, out, "04-samples.png")
    window.tabs.setCurrentWidget(window.schedule)
    window.schedule.timesteps.setText("0, 50, 150, 300, 500, 700, 999")
    window.schedule.update_now()
    _save(window, out, "05-schedule.png")

    # 6. a second run with a lower learning rate, both overlaid in the Runs tab
    first_run = window.run_dir
    window.presets.apply_config(presets.load_preset("demo").with_overrides(demo_overrides(args.steps, 5e-4)),
                                "demo-lr5e-4")
    window.train_bar.train_button.click()
    _wait(lambda: not window.runner.is_running(), 1800, "the second run to end")
    second_run = window.run_dir
    window.runs.refresh()
    _wait(lambda: {str(first_run), str(second_run)} <= set(window.runs.summaries), 60, "the runs list")
    window.runs.set_compared([p for p in (first_run, second_run) if p is not None])
    window.runs.tree.setCurrentItem(window.runs.tree.topLevelItem(0))
    window.tabs.setCurrentWidget(window.runs)
    _save(window, out, "06-runs.png")

    # 7. the export dialog of the first run (a from-scratch model: the formats it cannot use say why)
    export = window.open_export(first_run) if first_run is not None else None
    if export is None:
        raise RuntimeError("screenshots: the export dialog did not open")
    _save_with_dialog(window, export, out, "07-export.png")
    export.reject()

    # 8-10. a sweep over the learning rate, queued and run; its runs compared
    window.presets.apply_config(presets.load_preset("demo").with_overrides(demo_overrides(args.steps // 2, 1e-3)),
                                "demo")
    sweep = window.open_sweep_dialog()
    if sweep is None:
        raise RuntimeError("screenshots: the sweep dialog did not open")
    sweep.name.setText("demo-lr")
    sweep.set_row(0, "train.learning_rate", "5e-4, 1e-3, 2e-3")
    sweep.validate_now()
    _save_with_dialog(window, sweep, out, "08-sweep.png")
    sweep.queue_button.click()
    window.run_queue()
    queue = window.queue
    plots = window.plots  # cleared when each run starts: its points are the running run's
    _wait(lambda: queue.items[1].status == "running" and len(plots.loss) > 0
          and plots.loss.x[-1] >= args.steps // 4, 1800, "the second queued run")
    queue.select(1)
    window.tabs.setCurrentWidget(queue)
    _save(window, out, "09-queue.png")
    _wait(lambda: not queue.active, 3600, "the queue to end")
    window.compare_runs(queue.finished_runs(), "The queue's runs")
    _wait(lambda: window.compare.comparison is not None and len(window.compare.comparison.rows) == 3, 60,
          "the comparison")
    window.compare.table.selectRow(2)
    _save(window, out, "10-compare.png")

    window.close()
    app.processEvents()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
