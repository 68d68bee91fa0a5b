"""The main window's run queue and sweeps: queue the current settings or a sweep's combinations, and run the
queue one run after another through the window's single training worker. A mixin of MainWindow (no state of
its own; the panels, the runner and the run starter are the window's)."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QTimer

from sdstudio.core import events as ev
from sdstudio.core import paths
from sdstudio.core.runs import default_run_dir
from sdstudio.core.sweeps.plan import SweepPlan
from sdstudio.core.sweeps.runner import SweepFinished, SweepRunStarted

from .panels.datasets import same_folder
from .panels.export_dialog import run_checkpoints
from .panels.queue import QueueItem
from .panels.sweep_dialog import SweepDialog
from .widgets.failure_dialog import show_error


class QueueControl:
    form: Any
    datasets: Any
    presets: Any
    queue: Any
    log: Any
    tabs: Any
    runner: Any
    sweep_dialog: Any
    _quit_when_idle: bool
    # the window's own methods this mixin calls
    statusBar: Any
    _config_dataset: Any
    _run_label: Any
    _start_run: Any
    plots: Any
    samples: Any
    compare: Any
    training_tab: Any
    search_dir: Any

    def add_current_to_queue(self) -> QueueItem | None:
        """Queue a run with the current settings and dataset (refused, with the reasons, when they cannot train)."""
        config = self.form.config()
        problems = self.form.problems()
        report = self.datasets.report
        if report is not None and same_folder(report["root"], self._config_dataset()) and not report["usable"]:
            problems.append(f"dataset: {report['summary']}")
        if config is None or problems:
            show_error(self, "Not added to the queue", "The current settings cannot train:\n" + "\n".join(problems),
                       hint="Fix the settings marked in red (or pick another dataset), then add them again.")
            return None
        changes = self.presets.changes()
        description = self.presets.current_name or "custom"
        if changes:
            description += ": " + ", ".join(f"{k}={v!r}" for k, (_old, v) in changes.items() if k != "data.path")
        item = self.queue.add(config, self._run_label(config), description)
        self.log.note(f"queued {item.label} ({item.description})")
        self.statusBar().showMessage(f"Added to the queue ({self.queue.pending_count()} to run)", 5_000)
        return item

    def open_sweep_dialog(self) -> SweepDialog | None:
        config = self.form.config()
        if config is None or self.form.problems():
            show_error(self, "No sweep", "The current settings cannot train:\n" + "\n".join(self.form.problems()),
                       hint="A sweep starts from the current settings: fix the settings marked in red first.")
            return None
        dialog = SweepDialog(config, self.presets.current_name or "custom", self)
        dialog.queue_requested.connect(self._queue_sweep)
        dialog.search_requested.connect(self.run_search)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.sweep_dialog = dialog
        dialog.open()
        return dialog

    def _queue_sweep(self, name: str, plan: SweepPlan) -> None:
        for combo in plan.combinations:
            self.queue.add(combo.config, f"{name}-{combo.folder}", combo.describe())
        self.log.note(f"sweep {name}: {len(plan.combinations)} runs added to the queue")
        self.tabs.setCurrentWidget(self.queue)

    def run_search(self, plan: SweepPlan) -> bool:
        """A [search] sweep in the app: its trials train one after another on the training worker, each shown
        live; the folder is ``<runs>/sweeps/NAME`` (its study.db resumes an interrupted search); when it ends
        the comparison view opens it (pruned trials marked, parameter importances)."""
        from sdstudio.core.sweeps.search import run_search

        if self.runner.is_running():
            show_error(self, "A run is in progress", "The search starts when no run is training.",
                       hint="Wait for the current run to end, or stop it, then run the search again.")
            return False
        out = paths.runs_dir() / "sweeps" / plan.name
        self.search_dir = out
        self.plots.clear()
        self.runner.event.connect(self._search_event)
        self.runner.running_changed.connect(self._search_ended)
        self.log.note(f"search {plan.name}: {plan.search['trials'] if plan.search else '?'} trials in {out}")
        self.runner.start(None, None, events=lambda control: run_search(plan, out, control))
        self.tabs.setCurrentWidget(self.training_tab)
        return True

    def _search_event(self, event: ev.Event) -> None:
        if isinstance(event, SweepRunStarted):  # a new trial: its own curves and samples
            self.plots.clear()
            self.samples.set_entries([])
            values = ", ".join(f"{k}={v!r}" for k, v in event.overrides.items())
            self.log.note(f"search trial {event.index + 1} of {event.total}: {values}")
        elif isinstance(event, SweepFinished):
            self.log.note(f"search finished: {event.out_dir}")

    def _search_ended(self, running: bool) -> None:
        if running:
            return
        self.runner.event.disconnect(self._search_event)
        self.runner.running_changed.disconnect(self._search_ended)
        if self.search_dir is not None and (self.search_dir / "summary.json").is_file():
            self.compare.open_sweep(self.search_dir)
            self.tabs.setCurrentWidget(self.compare)

    def run_queue(self) -> None:
        if self.runner.is_running():
            show_error(self, "A run is in progress", "The queue starts when no run is training.",
                       hint="Wait for the current run to end, or stop it, then click Run queue.")
            return
        if self.queue.next_item() is None:
            self.statusBar().showMessage("The queue has nothing to run", 5_000)
            return
        self.queue.start()
        self.log.note(f"running the queue: {self.queue.pending_count()} runs")
        self._start_next_queued()

    def _start_next_queued(self) -> None:
        item = self.queue.next_item()
        if item is None or self.queue.halt or self.runner.is_running():
            done = self.queue.pending_count() == 0
            self.queue.finish("Queue finished." if done else "Queue stopped; Run queue continues it.")
            self.log.note("queue finished" if done else "queue stopped")
            return
        resume = item.status == "stopped" and item.run_dir is not None and bool(run_checkpoints(item.run_dir))
        run_dir = item.run_dir if resume and item.run_dir is not None else default_run_dir(item.label)
        self.queue.mark_running(item, run_dir)
        self._start_run(item.config, run_dir, resume=resume)

    def _queued_run_ended(self) -> None:
        item = self.queue.run_ended()
        if item is not None and item.status == "stopped":
            self.queue.halt = True
        if self._quit_when_idle:
            self.queue.halt = True
        # the next run starts from the event loop, after every slot of this run's end has run
        QTimer.singleShot(0, self._start_next_queued)

