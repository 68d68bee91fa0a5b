"""The export dialog: the formats a run supports (with the reason for the others), checkpoint / dtype / EMA
choices, a real kohya export of a tiny SD LoRA run in the background, overwrite confirmation, and errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from PySide6.QtCore import Qt
from safetensors import safe_open

from sdstudio.core import events as ev
from sdstudio.core.errors import UserError
from sdstudio.core.runs import save_run_config
from tests.gui.gui_helpers import tiny_run_config


def _fake_run(folder: Path, config, steps: tuple[int, ...] = (3, 6), best: int | None = None) -> Path:
    """A run folder with config.toml and checkpoint folders (enough for the dialog; not for exporting)."""
    for step in steps:
        ckpt = folder / "checkpoints" / f"step-{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "manifest.json").write_text("{}")
    if best is not None:
        (folder / "checkpoints" / "best.json").write_text(json.dumps({"checkpoint": f"step-{best:08d}"}))
    save_run_config(folder, config)
    return folder


def test_a_pixel_run_offers_only_the_diffusers_folder_and_says_why(qtbot, tiny_dataset: Path,
                                                                    tmp_path: Path) -> None:
    from sdstudio.gui.panels.export_dialog import ExportDialog

    run = _fake_run(tmp_path / "pixel-run", tiny_run_config(tiny_dataset), best=3)
    dialog = ExportDialog(run)
    qtbot.addWidget(dialog)
    dialog.show()
    buttons = dialog.format_buttons
    for fmt in ("kohya", "diffusers", "single-file"):
        assert not buttons[fmt].isEnabled(), fmt
        assert "from-scratch (pixel)" in buttons[fmt].toolTip() and "diffusers folder" in buttons[fmt].toolTip()
    assert buttons["diffusers-folder"].isEnabled() and dialog.selected_format() == "diffusers-folder"
    assert dialog.unavailable_note.isVisible() and "kohya" in dialog.unavailable_note.text()
    # checkpoints: newest, best (checkpoints/best.json), then each one
    items = [dialog.checkpoint.itemText(i) for i in range(dialog.checkpoint.count())]
    assert items == ["Newest (step 6)", "Best by validation loss (step 3)", "Step 6", "Step 3"]
    assert dialog.checkpoint_source() == (run, False, "step00000006")
    assert dialog.destination_path() == run / "exports" / f"{run.name}-step00000006-diffusers-folder"
    dialog.checkpoint.setCurrentIndex(1)
    assert dialog.checkpoint_source() == (run, True, "best")
    assert dialog.destination_path().name.endswith("-best-diffusers-folder")
    dialog.checkpoint.setCurrentIndex(3)
    assert dialog.checkpoint_source()[0] == run / "checkpoints" / "step-00000003"
    # no EMA in this run: the box is off and says why; dtype choices
    assert not dialog.ema.isEnabled() and not dialog.ema.isChecked() and "without EMA" in dialog.ema.toolTip()
    assert [dialog.dtype.itemText(i) for i in range(dialog.dtype.count())] == ["fp16", "bf16", "fp32"]
    assert dialog.export_button.isEnabled()


def test_ema_and_format_rules_follow_the_run_config(qtbot, tiny_dataset: Path, tmp_path: Path) -> None:
    from sdstudio.gui.panels.export_dialog import ExportDialog, format_choices

    run = _fake_run(tmp_path / "ema-run", tiny_run_config(tiny_dataset, **{"train.ema": True}))
    dialog = ExportDialog(run)
    qtbot.addWidget(dialog)
    assert dialog.ema.isEnabled() and dialog.ema.isChecked()

    full = tiny_run_config(tiny_dataset).with_overrides({"model.family": "sd1", "model.path": "/m"})
    reasons = {c.fmt: c.reason for c in format_choices(full)}
    assert "not a LoRA" in reasons["kohya"] and "not a LoRA" in reasons["diffusers"]
    assert not reasons["single-file"] and not reasons["diffusers-folder"]
    lora = full.with_overrides({"lora.enabled": True})
    assert all(c.available for c in format_choices(lora))

    empty = _fake_run(tmp_path / "no-checkpoints", tiny_run_config(tiny_dataset), steps=())
    dialog = ExportDialog(empty)
    qtbot.addWidget(dialog)
    assert not dialog.export_button.isEnabled() and "no checkpoint" in dialog.export_button.toolTip()


def test_export_a_lora_run_from_the_runs_panel(window, qtbot, tiny_sd1: Path, four_images: Path,
                                                monkeypatch) -> None:
    from sdstudio.core.runs import default_run_dir
    from sdstudio.core.train.loop import train
    from sdstudio.gui.panels import export_dialog
    from tests.sd_helpers import sd_config

    config = sd_config("sd15-lora", tiny_sd1, four_images, **{"train.max_steps": 2, "lora.rank": 4,
                                                              "train.threads": 1})
    run = default_run_dir("lora")
    events = list(train(config, run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]

    window.runs.refresh()
    qtbot.waitUntil(lambda: str(run) in window.runs.summaries, timeout=20_000)
    window.runs.tree.setCurrentItem(window.runs.tree.topLevelItem(0))
    assert window.runs.export_button.isEnabled()
    qtbot.mouseClick(window.runs.export_button, Qt.MouseButton.LeftButton)
    dialog = window.export_dialog
    assert dialog is not None and dialog.isVisible() and dialog.run_dir == run
    assert all(b.isEnabled() for b in dialog.format_buttons.values()), "a LoRA run: LoRA files and merged models"
    assert dialog.selected_format() == "kohya"
    target = dialog.destination_path()
    assert target.parent == run / "exports" and target.suffix == ".safetensors"

    # the export runs on a pool thread: the dialog shows it is busy and the GUI thread is free meanwhile
    gate = threading.Event()
    real_export = export_dialog.run_export

    def gated_export(*args, **kwargs):
        gate.wait(30)
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_dialog, "run_export", gated_export)
    qtbot.mouseClick(dialog.export_button, Qt.MouseButton.LeftButton)
    assert dialog.busy and dialog.busy_bar.isVisible() and not dialog.export_button.isEnabled()
    dialog.reject()
    assert dialog.isVisible(), "closing waits for the export"
    assert not window.close() and window.isVisible(), "quitting waits for the export too"
    assert "export" in window.statusBar().currentMessage()
    gate.set()
    qtbot.waitUntil(lambda: dialog.result_path is not None, timeout=60_000)
    assert dialog.result_path == target and target.is_file()
    assert str(target) in dialog.status.text() and dialog.open_folder_button.isVisible()
    with safe_open(str(target), "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(f"exported: {target}" in line for line in window.log.lines())

    # the same destination again: asked first; "no" leaves it, "yes" overwrites (force)
    asked: list[Path] = []
    dialog.confirm_overwrite = lambda path: asked.append(path) or False  # type: ignore[method-assign]
    assert not dialog.start_export() and asked == [target] and "Not exported" in dialog.status.text()
    before = target.stat().st_mtime_ns
    dialog.confirm_overwrite = lambda path: asked.append(path) or True  # type: ignore[method-assign]
    dialog.dtype.setCurrentText("fp32")
    assert dialog.start_export()
    qtbot.waitUntil(lambda: not dialog.busy, timeout=60_000)
    assert dialog.result_path == target and target.stat().st_mtime_ns != before
    with safe_open(str(target), "pt") as fh:
        assert fh.get_tensor(keys[0]).dtype.is_floating_point and str(fh.get_tensor(keys[0]).dtype) == "torch.float32"

    # a UserError from the core: the app's error dialog with its message
    def refusing_export(*args, **kwargs):
        raise UserError("exports/x.safetensors: the disk is full; free some space")

    monkeypatch.setattr(export_dialog, "run_export", refusing_export)
    dialog.set_format("diffusers")
    assert dialog.start_export()
    qtbot.waitUntil(lambda: dialog.error_box is not None and dialog.error_box.isVisible(), timeout=20_000)
    assert "the disk is full" in dialog.error_box.text() and dialog.error_box.informativeText()
    assert not dialog.busy and dialog.export_button.isEnabled() and "failed" in dialog.status.text()
    dialog.error_box.close()
    dialog.reject()

    # File -> Export model… opens the same dialog for the selected run
    assert window.export_action.isEnabled()
    window.export_action.trigger()
    assert window.export_dialog is not None and window.export_dialog.run_dir == run
    window.export_dialog.reject()


def test_export_a_pixel_run_as_a_diffusers_folder(qtbot, tiny_dataset: Path, tmp_path: Path) -> None:
    """A from-scratch run through the dialog: the folder is written and loads with diffusers' from_pretrained."""
    from sdstudio.core.train.loop import train
    from sdstudio.gui.panels.export_dialog import ExportDialog

    run = tmp_path / "pixel-run"
    events = list(train(tiny_run_config(tiny_dataset, **{"train.max_steps": 2, "train.threads": 1}), run_dir=run))
    assert isinstance(events[-1], ev.Finished), events[-1]
    dialog = ExportDialog(run)
    qtbot.addWidget(dialog)
    dialog.show()
    assert dialog.selected_format() == "diffusers-folder"
    target = dialog.destination_path()
    assert dialog.start_export()
    qtbot.waitUntil(lambda: not dialog.busy, timeout=60_000)
    assert dialog.result_path == target and (target / "model_index.json").is_file()
    index = json.loads((target / "model_index.json").read_text())
    assert "unet" in index and "scheduler" in index
    dialog.reject()
