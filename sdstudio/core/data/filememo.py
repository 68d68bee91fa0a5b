"""Facts about files (a content hash, "decodes fine") remembered across runs in a small JSON file.

A fact is stored under the file's stamp: path, size, mtime, ctime and inode. Writing a file changes its
ctime (no tool can set it back), so a changed file never matches a stale fact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import write_bytes_atomic

MAX_ENTRIES = 200_000  # beyond this the oldest facts are dropped (a fact costs ~150 bytes)


def file_stamp(path: Path | str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"


class FileMemo:
    """``get`` / ``put`` a string per file; ``save`` writes the memo atomically (last writer wins)."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._facts: dict[str, str] = {}
        self._dirty = False
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self._facts = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError):
            pass  # missing or damaged: start afresh, it is only a memo

    def get(self, path: Path | str) -> str | None:
        try:
            return self._facts.get(file_stamp(path))
        except OSError:
            return None

    def put(self, path: Path | str, value: str) -> None:
        try:
            stamp = file_stamp(path)
        except OSError:
            return
        self._facts.pop(stamp, None)  # re-insert: dict order is age order
        self._facts[stamp] = value
        self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        facts = list(self._facts.items())[-MAX_ENTRIES:]
        try:
            # no fsync: a memo lost to a crash is only recomputed
            write_bytes_atomic(self.file, json.dumps(dict(facts), separators=(",", ":")).encode("utf-8"), fsync=False)
        except OSError:
            return  # a read-only cache folder only costs the next run some time
        self._dirty = False
