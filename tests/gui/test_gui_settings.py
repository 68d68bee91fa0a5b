"""The generated settings form, validation highlighting, presets and the remembered session."""

from __future__ import annotations

from pathlib import Path

from sdstudio.core import paths, presets
from sdstudio.core.config import RunConfig


def test_form_has_every_config_field_with_tooltip_and_range(qtbot) -> None:
    from sdstudio.core.config_docs import field_docs
    from sdstudio.gui.panels.settings_form import SettingsForm

    form = SettingsForm()
    qtbot.addWidget(form)
    keys = {key for key, *_ in field_docs()} - {"schema_version"}
    assert keys == set(form.editors)
    lr = form.editors["train.learning_rate"]
    assert "Peak learning rate" in lr.input.toolTip() and "≤ 1" in lr.input.toolTip()
    resolution = form.editors["data.resolution"].input
    assert (resolution.minimum(), resolution.maximum(), resolution.singleStep()) == (8, 4096, 8)
    assert resolution.suffix() == " px"
    assert form.config() == RunConfig()


def test_invalid_value_is_highlighted_and_disables_train(window, qtbot) -> None:
    form, bar = window.form, window.train_bar
    assert bar.train_button.isEnabled()
    lr = form.editors["train.learning_rate"]
    lr.input.setText("5")
    assert lr.is_invalid() and lr.error.isVisible()
    assert "train.learning_rate" in lr.error.text() and "1.0" in lr.error.text()
    assert form.config() is None
    assert not bar.train_button.isEnabled()
    assert "train.learning_rate" in bar.reason.text() and "train.learning_rate" in bar.train_button.toolTip()

    lr.input.setText("abc")
    assert "not a number" in lr.error.text()
    lr.input.setText("3e-4")
    assert not lr.is_invalid() and not lr.error.isVisible()
    assert bar.train_button.isEnabled() and form.config().train.learning_rate == 3e-4

    # a cross-field rule of the core: the attention levels must match the UNet levels
    form.editors["model.block_channels"].input.setText("32, 64")
    assert set(form.invalid_keys()) >= {"model.attention_levels"}
    assert not bar.train_button.isEnabled()
    form.editors["model.attention_levels"].input.setText("false, true")
    assert form.invalid_keys() == [] and bar.train_button.isEnabled()

    # readiness: an SD family needs a base model file
    form.set_value("model.family", "sd1")
    assert form.editors["model.path"].is_invalid() and not bar.train_button.isEnabled()


def test_preset_save_load_rename_delete(window, qtbot, tmp_path: Path) -> None:
    panel, form = window.presets, window.form
    assert panel.current_name == presets.DEFAULT_PRESET and not panel.is_modified()
    form.editors["train.learning_rate"].input.setText("0.0002")
    form.set_value("train.batch_size", 8)
    assert panel.is_modified() and "2 settings" in panel.marker.text()
    assert "train.learning_rate" in panel.marker.toolTip()

    assert panel.save_as("my-shapes", "smaller batches")
    saved = paths.user_presets_dir() / "my-shapes.toml"
    assert saved.is_file() and not panel.is_modified() and "my-shapes" in panel.names()

    assert panel.load(presets.DEFAULT_PRESET)
    assert form.config().train.learning_rate == presets.load_preset("demo").train.learning_rate
    assert panel.load("my-shapes")
    assert form.config().train.learning_rate == 0.0002 and form.config().train.batch_size == 8
    assert panel.rename_action.isEnabled() and panel.delete_action.isEnabled()

    assert panel.rename("my-shapes", "shapes-b8")
    assert panel.current_name == "shapes-b8" and "shapes-b8" in panel.names()
    assert panel.delete("shapes-b8")
    assert "shapes-b8" not in panel.names() and not (paths.user_presets_dir() / "shapes-b8.toml").exists()

    assert panel.load(presets.DEFAULT_PRESET)
    assert not panel.rename_action.isEnabled(), "built-in presets cannot be renamed"


def test_export_and_import_toml(window, tmp_path: Path) -> None:
    panel, form = window.presets, window.form
    form.set_value("train.max_steps", 1234)
    target = tmp_path / "exported.toml"
    assert panel.export_file(target)
    assert presets.load_config_file(target).train.max_steps == 1234
    assert panel.load(presets.DEFAULT_PRESET)
    assert form.config().train.max_steps != 1234
    assert panel.import_file(target)
    assert form.config().train.max_steps == 1234 and panel.current_name == "exported.toml"

    broken = tmp_path / "broken.toml"
    broken.write_text("[train]\nlearning_rate = 7\n")
    assert not panel.import_file(broken)
    assert form.config().train.max_steps == 1234, "a bad file leaves the settings alone"


def test_first_start_opens_demo_dataset_with_demo_preset(qtbot) -> None:
    from sdstudio.gui.main_window import MainWindow

    win = MainWindow()
    qtbot.addWidget(win)
    win.restore_session()
    assert win.presets.current_name == presets.DEFAULT_PRESET
    assert win.datasets.current_path() == paths.demo_dataset_dir().absolute()
    assert win.form.values()["data"]["path"] == ""
    qtbot.waitUntil(lambda: win.datasets.model.rowCount() >= 200, timeout=30_000)
    win.datasets.shutdown()


def test_session_remembers_geometry_dataset_and_preset(window, qtbot, tiny_copy: Path) -> None:
    from sdstudio.gui.main_window import MainWindow

    window.resize(1000, 700)  # the offscreen screen is 800 x 800: only the height fits as it is
    window.datasets.open_folder(tiny_copy)
    assert window.form.values()["data"]["path"] == str(tiny_copy)
    window.presets.save_as("remember-me")
    window.close()
    assert not window.isVisible()

    again = MainWindow()
    qtbot.addWidget(again)
    again.restore_session()
    assert again.presets.current_name == "remember-me"
    assert again.datasets.current_path() == tiny_copy
    assert again.height() == 700 and again.settings.value("window/geometry")
    qtbot.waitUntil(lambda: again.datasets.report is not None, timeout=20_000)
    again.datasets.shutdown()
