"""Showing uint8 numpy images: conversion to QImage (GUI thread) and a scaling, clickable view."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QImage, QMouseEvent, QPainter, QPaintEvent, QPixmap
from PySide6.QtWidgets import QSizePolicy, QWidget


def array_to_qimage(image: np.ndarray) -> QImage:
    """A QImage that owns a copy of an HxWx3 (or HxW) uint8 array."""
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {array.shape}")
    if array.shape[2] == 4:
        array = np.ascontiguousarray(array[:, :, :3])
    height, width, _ = array.shape
    qimage = QImage(array.data, width, height, 3 * width, QImage.Format.Format_RGB888)
    return qimage.copy()  # detach from the numpy buffer, which may be freed


class ImageView(QWidget):
    """Draws a pixmap scaled to fit, keeping its aspect; pixel art (small images) scales without blur."""

    clicked = Signal()

    def __init__(self, parent: QWidget | None = None, *, placeholder: str = "") -> None:
        super().__init__(parent)
        self._pixmap: QPixmap | None = None
        self._placeholder = placeholder
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(64, 64)

    def set_image(self, image: np.ndarray | QImage | None) -> None:
        if image is None:
            self._pixmap = None
        elif isinstance(image, QImage):
            self._pixmap = QPixmap.fromImage(image)
        else:
            self._pixmap = QPixmap.fromImage(array_to_qimage(image))
        self.update()

    def pixmap(self) -> QPixmap | None:
        return self._pixmap

    def set_placeholder(self, text: str) -> None:
        self._placeholder = text
        self.update()

    def sizeHint(self) -> QSize:
        return QSize(320, 320)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        if self._pixmap is None or self._pixmap.isNull():
            painter.setPen(self.palette().placeholderText().color())
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap,
                             self._placeholder)
            return
        size = self._pixmap.size().scaled(self.size(), Qt.AspectRatioMode.KeepAspectRatio)
        upscale = size.width() > self._pixmap.width()
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, not upscale)
        x = (self.width() - size.width()) // 2
        y = (self.height() - size.height()) // 2
        painter.drawPixmap(x, y, size.width(), size.height(), self._pixmap)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton and self._pixmap is not None:
            self.clicked.emit()
        super().mouseReleaseEvent(event)
