"""A selection of a dataset's images named by paths or globs relative to the dataset folder (``only``; the
``--only`` of ``sdstudio dataset caption`` and ``masks``): what the app's grid selection is for scripts."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from sdstudio.core.data.scan import scan_dataset
from sdstudio.core.errors import UserError


def _relative_pattern(root: Path, pattern: str) -> str:
    """``pattern`` as a posix path relative to ``root`` (an absolute path inside the folder is accepted)."""
    text = pattern.strip().replace("\\", "/")
    candidate = Path(pattern).expanduser()
    if candidate.is_absolute():
        try:
            text = candidate.absolute().relative_to(root).as_posix()
        except ValueError as exc:
            raise UserError(f"only {pattern!r} is outside the dataset folder {root}; give paths relative "
                            "to it (e.g. 'cat.png' or 'sub/*.jpg').") from exc
    return str(PurePosixPath(text.removeprefix("./")))


def select_images(root: Path | str, patterns: Sequence[str]) -> list[Path]:
    """The dataset's images (absolute paths, in dataset order) that match any of ``patterns``: a file name
    or a glob (``*``, ``?``, ``[abc]``), relative to ``root``. A pattern that matches no image is an error,
    so a typo never silently turns into "nothing to do"."""
    scan = scan_dataset(root)
    relative = {record.path: record.path.relative_to(scan.root).as_posix() for record in scan.records}
    chosen: set[Path] = set()
    for pattern in patterns:
        wanted = _relative_pattern(scan.root, pattern)
        hits = {path for path, name in relative.items() if fnmatch.fnmatch(name, wanted)}
        if not hits:
            raise UserError(f"only {pattern!r} matches no image of {scan.root} (paths and globs are relative "
                            "to the dataset folder; mask and caption files are not images).")
        chosen |= hits
    return [record.path for record in scan.records if record.path in chosen]
