"""The training worker: a QObject on its own QThread that iterates the core's ``train()`` generator and
forwards every event as a queued signal. Control (stop, pause, sample/save now) goes only through the
core's thread-safe TrainingControl; queued slots would never reach a worker busy in a training step."""

from __future__ import annotations

import gc
import logging
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from sdstudio.core import events as ev
from sdstudio.core.config import RunConfig
from sdstudio.core.control import TrainingControl
from sdstudio.core.runs import RunFolder
from sdstudio.core.train.loop import train  # module global: tests replace it to inject failures

from . import qt_compat  # noqa: F401 - first: guards PySide6 6.12.0 on Python < 3.12

log = logging.getLogger("sdstudio")


class TrainingWorker(QObject):
    """Runs one training run when ``run`` is invoked on its thread (or, given ``events``, iterates the stream it
    makes from the control: a search sweep's runs one after another)."""

    event = Signal(object)  # every core Event, in order
    done = Signal()  # after the last event (Finished or Failed), always

    def __init__(self, config: RunConfig | None, control: TrainingControl, run_dir: Path | None, resume: bool,
                 events: Callable[[TrainingControl], Iterator[ev.Event]] | None = None) -> None:
        super().__init__()
        self.config, self.control, self.run_dir, self.resume = config, control, run_dir, resume
        self.events = events

    @Slot()
    def run(self) -> None:
        ended = False
        try:
            stream = (self.events(self.control) if self.events is not None else
                      train(self.config, self.control, run_dir=self.run_dir, resume=self.resume))
            for event in stream:
                ended = ended or isinstance(event, (ev.Finished, ev.Failed))
                self.event.emit(event)
        except Exception as exc:  # noqa: BLE001 - the engine failed outside its own handling: report it
            details = traceback.format_exc()
            log.error("the training worker failed: %s\n%s", exc, details)
            self.event.emit(ev.Failed(f"The training thread failed: {type(exc).__name__}: {exc}", details,
                                      _newest_checkpoint(self.run_dir), self.run_dir))
            ended = True
        finally:
            if not ended and self.events is None:  # a stream of several runs (a search) says its own end
                self.event.emit(ev.Failed("The training run ended without saying why.", "",
                                          _newest_checkpoint(self.run_dir), self.run_dir))
            self.done.emit()


def _newest_checkpoint(run_dir: Path | None) -> Path | None:
    return RunFolder(run_dir).newest_valid_checkpoint_or_none() if run_dir is not None else None


def freeze_heap() -> None:
    """Collect, then move every live object to the permanent generation (gc.freeze).

    A full collection of this process (torch, diffusers, Qt: ~500k objects) holds the GIL for ~0.5 s. The
    engine runs one when a run ends (accelerate's free_memory) and Python runs them now and then on its
    own; whichever thread does it, the GUI thread waits for the GIL. Frozen objects are skipped, so those
    collections only scan what the run itself allocated. Collecting first keeps a previous run's garbage
    from being frozen; it is quick after the first freeze, which run_app does at start-up.
    """
    gc.collect()
    gc.freeze()


class TrainingRunner(QObject):
    """Starts, steers and joins the worker thread; one run at a time."""

    event = Signal(object)
    running_changed = Signal(bool)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.control: TrainingControl | None = None
        self.thread: QThread | None = None
        self.worker: TrainingWorker | None = None
        self.run_dir: Path | None = None

    def is_running(self) -> bool:
        return self.thread is not None

    def start(self, config: RunConfig | None, run_dir: Path | None, *, resume: bool = False,
              events: Callable[[TrainingControl], Iterator[ev.Event]] | None = None) -> None:
        """Train ``config`` in ``run_dir``; or, with ``events``, iterate that stream (e.g. a search sweep)."""
        if self.is_running():
            raise RuntimeError("a run is in progress")
        freeze_heap()
        self.control = TrainingControl()
        self.run_dir = run_dir
        thread = QThread(self)
        thread.setObjectName("sdstudio-training")
        worker = TrainingWorker(config, self.control, run_dir, resume, events)
        worker.moveToThread(thread)
        thread.started.connect(worker.run)
        worker.event.connect(self.event)  # queued: the worker lives on the other thread
        # direct: QThread.quit is thread-safe, and a queued call would wait for the GUI thread, which may be
        # blocked in shutdown() waiting for this very thread
        worker.done.connect(thread.quit, Qt.ConnectionType.DirectConnection)
        thread.finished.connect(self._joined)
        self.thread, self.worker = thread, worker
        thread.start()
        self.running_changed.emit(True)

    @Slot()
    def _joined(self) -> None:
        if self.thread is None:  # joined already (shutdown waits, then the queued finished signal arrives)
            return
        thread, worker = self.thread, self.worker
        self.thread = self.worker = None
        thread.wait()
        thread.deleteLater()
        if worker is not None:
            worker.deleteLater()
        self.running_changed.emit(False)

    # -- control (thread-safe flags the loop polls between steps) ------------------------------------------
    def stop(self) -> None:
        if self.control is not None:
            self.control.request_stop()

    def pause(self) -> None:
        if self.control is not None:
            self.control.pause()

    def resume(self) -> None:
        if self.control is not None:
            self.control.resume()

    def sample_now(self) -> None:
        if self.control is not None:
            self.control.request_sample()

    def save_now(self) -> None:
        if self.control is not None:
            self.control.request_save()

    def shutdown(self, timeout_ms: int = 60_000) -> bool:
        """Ask the run to stop (it saves a checkpoint), wait for the thread; False if it did not end in time."""
        thread = self.thread
        if thread is None:
            return True
        self.stop()
        if not thread.wait(timeout_ms):
            return False
        self._joined()
        return True
