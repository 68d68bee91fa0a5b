"""One editor per config field, chosen from the field's type in the pydantic schema.

Every editor shows the field's description and range as its tooltip, reports a parse problem itself
(`value()` raises ValueError with a message for people) and can be marked invalid with a message.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import annotated_types
from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

INT_LIMIT = 2**31 - 1
FOLDER_FIELDS = {"data.path", "data.reg_path", "data.val_path"}
FILE_FIELDS = {"model.path", "model.vae_path"}
UNITS = {
    "data.resolution": "px", "data.rotation_degrees": "°", "train.max_steps": "steps", "train.epochs": "epochs",
    "train.warmup_steps": "steps", "train.lr_step_size": "steps", "train.log_every": "steps",
    "train.val_every_steps": "steps", "sample.every_steps": "steps", "sample.every_epochs": "epochs",
    "checkpoint.every_steps": "steps", "checkpoint.every_epochs": "epochs", "train.batch_size": "images",
    "sample.steps": "steps", "diffusion.num_timesteps": "steps", "checkpoint.keep_last": "checkpoints",
    "data.num_workers": "processes", "data.prefetch_batches": "batches", "train.threads": "threads",
}
PLACEHOLDERS = {"data.path": "(the bundled demo dataset)", "model.path": "diffusers folder or .safetensors file"}


@dataclass(frozen=True)
class FieldSpec:
    key: str  # "train.learning_rate"
    kind: str  # bool | choice | int | float | str | str_list | int_list | bool_list | int_tuple | float_tuple
    description: str
    choices: tuple[str, ...] = ()
    bounds: dict[str, float] = field(default_factory=dict)  # ge / gt / le / lt / multiple_of

    @property
    def label(self) -> str:
        return self.key.split(".")[-1].replace("_", " ")

    def range_text(self) -> str:
        parts = []
        for name, word in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if name in self.bounds:
                parts.append(f"{word} {self.bounds[name]:g}")
        if "multiple_of" in self.bounds:
            parts.append(f"a multiple of {self.bounds['multiple_of']:g}")
        return ", ".join(parts)

    def tooltip(self) -> str:
        lines = [f"<b>{self.key}</b>", self.description]
        if self.range_text():
            lines.append(f"Allowed: {self.range_text()}")
        if self.key in UNITS:
            lines.append(f"Unit: {UNITS[self.key]}")
        if self.choices:
            lines.append("Choices: " + ", ".join(self.choices))
        return "<br>".join(lines)


def spec_for(key: str, annotation: Any, description: str, metadata: list[Any]) -> FieldSpec:
    bounds: dict[str, float] = {}
    for item in metadata:  # annotated_types.Ge(ge=...), Le(le=...), MultipleOf(multiple_of=...)
        if isinstance(item, annotated_types.BaseMetadata):
            for name in ("ge", "gt", "le", "lt", "multiple_of"):
                value = getattr(item, name, None)
                if isinstance(value, (int, float)):
                    bounds[name] = float(value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return FieldSpec(key, "choice", description, tuple(str(a) for a in args))
    if annotation is bool:
        return FieldSpec(key, "bool", description)
    if annotation is int:
        return FieldSpec(key, "int", description, bounds=bounds)
    if annotation is float:
        return FieldSpec(key, "float", description, bounds=bounds)
    if annotation is str:
        return FieldSpec(key, "str", description)
    if origin is list and args:
        if typing.get_origin(args[0]) is Literal:  # e.g. export.formats: a list of choices
            return FieldSpec(key, "str_list", description, tuple(str(a) for a in typing.get_args(args[0])))
        return FieldSpec(key, {str: "str_list", int: "int_list", bool: "bool_list",
                               float: "float_tuple"}.get(args[0], "str"),  # float: comma-separated numbers
                         description)
    if origin is tuple and args:
        return FieldSpec(key, "float_tuple" if args[0] is float else "int_tuple", description)
    return FieldSpec(key, "str", description)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{text.strip()!r} is not true or false")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.strip().strip("[]()").split(",") if part.strip()]


class FieldEditor(QWidget):
    """A labelled-by-the-form editor of one field with an error line under it."""

    changed = Signal()

    def __init__(self, spec: FieldSpec, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.spec = spec
        self.input = self._make_input()
        self.input.setToolTip(spec.tooltip())
        self.error = QLabel("")
        self.error.setObjectName("fieldError")
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #b3261e;")
        self.error.setVisible(False)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.input, 1)
        if spec.key in UNITS and spec.kind not in ("int",):
            row.addWidget(QLabel(UNITS[spec.key]))
        if spec.key in FOLDER_FIELDS | FILE_FIELDS:
            browse = QToolButton()
            browse.setText("…")
            browse.setToolTip("Browse")
            browse.clicked.connect(self._browse)
            row.addWidget(browse)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(1)
        layout.addLayout(row)
        layout.addWidget(self.error)

    def _make_input(self) -> QWidget:
        spec = self.spec
        if spec.kind == "bool":
            box = QCheckBox()
            box.toggled.connect(self.changed)
            return box
        if spec.kind == "choice":
            combo = QComboBox()
            combo.addItems(list(spec.choices))
            combo.currentIndexChanged.connect(self.changed)
            return combo
        if spec.kind == "int":
            spin = QSpinBox()
            low = spec.bounds.get("ge", spec.bounds.get("gt", -INT_LIMIT - 1) + 1)
            high = spec.bounds.get("le", spec.bounds.get("lt", INT_LIMIT + 1) - 1)
            spin.setRange(int(max(low, -INT_LIMIT)), int(min(high, INT_LIMIT)))
            spin.setSingleStep(int(spec.bounds.get("multiple_of", 1)))
            spin.setKeyboardTracking(True)
            spin.setAccelerated(True)
            if spec.key in UNITS:
                spin.setSuffix(f" {UNITS[spec.key]}")
            spin.valueChanged.connect(self.changed)
            return spin
        if spec.kind == "str_list":
            text = QPlainTextEdit()
            text.setPlaceholderText("one per line")
            text.setFixedHeight(64)
            text.textChanged.connect(self.changed)
            return text
        line = QLineEdit()
        line.setPlaceholderText(PLACEHOLDERS.get(spec.key, spec.range_text()))
        line.textChanged.connect(self.changed)
        return line

    # -- values ------------------------------------------------------------------------------------------
    def value(self) -> Any:
        """The value to validate; ValueError (with a message for people) when the text cannot be read."""
        w, kind = self.input, self.spec.kind
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QComboBox):
            return w.currentText()
        if isinstance(w, QSpinBox):
            return w.value()
        if isinstance(w, QPlainTextEdit):
            return [line.strip() for line in w.toPlainText().splitlines() if line.strip()]
        assert isinstance(w, QLineEdit)
        text = w.text().strip()
        if kind == "float":
            try:
                number = float(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a number (write e.g. 0.001 or 1e-3)") from None
            if not math.isfinite(number):
                raise ValueError("must be a finite number")
            return number
        try:
            if kind == "int_list":
                return [int(p) for p in _split(text)]
            if kind == "bool_list":
                return [_parse_bool(p) for p in _split(text)]
            if kind == "int_tuple":
                return [int(p) for p in _split(text)]
            if kind == "float_tuple":
                return [float(p) for p in _split(text)]
        except ValueError:
            raise ValueError(f"{text!r}: write the values separated by commas, e.g. "
                             f"{'true, false' if kind == 'bool_list' else '1, 2'}") from None
        return w.text()

    def set_value(self, value: Any) -> None:
        w = self.input
        blocked = w.blockSignals(True)
        try:
            if isinstance(w, QCheckBox):
                w.setChecked(bool(value))
            elif isinstance(w, QComboBox):
                w.setCurrentIndex(max(0, w.findText(str(value))))
            elif isinstance(w, QSpinBox):
                w.setValue(int(value))
            elif isinstance(w, QPlainTextEdit):
                w.setPlainText("\n".join(str(v) for v in value))
            elif isinstance(w, QLineEdit):
                w.setText(_format(value))
        finally:
            w.blockSignals(blocked)

    def set_error(self, message: str | None) -> None:
        invalid = bool(message)
        self.error.setText(message or "")
        self.error.setVisible(invalid)
        self.input.setProperty("invalid", invalid)
        self.input.setStyleSheet("background: #fde7e9; border: 1px solid #b3261e;" if invalid else "")
        tip = self.spec.tooltip()
        self.input.setToolTip(f"{tip}<br><span style='color:#b3261e'>{message}</span>" if invalid else tip)

    def is_invalid(self) -> bool:
        return bool(self.input.property("invalid"))

    def _browse(self) -> None:
        current = self.input.text() if isinstance(self.input, QLineEdit) else ""
        if self.spec.key in FOLDER_FIELDS:
            chosen = QFileDialog.getExistingDirectory(self, self.spec.label, current)
        else:
            chosen, _ = QFileDialog.getOpenFileName(self, self.spec.label, current,
                                                    "Model files (*.safetensors *.ckpt);;All files (*)")
        if chosen and isinstance(self.input, QLineEdit):
            self.input.setText(chosen)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_format(v) for v in value)
    return str(value)
