"""The virtualised thumbnail grid's model: rows are dataset images, thumbnails are made lazily.

Only rows a view asks to paint are requested. Requests go on a stack (newest first, so what is on screen
now is made before what was scrolled past) that a couple of pool runnables drain; each thumbnail is read from
the disk cache (cache_dir()/thumbnails) or made with Pillow and written there. Worker threads make QImages
only; QPixmaps are made on the GUI thread.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from PySide6.QtCore import (
    QAbstractListModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QRunnable,
    QSize,
    Qt,
    QThreadPool,
    Signal,
)
from PySide6.QtGui import QColor, QImage, QPainter, QPixmap

from sdstudio.core import paths
from sdstudio.core.atomic import write_file_atomic
from sdstudio.core.data.scan import ImageRecord

from .mask_canvas import tinted_thumbnail

log = logging.getLogger("sdstudio")
THUMB_SIZE = 96
MEMORY_CACHE = 3000  # pixmaps kept; about 3000 * 96 * 96 * 4 bytes = 110 MB at most
MAX_PENDING = 600  # requests beyond this (long scrolls) are dropped oldest first and asked again when seen
PathRole = Qt.ItemDataRole.UserRole + 1
RecordRole = Qt.ItemDataRole.UserRole + 2
MASK_KEY = "mask:"  # request key prefix: the thumbnail with the image's mask tinted over it
IndexArg = QModelIndex | QPersistentModelIndex


def thumbnail_cache_dir() -> Path:
    return paths.cache_dir() / "thumbnails"


def cache_file(path: Path) -> Path | None:
    """Where the thumbnail of ``path`` is cached; keyed by path, size and mtime so edits invalidate it."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{THUMB_SIZE}".encode()).hexdigest()
    return thumbnail_cache_dir() / key[:2] / f"{key}.png"


def make_thumbnail(path: Path) -> QImage:
    """Read the cached thumbnail or make (and cache) it; a null QImage when the file cannot be read."""
    cached = cache_file(path)
    if cached is not None and cached.is_file():
        image = QImage(str(cached))
        if not image.isNull():
            return image
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.draft("RGB", (THUMB_SIZE, THUMB_SIZE))
            rgb = img.convert("RGB")
            rgb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BILINEAR)
            factor = THUMB_SIZE // max(rgb.size)
            if factor >= 2:  # small images (pixel art, the demo's 32 px shapes): enlarge crisply
                rgb = rgb.resize((rgb.width * factor, rgb.height * factor), Image.Resampling.NEAREST)
            data = rgb.tobytes()
            image = QImage(data, rgb.width, rgb.height, 3 * rgb.width, QImage.Format.Format_RGB888).copy()
    except (OSError, ValueError, Image.DecompressionBombError):
        return QImage()
    if cached is not None:
        _save_atomic(image, cached)
    return image


def _save_atomic(image: QImage, target: Path) -> None:
    def write(tmp: Path) -> None:
        if not image.save(str(tmp), "PNG"):
            raise OSError(f"{tmp}: Qt could not write the PNG")

    try:
        write_file_atomic(target, write, fsync=False)  # a cache: losing one to a crash costs a redraw
    except OSError:
        pass  # the cache is an optimisation; a read-only cache folder just means no cache


class _Signals(QObject):
    ready = Signal(str, QImage)


class _Drain(QRunnable):
    """Makes thumbnails for the queue's newest requests until it is empty."""

    def __init__(self, queue: _RequestStack, signals: _Signals) -> None:
        super().__init__()
        self.queue, self.signals = queue, signals

    def run(self) -> None:
        while (key := self.queue.pop()) is not None:
            try:
                if key.startswith(MASK_KEY):
                    path = Path(key[len(MASK_KEY):])
                    image = tinted_thumbnail(make_thumbnail(path), path)
                else:
                    image = make_thumbnail(Path(key))
            except Exception:
                log.exception("could not make the thumbnail of %s", key)
                image = QImage()
            self.signals.ready.emit(key, image)


class _RequestStack:
    """Thread-safe LIFO of paths with a bound; counts the drains working on it (under the same lock, so a
    drain that is about to retire never strands a request pushed at that moment)."""

    def __init__(self, drains: int) -> None:
        self._lock = threading.Lock()
        self._items: OrderedDict[str, None] = OrderedDict()
        self._max_drains = drains
        self._drains = 0
        self.dropped: list[str] = []
        self.closed = False

    def push(self, key: str) -> bool:
        """Queue ``key``; True when the caller must start another drain."""
        with self._lock:
            self._items[key] = None
            self._items.move_to_end(key)
            while len(self._items) > MAX_PENDING:
                old, _ = self._items.popitem(last=False)
                self.dropped.append(old)
            if self._drains < self._max_drains and not self.closed:
                self._drains += 1
                return True
            return False

    def pop(self) -> str | None:
        """The newest request, or None (and the calling drain retires)."""
        with self._lock:
            if self.closed or not self._items:
                self._drains -= 1
                return None
            key, _ = self._items.popitem(last=True)
            return key

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


class ThumbnailModel(QAbstractListModel):
    """Dataset images as list rows: display = file name, decoration = thumbnail (lazy), tooltip = caption."""

    def __init__(self, parent: QObject | None = None, *, threads: int = 2) -> None:
        super().__init__(parent)
        self._records: list[ImageRecord] = []
        self._rows: dict[str, int] = {}
        self._pixmaps: OrderedDict[str, QPixmap] = OrderedDict()
        self._failed: set[str] = set()
        self._pending: set[str] = set()
        self._queue = _RequestStack(threads)
        self._signals = _Signals(self)
        self._signals.ready.connect(self._on_ready)
        self._pool = QThreadPool(self)
        self._pool.setMaxThreadCount(threads)
        self._placeholder = _placeholder(QColor(225, 225, 228))
        self._broken = _placeholder(QColor(240, 200, 200))
        self.requests = 0  # thumbnails asked for since the last set_records (tests, diagnostics)
        self.show_masks = False  # decorations with the training mask tinted over them
        self._masked: set[str] = set()  # images that have a mask file (looked up when masks are shown)

    # -- content ----------------------------------------------------------------------------------------
    def set_records(self, records: list[ImageRecord]) -> None:
        self.beginResetModel()
        self._queue.clear()
        self._records = list(records)
        self._rows = {str(r.path): i for i, r in enumerate(self._records)}
        self._pending.clear()
        self.requests = 0
        self._masked = self._find_masks() if self.show_masks else set()
        self.endResetModel()

    def _find_masks(self) -> set[str]:
        from sdstudio.core.data.mask_files import mask_path

        return {str(r.path) for r in self._records if mask_path(r.path).is_file()}

    def set_show_masks(self, on: bool) -> None:
        """Tint each thumbnail's untrained parts (from its name.mask.png), or show plain thumbnails."""
        self.show_masks = on
        self.masks_changed()

    def masks_changed(self) -> None:
        """Mask files were written or removed: look them up again and redraw the tinted thumbnails."""
        for key in [k for k in self._pixmaps if k.startswith(MASK_KEY)]:
            del self._pixmaps[key]
        self._masked = self._find_masks() if self.show_masks else set()
        if self._records:
            self.dataChanged.emit(self.index(0), self.index(len(self._records) - 1),
                                  [Qt.ItemDataRole.DecorationRole])

    def has_mask(self, row: int) -> bool:
        return str(self._records[row].path) in self._masked

    def records(self) -> list[ImageRecord]:
        return self._records

    def record(self, row: int) -> ImageRecord:
        return self._records[row]

    def row_of(self, path: Path | str) -> int:
        return self._rows.get(str(path), -1)

    def update_captions(self, path: Path, captions: tuple[str, ...]) -> None:
        row = self.row_of(path)
        if row < 0:
            return
        self._records[row] = replace(self._records[row], captions=captions, caption_source="sidecar")
        index = self.index(row)
        self.dataChanged.emit(index, index, [Qt.ItemDataRole.ToolTipRole, RecordRole])

    # -- Qt model ---------------------------------------------------------------------------------------
    def rowCount(self, parent: IndexArg = QModelIndex()) -> int:  # noqa: B008 - Qt signature
        return 0 if parent.isValid() else len(self._records)

    def data(self, index: IndexArg, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._records):
            return None
        record = self._records[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return record.path.name
        if role == Qt.ItemDataRole.DecorationRole:
            key = str(record.path)
            return self._thumbnail(MASK_KEY + key if key in self._masked else key)
        if role == Qt.ItemDataRole.ToolTipRole:
            caption = record.captions[0] if record.captions else "(no caption)"
            return f"{record.path.name} · {record.width}×{record.height}\n{caption}"
        if role == Qt.ItemDataRole.SizeHintRole:
            return QSize(THUMB_SIZE + 16, THUMB_SIZE + 28)
        if role == PathRole:
            return str(record.path)
        if role == RecordRole:
            return record
        return None

    # -- thumbnails -------------------------------------------------------------------------------------
    def _thumbnail(self, key: str) -> QPixmap:
        pixmap = self._pixmaps.get(key)
        if pixmap is not None:
            self._pixmaps.move_to_end(key)
            return pixmap
        if key in self._failed:
            return self._broken
        if key not in self._pending:
            self._request(key)
        return self._placeholder

    def _request(self, key: str) -> None:
        self._pending.add(key)
        self.requests += 1
        start_drain = self._queue.push(key)
        for dropped in self._queue.dropped:
            self._pending.discard(dropped)
        self._queue.dropped.clear()
        if start_drain:
            self._pool.start(_Drain(self._queue, self._signals))

    def thumbnail_ready(self, row: int) -> bool:
        return str(self._records[row].path) in self._pixmaps

    def pending(self) -> int:
        return len(self._queue)

    def _on_ready(self, key: str, image: QImage) -> None:
        self._pending.discard(key)
        row = self._rows.get(key.removeprefix(MASK_KEY))
        if image.isNull():
            self._failed.add(key)
        else:
            self._pixmaps[key] = _framed(image)
            while len(self._pixmaps) > MEMORY_CACHE:
                self._pixmaps.popitem(last=False)
        if row is not None:
            index = self.index(row)
            self.dataChanged.emit(index, index, [Qt.ItemDataRole.DecorationRole])

    def shutdown(self, timeout_ms: int = 3000) -> None:
        """Stop making thumbnails and wait for the running ones (before the model is destroyed)."""
        self._queue.closed = True
        self._queue.clear()
        self._pool.waitForDone(timeout_ms)


def _framed(image: QImage) -> QPixmap:
    """The thumbnail with a hairline frame, so white-background images stand out from the view."""
    pixmap = QPixmap.fromImage(image)
    painter = QPainter(pixmap)
    painter.setPen(QColor(190, 190, 196))
    painter.drawRect(0, 0, pixmap.width() - 1, pixmap.height() - 1)
    painter.end()
    return pixmap


def _placeholder(color: QColor) -> QPixmap:
    pixmap = QPixmap(THUMB_SIZE, THUMB_SIZE)
    pixmap.fill(Qt.GlobalColor.transparent)
    painter = QPainter(pixmap)
    painter.setPen(Qt.PenStyle.NoPen)
    painter.setBrush(color)
    painter.drawRoundedRect(4, 4, THUMB_SIZE - 8, THUMB_SIZE - 8, 6, 6)
    painter.end()
    return pixmap
