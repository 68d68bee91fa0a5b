"""The caption of the selected image, edited in place and saved to its sidecar file atomically."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

from sdstudio.core.atomic import write_text_atomic
from sdstudio.core.data.scan import ImageRecord


def sidecar_path(image: Path, extension: str = ".txt") -> Path:
    return image.with_name(image.stem + extension)


def write_caption_atomic(image: Path, text: str, extension: str = ".txt") -> Path:
    """Write ``<image stem>.txt`` next to the image: a temp file in the same folder, then os.replace.

    A reader sees the old caption or the new one, never half of one; the image itself is never opened.
    """
    target = sidecar_path(image, extension)
    write_text_atomic(target, text.strip() + "\n")
    return target


class CaptionEditor(QWidget):
    """Shows one image's caption (each line an alternative); Save (Ctrl+S) writes the sidecar file."""

    saved = Signal(Path, tuple)  # image path, the new captions
    failed = Signal(str)  # a message for people

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._record: ImageRecord | None = None
        self.title = QLabel("Select an image to see and edit its caption.")
        self.title.setWordWrap(True)
        self.edit = QPlainTextEdit()
        self.edit.setPlaceholderText("Caption (one alternative per line)")
        self.edit.setMaximumHeight(110)
        self.edit.textChanged.connect(self._update_buttons)
        self.save_button = QPushButton("Save caption")
        self.save_button.setToolTip("Write the caption to the image's .txt sidecar file (Ctrl+S); "
                                    "the image file is never changed")
        self.save_button.clicked.connect(self.save)
        self.revert_button = QPushButton("Revert")
        self.revert_button.clicked.connect(self._revert)
        self.status = QLabel("")
        buttons = QHBoxLayout()
        buttons.addWidget(self.save_button)
        buttons.addWidget(self.revert_button)
        buttons.addWidget(self.status, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.title)
        layout.addWidget(self.edit)
        layout.addLayout(buttons)
        QShortcut(QKeySequence.StandardKey.Save, self.edit, activated=self.save)
        self.set_record(None)

    def set_record(self, record: ImageRecord | None) -> None:
        self._record = record
        self.edit.setEnabled(record is not None)
        if record is None:
            self.title.setText("Select an image to see and edit its caption.")
            self.edit.setPlainText("")
        else:
            source = {"sidecar": "from its caption file", "metadata": "from metadata (saving writes a .txt "
                      "file, which the metadata row overrides)", "folder": "from its folder's name",
                      "instance_prompt": "the instance prompt", "none": "no caption yet"}
            self.title.setText(f"<b>{record.path.name}</b> · {record.width}×{record.height} · "
                               f"{source.get(record.caption_source, record.caption_source)}")
            self.edit.setPlainText("\n".join(record.captions))
        self.status.setText("")
        self._update_buttons()

    def record(self) -> ImageRecord | None:
        return self._record

    def is_modified(self) -> bool:
        if self._record is None:
            return False
        return self.edit.toPlainText().strip() != "\n".join(self._record.captions).strip()

    def _update_buttons(self) -> None:
        modified = self.is_modified()
        self.save_button.setEnabled(modified)
        self.revert_button.setEnabled(modified)

    def _revert(self) -> None:
        self.set_record(self._record)

    def save(self) -> None:
        record = self._record
        if record is None or not self.is_modified():
            return
        text = self.edit.toPlainText()
        try:
            write_caption_atomic(record.path, text)
        except OSError as exc:
            self.failed.emit(f"Could not save the caption of {record.path.name}: {exc.strerror or exc}. "
                             f"Check that {record.path.parent} is writable.")
            return
        captions = tuple(line.strip() for line in text.splitlines() if line.strip())
        self._record = replace(record, captions=captions, caption_source="sidecar")
        self._update_buttons()
        self.status.setText(f"saved to {sidecar_path(record.path).name}")
        self.saved.emit(record.path, captions)
