"""Errors shown to people: the message, what to do, and the technical details behind a 'Show Details' button."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox, QWidget


def failure_dialog(parent: QWidget | None, title: str, message: str, *, details: str = "",
                   hint: str = "") -> QMessageBox:
    """A window-modal message box (not yet shown); ``details`` are expandable (QMessageBox's details)."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Critical)
    box.setWindowTitle(title)
    box.setText(message)
    if hint:
        box.setInformativeText(hint)
    if details:
        box.setDetailedText(details)
    box.setStandardButtons(QMessageBox.StandardButton.Ok)
    box.setObjectName("failureDialog")
    return box


def show_error(parent: QWidget | None, title: str, message: str, *, details: str = "",
               hint: str = "") -> QMessageBox:
    """Show a failure without blocking the event loop (training events keep arriving behind it)."""
    box = failure_dialog(parent, title, message, details=details, hint=hint)
    box.open()
    return box
