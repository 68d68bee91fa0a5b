"""The datasets the user opened before: a small JSON list in the data folder. Never touches the datasets."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sdstudio.core import paths
from sdstudio.core.atomic import write_text_atomic

log = logging.getLogger(__name__)

REGISTRY_VERSION = 1
_lock = threading.Lock()  # read-modify-write of the file within this process


@dataclass
class DatasetEntry:
    name: str
    path: str  # absolute
    added: str  # ISO 8601, UTC
    summary: str | None = None  # the last health report's summary line
    checked: str | None = None  # when that summary was made


def registry_path() -> Path:
    return paths.data_dir() / "datasets.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _key(path: Path | str) -> str:
    return os.path.normpath(Path(path).expanduser().absolute())


def _same(a: str, b: str) -> bool:
    return os.path.normcase(a) == os.path.normcase(b)


def _backup_corrupt(file: Path, why: str) -> None:
    backup = file.with_name(file.name + ".bad")
    log.warning("The dataset list %s is unreadable (%s); it was moved to %s and a new list started.",
                file, why, backup)
    try:
        os.replace(file, backup)
    except OSError as exc:
        log.warning("Could not move %s aside: %s", file, exc)


def _entry(item: Any) -> DatasetEntry | None:
    if not isinstance(item, dict):
        return None
    name, path, added = item.get("name"), item.get("path"), item.get("added")
    if not (isinstance(name, str) and isinstance(path, str) and path and isinstance(added, str)):
        return None
    summary, checked = item.get("summary"), item.get("checked")
    return DatasetEntry(name, path, added, summary if isinstance(summary, str) else None,
                        checked if isinstance(checked, str) else None)


def _load() -> list[DatasetEntry]:
    file = registry_path()
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _backup_corrupt(file, str(exc))
        return []
    items = data.get("datasets") if isinstance(data, dict) else None
    if not isinstance(items, list):
        _backup_corrupt(file, "no 'datasets' list")
        return []
    entries = []
    for item in items:
        entry = _entry(item)
        if entry is None:
            log.warning("Skipping an invalid entry in %s: %r", file, item)
        else:
            entries.append(entry)
    return entries


def _save(entries: list[DatasetEntry]) -> None:
    text = json.dumps({"version": REGISTRY_VERSION, "datasets": [asdict(e) for e in entries]}, indent=2)
    write_text_atomic(registry_path(), text + "\n")  # readers see the old list or the new one, never half


def list_datasets() -> list[DatasetEntry]:
    """The remembered datasets, in the order they were added."""
    with _lock:
        return _load()


def add_dataset(path: Path | str, name: str | None = None, summary: str | None = None) -> DatasetEntry:
    """Remember a dataset folder (again: updates its name / summary, keeps when it was first added)."""
    key = _key(path)
    with _lock:
        entries = _load()
        entry = next((e for e in entries if _same(e.path, key)), None)
        if entry is None:
            entry = DatasetEntry(name or Path(key).name or key, key, _now())
            entries.append(entry)
        elif name:
            entry.name = name
        if summary is not None:
            entry.summary, entry.checked = summary, _now()
        _save(entries)
        return entry


def remove_dataset(path: Path | str) -> bool:
    """Forget a dataset folder (its files are left alone); False when it was not in the list."""
    key = _key(path)
    with _lock:
        entries = _load()
        kept = [e for e in entries if not _same(e.path, key)]
        if len(kept) == len(entries):
            return False
        _save(kept)
        return True


def update_summary(path: Path | str, summary: str) -> bool:
    """Store the last health-report summary of a remembered dataset; False when it is not remembered."""
    key = _key(path)
    with _lock:
        entries = _load()
        entry = next((e for e in entries if _same(e.path, key)), None)
        if entry is None:
            return False
        entry.summary, entry.checked = summary, _now()
        _save(entries)
        return True
