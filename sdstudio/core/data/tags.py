"""Comma-separated tag captions: telling them from prose, the dataset's tag table, and bulk edits.

Tag caption or prose? Each line of a caption is looked at on its own (lines are alternative captions). A line
is a tag list when every comma-separated piece is short: at most ``MAX_TAG_WORDS`` words and no sentence
punctuation (``.``, ``!``, ``?``, ``;`` or ``:`` inside or at the end of a piece). "1girl, solo, long hair" and
"sks dog" are tag lines; "A photo of a dog on a beach." and "a dog, running across the wet sand near the
sea" are prose. Bulk edits change tag lines only, unless the caller asks for prose too (``include_prose``),
in which case a prose line is split at its commas like any other.

Matching is exact after trimming spaces; edits keep each line's ending (``\\n`` or ``\\r\\n``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_TAG_WORDS = 4
_SENTENCE = re.compile(r"[.!?;:](\s|$)")


def split_tags(line: str) -> list[str]:
    return [t.strip() for t in line.split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def is_tag_line(line: str) -> bool:
    tags = split_tags(line)
    if not tags:
        return False
    return all(len(t.split()) <= MAX_TAG_WORDS and not _SENTENCE.search(t) for t in tags)


def caption_lines(text: str) -> list[tuple[str, str]]:
    """(line, its ending) pairs, so an edit can give every line back its own ending."""
    out = []
    for raw in text.splitlines(keepends=True):
        body = raw.rstrip("\r\n")
        out.append((body, raw[len(body):]))
    return out


def caption_tags(text: str | None, include_prose: bool = False) -> list[str]:
    """The distinct tags of a caption's tag lines, in order of first appearance."""
    seen: dict[str, None] = {}
    for line, _end in caption_lines(text or ""):
        if include_prose or is_tag_line(line):
            seen.update(dict.fromkeys(split_tags(line)))
    return list(seen)


@dataclass(frozen=True)
class TagRow:
    tag: str
    count: int  # images whose caption has the tag
    images: tuple[Path, ...]


def tag_table(captions: dict[Path, str | None], include_prose: bool = False) -> list[TagRow]:
    """Tags by how many images have them (most first, then alphabetically)."""
    found: dict[str, list[Path]] = {}
    for image, text in captions.items():
        for tag in caption_tags(text, include_prose):
            found.setdefault(tag, []).append(image)
    rows = [TagRow(tag, len(images), tuple(images)) for tag, images in found.items()]
    return sorted(rows, key=lambda r: (-r.count, r.tag))


@dataclass(frozen=True)
class TagFilter:
    """Images whose tags include every ``where`` tag and none of the ``where_not`` tags."""

    where: tuple[str, ...] = ()
    where_not: tuple[str, ...] = ()

    def matches(self, tags: Sequence[str]) -> bool:
        have = set(tags)
        return all(t in have for t in self.where) and not any(t in have for t in self.where_not)


TagOperation = Callable[[list[str]], list[str]]


def _dedupe(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def rename(old: str, new: str) -> TagOperation:
    def apply(tags: list[str]) -> list[str]:
        return _dedupe([new if t == old else t for t in tags])
    return apply


def remove(tag: str) -> TagOperation:
    return lambda tags: [t for t in tags if t != tag]


def add(tag: str, first: bool = False) -> TagOperation:
    def apply(tags: list[str]) -> list[str]:
        rest = [t for t in tags if t != tag]
        if first:
            return [tag, *rest]
        return tags if tag in tags else [*tags, tag]
    return apply


def move_first(tag: str) -> TagOperation:
    return lambda tags: [tag, *(t for t in tags if t != tag)] if tag in tags else tags


def replace_text(old: str, new: str) -> TagOperation:
    """Replace text inside every tag (e.g. "_" -> " "); tags that become empty are dropped."""
    return lambda tags: _dedupe([r for r in (t.replace(old, new).strip() for t in tags) if r])


def dedupe() -> TagOperation:
    return _dedupe


@dataclass
class TagEditPlan:
    """What a bulk edit would change: image -> (old caption, new caption), for the preview and the write."""

    changes: dict[Path, tuple[str | None, str]] = field(default_factory=dict)
    matched: int = 0  # images the filter selected
    skipped_prose: int = 0  # selected images whose caption has prose lines that were left alone


def edit_caption(text: str | None, operations: Sequence[TagOperation],
                 include_prose: bool = False) -> tuple[str, bool]:
    """(new caption, whether prose lines were left alone). A missing caption is an empty tag line."""
    lines = caption_lines(text or "") or [("", "")]
    out: list[str] = []
    left_prose = False
    for line, ending in lines:
        if line.strip() and not include_prose and not is_tag_line(line):
            left_prose = True
            out.append(line + ending)
            continue
        if not line.strip() and len(lines) > 1:
            out.append(line + ending)  # blank separator lines between alternatives stay
            continue
        tags = split_tags(line)
        for operation in operations:
            tags = operation(tags)
        new = join_tags(tags)
        out.append((new if new != join_tags(split_tags(line)) else line) + ending)
    return "".join(out), left_prose


def plan_tag_edit(captions: dict[Path, str | None], operations: Sequence[TagOperation],
                  selection: TagFilter = TagFilter(), include_prose: bool = False,
                  images: Iterable[Path] | None = None) -> TagEditPlan:
    """Apply ``operations`` to the tag lines of the selected images (``images`` limits it further)."""
    plan = TagEditPlan()
    allowed = set(images) if images is not None else None
    for image, text in captions.items():
        if allowed is not None and image not in allowed:
            continue
        if not selection.matches(caption_tags(text, include_prose)):
            continue
        plan.matched += 1
        new, left_prose = edit_caption(text, operations, include_prose)
        plan.skipped_prose += int(left_prose)
        if new != (text or ""):
            plan.changes[image] = (text, new)
    return plan
