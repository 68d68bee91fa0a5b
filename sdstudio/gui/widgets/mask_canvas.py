"""A training mask drawn over its image: the parts left out of training are tinted red; a round brush paints
(white = train on this pixel) or erases (black) with the mouse. The mask is a single-channel QImage of the
image's own size, so strokes land on image pixels whatever the zoom."""

from __future__ import annotations

import itertools
from pathlib import Path

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QImage, QMouseEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from sdstudio.core.data.mask_files import mask_path

TINT = QColor(230, 30, 30)
TINT_OPACITY = 0.55


def mask_overlay(mask: QImage, size: QSize | None = None) -> QImage:
    """A red image, opaque where ``mask`` is black (not trained) and clear where it is white; scaled to
    ``size`` when given. Draw it with some opacity over the picture."""
    gray = mask.convertToFormat(QImage.Format.Format_Grayscale8)
    if size is not None and gray.size() != size:
        gray = gray.scaled(size, Qt.AspectRatioMode.IgnoreAspectRatio, Qt.TransformationMode.FastTransformation)
    gray.invertPixels()
    overlay = QImage(gray.size(), QImage.Format.Format_ARGB32)
    overlay.fill(TINT)
    overlay.setAlphaChannel(gray)
    return overlay


def with_mask_tint(picture: QImage, mask: QImage) -> QImage:
    """``picture`` with the untrained parts of ``mask`` (any size) tinted."""
    out = picture.convertToFormat(QImage.Format.Format_ARGB32_Premultiplied)
    painter = QPainter(out)
    painter.setOpacity(TINT_OPACITY)
    painter.drawImage(0, 0, mask_overlay(mask, out.size()))
    painter.end()
    return out


def tinted_thumbnail(thumbnail: QImage, image: Path) -> QImage:
    """The thumbnail of ``image`` with its mask tinted over it (unchanged when it has no readable mask)."""
    mask = QImage(str(mask_path(image)))
    return thumbnail if mask.isNull() or thumbnail.isNull() else with_mask_tint(thumbnail, mask)


class MaskCanvas(QWidget):
    """Shows ``image`` with ``mask`` tinted over it; left-drag paints (or erases, see ``erase``)."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._image = QImage()
        self.mask = QImage()
        self.brush_radius = 12  # image pixels
        self.erase = False  # False: strokes paint white (train here); True: black (leave out)
        self.show_mask = True
        self.modified = False
        self._last: QPointF | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(160, 160)
        self.setMouseTracking(False)

    def set_images(self, image: QImage, mask: QImage | None) -> None:
        """The picture and its mask (None: a new, all-white mask: everything trained)."""
        self._image = image
        if mask is None or mask.isNull():
            self.mask = QImage(image.size(), QImage.Format.Format_Grayscale8)
            self.mask.fill(255)
        else:
            self.mask = mask.convertToFormat(QImage.Format.Format_Grayscale8)
            if self.mask.size() != image.size():
                self.mask = self.mask.scaled(image.size(), Qt.AspectRatioMode.IgnoreAspectRatio,
                                             Qt.TransformationMode.FastTransformation)
        self.modified = False
        self.update()

    def set_mask(self, mask: QImage) -> None:
        """Replace the whole mask (scaled to the image) as an edit."""
        self.mask = mask.convertToFormat(QImage.Format.Format_Grayscale8).scaled(
            self._image.size(), Qt.AspectRatioMode.IgnoreAspectRatio, Qt.TransformationMode.FastTransformation)
        self._changed()

    def fill(self, value: int) -> None:
        """The whole mask white (255, all trained) or black (0)."""
        self.mask.fill(value)
        self._changed()

    def sizeHint(self) -> QSize:
        return QSize(520, 420)

    # -- geometry ---------------------------------------------------------------------------------------
    def image_rect(self) -> QRectF:
        """Where the image is drawn in the widget (fitted, centred)."""
        if self._image.isNull():
            return QRectF()
        size = self._image.size().scaled(self.size(), Qt.AspectRatioMode.KeepAspectRatio)
        return QRectF((self.width() - size.width()) / 2, (self.height() - size.height()) / 2,
                      size.width(), size.height())

    def to_image(self, point: QPointF) -> QPointF:
        rect = self.image_rect()
        scale = self._image.width() / rect.width() if rect.width() else 1.0
        return QPointF((point.x() - rect.x()) * scale, (point.y() - rect.y()) * scale)

    # -- drawing ----------------------------------------------------------------------------------------
    def stroke(self, points: list[QPointF]) -> None:
        """Paint (or erase) along image-pixel points: a round brush of ``brush_radius``."""
        if self.mask.isNull() or not points:
            return
        value = 0 if self.erase else 255
        painter = QPainter(self.mask)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, False)  # masks stay hard-edged: 0 or 255
        pen = QPen(QColor(value, value, value), 2 * self.brush_radius, Qt.PenStyle.SolidLine,
                   Qt.PenCapStyle.RoundCap, Qt.PenJoinStyle.RoundJoin)
        painter.setPen(pen)
        if len(points) == 1:
            painter.drawPoint(points[0])
        else:
            for a, b in itertools.pairwise(points):
                painter.drawLine(a, b)
        painter.end()
        self._changed()

    def _changed(self) -> None:
        self.modified = True
        self.update()
        self.changed.emit()

    def mousePressEvent(self, event: QMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton and not self._image.isNull():
            self._last = self.to_image(event.position())
            self.stroke([self._last])

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        if self._last is not None and event.buttons() & Qt.MouseButton.LeftButton:
            point = self.to_image(event.position())
            self.stroke([self._last, point])
            self._last = point

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:
        self._last = None
        super().mouseReleaseEvent(event)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), self.palette().window())
        if self._image.isNull():
            return
        rect = self.image_rect()
        upscale = rect.width() > self._image.width()
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, not upscale)
        painter.drawImage(rect, self._image)
        if self.show_mask and not self.mask.isNull():
            painter.setOpacity(TINT_OPACITY)
            painter.drawImage(rect, mask_overlay(self.mask))
