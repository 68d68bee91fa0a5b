"""Datasets panel: caption editing (atomic sidecar writes, images untouched), the clickable health report,
and the virtualised thumbnail grid."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QModelIndex, Qt
from PySide6.QtWidgets import QListView

from sdstudio.core.data.scan import ImageRecord


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _panel(qtbot, folder: Path):
    from sdstudio.gui.panels.datasets import DatasetsPanel

    panel = DatasetsPanel()
    qtbot.addWidget(panel)
    panel.resize(1200, 700)
    panel.show()
    panel.open_folder(folder)
    qtbot.waitUntil(lambda: panel.report is not None and not panel.progress.isVisible(), timeout=30_000)
    return panel


def test_caption_edit_writes_the_sidecar_atomically_and_never_touches_the_image(qtbot, tiny_copy: Path,
                                                                                monkeypatch) -> None:
    from sdstudio.core import atomic

    panel = _panel(qtbot, tiny_copy)
    image = panel.model.record(0).path
    sidecar = image.with_suffix(".txt")
    before_image, before_caption = _sha(image), sidecar.read_text()
    replaced: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:  # os is shared: thumbnail cache writes come through here too
        if Path(dst).parent == tiny_copy:
            replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", spy)
    panel.select_file(image)
    editor = panel.caption
    assert editor.record().path == image
    assert editor.edit.toPlainText() == before_caption.strip()
    assert not editor.save_button.isEnabled()
    editor.edit.setPlainText("a crimson circle on white\nred circle, white background")
    assert editor.save_button.isEnabled()
    qtbot.mouseClick(editor.save_button, Qt.MouseButton.LeftButton)

    assert sidecar.read_text() == "a crimson circle on white\nred circle, white background\n"
    assert _sha(image) == before_image, "the image file must never change"
    assert len(replaced) == 1 and replaced[0][1] == str(sidecar)
    assert Path(replaced[0][0]).parent == sidecar.parent and not Path(replaced[0][0]).exists()
    assert not [p for p in tiny_copy.iterdir() if p.name.startswith(".")], "no temp file left behind"
    assert panel.model.record(0).captions == ("a crimson circle on white", "red circle, white background")
    assert not editor.save_button.isEnabled() and "saved" in editor.status.text()
    panel.shutdown()


def test_clicking_a_problem_selects_its_file(qtbot, tiny_copy: Path) -> None:
    uncaptioned = sorted(tiny_copy.glob("*.png"))[3]
    uncaptioned.with_suffix(".txt").unlink()
    panel = _panel(qtbot, tiny_copy)
    health = panel.health
    items = [health.problems.topLevelItem(i) for i in range(health.problems.topLevelItemCount())]
    missing = [item for item in items if item.text(1) == "missing caption"]
    assert missing, [item.text(1) for item in items]
    health.problems.itemClicked.emit(missing[0], 0)
    current = panel.grid.currentIndex()
    assert current.isValid() and panel.model.record(current.row()).path == uncaptioned
    assert panel.caption.record().path == uncaptioned
    assert "1 warning" in health.summary.text() or "warnings" in health.summary.text()
    panel.shutdown()


def test_thumbnails_are_made_in_the_background_and_cached_on_disk(qtbot, tiny_copy: Path) -> None:
    from sdstudio.gui.widgets.thumbnails import THUMB_SIZE, thumbnail_cache_dir

    panel = _panel(qtbot, tiny_copy)
    model = panel.model
    first = model.index(0)
    model.data(first, Qt.ItemDataRole.DecorationRole)  # asks for it (the view may have already)
    qtbot.waitUntil(lambda: model.thumbnail_ready(0), timeout=20_000)
    pixmap = model.data(first, Qt.ItemDataRole.DecorationRole)
    assert pixmap.width() == THUMB_SIZE  # 16 px images are enlarged 6x, crisply
    cached = list(thumbnail_cache_dir().rglob("*.png"))
    assert cached, "thumbnails are written to the disk cache"
    panel.shutdown()


def test_thumbnail_model_with_10000_images_stays_responsive_and_lazy(qtbot, tmp_path: Path) -> None:
    from sdstudio.gui.widgets.thumbnails import ThumbnailModel

    records = [ImageRecord(tmp_path / f"img_{i:05d}.png", (f"caption {i}",), 1, "", 512, 512, "sidecar")
               for i in range(10_000)]
    model = ThumbnailModel()
    t0 = time.perf_counter()
    model.set_records(records)
    assert time.perf_counter() - t0 < 0.5
    assert model.rowCount() == 10_000 and model.rowCount(model.index(0)) == 0

    t0 = time.perf_counter()
    names = [model.data(model.index(row), Qt.ItemDataRole.DisplayRole) for row in range(10_000)]
    tips = [model.data(model.index(row), Qt.ItemDataRole.ToolTipRole) for row in range(0, 10_000, 10)]
    assert time.perf_counter() - t0 < 1.5
    assert names[9_999] == "img_09999.png" and "caption 990" in tips[99]
    assert model.requests == 0, "display and tooltip data never make thumbnails"
    assert model.data(QModelIndex(), Qt.ItemDataRole.DisplayRole) is None

    view = QListView()
    qtbot.addWidget(view)
    view.setViewMode(QListView.ViewMode.IconMode)
    view.setUniformItemSizes(True)
    view.setLayoutMode(QListView.LayoutMode.Batched)
    view.setModel(model)
    view.resize(600, 400)
    view.show()
    t0 = time.perf_counter()
    qtbot.waitUntil(lambda: model.requests > 0, timeout=10_000)
    qtbot.wait(200)
    assert time.perf_counter() - t0 < 5
    assert 0 < model.requests < 500, f"only what is on screen is asked for, not {model.requests}"
    view.scrollToBottom()
    qtbot.wait(200)
    assert model.requests < 1000
    # the fake files do not exist: those rows get the 'broken' thumbnail, nothing raises
    qtbot.waitUntil(lambda: model.pending() == 0, timeout=20_000)
    model.shutdown()


def test_an_unreadable_image_gets_a_broken_thumbnail(qtbot, tmp_path: Path) -> None:
    from sdstudio.gui.widgets.thumbnails import make_thumbnail

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert make_thumbnail(bad).isNull()
    good = tmp_path / "good.png"
    Image.new("RGB", (300, 150), "red").save(good)
    thumb = make_thumbnail(good)
    assert (thumb.width(), thumb.height()) == (96, 48)


def test_the_list_marks_the_dataset_shown_and_nothing_when_it_is_not_listed(qtbot, tiny_copy: Path,
                                                                           tmp_path: Path) -> None:
    """A folder opened without being added (the last session's, a config's data.path) is shown with no list
    entry selected: the bundled demo used to stay highlighted over another folder's images."""
    import shutil

    from sdstudio.core import paths
    from sdstudio.gui.panels.datasets import PATH_ROLE, DatasetsPanel

    panel = DatasetsPanel()
    qtbot.addWidget(panel)
    panel.show()

    def selected() -> list[str]:
        return [item.data(PATH_ROLE) for item in panel.datasets.selectedItems()]

    panel.open_folder(paths.demo_dataset_dir(), remember=False)
    assert selected() == [str(paths.demo_dataset_dir())]
    unlisted = shutil.copytree(tiny_copy, tmp_path / "unlisted")
    panel.open_folder(unlisted, remember=False)
    assert selected() == [] and panel.datasets.currentItem() is None
    panel.open_folder(tiny_copy)  # added to the list, and marked
    assert [Path(p) for p in selected()] == [tiny_copy]
    qtbot.waitUntil(lambda: not panel.progress.isVisible(), timeout=30_000)
    panel.shutdown()
