"""Save the app icon (drawn by sdstudio.gui.icon) as packaging/sdstudio.png, 256 px.

    python packaging/make_icon.py [OUT.png]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtGui import QGuiApplication

    from sdstudio.gui.icon import draw_icon

    app = QGuiApplication.instance() or QGuiApplication([])  # noqa: F841 - QImage text/paint needs an app
    out = Path(argv[0]) if argv else Path(__file__).resolve().parent / "sdstudio.png"
    if not draw_icon(256).save(str(out), "PNG"):
        print(f"make_icon: could not write {out}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
