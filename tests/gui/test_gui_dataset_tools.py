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


def _drag(widget, points) -> None:
    """A left-button drag through ``points`` (widget coordinates), as real mouse events."""
    from PySide6.QtCore import QEvent, QPointF, Qt
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtWidgets import QApplication

    left, none, mods = Qt.MouseButton.LeftButton, Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier
    for i, point in enumerate(points):
        pos = QPointF(point)
        global_pos = QPointF(widget.mapToGlobal(pos.toPoint()))
        kind, button = (QEvent.Type.MouseButtonPress, left) if i == 0 else (QEvent.Type.MouseMove, none)
        QApplication.sendEvent(widget, QMouseEvent(kind, pos, global_pos, button, left, mods))
    pos = QPointF(points[-1])
    QApplication.sendEvent(widget, QMouseEvent(QEvent.Type.MouseButtonRelease, pos,
                                               QPointF(widget.mapToGlobal(pos.toPoint())), left, none, mods))


def test_mask_editor_paints_a_stroke_saves_it_and_the_grid_shows_it(qtbot, tmp_path: Path) -> None:
    import numpy as np
    from PySide6.QtCore import QPointF

    from sdstudio.core.data.undo_journal import list_entries

    root = _dataset(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    panel = _panel(qtbot, root)
    panel.select_file(root / "b.png")
    dialog = panel.open_masks()
    qtbot.addWidget(dialog)
    dialog.resize(640, 520)
    qtbot.waitExposed(dialog)
    assert dialog.image == root / "b.png" and not dialog.save_button.isEnabled()
    canvas = dialog.canvas
    dialog.erase.setChecked(True)
    dialog.brush.setValue(2)
    rect = canvas.image_rect()
    scale = rect.width() / 24  # b.png is 24 x 16

    def at(x: float, y: float) -> QPointF:
        return QPointF(rect.x() + x * scale, rect.y() + y * scale)

    _drag(canvas, [at(4, 8), at(12, 8), at(20, 8)])
    assert canvas.modified and dialog.save_button.isEnabled()
    _shot(dialog, "mask-dialog.png")
    dialog.save()
    with Image.open(root / "b.mask.png") as saved:
        assert saved.mode == "L" and saved.size == (24, 16)
        mask = np.asarray(saved)
    assert (mask[7:10, 5:20] == 0).all()  # the stroke: left out of training
    assert (mask[:4] == 255).all() and (mask[13:] == 255).all()  # the rest: trained
    assert set(np.unique(mask).tolist()) == {0, 255}
    assert len(list_entries(root)) == 1  # through the undo journal

    panel.show_masks.setChecked(True)  # the grid tints the left-out parts
    row = panel.model.row_of(root / "b.png")
    assert panel.model.has_mask(row) and not panel.model.has_mask(panel.model.row_of(root / "a.png"))
    panel.model.data(panel.model.index(row), 1)  # ask for the tinted thumbnail
    qtbot.waitUntil(lambda: "mask:" + str(root / "b.png") in panel.model._pixmaps, timeout=10_000)
    tinted = panel.model._pixmaps["mask:" + str(root / "b.png")].toImage()
    middle, corner = tinted.pixelColor(tinted.width() // 2, tinted.height() // 2), tinted.pixelColor(2, 2)
    assert middle.red() > 100 and middle != corner, (middle.name(), corner.name())  # tinted vs blue
    panel.resize(900, 500)
    _shot(panel, "datasets-masks.png")

    dialog.undo()
    assert not (root / "b.mask.png").exists()
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


def test_caption_dialog_captions_only_the_selected_images(qtbot, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'sdstudio[tagger]')")
    from PySide6.QtCore import QItemSelectionModel

    tagger = build_tagger(tmp_path / "tagger")
    root = _dataset(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    panel = _panel(qtbot, root)
    selection = panel.grid.selectionModel()
    for name in ("b.png", "c.png"):
        selection.select(panel.model.index(panel.model.row_of(root / name)), QItemSelectionModel.SelectionFlag.Select)
    assert panel.selected_images() == [root / "b.png", root / "c.png"]
    dialog = panel.open_caption()
    qtbot.addWidget(dialog)
    assert dialog.scope.currentIndex() == 1 and "(2)" in dialog.scope.currentText()
    dialog.model_folder.setText(str(tagger))
    dialog.mode.setCurrentText("Replace existing captions")
    dialog.start()
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    assert "2 caption(s) written" in dialog.status.text(), dialog.status.text()
    assert (root / "a.txt").read_bytes() == before["a.txt"]  # not selected: left alone
    assert (root / "b.txt").read_bytes() != before["b.txt"] and (root / "c.txt").is_file()


def _select(panel, root: Path, names) -> None:
    from PySide6.QtCore import QItemSelectionModel

    selection = panel.grid.selectionModel()
    for name in names:
        selection.select(panel.model.index(panel.model.row_of(root / name)), QItemSelectionModel.SelectionFlag.Select)


def _cutouts(root: Path) -> Path:
    """Four RGBA images, the left half of each transparent."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b", "c", "d"):
        cut = Image.new("RGBA", (24, 16), (255, 0, 0, 255))
        cut.paste((0, 0, 0, 0), (0, 0, 12, 16))
        cut.save(root / f"{name}.png")
    return root


def test_masks_dialog_masks_the_selection_from_alpha_and_undoes(qtbot, tmp_path: Path) -> None:
    import numpy as np

    root = _cutouts(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    panel = _panel(qtbot, root)
    assert panel.report["counts"]["masked"] == 0
    _select(panel, root, ("b.png", "d.png"))
    dialog = panel.open_make_masks()
    qtbot.addWidget(dialog)
    assert dialog.scope.currentIndex() == 1 and "(2)" in dialog.scope.currentText()
    assert not dialog.prompt.isVisible() and not dialog.undo_button.isEnabled()  # alpha: no prompt, no model
    dialog.start()
    assert dialog.running and not dialog.run_button.isEnabled() and dialog.stop_button.isEnabled()
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    assert "2 mask(s) written" in dialog.status.text(), dialog.status.text()
    assert sorted(p.name for p in root.glob("*.mask.png")) == ["b.mask.png", "d.mask.png"]  # the selection only
    pixels = np.asarray(Image.open(root / "b.mask.png"))
    assert (pixels[:, :12] == 0).all() and (pixels[:, 12:] == 255).all()
    # the grid tints the masked thumbnails and the health report counts them, without "Check again"
    assert panel.show_masks.isChecked() and panel.model.has_mask(panel.model.row_of(root / "d.png"))
    assert not panel.model.has_mask(panel.model.row_of(root / "a.png"))
    qtbot.waitUntil(lambda: panel.report["counts"]["masked"] == 2 and not panel.progress.isVisible(), timeout=30_000)
    dialog.mode.setCurrentText("Skip images that have a mask")
    dialog.start()
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    assert "0 mask(s) written; 2 existing mask(s) left alone" in dialog.status.text(), dialog.status.text()
    assert dialog.undo_button.isEnabled()
    dialog.undo()
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    qtbot.waitUntil(lambda: panel.report["counts"]["masked"] == 0 and not panel.progress.isVisible(), timeout=30_000)


def test_masks_dialog_masks_from_a_prompt_with_clipseg(qtbot, tmp_path: Path) -> None:
    import numpy as np

    try:
        from tiny_clipseg import build_clipseg
    except ImportError:  # tests/ imported as a package
        from tests.tiny_clipseg import build_clipseg

    clipseg = build_clipseg(tmp_path / "clipseg")
    root = _dataset(tmp_path / "data")
    panel = _panel(qtbot, root)
    _select(panel, root, ("a.png", "c.png"))
    dialog = panel.open_make_masks()
    qtbot.addWidget(dialog)
    dialog.source.setCurrentText("A text prompt (CLIPSeg model folder)")
    dialog.start()  # no prompt, no folder: a sentence, no run
    assert not dialog.running and "prompt" in dialog.status.text()
    dialog.prompt.setText("a red square")
    dialog.model_folder.setText(str(tmp_path / "nowhere"))
    dialog.start()
    qtbot.waitUntil(lambda: not dialog.running, timeout=30_000)
    assert "does not exist" in dialog.status.text(), dialog.status.text()  # a clear message, no crash
    dialog.model_folder.setText(str(clipseg))
    dialog.threshold.setValue(0.0)  # every sigmoid is above 0: all white
    dialog.batch_size.setValue(1)
    dialog.resize(620, 400)
    dialog.show()
    qtbot.waitExposed(dialog)
    dialog.start()
    qtbot.waitUntil(lambda: not dialog.running, timeout=60_000)
    assert "2 mask(s) written" in dialog.status.text(), dialog.status.text()
    assert sorted(p.name for p in root.glob("*.mask.png")) == ["a.mask.png", "c.mask.png"]
    for name in ("a", "c"):
        with Image.open(root / f"{name}.mask.png") as mask:
            assert mask.mode == "L" and mask.size == (24, 16) and (np.asarray(mask) == 255).all()
    _shot(dialog, "masks-dialog.png")
    qtbot.waitUntil(lambda: panel.report["counts"]["masked"] == 2 and not panel.progress.isVisible(), timeout=30_000)
    panel.resize(900, 500)
    _shot(panel, "datasets-masks-panel.png")
