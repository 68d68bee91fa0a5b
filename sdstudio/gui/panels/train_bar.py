"""Train / Pause / Resume / Stop / Sample now / Save now / Add to queue, with step progress, epoch, it/s, ETA
and phase."""

from __future__ import annotations

import math
import time

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from sdstudio.core import events as ev

PHASE_TEXT = {"scanning": "Scanning the dataset", "caching": "Caching", "building": "Building the model",
              "compiling": "Compiling", "compiled": "Compiled", "loading": "Loading the checkpoint",
              "training": "Training",
              "validating": "Validation", "sampling": "Sampling", "saving": "Saving a checkpoint",
              "paused": "Paused"}


def format_duration(seconds: float) -> str:
    if math.isnan(seconds) or seconds < 0:
        return "–"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class TrainBar(QWidget):
    train_clicked = Signal()
    pause_clicked = Signal()
    resume_clicked = Signal()
    stop_clicked = Signal()
    sample_clicked = Signal()
    save_clicked = Signal()
    queue_clicked = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.train_button = QPushButton("Train")
        self.train_button.setObjectName("trainButton")
        self.train_button.setStyleSheet("QPushButton#trainButton:enabled { font-weight: bold; }")
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step and save a resumable checkpoint")
        self.sample_button = QPushButton("Sample now")
        self.sample_button.setToolTip("Make a sample grid after the current step")
        self.save_button = QPushButton("Save now")
        self.save_button.setToolTip("Save a checkpoint after the current step")
        self.queue_button = QPushButton("Add to queue")
        self.queue_button.setToolTip("Queue a run with these settings (the Queue tab runs them one after another)")
        for button, signal in ((self.train_button, self.train_clicked), (self.pause_button, self.pause_clicked),
                               (self.resume_button, self.resume_clicked), (self.stop_button, self.stop_clicked),
                               (self.sample_button, self.sample_clicked), (self.save_button, self.save_clicked),
                               (self.queue_button, self.queue_clicked)):
            button.clicked.connect(signal)
        self.reason = QLabel("")
        self.reason.setObjectName("trainReason")
        self.reason.setWordWrap(True)
        self.reason.setStyleSheet("color: #b3261e;")
        self.progress = QProgressBar()
        self.progress.setFormat("no run yet")
        self.progress.setTextVisible(True)
        self.progress.setValue(0)
        self.phase = QLabel("Ready")
        self.phase.setMinimumWidth(200)
        self.stats = QLabel("")
        self.stats.setMinimumWidth(320)
        buttons = QHBoxLayout()
        buttons.setContentsMargins(0, 0, 0, 0)
        for button in (self.train_button, self.pause_button, self.resume_button, self.stop_button,
                       self.sample_button, self.save_button):
            buttons.addWidget(button)
        buttons.addSpacing(12)
        buttons.addWidget(self.queue_button)
        buttons.addWidget(self.reason, 1)
        status = QHBoxLayout()
        status.setContentsMargins(0, 0, 0, 0)
        status.addWidget(self.phase)
        status.addWidget(self.progress, 1)
        status.addWidget(self.stats)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 4)
        layout.addLayout(buttons)
        layout.addLayout(status)
        self._running = False
        self._paused = False
        self._can_train = True
        self._last: tuple[float, int] | None = None
        self._its = float("nan")
        self.set_running(False)

    # -- state -------------------------------------------------------------------------------------------
    def set_can_train(self, problems: list[str]) -> None:
        """Enable Train, or disable it with the first reason (all of them in the tooltip)."""
        self._can_train = not problems
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            self.reason.setText(f"Cannot train: {problems[0]}{more}")
            self.reason.setToolTip("\n".join(problems))
            self.train_button.setToolTip("Cannot train:\n" + "\n".join(problems))
        else:
            self.reason.setText("")
            self.reason.setToolTip("")
            self.train_button.setToolTip("Start training with these settings")
        self._update_buttons()

    def set_running(self, running: bool) -> None:
        self._running = running
        if not running:
            self._paused = False
        self._update_buttons()

    def set_paused(self, paused: bool) -> None:
        self._paused = paused
        self._update_buttons()

    def _update_buttons(self) -> None:
        running = self._running
        self.train_button.setEnabled(not running and self._can_train)
        self.queue_button.setEnabled(self._can_train)
        self.pause_button.setEnabled(running and not self._paused)
        self.resume_button.setEnabled(running and self._paused)
        for button in (self.stop_button, self.sample_button, self.save_button):
            button.setEnabled(running)
        if running:
            self.reason.setText("")

    def stop_requested(self) -> None:
        self.phase.setText("Stopping (saving a checkpoint)…")
        self.stop_button.setEnabled(False)

    # -- events ------------------------------------------------------------------------------------------
    def add_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.Started):
            self.progress.setFormat("step %v of %m")
            self.progress.setRange(0, max(1, event.total_steps))
            self.progress.setValue(event.resumed_from_step)
            self._last = (time.perf_counter(), event.resumed_from_step)
            self._its = float("nan")
            self.stats.setText("")
        elif isinstance(event, ev.Status):
            self.phase.setText(PHASE_TEXT.get(event.phase, event.phase.title()) +
                               (f": {event.text}" if event.text and event.text != event.phase else ""))
            if event.phase == "compiled":  # train.compile_prewarm: the it/s rate starts after the warm-up
                self._last = (time.perf_counter(), self.progress.value())
            if event.phase == "paused" or (self._paused and event.phase == "training"):
                self.set_paused(event.phase == "paused")
        elif isinstance(event, ev.StepMetrics):
            self._step(event)
        elif isinstance(event, ev.Finished):
            self.phase.setText(f"Run {event.reason} at step {event.step}")
        elif isinstance(event, ev.Failed):
            self.phase.setText("Run failed" + (" (resumable)" if event.resumable_from else ""))

    def _step(self, event: ev.StepMetrics) -> None:
        self.progress.setRange(0, max(1, event.total_steps))
        self.progress.setValue(event.step)
        now = time.perf_counter()
        if self._last is not None and event.step > self._last[1]:
            rate = (event.step - self._last[1]) / max(now - self._last[0], 1e-9)
            self._its = rate if math.isnan(self._its) else 0.7 * self._its + 0.3 * rate
        self._last = (now, event.step)
        its = "–" if math.isnan(self._its) else f"{self._its:.2f} it/s"
        self.stats.setText(f"epoch {event.epoch + 1} · {its} · {event.img_per_s:.0f} img/s · "
                           f"ETA {format_duration(event.eta_s)}")
