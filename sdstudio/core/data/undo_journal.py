"""The undo journal of a dataset folder: every caption edit (bulk tag edit, captioning run) first copies the
bytes of each file it is about to change into ``DIR/.sdstudio/undo/<entry>/``, then writes the new files
atomically. ``undo_last`` puts the old bytes back, byte for byte, and removes files the edit created.

Order matters for crash safety: an entry's manifest lists a file only after its backup is on disk, and a
file is written only after it is listed. A crash at any point leaves every caption either old or new (the
writes are atomic), and the newest entry can still restore all of them. The folder starts with a dot, so
``scan_dataset`` never takes it for part of the dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdstudio.core.atomic import write_bytes_atomic, write_text_atomic
from sdstudio.core.errors import UserError

JOURNAL_DIR = Path(".sdstudio") / "undo"
MANIFEST = "manifest.json"


def journal_root(dataset: Path) -> Path:
    return Path(dataset) / JOURNAL_DIR


@dataclass(frozen=True)
class UndoResult:
    label: str
    restored: list[Path]  # files put back to their old bytes
    removed: list[Path]  # files the edit had created, deleted again


class JournalEntry:
    """One undoable edit. ``record`` backs files up (once each); ``write`` records, then writes atomically."""

    def __init__(self, dataset: Path, folder: Path, label: str, files: list[dict[str, object]]) -> None:
        self.dataset = Path(dataset)
        self.folder = folder
        self.label = label
        self._files = files
        self._known = {str(f["path"]) for f in files}

    @property
    def name(self) -> str:
        return self.folder.name

    @classmethod
    def create(cls, dataset: Path, label: str) -> JournalEntry:
        root = journal_root(dataset)
        root.mkdir(parents=True, exist_ok=True)
        # Names sort in creation order; the counter keeps two entries in the same second apart.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        n = 0
        while (folder := root / f"{stamp}-{n:03d}").exists():
            n += 1
        folder.mkdir()
        entry = cls(dataset, folder, label, [])
        entry._save_manifest()
        return entry

    @classmethod
    def open(cls, dataset: Path, name: str) -> JournalEntry:
        folder = journal_root(dataset) / name
        manifest = _read_manifest(folder)
        return cls(dataset, folder, str(manifest.get("label", "")), list(manifest.get("files", [])))

    def _rel(self, path: Path) -> str:
        return Path(os.path.relpath(Path(path).absolute(), self.dataset.absolute())).as_posix()

    def _save_manifest(self) -> None:
        data = {"version": 1, "label": self.label, "created": self.folder.name, "files": self._files}
        write_text_atomic(self.folder / MANIFEST, json.dumps(data, indent=1, ensure_ascii=False))

    def record(self, paths: Iterable[Path]) -> None:
        """Back up the current bytes (or absence) of every path not backed up yet in this entry."""
        added = False
        for path in paths:
            rel = self._rel(path)
            if rel in self._known:
                continue
            item: dict[str, object] = {"path": rel, "existed": Path(path).exists()}
            if item["existed"]:
                backup = f"{len(self._files):06d}.bin"
                write_bytes_atomic(self.folder / backup, Path(path).read_bytes())
                item["backup"] = backup
            self._files.append(item)
            self._known.add(rel)
            added = True
        if added:
            _fsync_dir(self.folder)  # the backups are on disk before the manifest names them
            self._save_manifest()

    def write(self, contents: Mapping[Path, bytes]) -> None:
        """Record, then write each file atomically (the journal is on disk before the first edit)."""
        self.record(contents)
        for path, data in contents.items():
            write_bytes_atomic(Path(path), data)

    @property
    def paths(self) -> list[Path]:
        return [self.dataset / str(f["path"]) for f in self._files]


def _read_manifest(folder: Path) -> dict[str, object]:
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"undo entry {folder} cannot be read ({exc}); delete that folder to undo "
                        "older edits.") from exc
    if not isinstance(data, dict):
        raise UserError(f"undo entry {folder / MANIFEST} is not a JSON object; delete that folder.")
    return data


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; its renames are durable enough
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_entries(dataset: Path) -> list[str]:
    """Entry names, oldest first (names sort in creation order)."""
    root = journal_root(dataset)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and p.is_dir() and (p / MANIFEST).is_file())


def undo_last(dataset: Path) -> UndoResult:
    """Restore the files of the newest entry to their bytes before that edit, then drop the entry."""
    dataset = Path(dataset)
    names = list_entries(dataset)
    if not names:
        raise UserError(f"nothing to undo in {dataset}: no edit or captioning run is recorded in "
                        f"{journal_root(dataset)}.")
    entry = JournalEntry.open(dataset, names[-1])
    restored: list[Path] = []
    removed: list[Path] = []
    for item in entry._files:
        path = dataset / str(item["path"])
        if item.get("existed"):
            write_bytes_atomic(path, (entry.folder / str(item["backup"])).read_bytes())
            restored.append(path)
        elif path.exists():
            path.unlink()
            removed.append(path)
    # Renamed aside first so a crash during the delete never leaves a half-removed entry that looks valid.
    trash = entry.folder.with_name(f".{entry.folder.name}.done")
    os.replace(entry.folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return UndoResult(entry.label, restored, removed)
