"""Atomic file writes: a temp file in the same folder, fsynced, then renamed over the target, so readers
(and a crash) see the old content or the new, never a part."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def temp_path_beside(path: Path) -> Path:
    """A unique hidden name in ``path``'s folder (same file system, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_file_atomic(path: Path, write: Callable[[Path], object], *, fsync: bool = True) -> Path:
    """``write(tmp)`` writes the whole file under a temp name beside ``path`` (any writer: PIL, Qt,
    safetensors); it is then fsynced and renamed over ``path``. On any failure the temp file is removed and
    ``path`` keeps its old content. The writer creates the file, so it gets the usual permissions (umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as fh:  # writable: Windows refuses fsync on a read-only handle
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())

    write_file_atomic(path, write, fsync=False)  # fsynced above, through the handle that wrote it


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
