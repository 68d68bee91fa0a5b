"""The app's run queue on disk (``<data folder>/queue.json``): written whenever the queue changes, read when the
app starts, so a restart or a crash loses nothing. A run that was training when the app went away is restored
as ``stopped`` (resumable from its checkpoint when it has one): the user resumes it with Run queue."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .atomic import write_text_atomic
from .config import RunConfig
from .errors import UserError

QUEUE_FILE = "queue.json"
FORMAT = "sdstudio-queue"
VERSION = 1
log = logging.getLogger("sdstudio")


def queue_file() -> Path:
    return paths.data_dir() / QUEUE_FILE


@dataclass
class SavedItem:
    config: RunConfig
    label: str
    description: str
    status: str
    run_dir: Path | None
    message: str
    resumable: bool


def save_queue(items: list[SavedItem], path: Path | None = None) -> None:
    path = path or queue_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, "items": [
        {"config": i.config.to_dict(), "label": i.label, "description": i.description, "status": i.status,
         "run_dir": str(i.run_dir) if i.run_dir else None, "message": i.message, "resumable": i.resumable}
        for i in items]}
    write_text_atomic(path, json.dumps(data, indent=1))


def load_queue(path: Path | None = None, *, has_checkpoint: Any = None) -> tuple[list[SavedItem], list[str]]:
    """The saved queue and notes about what changed (an interrupted run, an item whose config no longer loads).
    ``has_checkpoint(run_dir) -> bool`` says whether an interrupted run can resume."""
    path = path or queue_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [], []
    except (OSError, ValueError) as exc:
        return [], [f"{path}: the saved queue could not be read ({exc}); starting with an empty queue"]
    items, notes = [], []
    for n, raw in enumerate(data.get("items", []) if isinstance(data, dict) else []):
        try:
            config = RunConfig.from_dict(raw["config"], source=f"{path} item {n + 1}")
        except (UserError, KeyError, TypeError) as exc:
            notes.append(f"queue item {n + 1} ({raw.get('label', '?') if isinstance(raw, dict) else '?'}) dropped: "
                         f"{exc}")
            continue
        run_dir = Path(raw["run_dir"]) if raw.get("run_dir") else None
        status, message = str(raw.get("status", "pending")), str(raw.get("message", ""))
        resumable = bool(raw.get("resumable", False))
        if status == "running":  # the app went away while it trained
            resumable = bool(run_dir is not None and has_checkpoint is not None and has_checkpoint(run_dir))
            status = "stopped" if resumable else "pending"
            message = ("interrupted when the app closed; Run queue resumes it from its checkpoint" if resumable
                       else "interrupted before its first checkpoint; Run queue starts it again")
            if not resumable:
                run_dir = None
            notes.append(f"{raw.get('label', 'a run')} was training when the app closed: {message}")
        items.append(SavedItem(config, str(raw.get("label", "run")), str(raw.get("description", "")), status,
                               run_dir, message, resumable))
    return items, notes
