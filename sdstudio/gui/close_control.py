"""The main window's closing: asking what to do with a run still going (stop and quit, quit when it ends, keep
training), waiting for an export, and the watchdog that offers to quit when a stop request is not answered in
time. A mixin of MainWindow (its state, the runner, the export dialog and the log, are the window's)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import QMessageBox

STOP_TIMEOUT_MS = 120_000  # a stop request not answered by then: say so and offer to quit anyway
CLOSE_STOP, CLOSE_LATER, CLOSE_KEEP = "stop", "later", "keep"


class CloseControl:
    runner: Any
    export_dialog: Any
    stop_box: QMessageBox | None
    force_quit: bool
    _quit_when_idle: bool
    _stop_watchdog: Any
    _stop_quit_button: Any
    log: Any
    datasets: Any
    runs: Any
    compare: Any

    if TYPE_CHECKING:  # the window's (QMainWindow's and MainWindow's); not defined here, so nothing is shadowed
        def statusBar(self) -> Any: ...
        def stop_training(self) -> None: ...
        def save_session(self) -> None: ...
        def close(self) -> bool: ...

    def ask_close_choice(self) -> str:
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Training is running")
        box.setText("A training run is in progress.")
        box.setInformativeText("Stop it (a resumable checkpoint is saved first) and quit, quit when it ends, or "
                               "keep training?")
        stop = box.addButton("Stop, save and quit", QMessageBox.ButtonRole.AcceptRole)
        later = box.addButton("Quit when it ends", QMessageBox.ButtonRole.ActionRole)
        keep = box.addButton("Keep training", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(keep)
        box.exec()
        clicked = box.clickedButton()
        return CLOSE_STOP if clicked is stop else CLOSE_LATER if clicked is later else CLOSE_KEEP

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.export_dialog is not None and self.export_dialog.busy and not self.force_quit:
            # quitting would end the export half-way (nothing corrupt: it is written atomically, but lost)
            self.statusBar().showMessage("An export is being written: sdstudio can close when it is done")
            self.export_dialog.raise_()
            event.ignore()
            return
        if self.runner.is_running() and not self.force_quit:
            choice = self.ask_close_choice()
            if choice == CLOSE_STOP:
                self._quit_when_idle = True
                self.stop_training()
                self._stop_watchdog.start(STOP_TIMEOUT_MS)
            elif choice == CLOSE_LATER:
                self._quit_when_idle = True
                self.statusBar().showMessage("sdstudio quits when the run ends")
            else:
                self._quit_when_idle = False
            event.ignore()
            return
        self.save_session()
        self.datasets.shutdown()
        self.runs.shutdown()
        self.compare.shutdown()
        self.log.detach()
        event.accept()

    def shutdown_for_quit(self) -> None:
        """On application quit: a run still going is stopped (it saves a checkpoint) and its thread joined."""
        if not self.force_quit and not self.runner.shutdown(STOP_TIMEOUT_MS):
            self.force_quit = True

    def _stop_not_answered(self) -> None:
        """The watchdog: a stop request not answered in time. Says so and offers to quit (not blocking: the
        window stays usable, and the box closes itself when the run does stop)."""
        if not self.runner.is_running() or (self.stop_box is not None and self.stop_box.isVisible()):
            return
        waited = STOP_TIMEOUT_MS / 1000
        box = QMessageBox(self)
        box.setObjectName("stopNotAnswered")
        box.setIcon(QMessageBox.Icon.Warning)
        box.setWindowTitle("The run does not stop")
        box.setText(f"The training thread has not answered the stop request for {waited:g} s (a long step, or "
                    "it hangs).")
        box.setInformativeText("Quit anyway? The newest checkpoint on disk stays resumable. Or keep waiting: this "
                               "message closes itself when the run stops.")
        self._stop_quit_button = box.addButton("Quit anyway", QMessageBox.ButtonRole.DestructiveRole)
        wait = box.addButton("Keep waiting", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(wait)
        box.finished.connect(self._stop_box_answered)
        self.stop_box = box
        self.log.note(f"the run has not answered the stop request for {waited:g} s")
        box.open()

    def _stop_box_answered(self, _result: int) -> None:
        box, self.stop_box = self.stop_box, None
        if box is None:
            return
        box.deleteLater()
        if not self.runner.is_running():
            return
        if box.clickedButton() is self._stop_quit_button:
            self.log.note("quitting without waiting for the run to stop")
            self.force_quit = True
            self.close()
        else:
            self._stop_watchdog.start(STOP_TIMEOUT_MS)

    def _close_stop_box(self) -> None:
        box, self.stop_box = self.stop_box, None  # cleared first: closing it is not an answer
        if box is not None:
            box.done(0)
            box.deleteLater()
