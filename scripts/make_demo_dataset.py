"""Regenerate the bundled demo dataset in resources/demo/ (288 coloured shapes with caption sidecars).

Run from anywhere: ``python scripts/make_demo_dataset.py``. Only the demo's own PNG/TXT files are replaced;
resources/demo/README.md and anything else in the folder are left alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO_ROOT / "resources" / "demo"
PER_CLASS = 24
SIZE = 32
SEED = 0

try:
    from sdstudio.core import demo_shapes
except ImportError:  # running from a source checkout without an install
    sys.path.insert(0, str(REPO_ROOT))
    from sdstudio.core import demo_shapes


def remove_old_demo_files(demo_dir: Path) -> int:
    """Delete the PNG/TXT files this script writes (any index, so a smaller per_class leaves no strays)."""
    removed = 0
    for colour in demo_shapes.COLOURS:
        for shape in demo_shapes.SHAPES:
            for suffix in (".png", ".txt"):
                for path in demo_dir.glob(f"{colour}_{shape}_[0-9][0-9][0-9]{suffix}"):
                    path.unlink()
                    removed += 1
    return removed


def main() -> int:
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    removed = remove_old_demo_files(DEMO_DIR)
    count = demo_shapes.generate_demo_dataset(DEMO_DIR, per_class=PER_CLASS, size=SIZE, seed=SEED)
    print(f"removed {removed} old files; wrote {count} images + captions to {DEMO_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
