"""The Tags and Caption dialogs, opened from the datasets panel: preview, apply, undo, and a captioning run
with a tiny WD14 tagger, all off the GUI thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

try:
    from tiny_tagger import build_tagger
except ImportError:  # tests/ imported as a package
    from tests.tiny_tagger import build_tagger


def _dataset(root: Path) -> Path:
    for name, color in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (255, 0, 0))):
        root.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 16), color).save(root / f"{name}.png")
    (root / "a.txt").write_bytes(b"1girl, solo, long_hair\n")
    (root / "b.txt").write_bytes(b"1girl, smile\n")
    return root


def _panel(qtbot, folder: Path):
    from sdstudio.gui.panels.datasets import DatasetsPanel

    panel = DatasetsPanel()
    qtbot.addWidget(panel)
    panel.open_folder(folder)
    qtbot.waitUntil(lambda: panel.report is not None and not panel.progress.isVisible(), timeout=30_000)
    return panel


def _shot(widget, name: str) -> None:
    folder = os.environ.get("SDSTUDIO_SCREENSHOTS")
    if folder:
        widget.grab().save(str(Path(folder) / name))


def test_tags_dialog_previews_applies_and_undoes(qtbot, tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    panel = _panel(qtbot, root)
    dialog = panel.open_tags()
    qtbot.addWidget(dialog)
    qtbot.waitUntil(lambda: dialog.captions is not None and dialog.table.rowCount() == 4, timeout=10_000)
    assert dialog.table.item(0, 0).text() == "1girl" and dialog.table.item(0, 1).data(0) == 2
    dialog.table.selectRow(0)
    assert dialog.tag.text() == "1girl"  # picking a row fills the tag field
    dialog.operation.setCurrentText("Rename tag")
    dialog.value.setText("woman")
    dialog.where_not.setText("smile")
    assert not dialog.apply_button.isEnabled()  # nothing is written before a preview
    dialog.make_preview()
    assert "a.txt" not in dialog.preview.toPlainText() and "+ woman, solo, long_hair" in dialog.preview.toPlainText()
    assert (root / "a.txt").read_bytes() == before["a.txt"]
    dialog.resize(820, 520)
    _shot(dialog, "tags-dialog.png")
    dialog.apply()
    qtbot.waitUntil(lambda: not dialog.busy and (root / "a.txt").read_bytes() == b"woman, solo, long_hair\n",
                    timeout=10_000)
    qtbot.waitUntil(lambda: "changed" in dialog.status.text(), timeout=10_000)
    assert (root / "b.txt").read_bytes() == before["b.txt"]
    dialog.undo()
    qtbot.waitUntil(lambda: not dialog.busy and "Undone" in dialog.status.text(), timeout=10_000)
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


def test_caption_dialog_runs_off_the_gui_thread(qtbot, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'sdstudio[tagger]')")
    tagger = build_tagger(tmp_path / "tagger")
    root = _dataset(tmp_path / "data")
    panel = _panel(qtbot, root)
    dialog = panel.open_caption()
    qtbot.addWidget(dialog)
    assert not dialog.undo_button.isEnabled()
    dialog.model_folder.setText(str(tagger))
    dialog.trigger.setText("sks")
    dialog.threshold.setValue(0.6)
    dialog.exclude.setText("watermark, ^_^")
    dialog.resize(620, 420)
    dialog.start()
    assert dialog.running and not dialog.run_button.isEnabled()
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    assert "1 caption(s) written" in dialog.status.text(), dialog.status.text()
    assert "2 existing caption(s) left alone" in dialog.status.text()
    assert (root / "c.txt").read_text() == "sks, red hair"
    _shot(dialog, "caption-dialog.png")
    assert dialog.undo_button.isEnabled()
    dialog.undo()
    assert not (root / "c.txt").exists()
    dialog.model_folder.setText(str(tmp_path))
    dialog.start()
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    assert "model.onnx" in dialog.status.text()  # a clear message, no crash
