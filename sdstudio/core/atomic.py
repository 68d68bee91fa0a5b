"""Atomic file writes: a temp file in the same folder, fsynced, then renamed over the target, so readers
(and a crash) see the old content or the new, never a part."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, *, fsync: bool = True) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_folder_atomic(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder under a temp name beside ``folder`` with ``fill(tmp)``, then put it in place: a reader
    (or a crash) sees the old folder or the new one, never a half-written one under the final name. On any
    failure the temp folder is removed and the old folder is left as it was."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)  # moved aside first: the new folder then appears in one rename
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
