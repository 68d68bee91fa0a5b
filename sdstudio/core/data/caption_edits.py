"""Bulk tag edits on a dataset folder: plan (the preview), then write through the undo journal."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from sdstudio.core.data.caption_store import DatasetCaptions, read_captions
from sdstudio.core.data.tags import TagEditPlan, TagFilter, TagOperation, TagRow, plan_tag_edit, tag_table
from sdstudio.core.data.undo_journal import JournalEntry


def editable_captions(captions: DatasetCaptions) -> dict[Path, str | None]:
    """image -> caption text, leaving out captions that cannot be read (never overwritten blindly)."""
    return {e.image: e.text for e in captions.entries if not e.unreadable}


def dataset_tag_table(root: Path | str, include_prose: bool = False) -> tuple[DatasetCaptions, list[TagRow]]:
    captions = read_captions(root)
    return captions, tag_table(editable_captions(captions), include_prose)


def plan_dataset_edit(captions: DatasetCaptions, operations: Sequence[TagOperation],
                      selection: TagFilter | None = None, include_prose: bool = False,
                      images: Iterable[Path] | None = None) -> TagEditPlan:
    return plan_tag_edit(editable_captions(captions), operations, selection or TagFilter(), include_prose, images)


def write_plan(captions: DatasetCaptions, plan: TagEditPlan, label: str) -> JournalEntry | None:
    """Write the planned captions; the journal entry holds the old bytes (None when nothing changes)."""
    if not plan.changes:
        return None
    contents = captions.stage({image: new for image, (_old, new) in plan.changes.items()})
    entry = JournalEntry.create(captions.root, label)
    entry.write(contents)
    return entry
