"""The mask editor: paint or erase an image's training mask (``name.mask.png``) with a brush, step through the
images, save through the dataset's undo journal (``Undo`` there, or ``sdstudio dataset undo DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PySide6.QtCore import Signal
from PySide6.QtGui import QImage, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from sdstudio.core.data.mask_files import mask_path
from sdstudio.core.data.masks import mask_from_alpha, open_image, read_mask, write_masks
from sdstudio.core.data.undo_journal import list_entries, undo_last
from sdstudio.core.errors import UserError

from ..widgets.mask_canvas import MaskCanvas


def pil_to_qimage(image: Image.Image) -> QImage:
    """A QImage owning a copy of a PIL image (L stays grayscale, the rest becomes RGBA)."""
    if image.mode == "L":
        return QImage(image.tobytes(), image.width, image.height, image.width,
                      QImage.Format.Format_Grayscale8).copy()
    rgba = image.convert("RGBA")
    return QImage(rgba.tobytes(), rgba.width, rgba.height, 4 * rgba.width, QImage.Format.Format_RGBA8888).copy()


def qimage_to_mask(image: QImage) -> Image.Image:
    """The grayscale QImage as a PIL L image (rows copied without Qt's line padding)."""
    gray = image.convertToFormat(QImage.Format.Format_Grayscale8)
    rows = np.frombuffer(gray.constBits(), dtype=np.uint8, count=gray.sizeInBytes())
    pixels = rows.reshape(gray.height(), gray.bytesPerLine())[:, :gray.width()]
    return Image.fromarray(np.ascontiguousarray(pixels))


class MaskDialog(QDialog):
    """Edit the masks of ``images`` (dataset ``root``), starting at ``start``; ``mask_saved`` names the image
    whose mask was written or restored."""

    mask_saved = Signal(Path)

    def __init__(self, root: Path, images: list[Path], start: Path | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.root = Path(root)
        self.images = list(images)
        self.index = self.images.index(start) if start in self.images else 0
        self._picture: Image.Image | None = None
        self.setWindowTitle("Mask")

        self.canvas = MaskCanvas()
        self.paint = QRadioButton("Paint (train here)")
        self.erase = QRadioButton("Erase (leave out)")
        self.paint.setChecked(True)
        group = QButtonGroup(self)
        for button in (self.paint, self.erase):
            group.addButton(button)
        self.erase.toggled.connect(lambda on: setattr(self.canvas, "erase", on))
        self.brush = QSpinBox(minimum=1, maximum=500, value=self.canvas.brush_radius, suffix=" px")
        self.brush.setToolTip("Brush radius in image pixels")
        self.brush.valueChanged.connect(lambda v: setattr(self.canvas, "brush_radius", v))
        self.show_mask = QCheckBox("Show mask")
        self.show_mask.setChecked(True)
        self.show_mask.toggled.connect(self._toggle_mask)
        tools = QHBoxLayout()
        for widget in (self.paint, self.erase, QLabel("Brush"), self.brush, self.show_mask):
            tools.addWidget(widget)
        tools.addStretch(1)
        fills = QHBoxLayout()
        for text, tip, slot in (
            ("All trained", "White mask: every pixel is trained", lambda: self.canvas.fill(255)),
            ("None trained", "Black mask: paint what to train", lambda: self.canvas.fill(0)),
            ("From alpha", "The image's transparency: transparent pixels are left out", self.from_alpha),
        ):
            button = QPushButton(text)
            button.setToolTip(tip)
            button.clicked.connect(slot)
            fills.addWidget(button)
        fills.addStretch(1)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.previous_button = QPushButton("◀ Previous")
        self.previous_button.clicked.connect(lambda: self.go(-1))
        self.next_button = QPushButton("Next ▶")
        self.next_button.clicked.connect(lambda: self.go(1))
        self.save_button = QPushButton("Save")
        self.save_button.setDefault(True)
        self.save_button.clicked.connect(self.save)
        QShortcut(QKeySequence.StandardKey.Save, self, activated=self.save)
        self.undo_button = QPushButton("Undo last")
        self.undo_button.setToolTip("Restore the masks (or captions) from before the last saved edit")
        self.undo_button.clicked.connect(self.undo)
        self.delete_button = QPushButton("Delete mask")
        self.delete_button.setToolTip("Remove this image's mask file (undoable): the whole image is trained")
        self.delete_button.clicked.connect(self.delete)
        close = QPushButton("Close")
        close.clicked.connect(self.close)
        buttons = QHBoxLayout()
        for button in (self.previous_button, self.next_button, self.save_button, self.undo_button,
                       self.delete_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        buttons.addWidget(close)

        layout = QVBoxLayout(self)
        hint = QLabel("Red parts are left out of training (used by the masked loss). Drag to paint or erase.")
        hint.setWordWrap(True)
        layout.addWidget(hint)
        layout.addLayout(tools)
        layout.addLayout(fills)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.status)
        layout.addLayout(buttons)
        self.canvas.changed.connect(self._update_buttons)
        self.load()

    @property
    def image(self) -> Path | None:
        return self.images[self.index] if self.images else None

    def load(self) -> None:
        """Show the current image and its mask (a new all-white mask when it has none)."""
        image = self.image
        if image is None:
            self.status.setText("No images.")
            return
        try:
            self._picture = open_image(image)
            mask = read_mask(image, self._picture.size)
        except (OSError, ValueError, UserError) as exc:
            self._picture = None
            self.status.setText(f"{image.name} cannot be shown: {exc}")
            return
        self.canvas.set_images(pil_to_qimage(self._picture), pil_to_qimage(mask) if mask is not None else None)
        self.setWindowTitle(f"Mask: {image.name} ({self.index + 1} of {len(self.images)})")
        state = "its mask" if mask is not None else "no mask yet (all trained)"
        self.status.setText(f"{image.name}: {state}.")
        self._update_buttons()

    def _toggle_mask(self, on: bool) -> None:
        self.canvas.show_mask = on
        self.canvas.update()

    def _update_buttons(self, *_args: Any) -> None:
        self.previous_button.setEnabled(self.index > 0)
        self.next_button.setEnabled(self.index < len(self.images) - 1)
        self.save_button.setEnabled(self.canvas.modified)
        self.undo_button.setEnabled(bool(list_entries(self.root)))
        self.delete_button.setEnabled(self.image is not None and mask_path(self.image).exists())

    def from_alpha(self) -> None:
        if self._picture is None:
            return
        mask = mask_from_alpha(self._picture)
        if isinstance(mask, str):
            self.status.setText(f"No mask from alpha: {mask}.")
            return
        self.canvas.set_mask(pil_to_qimage(mask))

    def save(self) -> bool:
        """Write the mask (atomically, through the undo journal); False when writing failed."""
        image = self.image
        if image is None or not self.canvas.modified:
            return True
        try:
            write_masks(self.root, {image: qimage_to_mask(self.canvas.mask)}, f"mask: {image.name}")
        except (OSError, UserError) as exc:
            self.status.setText(f"Mask not saved: {exc}")
            return False
        self.canvas.modified = False
        self.status.setText(f"Saved {mask_path(image).name}.")
        self._update_buttons()
        self.mask_saved.emit(image)
        return True

    def go(self, step: int) -> None:
        """Save the current mask if it changed, then show the previous / next image."""
        target = self.index + step
        if not 0 <= target < len(self.images) or not self.save():
            return
        self.index = target
        self.load()

    def delete(self) -> None:
        from sdstudio.core.data.masks import delete_masks

        image = self.image
        if image is not None and delete_masks(self.root, [image], f"mask: delete {image.name}") is not None:
            self.mask_saved.emit(image)
            self.load()
            self.status.setText(f"Deleted the mask of {image.name} (Undo last puts it back).")

    def undo(self) -> None:
        try:
            result = undo_last(self.root)
        except UserError as exc:
            self.status.setText(str(exc))
            return
        self.load()
        self.status.setText(f"Undone: {result.label}.")
        for path in result.restored + result.removed:
            self.mask_saved.emit(path)  # a mask path: the panel refreshes whatever it shows of it

    def closeEvent(self, event: Any) -> None:
        self.save()  # like the caption editor: an edit is never lost by closing
        super().closeEvent(event)
