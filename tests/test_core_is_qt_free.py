"""The core must import and run with PySide6 and pyqtgraph absent (napari-style separation)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import sdstudio.core

SCRIPT = r"""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("PySide6", "shiboken6", "pyqtgraph", "superqt") or name.startswith("sdstudio.gui"):
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, Block())
import sdstudio.core
names = [m.name for m in pkgutil.walk_packages(sdstudio.core.__path__, "sdstudio.core.")]
for name in names:
    importlib.import_module(name)
import sdstudio.cli
sdstudio.cli.build_parser()
bad = [m for m in sys.modules if m.split(".")[0] in ("PySide6", "pyqtgraph")]
assert not bad, bad
print("ok", len(names))
"""


def test_core_imports_without_qt() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_no_core_module_names_qt_in_its_source() -> None:
    root = Path(sdstudio.core.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and any(
                    q in stripped for q in ("PySide6", "pyqtgraph", "sdstudio.gui", "from ..gui", "from ...gui")):
                offenders.append(f"{path}: {stripped}")
    assert not offenders, offenders
    assert list(pkgutil.walk_packages(sdstudio.core.__path__))
