"""The dataset health report: summary, counts, histograms, and the clickable problem list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import QLabel, QPlainTextEdit, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from sdstudio.core.data.report import format_report

PROBLEM_PATH_ROLE = Qt.ItemDataRole.UserRole + 1
_COLORS = {"error": QColor(190, 30, 30), "warning": QColor(170, 110, 0)}


class ReportPanel(QWidget):
    """Shows ``build_report`` output; clicking a problem emits the file it names."""

    problem_selected = Signal(Path)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._root: Path | None = None
        self.summary = QLabel("No dataset checked yet.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.problems = QTreeWidget()
        self.problems.setHeaderLabels(["", "Problem", "File", "What to do"])
        self.problems.setRootIsDecorated(False)
        self.problems.setAlternatingRowColors(True)
        self.problems.setColumnWidth(0, 64)
        self.problems.setColumnWidth(1, 120)
        self.problems.setColumnWidth(2, 170)
        self.problems.itemClicked.connect(self._clicked)
        self.problems.itemActivated.connect(self._clicked)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        mono = QFont("DejaVu Sans Mono")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        mono.setPointSize(8)
        self.details.setFont(mono)
        self.details.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.summary)
        layout.addWidget(QLabel("<b>Problems</b> (click one to select its file)"))
        layout.addWidget(self.problems, 1)
        layout.addWidget(QLabel("<b>Details</b>"))
        layout.addWidget(self.details, 2)

    def set_scanning(self, done: int, total: int) -> None:
        self.summary.setText(f"Checking the dataset… {done} of {total} images" if total else
                             "Checking the dataset…")

    def set_error(self, message: str) -> None:
        self.summary.setText(f"<span style='color:#b00'>{message}</span>")
        self.problems.clear()
        self.details.setPlainText("")

    def set_report(self, report: dict[str, Any], *, preliminary: bool = False) -> None:
        self._root = Path(report["root"])
        counts = report["counts"]
        colour = "#1a7f37" if report["usable"] and not counts["errors"] else ("#b00" if not report["usable"]
                                                                              else "#9a6700")
        note = " <i>(quick check; decoding and duplicate search running…)</i>" if preliminary else ""
        self.summary.setText(f"<span style='color:{colour}'><b>{report['summary']}</b></span>{note}")
        self.problems.clear()
        items = []
        for problem in report["problems"]:
            item = QTreeWidgetItem([problem["severity"], problem["kind"].replace("_", " "), problem["path"],
                                    problem["fix"]])
            item.setForeground(0, QBrush(_COLORS.get(problem["severity"], QColor("black"))))
            item.setToolTip(2, problem["message"])
            item.setToolTip(3, problem["fix"])
            item.setData(0, PROBLEM_PATH_ROLE, problem["path"])
            items.append(item)
        self.problems.addTopLevelItems(items)
        if not items:
            empty = QTreeWidgetItem(["", "none", "", "nothing to fix"])
            empty.setFlags(Qt.ItemFlag.NoItemFlags)
            self.problems.addTopLevelItem(empty)
        self.details.setPlainText(format_report(report))

    def problem_count(self) -> int:
        return sum(1 for i in range(self.problems.topLevelItemCount())
                   if self.problems.topLevelItem(i).data(0, PROBLEM_PATH_ROLE))

    def _clicked(self, item: QTreeWidgetItem, _column: int = 0) -> None:
        rel = item.data(0, PROBLEM_PATH_ROLE)
        if rel and self._root is not None:
            self.problem_selected.emit(self._root / rel)
