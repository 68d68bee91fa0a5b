"""The app icon, drawn with QPainter (no image file to ship): noise turning into a clean shape above a
falling loss curve. ``packaging/make_icon.py`` saves the same drawing as packaging/sdstudio.png."""

from __future__ import annotations

import random

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import (
    QBrush,
    QColor,
    QIcon,
    QImage,
    QLinearGradient,
    QPainter,
    QPainterPath,
    QPen,
    QPixmap,
)

ICON_SIZES = (16, 24, 32, 48, 64, 128, 256)


def draw_icon(size: int = 256) -> QImage:
    """The icon at ``size`` x ``size`` pixels, transparent outside its rounded square."""
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    s = size / 256.0
    p = QPainter(image)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    gradient = QLinearGradient(0, 0, size, size)
    gradient.setColorAt(0.0, QColor(40, 52, 160))
    gradient.setColorAt(1.0, QColor(128, 48, 176))
    p.setPen(Qt.PenStyle.NoPen)
    p.setBrush(QBrush(gradient))
    p.drawRoundedRect(QRectF(8 * s, 8 * s, 240 * s, 240 * s), 48 * s, 48 * s)

    # noise dots, denser and larger on the left: the forward process run backwards
    rng = random.Random(7)
    for _ in range(170):
        x = rng.uniform(28, 150)
        y = rng.uniform(28, 150)
        fade = 1.0 - (x - 28) / 122.0
        if rng.random() > fade + 0.1:
            continue
        radius = (1.5 + 3.5 * fade * rng.random()) * s
        p.setBrush(QColor(255, 255, 255, int(60 + 150 * fade)))
        p.drawEllipse(QPointF(x * s, y * s), radius, radius)

    # the clean sample: a warm disc with a soft ring
    p.setBrush(QColor(255, 176, 64))
    p.drawEllipse(QPointF(168 * s, 94 * s), 44 * s, 44 * s)
    p.setBrush(Qt.BrushStyle.NoBrush)
    p.setPen(QPen(QColor(255, 230, 180, 160), 5 * s))
    p.drawEllipse(QPointF(168 * s, 94 * s), 54 * s, 54 * s)

    # the falling loss curve
    path = QPainterPath(QPointF(36 * s, 168 * s))
    path.cubicTo(QPointF(70 * s, 230 * s), QPointF(110 * s, 212 * s), QPointF(220 * s, 214 * s))
    p.setPen(QPen(QColor(255, 255, 255, 235), 12 * s, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
    p.drawPath(path)
    p.end()
    return image


def app_icon() -> QIcon:
    icon = QIcon()
    for size in ICON_SIZES:
        icon.addPixmap(QPixmap.fromImage(draw_icon(size)))
    return icon
