"""The Tags dialog: the dataset's tag table, image filters (with / without tags), bulk edits with a preview
before anything is written, and undo. Reading and writing run off the GUI thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QThreadPool, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.data import tags as tag_ops
from sdstudio.core.data.caption_edits import dataset_tag_table, plan_dataset_edit, write_plan
from sdstudio.core.data.caption_store import DatasetCaptions
from sdstudio.core.data.undo_journal import list_entries, undo_last

from ..background import run_in_background

# label -> (needs a tag, needs a second value, the operation)
OPERATIONS: dict[str, tuple[bool, bool, Any]] = {
    "Rename tag": (True, True, tag_ops.rename),
    "Remove tag": (True, False, tag_ops.remove),
    "Add tag (at the end)": (True, False, lambda tag: tag_ops.add(tag, first=False)),
    "Add tag first": (True, False, lambda tag: tag_ops.add(tag, first=True)),
    "Move tag first": (True, False, tag_ops.move_first),
    "Replace text in tags": (True, True, tag_ops.replace_text),
    "Remove duplicate tags": (False, False, tag_ops.dedupe),
}
PREVIEW_LINES = 200


def _tag_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


class TagsDialog(QDialog):
    """Bulk tag editing for ``folder``; ``captions_changed`` fires after an edit or an undo."""

    captions_changed = Signal()

    def __init__(self, folder: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.folder = Path(folder)
        self.setWindowTitle(f"Tags of {self.folder.name}")
        self.resize(820, 560)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self.captions: DatasetCaptions | None = None
        self.plan: tag_ops.TagEditPlan | None = None
        self.busy = False
        self._note = ""  # said before the counts once the table is read again

        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Tag", "Images"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.itemSelectionChanged.connect(self._tag_picked)

        self.where = QLineEdit()
        self.where.setPlaceholderText("only images with all of these tags (comma-separated)")
        self.where_not = QLineEdit()
        self.where_not.setPlaceholderText("and none of these")
        self.operation = QComboBox()
        self.operation.addItems(list(OPERATIONS))
        self.operation.currentIndexChanged.connect(self._operation_changed)
        self.tag = QLineEdit()
        self.value = QLineEdit()
        self.include_prose = QCheckBox("Edit prose captions too (split at commas)")
        for edit in (self.where, self.where_not, self.tag, self.value):
            edit.textChanged.connect(self._invalidate)
        self.operation.currentIndexChanged.connect(self._invalidate)
        self.include_prose.toggled.connect(self._invalidate)
        form = QFormLayout()
        form.addRow("With tags", self.where)
        form.addRow("Without tags", self.where_not)
        form.addRow("Edit", self.operation)
        form.addRow("Tag", self.tag)
        form.addRow("New", self.value)
        form.addRow("", self.include_prose)
        self._form = form

        self.preview = QPlainTextEdit()
        self.preview.setReadOnly(True)
        self.preview.setPlaceholderText("Preview shows every caption the edit changes, before anything is written.")
        self.status = QLabel("Reading captions…")
        self.status.setWordWrap(True)
        self.preview_button = QPushButton("Preview")
        self.preview_button.clicked.connect(self.make_preview)
        self.apply_button = QPushButton("Apply")
        self.apply_button.clicked.connect(self.apply)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.clicked.connect(self.undo)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        for button in (self.preview_button, self.apply_button, self.undo_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)

        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addLayout(form)
        right_layout.addWidget(self.preview, 1)
        splitter = QSplitter()
        splitter.addWidget(self.table)
        splitter.addWidget(right)
        splitter.setSizes([300, 520])
        layout = QVBoxLayout(self)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self._operation_changed()
        self.reload()

    # -- state ----------------------------------------------------------------------------------------
    def _update_buttons(self) -> None:
        ready = not self.busy and self.captions is not None
        self.preview_button.setEnabled(ready)
        self.apply_button.setEnabled(ready and self.plan is not None and bool(self.plan.changes))
        self.undo_button.setEnabled(not self.busy and bool(list_entries(self.folder)))

    def _invalidate(self) -> None:
        self.plan = None
        self._update_buttons()

    def _operation_changed(self) -> None:
        needs_tag, needs_value, _op = OPERATIONS[self.operation.currentText()]
        self._form.setRowVisible(self.tag, needs_tag)
        self._form.setRowVisible(self.value, needs_value)

    def _tag_picked(self) -> None:
        rows = {i.row() for i in self.table.selectedItems()}
        if len(rows) == 1:
            item = self.table.item(rows.pop(), 0)
            if item is not None:
                self.tag.setText(item.text())

    def _start(self, job: Any, on_done: Any) -> None:
        self.busy = True
        self._update_buttons()
        run_in_background(job, on_done, self._failed, pool=self._pool)

    def _failed(self, message: str, _details: str) -> None:
        self.busy = False
        self.status.setText(message)
        self._update_buttons()

    # -- reading --------------------------------------------------------------------------------------
    def reload(self) -> None:
        include_prose = self.include_prose.isChecked()
        self._start(lambda: dataset_tag_table(self.folder, include_prose), self._loaded)

    def _loaded(self, result: tuple[DatasetCaptions, list[tag_ops.TagRow]]) -> None:
        self.busy = False
        self.captions, rows = result
        self.plan = None
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            count = QTableWidgetItem()
            count.setData(0, row.count)  # a number, so the column sorts numerically
            self.table.setItem(i, 0, QTableWidgetItem(row.tag))
            self.table.setItem(i, 1, count)
        note, self._note = self._note, ""
        self.status.setText(f"{note}{len(rows)} tag(s) in {len(self.captions.entries)} image(s) "
                            f"({self.captions.layout} layout).")
        self._update_buttons()

    # -- editing --------------------------------------------------------------------------------------
    def _operation(self) -> tag_ops.TagOperation | None:
        needs_tag, _needs_value, make = OPERATIONS[self.operation.currentText()]
        tag, value = self.tag.text().strip(), self.value.text()
        if needs_tag and not tag:
            self.status.setText("Type a tag (or pick one in the table) first.")
            return None
        if make is tag_ops.rename:
            if not value.strip():
                self.status.setText("Type the new name first.")
                return None
            return make(tag, value.strip())
        if make is tag_ops.replace_text:
            return make(self.tag.text(), value)  # raw text: spaces matter ("_" -> " ")
        return make(tag) if needs_tag else make()

    def make_preview(self) -> None:
        if self.captions is None:
            return
        operation = self._operation()
        if operation is None:
            return
        selection = tag_ops.TagFilter(_tag_list(self.where.text()), _tag_list(self.where_not.text()))
        self.plan = plan_dataset_edit(self.captions, [operation], selection, self.include_prose.isChecked())
        lines: list[str] = []
        for image, (old, new) in sorted(self.plan.changes.items())[:PREVIEW_LINES]:
            lines += [self.captions.relative(image), f"  - {old.strip() if old else '(no caption)'}",
                      f"  + {new.strip()}"]
        if len(self.plan.changes) > PREVIEW_LINES:
            lines.append(f"… and {len(self.plan.changes) - PREVIEW_LINES} more")
        self.preview.setPlainText("\n".join(lines))
        prose = f"; {self.plan.skipped_prose} with prose lines left alone" if self.plan.skipped_prose else ""
        self.status.setText(f"{len(self.plan.changes)} of {self.plan.matched} selected caption(s) change{prose}. "
                            "Apply writes them (undoable).")
        self._update_buttons()

    def apply(self) -> None:
        if self.captions is None or self.plan is None or not self.plan.changes:
            return
        captions, plan = self.captions, self.plan
        label = f"tags: {self.operation.currentText().lower()} {self.tag.text().strip()}".strip()
        self._start(lambda: (write_plan(captions, plan, label), len(plan.changes)), self._applied)

    def _applied(self, result: tuple[Any, int]) -> None:
        self.busy = False
        self.preview.clear()
        self._note = f"{result[1]} caption(s) changed; Undo last restores them. "
        self.captions_changed.emit()
        self.reload()

    def undo(self) -> None:
        self._start(lambda: undo_last(self.folder), self._undone)

    def _undone(self, result: Any) -> None:
        self.busy = False
        self._note = f"Undone: {result.label} ({len(result.restored)} restored, {len(result.removed)} removed). "
        self.captions_changed.emit()
        self.reload()

    def closeEvent(self, event: Any) -> None:
        self._pool.waitForDone(30_000)
        super().closeEvent(event)
