"""The main window: settings on the left (preset + generated form), the train bar on top, and tabs for
the dataset, live curves, samples, the noise schedule, past runs, the run queue, run comparison and the log.
It wires panels together and turns the worker's events into what they show; the training itself runs on the
worker's thread, one run at a time (the Train button's run, or the queue's runs one after another)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMainWindow, QMessageBox, QSplitter, QTabWidget, QVBoxLayout, QWidget

from sdstudio.core import events as ev
from sdstudio.core import paths, presets
from sdstudio.core.config import RunConfig
from sdstudio.core.errors import UserError
from sdstudio.core.runs import RunFolder, default_run_dir, load_run_config

from . import (
    close_control,
    qt_compat,  # noqa: F401 - first: guards PySide6 6.12.0 on Python < 3.12
)
from .app_settings import app_settings
from .close_control import CLOSE_KEEP, CLOSE_LATER, CLOSE_STOP, CloseControl  # noqa: F401 - the choices, for callers
from .icon import app_icon
from .panels.compare import ComparePanel
from .panels.datasets import DatasetsPanel, same_folder
from .panels.export_dialog import ExportDialog, open_export_dialog, run_checkpoints
from .panels.fit_dialog import FitBar
from .panels.log_view import LogView
from .panels.plots import PlotsPanel
from .panels.presets import PresetsPanel
from .panels.queue import QueuePanel
from .panels.runs import RunsPanel
from .panels.samples import SamplesPanel, read_run_samples
from .panels.schedule import SchedulePanel
from .panels.settings_form import SettingsForm
from .panels.sweep_dialog import SweepDialog
from .panels.train_bar import TrainBar
from .queue_control import QueueControl
from .widgets.failure_dialog import show_error
from .widgets.image_view import ImageView
from .worker import TrainingRunner, freeze_heap


class MainWindow(CloseControl, QueueControl, QMainWindow):
    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or app_settings()
        self.setWindowTitle("sdstudio")
        self.setWindowIcon(app_icon())
        self.runner = TrainingRunner(self)
        self.runner.event.connect(self.on_event)
        self.runner.running_changed.connect(self._running_changed)
        self.run_dir: Path | None = None
        self.failure_box: QMessageBox | None = None
        self.stop_box: QMessageBox | None = None  # "the run does not stop" (the stop watchdog)
        self._stop_quit_button: object = None
        self.export_dialog: ExportDialog | None = None
        self.sweep_dialog: SweepDialog | None = None
        self.search_dir: Path | None = None  # the folder of a search sweep running in the app
        self._quit_when_idle = False
        self.force_quit = False

        self.form = SettingsForm()
        self.presets = PresetsPanel(self.form)
        self.fit_bar = FitBar(self.form)
        self.train_bar = TrainBar()
        self.datasets = DatasetsPanel()
        self.plots = PlotsPanel()
        self.latest_sample = ImageView(placeholder="The newest sample grid shows here.")
        self.latest_sample.clicked.connect(lambda: self.tabs.setCurrentWidget(self.samples))
        self.samples = SamplesPanel()
        self.schedule = SchedulePanel()
        self.runs = RunsPanel()
        self.queue = QueuePanel()
        self.compare = ComparePanel()
        self.log = LogView()
        self._build_layout()
        self._build_menus()
        self._connect()
        self._stop_watchdog = QTimer(self)
        self._stop_watchdog.setSingleShot(True)
        self._stop_watchdog.timeout.connect(self._stop_not_answered)
        freeze_heap()  # start-up objects leave the garbage collector's scans (see worker.freeze_heap)

    # -- construction ----------------------------------------------------------------------------------------
    def _build_layout(self) -> None:
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(self.presets)
        left_layout.addWidget(self.fit_bar)
        left_layout.addWidget(self.form, 1)
        training = QSplitter(Qt.Orientation.Horizontal)
        training.addWidget(self.plots)
        training.addWidget(self.latest_sample)
        training.setSizes([700, 300])
        self.tabs = QTabWidget()
        for widget, title in ((self.datasets, "Dataset"), (training, "Training"), (self.samples, "Samples"),
                              (self.schedule, "Noise schedule"), (self.runs, "Runs"), (self.queue, "Queue"),
                              (self.compare, "Compare"), (self.log, "Log")):
            self.tabs.addTab(widget, title)
        self.training_tab = training
        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(left)
        self.splitter.addWidget(self.tabs)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([400, 1000])
        central = QWidget()
        layout = QVBoxLayout(central)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.train_bar)
        layout.addWidget(self.splitter, 1)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Ready")
        self.resize(1440, 900)

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        file_menu.setToolTipsVisible(True)
        file_menu.addAction("Add dataset folder…", self.datasets.pick_folder)
        file_menu.addAction("Import settings…", self.presets.ask_import)
        file_menu.addAction("Export settings…", self.presets.ask_export)
        self.export_action = QAction("Export model…", self)
        self.export_action.setToolTip("Export a run: the run selected in the Runs tab, else the newest run")
        self.export_action.setStatusTip(self.export_action.toolTip())
        self.export_action.triggered.connect(self.export_current_run)
        file_menu.addAction(self.export_action)
        file_menu.addSeparator()
        file_menu.addAction("Quit", QKeySequence.StandardKey.Quit, self.close)
        run_menu = self.menuBar().addMenu("&Run")
        bar = self.train_bar
        for text, shortcut, button in (("Train", "Ctrl+Return", bar.train_button),
                                       ("Pause", "", bar.pause_button), ("Resume", "", bar.resume_button),
                                       ("Stop", "", bar.stop_button), ("Sample now", "", bar.sample_button),
                                       ("Save now", "", bar.save_button)):
            action = run_menu.addAction(text, button.click)
            if shortcut:
                action.setShortcut(QKeySequence(shortcut))
        run_menu.addSeparator()
        run_menu.addAction("Add settings to queue", self.add_current_to_queue)
        run_menu.addAction("Sweep…", self.open_sweep_dialog)
        run_menu.addAction("Run queue", self.run_queue)
        view_menu = self.menuBar().addMenu("&View")
        log_action = view_menu.addAction("Log-scale loss")
        log_action.setCheckable(True)
        log_action.toggled.connect(self.plots.set_log_scale)
        self.plots.log_scale.toggled.connect(log_action.setChecked)

    def _connect(self) -> None:
        bar = self.train_bar
        bar.train_clicked.connect(self.start_training)
        bar.pause_clicked.connect(self._pause)
        bar.resume_clicked.connect(self._resume)
        bar.stop_clicked.connect(self.stop_training)
        bar.sample_clicked.connect(self.runner.sample_now)
        bar.save_clicked.connect(self.runner.save_now)
        self.form.changed.connect(self._settings_changed)
        self.form.editors["data.path"].input.editingFinished.connect(self._data_path_edited)
        self.presets.preset_loaded.connect(self._preset_loaded)
        self.datasets.dataset_opened.connect(self._dataset_opened)
        self.datasets.report_ready.connect(lambda _report: self._update_can_train())
        self.runs.resume_requested.connect(self.resume_run)
        self.runs.samples_requested.connect(self._show_run_samples)
        self.runs.run_selected.connect(self.schedule.show_run_schedule)  # a past run's learned noise schedule
        self.runs.export_requested.connect(self.open_export)
        self.runs.compare_requested.connect(self.compare_runs)
        bar.queue_clicked.connect(self.add_current_to_queue)
        self.queue.add_requested.connect(self.add_current_to_queue)
        self.queue.sweep_requested.connect(self.open_sweep_dialog)
        self.queue.run_requested.connect(self.run_queue)
        self.queue.stop_requested.connect(self.stop_training)
        self.queue.compare_requested.connect(lambda runs: self.compare_runs(runs, "The queue's runs"))
        self.tabs.currentChanged.connect(self._tab_changed)

    # -- session --------------------------------------------------------------------------------------------
    def restore_session(self) -> None:
        """Geometry, last preset and dataset; the first start opens the demo dataset with the demo preset."""
        s = self.settings
        geometry = s.value("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        splitter = s.value("window/splitter")
        if splitter is not None:
            self.splitter.restoreState(splitter)
        names = [p.name for p in presets.list_presets()]
        preset = str(s.value("last/preset", "") or "")
        if preset not in names:
            preset = presets.DEFAULT_PRESET if presets.DEFAULT_PRESET in names else ""
        if not preset or not self.presets.load(preset, keep_dataset=False):
            self.presets.apply_config(RunConfig(), "defaults")
            self.log.note(f"The {presets.DEFAULT_PRESET!r} preset was not found; using the default settings.")
        dataset = str(s.value("last/dataset", "") or "")
        folder = Path(dataset) if dataset and Path(dataset).is_dir() else self._config_dataset()
        self.datasets.open_folder(folder, remember=False)
        self.tabs.setCurrentIndex(int(s.value("window/tab", 0) or 0))
        self.runs.refresh()

    def save_session(self) -> None:
        s = self.settings
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/splitter", self.splitter.saveState())
        s.setValue("window/tab", self.tabs.currentIndex())
        s.setValue("last/preset", self.presets.current_name)
        current = self.datasets.current_path()
        s.setValue("last/dataset", str(current) if current else "")
        s.sync()

    # -- settings, dataset and preset wiring -----------------------------------------------------------------
    def _config_dataset(self) -> Path:
        text = str(self.form.values()["data"]["path"]).strip()
        return Path(text).expanduser() if text else paths.demo_dataset_dir()

    def _dataset_opened(self, folder: str) -> None:
        if same_folder(folder, self._config_dataset()):
            return
        self.form.set_value("data.path", "" if same_folder(folder, paths.demo_dataset_dir()) else folder)

    def _data_path_edited(self) -> None:
        folder = self._config_dataset()
        current = self.datasets.current_path()
        if folder.is_dir() and (current is None or not same_folder(folder, current)):
            self.datasets.open_folder(folder, remember=False)

    def _preset_loaded(self, name: str) -> None:
        self.log.note(f"settings loaded from {name!r}")
        self._data_path_edited()

    def _settings_changed(self) -> None:
        config = self.form.config()
        if config is not None:
            self.datasets.set_resolution(config.data.resolution)
            self.schedule.set_inputs(config.diffusion, resolution=config.data.resolution,
                                     image=self.datasets.first_image(), loss=config.loss, train=config.train,
                                     images_per_epoch=self._images_per_epoch(config))
        self._update_can_train()

    def _images_per_epoch(self, config: RunConfig) -> int | None:
        """Training images per epoch of the open dataset (for the LR preview's step count), None unknown."""
        report = self.datasets.report
        if report is None or not same_folder(report["root"], self._config_dataset()):
            return None
        return max(1, round(report["counts"]["repeats_total"] * (1 - config.data.val_split)))

    def _update_can_train(self) -> None:
        problems = self.form.problems()
        report = self.datasets.report
        if report is not None and same_folder(report["root"], self._config_dataset()) and not report["usable"]:
            problems.append(f"dataset: {report['summary']} Pick another folder or fix the problems listed in "
                            "the health report.")
        if report is not None and same_folder(report["root"], self._config_dataset()):
            config = self.form.config()
            self.schedule.set_inputs(image=self.datasets.first_image(),
                                     images_per_epoch=self._images_per_epoch(config) if config else None)
        self.train_bar.set_can_train(problems)

    # -- training ---------------------------------------------------------------------------------------------
    def start_training(self) -> None:
        config = self.form.config()
        if config is None or self.runner.is_running() or self.form.problems():
            return
        self.settings.setValue("last/preset", self.presets.current_name)
        self._start_run(config, default_run_dir(self._run_label(config)))

    def _run_label(self, config: RunConfig) -> str:
        return config.name or self.presets.current_name or "custom"

    def _start_run(self, config: RunConfig, run_dir: Path, *, resume: bool = False) -> None:
        """Start the worker on a run (a fresh folder, or a run to resume) and show its history."""
        if resume:
            self.plots.load_rows(RunFolder(run_dir).metrics_rows())
            self.samples.set_entries(read_run_samples(run_dir))
        else:
            self.plots.clear()
            self.samples.set_entries([])
        self.latest_sample.set_image(None)
        self.log.note(f"{'resuming' if resume else 'starting'} a run in {run_dir}")
        self.runner.start(config, run_dir, resume=resume)
        self.tabs.setCurrentWidget(self.training_tab)

    def resume_run(self, run_dir: Path) -> None:
        if self.runner.is_running():
            show_error(self, "A run is in progress", "Stop the current run before resuming another one.")
            return
        try:
            config = load_run_config(run_dir)
        except UserError as exc:
            show_error(self, "Run not resumed", str(exc), hint="Choose a run folder made by sdstudio.")
            return
        self.presets.apply_config(config, f"run {run_dir.name}")
        self._start_run(config, run_dir, resume=True)

    def stop_training(self) -> None:
        if self.queue.active:
            self.queue.halt = True  # the queue ends with this run, whichever way it ends
        if self.runner.is_running():
            self.runner.stop()
            self.train_bar.stop_requested()
            self.log.note("stop requested: the run saves a checkpoint after the current step")
            if not self._stop_watchdog.isActive():
                self._stop_watchdog.start(close_control.STOP_TIMEOUT_MS)

    def _pause(self) -> None:
        self.runner.pause()
        self.train_bar.set_paused(True)

    def _resume(self) -> None:
        self.runner.resume()
        self.train_bar.set_paused(False)

    def _running_changed(self, running: bool) -> None:
        self.train_bar.set_running(running)
        self.form.setEnabled(not running)
        self.fit_bar.setEnabled(not running)
        self.presets.setEnabled(not running)
        self.queue.set_runner_busy(running)
        self._update_can_train()
        if not running:
            self._stop_watchdog.stop()
            self._close_stop_box()
            self.runs.refresh()
            if self.queue.active:
                self._queued_run_ended()
            if self._quit_when_idle:
                self.close()

    def on_event(self, event: ev.Event) -> None:
        """Every event from the worker, on the GUI thread, in order."""
        self.train_bar.add_event(event)
        self.plots.add_event(event)
        if self.queue.active:
            self.queue.observe(event)
        if isinstance(event, ev.Started):
            self.run_dir = event.run_dir
            self.statusBar().showMessage(f"Run folder: {event.run_dir}")
            self.schedule.clear_learned()
            if event.resumed_from_step:
                self.plots.truncate_after(event.resumed_from_step)
                self.samples.truncate_after(event.resumed_from_step)
            self.log.note(f"training {event.total_steps} steps"
                          + (f" from step {event.resumed_from_step}" if event.resumed_from_step else ""))
        elif isinstance(event, ev.Status):
            if event.phase != "training":
                self.log.note(f"{event.phase}: {event.text}")
        elif isinstance(event, ev.SampleGrid):
            self.samples.add_grid(event)
            self.latest_sample.set_image(event.image)
        elif isinstance(event, ev.CheckpointSaved):
            self.log.note(f"checkpoint saved at step {event.step}: {event.path}")
        elif isinstance(event, ev.Warning):
            self.log.note(f"warning: {event.text}")
            self.statusBar().showMessage(event.text, 10_000)
        elif isinstance(event, ev.Finished):
            self.log.note(f"run {event.reason} at step {event.step}: {event.run_dir}")
            self.statusBar().showMessage(f"Run {event.reason} at step {event.step}: {event.run_dir}")
        elif isinstance(event, ev.EvalResult):
            self.log.note(f"evaluation at step {event.step}: {self.plots.eval_label.text()}")
        elif isinstance(event, ev.Failed):
            self._show_failure(event)
        elif isinstance(event, ev.LearnedSchedule):
            self.schedule.show_learned(event.step, event.timesteps, event.log10_snr)

    def _show_failure(self, event: ev.Failed) -> None:
        self.log.note(f"run failed: {event.message}")
        if self.queue.active:  # marked in the queue; the queue goes on without a dialog per failure
            self.statusBar().showMessage(f"A queued run failed: {event.message}", 10_000)
            return
        if event.resumable_from is not None:
            hint = (f"The run can be resumed from its checkpoint {event.resumable_from.name}: select it in the "
                    "Runs tab and click Resume.")
        elif event.kind == "input":
            hint = "Fix the setting or file named above, then click Train again."
        else:
            hint = "The details below and the run's run.log say more."
        self.failure_box = show_error(self, "Training failed", event.message, details=event.details, hint=hint)

    def _show_run_samples(self, run_dir: Path) -> None:
        self.samples.set_entries(read_run_samples(run_dir))
        self.tabs.setCurrentWidget(self.samples)

    # -- export ---------------------------------------------------------------------------------------------
    def open_export(self, run_dir: Path) -> ExportDialog | None:
        """The export dialog for a run (window-modal, not blocking: training events keep arriving)."""
        self.export_dialog = open_export_dialog(run_dir, self)
        if self.export_dialog is not None:
            self.export_dialog.exported.connect(self._exported)
        return self.export_dialog

    def export_current_run(self) -> ExportDialog | None:
        """File → Export model…: the run selected in the Runs tab, else the newest run with a checkpoint."""
        run_dir = self.runs.selected_path()
        if run_dir is None:
            candidates = [p for p in (self.run_dir,) if p is not None and run_checkpoints(p)]
            candidates += [s.path for s in self.runs.summaries.values() if s.has_checkpoint]
            run_dir = candidates[0] if candidates else None
        if run_dir is None:
            show_error(self, "Nothing to export", "No run with a checkpoint was found.",
                       hint="Train a run first (or select one in the Runs tab), then export it.")
            return None
        return self.open_export(run_dir)

    def _exported(self, path: Path) -> None:
        self.log.note(f"exported: {path}")
        self.statusBar().showMessage(f"Exported to {path}", 10_000)

    # -- comparison -----------------------------------------------------------------------------------------
    def _tab_changed(self, _index: int) -> None:
        if self.tabs.currentWidget() is self.compare:
            self.compare.refresh_sweeps()  # a sweep run from the command line meanwhile shows up

    def compare_runs(self, run_dirs: list[Path], title: str = "") -> None:
        self.compare.set_runs(list(run_dirs), title)
        self.tabs.setCurrentWidget(self.compare)
