"""The Qt-free core: config, data, models, the training loop, sampling, checkpoints, exports.

Nothing in this package may import PySide6, pyqtgraph or sdstudio.gui (tests/test_core_is_qt_free.py).
"""
