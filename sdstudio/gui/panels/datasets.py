"""Datasets: the remembered folders, a virtualised thumbnail grid, the caption editor and the health report."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QItemSelectionModel, QModelIndex, QSize, Qt, QThreadPool, Signal, Slot
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core import paths
from sdstudio.core.data import registry
from sdstudio.core.data.report import build_report
from sdstudio.core.data.scan import ScanResult, scan_dataset

from ..background import run_in_background
from ..widgets.caption_editor import CaptionEditor
from ..widgets.failure_dialog import show_error
from ..widgets.thumbnails import THUMB_SIZE, RecordRole, ThumbnailModel
from .image_loss import ImageLossPanel
from .report import ReportPanel

PATH_ROLE = Qt.ItemDataRole.UserRole + 1


def same_folder(a: Path | str, b: Path | str) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


class DatasetsPanel(QWidget):
    """Pick a dataset folder (button, list or drag & drop); see its images, captions and problems."""

    dataset_opened = Signal(str)  # the folder now shown (absolute)
    report_ready = Signal(object)  # the health report dict (preliminary ones too)
    _deliver_quick = Signal(object)  # emitted from the scan job; queued to the GUI thread

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAcceptDrops(True)
        self._current: Path | None = None
        self._scan_token = 0
        self._resolution = 0
        self.report: dict[str, Any] | None = None
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(1)
        self._deliver_quick.connect(self._quick_result)

        self.datasets = QListWidget()
        self.datasets.itemClicked.connect(self._dataset_clicked)
        add = QPushButton("Add folder…")
        add.setToolTip("Add an image folder (or drop one onto this panel)")
        add.clicked.connect(self.pick_folder)
        self.remove_button = QPushButton("Forget")
        self.remove_button.setToolTip("Remove the selected folder from this list (its files are left alone)")
        self.remove_button.clicked.connect(self._forget_selected)
        rescan = QPushButton("Check again")
        rescan.setToolTip("Scan the folder again (after you changed files)")
        rescan.clicked.connect(self.rescan)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(QLabel("<b>Datasets</b>"))
        left_layout.addWidget(self.datasets, 1)
        row = QHBoxLayout()
        row.addWidget(add)
        row.addWidget(self.remove_button)
        left_layout.addLayout(row)
        left_layout.addWidget(rescan)
        tools, mask_tools = QHBoxLayout(), QHBoxLayout()  # the dataset tools: their own dialogs
        for line, text, tip, slot in (
                (tools, "Tags…", "Tag table, bulk tag edits, undo", self.open_tags),
                (tools, "Caption…", "Caption the images with a tagger or captioner", self.open_caption),
                (tools, "Masks…", "Make masks from the alpha channel or a text prompt",
                 self.open_make_masks),
                (mask_tools, "Paint mask…", "Paint the training mask of the selected image", self.open_masks)):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(slot)
            line.addWidget(button)
        left_layout.addLayout(tools)
        self.show_masks = QCheckBox("Show masks")
        self.show_masks.setToolTip("Tint the parts of each thumbnail that its mask (name.mask.png) leaves out")
        self.show_masks.toggled.connect(lambda on: self.model.set_show_masks(on))
        mask_tools.addWidget(self.show_masks)
        left_layout.addLayout(mask_tools)

        self.model = ThumbnailModel(self)
        self.grid = QListView()
        self.grid.setViewMode(QListView.ViewMode.IconMode)
        self.grid.setResizeMode(QListView.ResizeMode.Adjust)
        self.grid.setMovement(QListView.Movement.Static)
        self.grid.setUniformItemSizes(True)
        self.grid.setLayoutMode(QListView.LayoutMode.Batched)
        self.grid.setBatchSize(200)
        self.grid.setIconSize(QSize(THUMB_SIZE, THUMB_SIZE))
        self.grid.setGridSize(QSize(THUMB_SIZE + 16, THUMB_SIZE + 28))
        self.grid.setSpacing(2)
        self.grid.setModel(self.model)
        self.grid.setSelectionMode(QListView.SelectionMode.ExtendedSelection)  # a selection for the tools
        self.grid.selectionModel().currentChanged.connect(self._image_selected)
        self.header = QLabel("")
        self.header.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.progress.setMaximumHeight(14)
        middle = QWidget()
        middle_layout = QVBoxLayout(middle)
        middle_layout.setContentsMargins(0, 0, 0, 0)
        middle_layout.addWidget(self.header)
        middle_layout.addWidget(self.progress)
        middle_layout.addWidget(self.grid, 1)

        self.caption = CaptionEditor()
        self.caption.saved.connect(self._caption_saved)
        self.caption.failed.connect(lambda message: show_error(self, "Caption not saved", message))
        self.health = ReportPanel()
        self.health.problem_selected.connect(self.select_file)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(QLabel("<b>Caption</b>"))
        right_layout.addWidget(self.caption)
        right_layout.addWidget(QLabel("<b>Health report</b>"))
        right_layout.addWidget(self.health, 1)
        right_layout.addWidget(QLabel("<b>Per-image loss</b>"))
        self.image_loss = ImageLossPanel()
        self.image_loss.image_selected.connect(self.select_file)
        right_layout.addWidget(self.image_loss, 1)

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        for widget, stretch in ((left, 0), (middle, 1), (right, 0)):
            self.splitter.addWidget(widget)
            self.splitter.setStretchFactor(self.splitter.count() - 1, stretch)
        self.splitter.setSizes([170, 640, 350])
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.splitter)
        self.refresh_list()

    # -- the list of datasets -------------------------------------------------------------------------
    def refresh_list(self) -> None:
        self.datasets.clear()
        demo = QListWidgetItem("Demo shapes (bundled)")
        demo.setData(PATH_ROLE, str(paths.demo_dataset_dir()))
        demo.setToolTip(f"{paths.demo_dataset_dir()}\n288 coloured shapes with captions; trains in minutes on "
                        "a CPU")
        self.datasets.addItem(demo)
        for entry in registry.list_datasets():
            if same_folder(entry.path, paths.demo_dataset_dir()):
                continue
            item = QListWidgetItem(entry.name)
            item.setData(PATH_ROLE, entry.path)
            item.setToolTip(f"{entry.path}\n{entry.summary or 'not checked yet'}")
            self.datasets.addItem(item)
        self._mark_current()

    def _mark_current(self) -> None:
        for i in range(self.datasets.count()):
            item = self.datasets.item(i)
            if self._current is not None and same_folder(item.data(PATH_ROLE), self._current):
                self.datasets.setCurrentItem(item)
                return
        # the folder shown is not in the list (opened from a config or the last session without being added):
        # no entry may look selected, or the list would name another dataset than the one shown
        self.datasets.setCurrentRow(-1)
        self.datasets.clearSelection()

    def _dataset_clicked(self, item: QListWidgetItem) -> None:
        self.open_folder(Path(item.data(PATH_ROLE)), remember=False)

    def pick_folder(self) -> None:
        start = str(self._current.parent) if self._current else str(Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Add an image folder", start)
        if folder:
            self.open_folder(Path(folder))

    def _forget_selected(self) -> None:
        item = self.datasets.currentItem()
        if item is None or same_folder(item.data(PATH_ROLE), paths.demo_dataset_dir()):
            return
        registry.remove_dataset(item.data(PATH_ROLE))
        self.refresh_list()

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if any(Path(url.toLocalFile()).is_dir() for url in event.mimeData().urls()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        folders = [Path(url.toLocalFile()) for url in event.mimeData().urls() if Path(url.toLocalFile()).is_dir()]
        for folder in folders:
            self.open_folder(folder)
        event.acceptProposedAction()

    # -- opening and scanning -------------------------------------------------------------------------
    def current_path(self) -> Path | None:
        return self._current

    def set_resolution(self, resolution: int) -> None:
        self._resolution = resolution

    def open_folder(self, folder: Path, *, remember: bool = True) -> None:
        """Show ``folder``: the grid fills after a quick scan, the full report follows (background)."""
        folder = folder.expanduser().absolute()
        if not folder.is_dir():
            show_error(self, "Not a folder", f"{folder} is not a folder (or cannot be read).",
                       hint="Choose an existing folder of images.")
            return
        if remember and not same_folder(folder, paths.demo_dataset_dir()):
            registry.add_dataset(folder)
            self.refresh_list()
        changed = self._current is None or not same_folder(folder, self._current)
        self._current = folder
        self._mark_current()
        if changed:
            self.model.set_records([])
            self.caption.set_record(None)
            self.image_loss.set_dataset(folder)
            self.dataset_opened.emit(str(folder))
        self.rescan()

    def rescan(self) -> None:
        if self._current is None:
            return
        self._scan_token += 1
        token, folder, resolution = self._scan_token, self._current, self._resolution
        self.header.setText(f"<b>{folder.name}</b> · {folder}")
        self.health.set_scanning(0, 0)
        self.progress.setVisible(True)
        self.progress.setRange(0, 0)

        def job(progress: Any) -> tuple[int, str, ScanResult, dict[str, Any]]:
            quick = scan_dataset(folder, resolution=resolution)
            # the grid and a preliminary report appear at once; the deep check (decoding, duplicates) follows
            self._deliver_quick.emit((token, quick, build_report(quick, resolution)))
            full = scan_dataset(folder, resolution=resolution, find_duplicates=True, progress=progress)
            return token, str(folder), full, build_report(full, resolution)

        run_in_background(job, self._scan_done, self._scan_failed, on_progress=self._scan_progress,
                          pool=self._pool)

    @Slot(int, int)
    def _scan_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.health.set_scanning(done, total)

    def _quick_result(self, payload: tuple[int, ScanResult, dict[str, Any]]) -> None:
        token, scan, report = payload
        if token != self._scan_token:
            return
        self._show_scan(scan, report, preliminary=True)

    def _scan_done(self, result: tuple[int, str, ScanResult, dict[str, Any]]) -> None:
        token, folder, full, report = result
        if token != self._scan_token:
            return
        self.progress.setVisible(False)
        self._show_scan(full, report, preliminary=False)
        registry.update_summary(folder, report["summary"])

    def _scan_failed(self, message: str, details: str) -> None:
        self.progress.setVisible(False)
        self.health.set_error(message)
        self.report = None

    def _show_scan(self, scan: ScanResult, report: dict[str, Any], *, preliminary: bool) -> None:
        selected = self.caption.record()
        if [r.path for r in scan.records] != [r.path for r in self.model.records()]:
            self.model.set_records(scan.records)
            if selected is not None:
                self.select_file(selected.path)
        self.report = report
        self.health.set_report(report, preliminary=preliminary)
        counts = report["counts"]
        self.header.setText(f"<b>{scan.root.name}</b> · {counts['images']} images · {scan.layout} layout · "
                            f"<span style='color:gray'>{scan.root}</span>")
        self.report_ready.emit(report)

    # -- images and captions --------------------------------------------------------------------------
    def _image_selected(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if self.caption.is_modified():
            self.caption.save()
        self.caption.set_record(current.data(RecordRole) if current.isValid() else None)

    @Slot(Path)
    def select_file(self, path: Path) -> None:
        row = self.model.row_of(path)
        if row < 0:
            self.header.setText(f"{path.name} is not among the usable images (see its problem in the report).")
            return
        index = self.model.index(row)
        self.grid.selectionModel().setCurrentIndex(index, QItemSelectionModel.SelectionFlag.ClearAndSelect)
        self.grid.scrollTo(index)

    def _caption_saved(self, path: Path, captions: tuple[str, ...]) -> None:
        self.model.update_captions(path, captions)

    def first_image(self) -> Path | None:
        records = self.model.records()
        return records[0].path if records else None

    def open_tags(self) -> QWidget | None:
        from .tags_dialog import TagsDialog

        return self._open_tool(TagsDialog)

    def selected_images(self) -> list[Path]:
        """The images selected in the grid, in dataset order."""
        rows = sorted(index.row() for index in self.grid.selectionModel().selectedIndexes())
        return [self.model.record(row).path for row in rows]

    def open_caption(self) -> QWidget | None:
        from .caption_dialog import CaptionDialog

        if self._current is None:
            return None
        dialog = CaptionDialog(self._current, self, selection=self.selected_images())
        dialog.captions_changed.connect(self.rescan)
        dialog.show()
        return dialog

    def open_masks(self) -> QWidget | None:
        """The mask editor for the selected images (all of them when one or none is selected)."""
        from .mask_dialog import MaskDialog

        records = self.model.records()
        if self._current is None or not records:
            return None
        selected = self.selected_images()
        images = selected if len(selected) > 1 else [r.path for r in records]
        current = self.caption.record()
        dialog = MaskDialog(self._current, images, current.path if current else None, self)
        dialog.mask_saved.connect(lambda _path: self.model.masks_changed())
        dialog.show()
        return dialog

    def open_make_masks(self) -> QWidget | None:
        """The Masks dialog: masks from the alpha channel or a prompt, for the selection or the dataset."""
        from .masks_dialog import MasksDialog

        if self._current is None:
            return None
        dialog = MasksDialog(self._current, self, selection=self.selected_images())
        dialog.masks_changed.connect(self._masks_written)
        dialog.show()
        return dialog

    def _masks_written(self) -> None:
        """Masks were written or undone: tint the thumbnails again (showing masks: the user just made some) and
        recount them in the health report."""
        if self.show_masks.isChecked():
            self.model.masks_changed()
        else:
            self.show_masks.setChecked(True)  # looks the masks up again
        self.rescan()

    def _open_tool(self, dialog_class: Any) -> QWidget | None:
        if self._current is None:
            return None
        dialog = dialog_class(self._current, self)
        dialog.captions_changed.connect(self.rescan)
        dialog.show()
        return dialog

    def shutdown(self) -> None:
        self._scan_token += 1
        self.model.shutdown()
        self._pool.waitForDone(5000)
