"""Read and write the captions of a dataset in the convention it already uses, for editing tools.

Where an image's caption lives: its sidecar file (``cat.png`` -> ``cat.txt`` or ``cat.caption``, whichever
exists, the same lookup order as ``scan_dataset``); in a Hugging Face imagefolder, its row of
``metadata.jsonl`` / ``metadata.csv``. A new caption goes where the dataset keeps them: a new sidecar with the
extension most of the dataset's sidecars use (``.txt`` when there are none), or a new metadata row. kohya
folders are plain folders of sidecars here: the folder-name fallback caption is not a file, so it is not
edited (an image that only has it has no caption of its own).

This module only computes file contents; writing them goes through the undo journal.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdstudio.core.data.metadata import path_key
from sdstudio.core.data.scan import scan_dataset
from sdstudio.core.errors import DatasetError

CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass
class CaptionEntry:
    image: Path  # absolute
    text: str | None  # the caption as stored (lines = alternatives); None: the image has none of its own
    file: Path  # where it is (or would be) stored
    unreadable: str = ""  # why the stored caption cannot be edited ("" when it can)


@dataclass
class _Metadata:
    path: Path
    kind: str  # "jsonl" | "csv"
    rows: list[dict[str, object] | str]  # parsed rows; jsonl lines that are not objects kept verbatim
    raw_lines: list[str]  # jsonl: the original line of each row, written back untouched when unchanged
    columns: list[str] = field(default_factory=list)  # csv header
    index: dict[str, int] = field(default_factory=dict)  # path_key(image) -> row index


@dataclass
class DatasetCaptions:
    root: Path
    layout: str
    entries: list[CaptionEntry]
    sidecar_extension: str
    metadata: _Metadata | None = None

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()

    def by_image(self) -> dict[Path, CaptionEntry]:
        return {e.image: e for e in self.entries}

    def stage(self, new_texts: Mapping[Path, str]) -> dict[Path, bytes]:
        """The bytes of every file to write so that each image in ``new_texts`` gets that caption; the
        in-memory captions are updated too, so a later batch builds on this one."""
        entries = self.by_image()
        out: dict[Path, bytes] = {}
        meta_changes: dict[Path, str] = {}
        for image, text in new_texts.items():
            entry = entries[image]
            entry.text = text
            if self.metadata is not None and entry.file == self.metadata.path:
                meta_changes[image] = text
            else:
                out[entry.file] = text.encode("utf-8")
        if meta_changes:
            assert self.metadata is not None
            out[self.metadata.path] = _render_metadata(self.metadata, self.root, meta_changes)
        return out


def _text_key(row: Mapping[str, object], columns: Sequence[str]) -> str:
    for name in ("text", "caption"):
        if name in columns:
            return name
    others = [c for c in columns if c != "file_name" and isinstance(row.get(c, ""), str)]
    return others[0] if others else "text"


def _read_metadata(root: Path) -> _Metadata:
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    source = jsonl if jsonl.exists() else table
    try:
        text = source.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{source} cannot be read as UTF-8 text ({exc}); fix it before editing "
                           "captions.") from exc
    if source is jsonl:
        meta = _Metadata(source, "jsonl", [], [])
        for line in text.splitlines():
            try:
                row = json.loads(line) if line.strip() else line
            except json.JSONDecodeError:
                row = line
            meta.rows.append(row if isinstance(row, dict) else line)
            meta.raw_lines.append(line)
    else:
        reader = csv.DictReader(io.StringIO(text))
        meta = _Metadata(source, "csv", [dict(r) for r in reader], [], list(reader.fieldnames or []))
        meta.raw_lines = [""] * len(meta.rows)
    for i, row in enumerate(meta.rows):
        if isinstance(row, dict) and isinstance(row.get("file_name"), str):
            meta.index[path_key(root / str(row["file_name"]))] = i
    return meta


def _metadata_text(meta: _Metadata, row: dict[str, object]) -> str | None:
    value = row.get(_text_key(row, meta.columns or list(row)))
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)  # a list of alternatives: one per line, as in a sidecar
    return value if isinstance(value, str) else None


def _render_metadata(meta: _Metadata, root: Path, changes: Mapping[Path, str]) -> bytes:
    """Apply ``changes`` to the parsed rows (kept, so the next batch builds on them) and render the file."""
    for image, text in changes.items():
        i = meta.index.get(path_key(image))
        if i is None:
            meta.rows.append({"file_name": Path(os.path.relpath(image, root)).as_posix()})
            meta.raw_lines.append("")
            i = meta.index[path_key(image)] = len(meta.rows) - 1
        row = meta.rows[i]
        assert isinstance(row, dict)
        key = _text_key(row, meta.columns or list(row))
        row[key] = text.splitlines() if isinstance(row.get(key), list) else text
        meta.raw_lines[i] = ""  # re-serialised below
    if meta.kind == "csv":
        columns = meta.columns or ["file_name", "text"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in meta.rows if isinstance(r, dict))
        return buffer.getvalue().encode("utf-8")
    for i, row in enumerate(meta.rows):
        if not meta.raw_lines[i] and isinstance(row, dict):
            meta.raw_lines[i] = json.dumps(row, ensure_ascii=False)
    return ("\n".join(meta.raw_lines) + "\n").encode("utf-8")


def _sidecars(images: Sequence[Path]) -> dict[Path, Path | None]:
    """Each image's caption file, found as the scan finds it (extension case ignored, .txt before .caption)."""
    listing: dict[Path, dict[tuple[str, str], Path]] = {}
    out: dict[Path, Path | None] = {}
    for image in images:
        folder = image.parent
        if folder not in listing:
            names: dict[tuple[str, str], Path] = {}
            for entry in sorted(os.listdir(folder)):
                stem, ext = os.path.splitext(entry)
                if ext.lower() in CAPTION_EXTENSIONS and (folder / entry).is_file():
                    names.setdefault((stem, ext.lower()), folder / entry)
            listing[folder] = names
        stem = os.path.splitext(image.name)[0]
        out[image] = next((listing[folder][(stem, e)] for e in CAPTION_EXTENSIONS
                           if (stem, e) in listing[folder]), None)
    return out


def read_captions(root: Path | str) -> DatasetCaptions:
    """Every usable image of the dataset and its own caption (raises DatasetError when unreadable)."""
    scan = scan_dataset(root)
    root = scan.root
    metadata = _read_metadata(root) if scan.layout == "imagefolder" else None
    sidecars = _sidecars([r.path for r in scan.records])
    counts = Counter(p.suffix.lower() for p in sidecars.values() if p is not None)
    extension = counts.most_common(1)[0][0] if counts else ".txt"
    entries: list[CaptionEntry] = []
    for record in scan.records:
        row_index = metadata.index.get(path_key(record.path)) if metadata else None
        if metadata is not None and (row_index is not None or sidecars[record.path] is None):
            row = metadata.rows[row_index] if row_index is not None else None
            text = _metadata_text(metadata, row) if isinstance(row, dict) else None
            entries.append(CaptionEntry(record.path, text, metadata.path))
            continue
        sidecar = sidecars[record.path]
        if sidecar is None:
            entries.append(CaptionEntry(record.path, None, record.path.with_suffix(extension)))
            continue
        try:
            entries.append(CaptionEntry(record.path, sidecar.read_bytes().decode("utf-8-sig"), sidecar))
        except (OSError, UnicodeDecodeError) as exc:
            entries.append(CaptionEntry(record.path, None, sidecar, unreadable=str(exc)))
    return DatasetCaptions(root, scan.layout, entries, extension, metadata)
