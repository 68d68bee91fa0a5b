"""The PySide6 desktop app: a thin shell over sdstudio.core (displays and controls only)."""
