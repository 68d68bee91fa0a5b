"""A small sweep dialog: pick a few settings and the values to try; it shows how many runs that makes,
validates every combination with the core's sweep expansion (``core/sweeps/plan.py``, the same checks as
`sdstudio sweep`) and either queues them or writes a sweep file for `sdstudio sweep`.

Method "TPE search" is the file's ``[search]`` table: each row is a range (``1e-4 .. 1e-2 log``, or
``{ min = ..., max = ..., log = true }``) or comma-separated choices, with the number of trials, pruning and
the seed; "Run search" runs it in the app (Optuna, the study in ``<runs>/sweeps/NAME/study.db``, so running it
again resumes it) and the comparison view then shows its trials, the pruned ones marked, and the parameter
importances.

The base of the sweep is the current settings (written next to the sweep file as ``<name>-base.toml``)."""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QCompleter,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.atomic import write_text_atomic
from sdstudio.core.config import RunConfig
from sdstudio.core.config_docs import field_docs
from sdstudio.core.errors import UserError
from sdstudio.core.overrides import parse_set_value
from sdstudio.core.presets import config_to_toml
from sdstudio.core.sweeps.plan import NOT_OVERRIDABLE, SweepPlan, format_value, load_sweep, parse_sweep

PREVIEW_LIMIT = 200  # combinations listed in the dialog (all of them are validated)
METHODS = {"grid": "Grid: every combination", "tpe": "TPE search (Optuna): learns from finished runs"}
_RANGE = re.compile(r"^\s*([-+0-9.eE]+)\s*(?:\.\.|–|to)\s*([-+0-9.eE]+)\s*(log)?\s*$")


def sweep_keys() -> list[str]:
    return [key for key, *_ in field_docs() if key not in NOT_OVERRIDABLE]


def split_values(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: ``[16, 32], [32, 64]`` is two values."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_values(text: str) -> list[Any]:
    """Comma-separated values, each parsed like ``--set`` (a TOML value, else a plain string)."""
    text = text.strip()
    if not text:
        raise UserError("no values: give them separated by commas, e.g. 1e-4, 3e-4")
    try:
        return list(tomllib.loads(f"v = [{text}]")["v"])  # numbers, booleans, quoted strings, [lists]
    except tomllib.TOMLDecodeError:
        pass
    values = split_values(text)
    if any(not v for v in values):
        raise UserError(f"{text!r}: an empty value between commas")
    return [parse_set_value(v) for v in values]


def sweep_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.strip()).strip("-.")[:64] or "sweep"


def sweep_data(name: str, base_file: str, grid: dict[str, Any],
               search: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sweep file's content (docs/sweeps.md): a [grid] table, or with ``search`` settings (method, trials,
    prune, seed) a [search] table of those settings and the ranges."""
    if search is not None:
        return {"name": name, "base_config": base_file, "search": {**search, **grid}}
    return {"name": name, "base_config": base_file, "grid": dict(grid)}


def parse_range(text: str) -> Any:
    """A search row: ``low .. high [log]`` or an inline ``{ min, max, log }`` table is a range; anything else is
    comma-separated choices (read like ``--set``)."""
    match = _RANGE.match(text)
    if match:
        low, high = (parse_set_value(match.group(i)) for i in (1, 2))
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
            raise UserError(f"{text!r}: a range needs two numbers, e.g. 1e-4 .. 1e-2 log")
        return {"min": low, "max": high, **({"log": True} if match.group(3) else {})}
    values = parse_values(text)
    if len(values) == 1 and isinstance(values[0], dict):
        return values[0]
    return values


def _parse_rows(rows: list[tuple[str, str]], parse: Any, twice: str, empty: str) -> dict[str, Any]:
    """``{key: parse(text)}`` from the dialog's rows (blank rows skipped); a row's problem is a UserError naming
    the key; ``twice`` / ``empty``: what to say for a repeated key / no row at all."""
    out: dict[str, Any] = {}
    for key, text in rows:
        key = key.strip()
        if not key and not text.strip():
            continue
        if not key:
            raise UserError(f"values {text!r} without a setting: pick the setting they are for")
        if key in out:
            raise UserError(f"{key}: chosen twice; {twice}")
        try:
            out[key] = parse(text)
        except UserError as exc:
            raise UserError(f"{key}: {exc}") from None
    if not out:
        raise UserError(empty)
    return out


def build_search(rows: list[tuple[str, str]]) -> dict[str, Any]:
    """``{key: range or choices}`` from the dialog's rows in search mode."""
    return _parse_rows(rows, parse_range, "give its range in one row",
                       "choose at least one setting and its range, e.g. 1e-4 .. 1e-2 log")


def describe_range(spec: Any) -> str:
    if isinstance(spec, dict):
        return f"{format_value(spec['min'])} .. {format_value(spec['max'])}" + (" (log)" if spec.get("log") else "")
    return "one of " + ", ".join(format_value(v) for v in spec)


def build_grid(rows: list[tuple[str, str]]) -> dict[str, list[Any]]:
    """``{key: values}`` from the dialog's rows; a row's problem is a UserError naming the key."""
    return _parse_rows(rows, parse_values, "give all its values in one row",
                       "choose at least one setting and the values to try")


def plan_sweep(base: RunConfig, name: str, grid: dict[str, Any], folder: Path,
               search: dict[str, Any] | None = None) -> SweepPlan:
    """Validate with the core's sweep expansion: write the base config and the sweep file into ``folder``."""
    base_file = f"{name}-base.toml"
    write_text_atomic(folder / base_file, config_to_toml(base))
    path = folder / f"{name}.toml"
    try:
        return parse_sweep(sweep_data(name, base_file, grid, search), path=path)
    except UserError as exc:
        raise UserError(str(exc).replace(f"{path}: ", "").replace(f"{path}, ", "")) from None


def write_sweep_file(base: RunConfig, name: str, grid: dict[str, Any], path: Path,
                     search: dict[str, Any] | None = None) -> SweepPlan:
    """Write ``path`` and ``<stem>-base.toml`` beside it (the current settings) and check them by loading."""
    base_file = f"{path.stem}-base.toml"
    write_text_atomic(path.parent / base_file, config_to_toml(base))
    write_text_atomic(path, tomli_w.dumps(sweep_data(name, base_file, grid, search)))
    return load_sweep(path)


def _default_values(base: RunConfig) -> str:
    lr = base.train.learning_rate
    return ", ".join(format_value(v) for v in (lr / 3, lr, lr * 3))


class SweepDialog(QDialog):
    """Emits ``queue_requested(name, plan)`` for "Add to queue" (grid), ``search_requested(plan)`` for "Run
    search" (TPE); writes files itself for "Save sweep file"."""

    queue_requested = Signal(str, object)  # sweep name, SweepPlan
    search_requested = Signal(object)  # SweepPlan of mode "search"

    def __init__(self, base: RunConfig, base_label: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Sweep")
        self.setObjectName("sweepDialog")
        self.base = base
        self.plan: SweepPlan | None = None
        self.error = ""
        self.saved_path: Path | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sdstudio-sweep-")
        self._keys = sweep_keys()
        self._docs = {key: (typ, desc) for key, typ, _default, desc in field_docs()}

        self.intro = intro = QLabel(f"Every combination of the values below trains one run, starting from the current "
                       f"settings ({base_label}). Values are separated by commas and read like <tt>--set</tt>: "
                       "numbers, true/false, text, [lists] for list settings.")
        intro.setWordWrap(True)
        self.name = QLineEdit(sweep_name(f"{base_label}-sweep"))
        self.name.textChanged.connect(self._schedule)
        self.method = QComboBox()
        self.method.setObjectName("sweepMethod")
        for key, label in METHODS.items():
            self.method.addItem(label, key)
        self.method.currentIndexChanged.connect(lambda _i: self._method_changed())
        self.trials = QSpinBox()
        self.trials.setRange(1, 10_000)
        self.trials.setValue(12)
        self.trials.setToolTip("How many runs the search trains ([search] trials)")
        self.prune = QCheckBox("Prune runs that fall behind")
        self.prune.setChecked(True)
        self.prune.setToolTip("Stop a run whose validation loss is worse than the median of the finished runs at "
                              "the same step (Optuna's median rule; needs validation, e.g. train.val_every_steps)")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("The search's own seed: the same seed draws the same trials")
        for widget in (self.trials, self.seed):
            widget.valueChanged.connect(self._schedule)
        self.prune.toggled.connect(self._schedule)
        search_row = QHBoxLayout()
        search_row.addWidget(QLabel("Trials"))
        search_row.addWidget(self.trials)
        search_row.addWidget(self.prune)
        search_row.addWidget(QLabel("Seed"))
        search_row.addWidget(self.seed)
        search_row.addStretch(1)
        self.search_box = QWidget()
        self.search_box.setLayout(search_row)
        self.search_box.setVisible(False)
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["Setting", "Values (comma-separated)"])
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.setColumnWidth(0, 260)
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.currentCellChanged.connect(lambda *_: self._show_doc())
        add_row = QPushButton("Add setting")
        add_row.clicked.connect(lambda: self.add_row())
        remove_row = QPushButton("Remove setting")
        remove_row.clicked.connect(self.remove_current_row)
        row_buttons = QHBoxLayout()
        row_buttons.addWidget(add_row)
        row_buttons.addWidget(remove_row)
        row_buttons.addStretch(1)
        self.doc = QLabel("")
        self.doc.setWordWrap(True)
        self.doc.setStyleSheet("color: #555;")
        self.count = QLabel("")
        self.count.setWordWrap(True)
        self.count.setObjectName("sweepCount")
        self.preview = QListWidget()
        self.preview.setMaximumHeight(160)

        self.queue_button = QPushButton("Add to queue")
        self.queue_button.setDefault(True)
        self.queue_button.clicked.connect(self._queue)
        self.save_button = QPushButton("Save sweep file…")
        self.save_button.setToolTip("Write a sweep file for `sdstudio sweep FILE.toml` (and the current settings "
                                    "beside it as FILE-base.toml)")
        self.save_button.clicked.connect(self._ask_save)
        close = QPushButton("Close")
        close.clicked.connect(self.reject)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.queue_button)
        buttons.addWidget(close)

        form = QFormLayout()
        form.addRow("Sweep name", self.name)
        form.addRow("Method", self.method)
        form.addRow("", self.search_box)
        layout = QVBoxLayout(self)
        layout.addWidget(intro)
        layout.addLayout(form)
        layout.addWidget(self.table, 1)
        layout.addLayout(row_buttons)
        layout.addWidget(self.doc)
        layout.addWidget(self.count)
        self.preview_title = QLabel("Combinations:")
        layout.addWidget(self.preview_title)
        layout.addWidget(self.preview)
        layout.addLayout(buttons)
        self.resize(820, 560)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self.validate_now)
        self.add_row("train.learning_rate", _default_values(base))
        self.validate_now()

    # -- method --------------------------------------------------------------------------------------------
    def is_search(self) -> bool:
        return self.method.currentData() == "tpe"

    def set_method(self, method: str) -> None:
        self.method.setCurrentIndex(list(METHODS).index(method))

    def search_settings(self) -> dict[str, Any] | None:
        if not self.is_search():
            return None
        return {"method": "tpe", "trials": self.trials.value(), "prune": self.prune.isChecked(),
                "seed": self.seed.value()}

    def _method_changed(self) -> None:
        search = self.is_search()
        self.search_box.setVisible(search)
        self.preview_title.setText("Ranges searched:" if search else "Combinations:")
        self._grid_intro = getattr(self, "_grid_intro", self.intro.text())
        self.intro.setText("Each trial trains one run from the current settings with values Optuna's TPE sampler "
                           "draws from the ranges below, learning from the finished trials; pruning stops a run "
                           "whose validation loss falls behind the others at the same step. A range is "
                           "<tt>low .. high</tt> (add <tt>log</tt> for a log scale); commas give choices."
                           if search else self._grid_intro)
        self.table.setHorizontalHeaderLabels(["Setting", "Range (low .. high [log]) or choices" if search
                                              else "Values (comma-separated)"])
        for row in range(self.table.rowCount()):
            self._values_edit(row).setPlaceholderText("e.g. 1e-4 .. 1e-2 log" if search else "e.g. 1e-4, 3e-4, 1e-3")
        self._schedule()

    def _rows_table(self) -> dict[str, Any]:
        return build_search(self.rows()) if self.is_search() else build_grid(self.rows())

    # -- rows ------------------------------------------------------------------------------------------------
    def add_row(self, key: str = "", values: str = "") -> int:
        row = self.table.rowCount()
        self.table.insertRow(row)
        combo = QComboBox()
        combo.setEditable(True)
        combo.addItems(self._keys)
        completer = QCompleter(self._keys, combo)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        combo.setCompleter(completer)
        combo.setCurrentText(key)
        combo.currentTextChanged.connect(self._schedule)
        combo.currentTextChanged.connect(lambda _t: self._show_doc())
        edit = QLineEdit(values)
        edit.setPlaceholderText("e.g. 1e-4, 3e-4, 1e-3")
        edit.textChanged.connect(self._schedule)
        self.table.setCellWidget(row, 0, combo)
        self.table.setCellWidget(row, 1, edit)
        self.table.setCurrentCell(row, 1)
        self._schedule()
        return row

    def set_row(self, row: int, key: str, values: str) -> None:
        self._key_combo(row).setCurrentText(key)
        self._values_edit(row).setText(values)

    def remove_current_row(self) -> None:
        row = self.table.currentRow()
        if row >= 0:
            self.table.removeRow(row)
            self._schedule()

    def _key_combo(self, row: int) -> QComboBox:
        widget = self.table.cellWidget(row, 0)
        assert isinstance(widget, QComboBox)
        return widget

    def _values_edit(self, row: int) -> QLineEdit:
        widget = self.table.cellWidget(row, 1)
        assert isinstance(widget, QLineEdit)
        return widget

    def rows(self) -> list[tuple[str, str]]:
        return [(self._key_combo(r).currentText(), self._values_edit(r).text()) for r in range(self.table.rowCount())]

    def _show_doc(self) -> None:
        row = self.table.currentRow()
        key = self._key_combo(row).currentText().strip() if row >= 0 else ""
        if key in self._docs:
            typ, desc = self._docs[key]
            self.doc.setText(f"<b>{key}</b> ({typ}): {desc}")
        else:
            self.doc.setText("")

    # -- validation ------------------------------------------------------------------------------------------
    def _schedule(self, *_: object) -> None:
        self._timer.start()

    def grid_size(self) -> int | None:
        if self.is_search():
            return self.trials.value()
        try:
            return math.prod(len(v) for v in build_grid(self.rows()).values())
        except UserError:
            return None

    def validate_now(self) -> SweepPlan | None:
        """Expand and validate every combination now (the dialog also does it shortly after each edit)."""
        self._timer.stop()
        self.preview.clear()
        self.plan, self.error = None, ""
        name = sweep_name(self.name.text())
        try:
            grid = self._rows_table()
            self.plan = plan_sweep(self.base, name, grid, Path(self._tmp.name), self.search_settings())
        except UserError as exc:
            self.error = str(exc)
        if self.plan is not None and self.plan.mode == "search":
            n = self.trials.value()
            self.count.setText(f"<span style='color:#287d3c'><b>{n} trial{'s' * (n != 1)}</b> of a TPE search"
                               f"{', pruning runs that fall behind' if self.prune.isChecked() else ''}; the lowest "
                               "and highest values are valid.</span>")
            for key, spec in (self.plan.ranges or {}).items():
                self.preview.addItem(f"{key}: {describe_range(spec)}")
        elif self.plan is not None:
            n = len(self.plan.combinations)
            sizes = " × ".join(str(len(v)) for v in grid.values()) + " = " if len(grid) > 1 else ""
            self.count.setText(f"<span style='color:#287d3c'>{sizes}<b>{n} combination{'s' * (n != 1)}</b>, "
                               "every one valid.</span>")
            for combo in self.plan.combinations[:PREVIEW_LIMIT]:
                self.preview.addItem(f"{combo.folder}:  {combo.describe()}")
            if n > PREVIEW_LIMIT:
                self.preview.addItem(f"… and {n - PREVIEW_LIMIT} more")
        else:
            size = self.grid_size()
            prefix = f"{size} combination{'s' * (size != 1)}, but: " if size is not None else ""
            self.count.setText(f"<span style='color:#b3261e'>{prefix}{_escape(self.error)}</span>")
        ok = self.plan is not None
        n = len(self.plan.combinations) if self.plan else 0
        self.queue_button.setEnabled(ok)
        if self.is_search():
            n = self.trials.value()
            self.queue_button.setText(f"Run the search ({n} trial{'s' * (n != 1)})")
        else:
            self.queue_button.setText(f"Add {n} run{'s' * (n != 1)} to the queue" if ok else "Add to queue")
        self.save_button.setEnabled(ok)
        return self.plan

    # -- results ---------------------------------------------------------------------------------------------
    def _queue(self) -> None:
        plan = self.validate_now()
        if plan is not None and plan.mode == "search":
            self.search_requested.emit(plan)
            self.accept()
        elif plan is not None:
            self.queue_requested.emit(plan.name, plan)
            self.accept()

    def _ask_save(self) -> None:
        if self.validate_now() is None:
            return
        name = sweep_name(self.name.text())
        path, _ = QFileDialog.getSaveFileName(self, "Save sweep file", str(Path.home() / f"{name}.toml"),
                                              "TOML (*.toml)")
        if path:
            self.save(Path(path))

    def save(self, path: Path) -> SweepPlan | None:
        """Write the sweep file (and its base config); the plan as `sdstudio sweep` will read it."""
        if path.suffix != ".toml":
            path = path.with_suffix(".toml")
        if self.validate_now() is None:
            return None
        try:
            plan = write_sweep_file(self.base, sweep_name(self.name.text()), self._rows_table(), path,
                                    self.search_settings())
        except (UserError, OSError) as exc:
            self.count.setText(f"<span style='color:#b3261e'>Not saved: {_escape(str(exc))}</span>")
            return None
        self.saved_path = path
        what = f"{self.trials.value()} trials" if plan.mode == "search" else f"{len(plan.combinations)} combinations"
        self.count.setText(f"Saved {path} ({what}). Run it with "
                           f"<tt>sdstudio sweep {_escape(str(path))}</tt>.")
        return plan

    def done(self, result: int) -> None:
        self._timer.stop()
        super().done(result)
        self._tmp.cleanup()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
