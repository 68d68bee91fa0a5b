"""The settings form, generated from the RunConfig schema: sections, tooltips from the field descriptions,
ranges and units; every edit is validated by the core and invalid fields show the core's message."""

from __future__ import annotations

import copy
import re
from typing import Any

from pydantic import BaseModel
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QFormLayout, QLabel, QScrollArea, QVBoxLayout, QWidget

from sdstudio.core.config import RunConfig
from sdstudio.core.errors import ConfigError

from ..widgets.collapsible import CollapsibleSection
from ..widgets.field_editors import FieldEditor, FieldSpec, spec_for

ESSENTIALS = ("data.path", "model.family", "model.path", "data.resolution", "train.learning_rate",
              "train.batch_size", "train.max_steps", "train.epochs", "name")
SECTION_TITLES = {"data": "Data", "model": "Model", "diffusion": "Diffusion (noise schedule)", "loss": "Loss",
                  "train": "Training", "sample": "Samples", "checkpoint": "Checkpoints", "lora": "LoRA",
                  "flow": "Flow matching (Flux)", "eval": "Evaluation (FID / KID)", "export": "Automatic export"}
EXPANDED = {"train", "sample"}
HIDDEN = {"schema_version"}
_KEY_RE = re.compile(r"\b([a-z_]+\.[a-z_]+)\b")


def config_field_specs() -> list[FieldSpec]:
    """Every config field in schema order, as a FieldSpec."""
    specs = []
    for section, info in RunConfig.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for name, f in ann.model_fields.items():
                specs.append(spec_for(f"{section}.{name}", f.annotation, f.description or "", list(f.metadata)))
        elif section not in HIDDEN:
            specs.append(spec_for(section, ann, info.description or "", list(info.metadata)))
    return specs


def problem_keys(line: str, known: set[str]) -> list[str]:
    """The fields a validation line is about: the keys named before its first ': ' (after the source)."""
    body = line.split(": ", 1)[1] if ": " in line else line
    head = body.split(": ", 1)[0].split(" = ", 1)[0]
    keys = [k for k in _KEY_RE.findall(head) if k in known]
    if not keys and head.strip() in known:  # top-level fields such as "name"
        keys = [head.strip()]
    return keys


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    if "." not in key:
        data[key] = value
        return
    section, name = key.split(".", 1)
    data.setdefault(section, {})[name] = value


class SettingsForm(QWidget):
    """Edits a RunConfig. ``changed`` fires after every edit, once the values were validated."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._base = RunConfig().to_dict()
        self._config: RunConfig | None = RunConfig()
        self._problems: list[str] = []
        self._loading = False
        self.editors: dict[str, FieldEditor] = {}
        self.sections: dict[str, CollapsibleSection] = {}
        specs = config_field_specs()
        self._known = {s.key for s in specs}

        content = QWidget()
        column = QVBoxLayout(content)
        column.setContentsMargins(6, 6, 6, 6)
        essentials = QWidget()
        essentials_form = self._form(essentials)
        for key in ESSENTIALS:
            spec = next(s for s in specs if s.key == key)
            self._add(essentials_form, spec, label=_essential_label(spec))
        self.sections["essentials"] = CollapsibleSection("Essentials", essentials, expanded=True)
        column.addWidget(self.sections["essentials"])
        for section, title in SECTION_TITLES.items():
            body = QWidget()
            form = self._form(body)
            for spec in specs:
                if spec.key.startswith(section + ".") and spec.key not in ESSENTIALS:
                    self._add(form, spec)
            self.sections[section] = CollapsibleSection(title, body, expanded=section in EXPANDED)
            column.addWidget(self.sections[section])
        column.addStretch(1)
        self.general_error = QLabel("")
        self.general_error.setWordWrap(True)
        self.general_error.setStyleSheet("color: #b3261e;")
        self.general_error.setVisible(False)

        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll = scroll
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.general_error)
        layout.addWidget(scroll, 1)
        self.set_config(RunConfig())

    @staticmethod
    def _form(parent: QWidget) -> QFormLayout:
        form = QFormLayout(parent)
        form.setContentsMargins(14, 2, 2, 6)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.setLabelAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop)
        return form

    def _add(self, form: QFormLayout, spec: FieldSpec, label: str | None = None) -> None:
        editor = FieldEditor(spec)
        editor.changed.connect(self._edited)
        text = QLabel(label or spec.label)
        text.setToolTip(spec.tooltip())
        form.addRow(text, editor)
        self.editors[spec.key] = editor

    # -- values ------------------------------------------------------------------------------------------
    def set_config(self, config: RunConfig) -> None:
        self._loading = True
        try:
            self._base = config.to_dict()
            for key, editor in self.editors.items():
                editor.set_value(_get_dotted(self._base, key))
        finally:
            self._loading = False
        self._validate()
        self.changed.emit()

    def set_value(self, key: str, value: Any) -> None:
        """Set one field as if the user typed it (validated, ``changed`` emitted)."""
        self.editors[key].set_value(value)
        self._edited()

    def value(self, key: str) -> Any:
        return self.editors[key].value()

    def values(self) -> dict[str, Any]:
        """The nested dict the form shows; unreadable fields keep their last loaded value."""
        data = copy.deepcopy(self._base)
        for key, editor in self.editors.items():
            try:
                _set_dotted(data, key, editor.value())
            except ValueError:
                pass
        return data

    def config(self) -> RunConfig | None:
        """The validated config, or None while a field is invalid."""
        return self._config

    def problems(self) -> list[str]:
        """Every reason the current settings cannot train, one line each, naming the field."""
        return list(self._problems)

    def _edited(self) -> None:
        if self._loading:
            return
        self._validate()
        self.changed.emit()

    def _validate(self) -> None:
        errors: dict[str, list[str]] = {}
        general: list[str] = []
        data = copy.deepcopy(self._base)
        for key, editor in self.editors.items():
            try:
                _set_dotted(data, key, editor.value())
            except ValueError as exc:
                errors.setdefault(key, []).append(f"settings: {key}: {exc}")
        config: RunConfig | None = None
        if not errors:
            try:
                config = RunConfig.from_dict(data, source="settings")
            except ConfigError as exc:
                for line in str(exc).splitlines():
                    self._file(line, errors, general)
            else:
                for line in config.readiness_problems():
                    self._file(f"settings: {line}", errors, general)
        self._config = config
        self._problems = [line.removeprefix("settings: ") for lines in errors.values() for line in lines]
        self._problems += [line.removeprefix("settings: ") for line in general]
        for key, editor in self.editors.items():
            messages = [m.removeprefix("settings: ") for m in errors.get(key, [])]
            editor.set_error("\n".join(dict.fromkeys(messages)) or None)
        for name, section in self.sections.items():
            if any(self.editors[k].is_invalid() for k in self._section_keys(name)):
                section.set_expanded(True)
        self.general_error.setText("\n".join(general))
        self.general_error.setVisible(bool(general))

    def _file(self, line: str, errors: dict[str, list[str]], general: list[str]) -> None:
        keys = problem_keys(line, self._known)
        if not keys:
            general.append(line)
        for key in keys:
            errors.setdefault(key, []).append(line)

    def _section_keys(self, name: str) -> list[str]:
        if name == "essentials":
            return list(ESSENTIALS)
        return [k for k in self.editors if k.startswith(name + ".") and k not in ESSENTIALS]

    def invalid_keys(self) -> list[str]:
        return [key for key, editor in self.editors.items() if editor.is_invalid()]


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


def _essential_label(spec: FieldSpec) -> str:
    return {"data.path": "dataset folder", "model.family": "model family", "model.path": "base model",
            "data.resolution": "resolution", "train.learning_rate": "learning rate",
            "train.batch_size": "batch size", "train.max_steps": "max steps", "train.epochs": "epochs",
            "name": "run name"}.get(spec.key, spec.label)
