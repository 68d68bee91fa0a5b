"""Hugging Face imagefolder captions: metadata.jsonl / metadata.csv next to the images."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .problems import ProblemList


def path_key(path: Path | str) -> str:
    """Compare paths as the file system does (case-insensitive on Windows)."""
    return os.path.normcase(os.path.normpath(path))


def _caption_value(value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        return tuple(line.strip() for line in value.splitlines() if line.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    return None


def _text_column(columns: Sequence[str], row: dict[str, object] | None = None) -> str | None:
    for name in ("text", "caption"):
        if name in columns:
            return name
    others = [c for c in columns if c != "file_name"]
    if row is not None:
        others = [c for c in others if isinstance(row.get(c), str)]
    return others[0] if others else None


def read_metadata(root: Path, problems: ProblemList) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Hugging Face imagefolder captions: path_key(image) -> (file_name as written, caption lines)."""
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    source = jsonl if jsonl.exists() else table
    if source is jsonl and table.exists():
        problems.add("metadata_error", table, "metadata.csv is ignored: metadata.jsonl is used.",
                     "Keep only one metadata file.")
    try:
        text = source.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.add("undecodable_caption", source, f"{source.name} is not UTF-8 text (byte {exc.start}); "
                     "its captions are not used.", "Re-save the metadata file as UTF-8.")
        return {}
    except OSError as exc:
        problems.add("metadata_error", source, f"{source.name} cannot be read ({exc.strerror or exc}).",
                     "Check that you have permission to read it.")
        return {}

    rows: list[tuple[int, dict[str, object]]] = []
    column: str | None = None
    if source is jsonl:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                row = exc.msg
            if not isinstance(row, dict):
                problems.add("metadata_error", source, f"{source.name} line {number} is not a JSON object "
                             f"({row if isinstance(row, str) else type(row).__name__}); it is skipped.",
                             'Write one object per line, like {"file_name": "a.png", "text": "a cat"}.')
                continue
            rows.append((number, row))
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(number, dict(row)) for number, row in enumerate(reader, 2)]
        if "file_name" not in (reader.fieldnames or []):
            problems.add("metadata_error", source, f"{source.name} has no file_name column; its captions "
                         "are not used.", "Add a header line like: file_name,text")
            return {}
        column = _text_column(reader.fieldnames or [])

    captions: dict[str, tuple[str, tuple[str, ...]]] = {}
    for number, row in rows:
        name = row.get("file_name")
        key = column if source is table else _text_column(list(row), row)
        value = _caption_value(row.get(key)) if key else None
        if not isinstance(name, str) or not name or value is None:
            problems.add("metadata_error", source, f"{source.name} line {number} has no file_name and "
                         "caption text; it is skipped.", "Give every row a file_name and a text value.")
            continue
        captions[path_key(root / name)] = (name, value)
    return captions
