"""Presets: pick a built-in or user preset, save the current settings as one, rename/delete user presets,
import/export TOML; a marker says when the settings differ from the preset they came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core import presets
from sdstudio.core.config import RunConfig
from sdstudio.core.errors import UserError

from ..widgets.failure_dialog import show_error
from .settings_form import SettingsForm

IGNORED_IN_DIFF = {"data.path"}  # the dataset is picked in its own panel; presets leave it empty


def flat_diff(base: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"train.learning_rate": (old, new)}`` for every value that differs."""
    changes: dict[str, tuple[Any, Any]] = {}

    def walk(diff: dict[str, Any], prefix: str) -> None:
        for key, value in diff.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, dotted + ".")
            else:
                node: Any = base
                for part in dotted.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                changes[dotted] = (node, value)

    walk(presets.config_diff(base, other), "")
    return changes


class PresetsPanel(QWidget):
    """Owns the link between the settings form and the preset it was loaded from."""

    preset_loaded = Signal(str)  # the preset's name (or "file.toml" for an import)

    def __init__(self, form: SettingsForm, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.form = form
        self.current_name = ""
        self._base: dict[str, Any] = RunConfig().to_dict()
        self.combo = QComboBox()
        self.combo.setMinimumContentsLength(14)
        self.combo.setToolTip("Built-in presets and your own; choosing one loads its settings")
        self.combo.activated.connect(self._chosen)
        self.marker = QLabel("")
        self.marker.setObjectName("presetMarker")
        self.save_button = QPushButton("Save as…")
        self.save_button.setToolTip("Save the current settings as a user preset")
        self.save_button.clicked.connect(self._ask_save_as)
        self.more = QToolButton()
        self.more.setText("More")
        self.more.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.rename_action = self.more.addAction("Rename…")
        self.delete_action = self.more.addAction("Delete")
        self.import_action = self.more.addAction("Import TOML…")
        self.export_action = self.more.addAction("Export TOML…")
        for action, slot in ((self.rename_action, self._ask_rename), (self.delete_action, self._ask_delete),
                             (self.import_action, self.ask_import), (self.export_action, self.ask_export)):
            action.triggered.connect(slot)
        top = QHBoxLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addWidget(QLabel("<b>Preset</b>"))
        top.addWidget(self.combo, 1)
        top.addWidget(self.save_button)
        top.addWidget(self.more)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 0)
        layout.addLayout(top)
        layout.addWidget(self.marker)
        form.changed.connect(self.update_marker)
        self.refresh()

    # -- list ----------------------------------------------------------------------------------------------
    def refresh(self) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        for preset in presets.list_presets():
            label = preset.name + ("" if not preset.builtin else "  (built in)")
            self.combo.addItem(label, preset.name)
            self.combo.setItemData(self.combo.count() - 1, preset.description or preset.name,
                                   Qt.ItemDataRole.ToolTipRole)
        index = self.combo.findData(self.current_name)
        if index < 0 and self.current_name:
            self.combo.addItem(self.current_name, self.current_name)
            index = self.combo.count() - 1
        self.combo.setCurrentIndex(index)
        self.combo.blockSignals(False)
        self._update_actions()

    def names(self) -> list[str]:
        return [self.combo.itemData(i) for i in range(self.combo.count())]

    def _is_user_preset(self, name: str) -> bool:
        return any(p.name == name and not p.builtin for p in presets.list_presets())

    def _update_actions(self) -> None:
        user = self._is_user_preset(self.current_name)
        why = "" if user else "Built-in presets cannot be changed; save a copy with Save as…"
        for action in (self.rename_action, self.delete_action):
            action.setEnabled(user)
            action.setToolTip(why)

    # -- loading -------------------------------------------------------------------------------------------
    def _chosen(self, index: int) -> None:
        name = self.combo.itemData(index)
        if name == self.current_name or not name:
            return
        if self.is_modified() and not self.confirm_discard():
            self.refresh()
            return
        self.load(name)

    def confirm_discard(self) -> bool:
        answer = QMessageBox.question(self, "Discard your changes?",
                                      f"The settings differ from the preset {self.current_name!r}. Load the other "
                                      "preset and lose these changes? (Save as… keeps them.)")
        return answer == QMessageBox.StandardButton.Yes

    def load(self, name: str, *, keep_dataset: bool = True) -> bool:
        """Load preset ``name`` into the form; False (and a dialog) when it cannot be loaded."""
        try:
            config = presets.load_preset(name)
        except UserError as exc:
            show_error(self, "Preset not loaded", str(exc), hint="Fix or delete the preset file, or choose "
                       "another preset.")
            self.refresh()
            return False
        self._apply(config, name, keep_dataset=keep_dataset)
        return True

    def apply_config(self, config: RunConfig, name: str) -> None:
        """Show a config that came from elsewhere (a run being resumed, the defaults) under ``name``."""
        self._apply(config, name, keep_dataset=False)

    def _apply(self, config: RunConfig, name: str, *, keep_dataset: bool) -> None:
        data_path = self.form.values()["data"]["path"]
        self._base = config.to_dict()
        self.current_name = name
        if keep_dataset and not config.data.path and data_path:
            config = config.with_overrides({"data.path": data_path})
        self.form.set_config(config)
        self.refresh()
        self.update_marker()
        self.preset_loaded.emit(name)

    # -- modified marker -----------------------------------------------------------------------------------
    def changes(self) -> dict[str, tuple[Any, Any]]:
        diff = flat_diff(self._base, self.form.values())
        if not self._base.get("data", {}).get("path"):
            for key in IGNORED_IN_DIFF:
                diff.pop(key, None)
        return diff

    def is_modified(self) -> bool:
        return bool(self.changes())

    def update_marker(self) -> None:
        changes = self.changes()
        if not changes:
            self.marker.setText("<span style='color:gray'>settings as in the preset</span>")
            self.marker.setToolTip("")
        else:
            n = len(changes)
            verb = "differs" if n == 1 else "differ"
            self.marker.setText(f"<span style='color:#9a6700'>● modified: {n} setting{'s' * (n != 1)} {verb} "
                                "from the preset</span>")
            self.marker.setToolTip("<br>".join(f"{k}: {old!r} → {new!r}" for k, (old, new) in changes.items()))
        self.save_button.setEnabled(self.form.config() is not None)
        self.save_button.setToolTip("Save the current settings as a user preset" if self.form.config() is not None
                                    else "Fix the invalid settings first")

    # -- saving, renaming, deleting ------------------------------------------------------------------------
    def save_as(self, name: str, description: str = "") -> bool:
        config = self.form.config()
        if config is None:
            show_error(self, "Preset not saved", "The settings have invalid values.",
                       hint="Fix the highlighted fields, then save again.")
            return False
        try:
            presets.save_user_preset(name, config, description)
        except (UserError, OSError) as exc:
            show_error(self, "Preset not saved", str(exc))
            return False
        self._base = presets.load_preset(name).to_dict()
        self.current_name = name
        self.refresh()
        self.update_marker()
        return True

    def rename(self, old: str, new: str) -> bool:
        try:
            presets.rename_user_preset(old, new)
        except (UserError, OSError) as exc:
            show_error(self, "Preset not renamed", str(exc))
            return False
        if self.current_name == old:
            self.current_name = new
        self.refresh()
        return True

    def delete(self, name: str) -> bool:
        try:
            presets.delete_user_preset(name)
        except (UserError, OSError) as exc:
            show_error(self, "Preset not deleted", str(exc))
            return False
        if self.current_name == name:
            self.current_name = ""  # the settings stay in the form, no longer tied to a preset
        self.refresh()
        return True

    def import_file(self, path: Path) -> bool:
        try:
            config = presets.load_config_file(path)
        except UserError as exc:
            show_error(self, "Settings not imported", str(exc), hint="Choose a TOML file written by sdstudio "
                       "(Export TOML… or a run's config.toml).")
            return False
        self._apply(config, path.name, keep_dataset=True)
        return True

    def export_file(self, path: Path) -> bool:
        config = self.form.config()
        if config is None:
            show_error(self, "Settings not exported", "The settings have invalid values.",
                       hint="Fix the highlighted fields, then export again.")
            return False
        try:
            presets.write_toml_atomic(path, config.to_dict())
        except OSError as exc:
            show_error(self, "Settings not exported", f"{path}: {exc.strerror or exc}")
            return False
        return True

    # -- dialogs -------------------------------------------------------------------------------------------
    def _ask_save_as(self) -> None:
        name, ok = QInputDialog.getText(self, "Save preset", "Name (letters, digits, '-', '_', '.'):",
                                        QLineEdit.EchoMode.Normal, "my-preset")
        if ok and name.strip():
            self.save_as(name.strip())

    def _ask_rename(self) -> None:
        old = self.current_name
        new, ok = QInputDialog.getText(self, "Rename preset", f"New name for {old!r}:", QLineEdit.EchoMode.Normal,
                                       old)
        if ok and new.strip() and new.strip() != old:
            self.rename(old, new.strip())

    def _ask_delete(self) -> None:
        name = self.current_name
        answer = QMessageBox.question(self, "Delete preset", f"Delete your preset {name!r}? The current settings "
                                      "stay in the form.")
        if answer == QMessageBox.StandardButton.Yes:
            self.delete(name)

    def ask_import(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Import settings", str(Path.home()), "TOML (*.toml)")
        if path:
            self.import_file(Path(path))

    def ask_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export settings", str(Path.home() / "sdstudio.toml"),
                                              "TOML (*.toml)")
        if path:
            self.export_file(Path(path))
