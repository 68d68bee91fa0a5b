"""The run queue: settings waiting to train, one after another, through the same worker as the Train button.

The panel keeps the list and each item's state (saved to disk after every change and restored when the app
starts: core/run_queue.py; rows reorder by drag and drop); the main window starts the runs and tells the
panel what happened (``observe`` for each event, ``run_ended`` when the thread was joined). A failed run is
marked and the queue goes on; a stopped run stops the queue (Run queue again resumes it from its checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QDropEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core import events as ev
from sdstudio.core import paths
from sdstudio.core.config import RunConfig
from sdstudio.core.run_queue import SavedItem, load_queue, save_queue
from sdstudio.core.runs import RunFolder

STATE_COLORS = {"running": "#1957be", "completed": "#287d3c", "failed": "#b3261e", "stopped": "#9a6700"}
TO_RUN = ("pending", "stopped")


@dataclass
class QueueItem:
    config: RunConfig
    label: str  # the run folder's name part (<stamp>-<label>)
    description: str = ""  # what distinguishes it (the preset and its changes, a sweep's values)
    status: str = "pending"  # pending | running | completed | failed | stopped
    run_dir: Path | None = None
    message: str = ""
    resumable: bool = False
    ident: int = field(default=0)

    @property
    def dataset(self) -> str:
        path = self.config.data.path
        return Path(path).name if path else f"{paths.demo_dataset_dir().name} (demo)"


class QueueTree(QTreeWidget):
    """The queue's list; rows are reordered by drag and drop (``reordered`` says so after a drop)."""

    reordered = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.setDragEnabled(True)
        self.setAcceptDrops(True)
        self.setDropIndicatorShown(True)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)

    def dropEvent(self, event: QDropEvent) -> None:
        super().dropEvent(event)
        self.reordered.emit()


IDENT_ROLE = Qt.ItemDataRole.UserRole + 3


class QueuePanel(QWidget):
    """The Queue tab: the list, reorder / remove, and Run queue / Stop."""

    add_requested = Signal()  # "Add current settings": the window validates and calls add()
    sweep_requested = Signal()
    run_requested = Signal()
    stop_requested = Signal()
    compare_requested = Signal(list)  # list[Path] of the runs the queue made

    def __init__(self, parent: QWidget | None = None, *, persist: bool = True) -> None:
        super().__init__(parent)
        self.items: list[QueueItem] = []
        self.active = False  # the queue is running its items
        self.halt = False  # stop after the current run (Stop was pressed)
        self.current: QueueItem | None = None
        self._next_ident = 1

        self.tree = QueueTree()
        self.tree.reordered.connect(self.sync_order_from_tree)
        self.tree.setToolTip("Drag a run to change the order")
        self.tree.setHeaderLabels(["#", "Run", "Dataset", "Settings", "Status", "Run folder"])
        self.tree.setRootIsDecorated(False)
        self.tree.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        for column, width in enumerate((36, 200, 130, 260, 160)):
            self.tree.setColumnWidth(column, width)
        self.tree.itemSelectionChanged.connect(self._update_buttons)

        self.add_button = QPushButton("Add current settings")
        self.add_button.setToolTip("Queue a run with the settings and dataset on the left, as they are now")
        self.add_button.clicked.connect(self.add_requested)
        self.sweep_button = QPushButton("Sweep…")
        self.sweep_button.setToolTip("Queue a grid of runs: every combination of values for a few settings")
        self.sweep_button.clicked.connect(self.sweep_requested)
        self.up_button = QPushButton("Move up")
        self.up_button.clicked.connect(lambda: self.move_selected(-1))
        self.down_button = QPushButton("Move down")
        self.down_button.clicked.connect(lambda: self.move_selected(1))
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_selected)
        self.clear_button = QPushButton("Clear finished")
        self.clear_button.setToolTip("Remove the completed and failed runs from the list (their folders stay)")
        self.clear_button.clicked.connect(self.clear_finished)
        self.run_button = QPushButton("Run queue")
        self.run_button.setObjectName("runQueueButton")
        self.run_button.setStyleSheet("QPushButton#runQueueButton:enabled { font-weight: bold; }")
        self.run_button.clicked.connect(self.run_requested)
        self.stop_button = QPushButton("Stop queue")
        self.stop_button.setToolTip("Stop the current run (it saves a resumable checkpoint) and the queue")
        self.stop_button.clicked.connect(self.stop_requested)
        self.compare_button = QPushButton("Compare runs")
        self.compare_button.setToolTip("Compare the runs the queue made: a table and their curves overlaid")
        self.compare_button.clicked.connect(lambda: self.compare_requested.emit(self.finished_runs()))
        top = QHBoxLayout()
        for button in (self.add_button, self.sweep_button, self.up_button, self.down_button, self.remove_button,
                       self.clear_button):
            top.addWidget(button)
        top.addStretch(1)
        bottom = QHBoxLayout()
        bottom.addWidget(self.run_button)
        bottom.addWidget(self.stop_button)
        bottom.addWidget(self.compare_button)
        bottom.addStretch(1)
        self.status = QLabel("Add the current settings or a sweep, then click Run queue. Runs train one after "
                             "another; a failed run is marked and the queue goes on; Stop stops the queue.")
        self.status.setWordWrap(True)
        self.counts = QLabel("")
        bottom.addWidget(self.counts)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.tree, 1)
        layout.addWidget(self.status)
        layout.addLayout(bottom)
        self._runner_busy = False
        self.persist = persist
        if persist:
            self.restore()
        self._refresh()

    # -- the list --------------------------------------------------------------------------------------------
    def add(self, config: RunConfig, label: str, description: str = "") -> QueueItem:
        item = QueueItem(config, label, description, ident=self._next_ident)
        self._next_ident += 1
        self.items.append(item)
        self._refresh()
        return item

    def selected_index(self) -> int | None:
        item = self.tree.currentItem()
        if item is None or not item.isSelected():
            return None
        return self.tree.indexOfTopLevelItem(item)

    def select(self, index: int) -> None:
        if 0 <= index < self.tree.topLevelItemCount():
            self.tree.setCurrentItem(self.tree.topLevelItem(index))

    def move(self, index: int, delta: int) -> bool:
        target = index + delta
        if not (0 <= index < len(self.items) and 0 <= target < len(self.items)):
            return False
        self.items.insert(target, self.items.pop(index))
        self._refresh()
        self.select(target)
        return True

    def move_selected(self, delta: int) -> None:
        index = self.selected_index()
        if index is not None:
            self.move(index, delta)

    def remove(self, index: int) -> bool:
        if not 0 <= index < len(self.items) or self.items[index] is self.current:
            return False
        del self.items[index]
        self._refresh()
        self.select(min(index, len(self.items) - 1))
        return True

    def remove_selected(self) -> None:
        index = self.selected_index()
        if index is not None:
            self.remove(index)

    def clear_finished(self) -> None:
        self.items = [i for i in self.items if i.status not in ("completed", "failed") or i is self.current]
        self._refresh()

    def next_item(self) -> QueueItem | None:
        return next((i for i in self.items if i.status in TO_RUN), None)

    def pending_count(self) -> int:
        return sum(i.status in TO_RUN for i in self.items)

    def finished_runs(self) -> list[Path]:
        return [i.run_dir for i in self.items if i.run_dir is not None and i.status != "pending"
                and i.run_dir.is_dir()]

    # -- running (called by the main window) -----------------------------------------------------------------
    def set_runner_busy(self, busy: bool) -> None:
        """Whether the worker is busy (with the queue or a run started elsewhere)."""
        self._runner_busy = busy
        self._update_buttons()

    def start(self) -> None:
        self.active, self.halt = True, False
        self._refresh()

    def finish(self, text: str) -> None:
        self.active, self.halt, self.current = False, False, None
        self.status.setText(text)
        self._refresh()

    def mark_running(self, item: QueueItem, run_dir: Path) -> None:
        item.status, item.run_dir, item.message = "running", run_dir, ""
        self.current = item
        position = self.items.index(item) + 1
        self.status.setText(f"Running {position} of {len(self.items)}: {item.label} in {run_dir}")
        self._refresh()

    def observe(self, event: ev.Event) -> None:
        """An event of the current queued run."""
        item = self.current
        if item is None:
            return
        if isinstance(event, ev.Started):
            item.run_dir = event.run_dir
        elif isinstance(event, ev.Finished):
            done = event.reason in ("completed", "early_stopped")  # early stopping ends a run as planned
            item.status = "completed" if done else "stopped"
            item.message = f"{'early-stopped ' if event.reason == 'early_stopped' else ''}at step {event.step}"
            item.resumable = not done
            self._refresh()
        elif isinstance(event, ev.Failed):
            item.status = "failed"
            item.message = event.message
            item.resumable = event.resumable_from is not None
            self._refresh()

    def run_ended(self) -> QueueItem | None:
        """The current run's thread was joined; returns it (marked failed if it never said how it ended)."""
        item, self.current = self.current, None
        if item is not None and item.status == "running":
            item.status, item.message = "failed", "the run ended without saying why"
        self._refresh()
        return item

    # -- on disk (core/run_queue.py): saved after every change, restored at start ---------------------------------
    def save(self) -> None:
        try:
            save_queue([SavedItem(i.config, i.label, i.description, i.status, i.run_dir, i.message, i.resumable)
                        for i in self.items])
        except OSError as exc:  # the queue still works in memory
            self.status.setText(f"The queue could not be saved ({exc}); it is kept until the app closes.")

    def restore(self) -> None:
        saved, notes = load_queue(has_checkpoint=lambda run_dir: RunFolder(run_dir).has_checkpoint())
        for s in saved:
            item = QueueItem(s.config, s.label, s.description, s.status, s.run_dir, s.message, s.resumable,
                             ident=self._next_ident)
            self._next_ident += 1
            self.items.append(item)
        if notes:
            self.status.setText("Restored the queue. " + " ".join(notes))

    def sync_order_from_tree(self) -> None:
        """After a drag and drop: the items in the order the rows now show."""
        by_ident = {i.ident: i for i in self.items}
        order = [by_ident.get(self.tree.topLevelItem(r).data(0, IDENT_ROLE))
                 for r in range(self.tree.topLevelItemCount())]
        if sorted(i.ident for i in order if i is not None) == sorted(by_ident):
            self.items = [i for i in order if i is not None]
        self._refresh()

    # -- view ------------------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        selected = self.selected_index()
        self.tree.clear()
        for n, item in enumerate(self.items, 1):
            status = item.status
            if item.message and item.status != "running":
                status += f" {item.message}" if item.message.startswith("at step") else f": {item.message}"
            row = QTreeWidgetItem([str(n), item.label, item.dataset, item.description or "–", status,
                                   item.run_dir.name if item.run_dir else ""])
            row.setToolTip(1, str(item.run_dir or "not started yet"))
            row.setToolTip(5, str(item.run_dir or "not started yet"))
            row.setToolTip(3, item.description)
            row.setToolTip(4, item.message or item.status)
            if item.status in STATE_COLORS:
                row.setForeground(4, QColor(STATE_COLORS[item.status]))
            if item.status == "running":
                font = row.font(1)
                font.setBold(True)
                row.setFont(1, font)
            row.setData(0, IDENT_ROLE, item.ident)
            row.setFlags((row.flags() | Qt.ItemFlag.ItemIsDragEnabled) & ~Qt.ItemFlag.ItemIsDropEnabled)
            self.tree.addTopLevelItem(row)
        if selected is not None:
            self.select(min(selected, len(self.items) - 1))
        if self.persist:
            self.save()
        counts = {s: sum(i.status == s for i in self.items) for s in ("pending", "completed", "failed", "stopped")}
        self.counts.setText(f"{len(self.items)} in the queue: " + ", ".join(f"{n} {s}" for s, n in counts.items())
                            + (" · running" if self.active else ""))
        self._update_buttons()

    def _update_buttons(self) -> None:
        index = self.selected_index()
        self.up_button.setEnabled(index is not None and index > 0)
        self.down_button.setEnabled(index is not None and index < len(self.items) - 1)
        self.remove_button.setEnabled(index is not None and self.items[index] is not self.current)
        self.clear_button.setEnabled(any(i.status in ("completed", "failed") for i in self.items))
        self.run_button.setEnabled(not self.active and not self._runner_busy and self.pending_count() > 0)
        self.run_button.setToolTip("Run the pending runs one after another" if self.pending_count() else
                                   "Nothing to run: add the current settings or a sweep first")
        self.stop_button.setEnabled(self.active)
        self.compare_button.setEnabled(len(self.finished_runs()) >= 1)
