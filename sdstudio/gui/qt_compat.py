"""A guard against a reference-count bug in PySide6 6.12.0 on Python < 3.12.

PySide6 6.12.0 (abi3 wheels that claim Python 3.10+) returns ``None`` from void methods, and ``True`` from
``Signal.emit``, without taking a reference. On Python 3.12+ these objects are immortal (PEP 683) and nothing
happens; on 3.10/3.11 every call drops one reference until the interpreter aborts with "none_dealloc:
deallocating None" after a few thousand Qt calls. PySide6 6.11 does not have the bug.

``pin_singletons()`` gives None, True and False a reference count so large that no run can exhaust it,
which is what 3.12 does for them anyway. It only acts on CPython < 3.12 and only after checking that the
reference count sits where CPython keeps it. Imported for its effect by every module that starts Qt.
"""

from __future__ import annotations

import ctypes
import platform
import sys

_PIN = 1 << 40
_pinned = False


def needs_pinning() -> bool:
    return platform.python_implementation() == "CPython" and sys.version_info < (3, 12)


def pin_singletons() -> bool:
    """Make None/True/False effectively immortal; True when done (now or before)."""
    global _pinned
    if _pinned:
        return True
    if not needs_pinning():
        return False
    for obj in (None, True, False):
        cell = ctypes.c_ssize_t.from_address(id(obj))
        # ob_refcnt is the first field of a PyObject in release builds; refuse to touch anything else
        if abs(cell.value - (sys.getrefcount(obj) - 1)) > 2:
            return False
    for obj in (None, True, False):
        ctypes.c_ssize_t.from_address(id(obj)).value += _PIN
    _pinned = True
    return True


pin_singletons()
