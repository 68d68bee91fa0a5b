"""The LoRA tools dialog (opened from the export dialog): a real merge of two LoRA files and a resize run on
the pool thread, the summary shows rank and error, missing inputs are said in the status line; screenshot."""

from __future__ import annotations

import os
from pathlib import Path

from sdstudio.core.lora_tools.files import read_adapter_file
from tests.test_lora_tools import synthetic_file


def test_merge_and_resize_from_the_dialog(qtbot, tiny_sd1: Path, tmp_path: Path) -> None:
    from sdstudio.gui.panels.lora_tools_dialog import LoraToolsDialog

    a = synthetic_file(tiny_sd1, tmp_path / "a.safetensors", seed=1)
    b = synthetic_file(tiny_sd1, tmp_path / "b.safetensors", rank=2, seed=2)
    dialog = LoraToolsDialog(folder=tmp_path)
    qtbot.addWidget(dialog)
    dialog.show()
    assert not dialog.start() and "add at least one" in dialog.status.text()
    dialog.add_merge_input(a, 0.5)
    dialog.add_merge_input(b, 1.0)
    dialog.merge_out.setText(str(tmp_path / "merged.safetensors"))
    dialog.dtype.setCurrentText("fp32")
    assert dialog.merge_inputs() == [(a, 0.5), (b, 1.0)]
    assert dialog.start()
    qtbot.waitUntil(lambda: not dialog.busy, timeout=120_000)
    assert dialog.report is not None and "rank 6" in dialog.status.text(), dialog.status.text()
    assert read_adapter_file(tmp_path / "merged.safetensors").ranks() == {6}

    dialog.tabs.setCurrentIndex(1)
    dialog.resize_in.setText(str(tmp_path / "merged.safetensors"))
    dialog.resize_out.setText(str(tmp_path / "small.safetensors"))
    dialog.resize_mode.setCurrentIndex(0)
    dialog.resize_value.setValue(2)
    assert dialog.start()
    qtbot.waitUntil(lambda: not dialog.busy, timeout=120_000)
    assert "relative error" in dialog.status.text(), dialog.status.text()
    assert read_adapter_file(tmp_path / "small.safetensors").ranks() == {2}
    shot = Path(os.environ.get("SDSTUDIO_SCREENSHOTS", tmp_path)) / "lora-tools.png"
    assert dialog.grab().save(str(shot))


def test_the_export_dialog_opens_the_lora_tools(qtbot, tiny_dataset: Path, tmp_path: Path) -> None:
    from sdstudio.gui.panels.export_dialog import ExportDialog
    from tests.gui.gui_helpers import tiny_run_config
    from tests.gui.test_gui_export import _fake_run

    run = _fake_run(tmp_path / "run", tiny_run_config(tiny_dataset))
    (run / "exports").mkdir()
    (run / "exports" / "x.safetensors").write_bytes(b"")
    dialog = ExportDialog(run)
    qtbot.addWidget(dialog)
    tools = dialog.open_lora_tools()
    assert tools.isVisible() and tools.merge_inputs() == [(run / "exports" / "x.safetensors", 1.0)]
    tools.close()
