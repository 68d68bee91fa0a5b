"""A captioning run over a dataset: batched, undoable, resumable.

Existing captions are never overwritten silently: ``mode`` says what happens to an image that has one
(``replace`` it, ``append`` the new caption to it, or ``skip`` the image). Every batch goes through one undo
journal entry, so ``sdstudio dataset undo`` restores the whole run. The job's progress is kept in
``DIR/.sdstudio/caption-job.json`` (the images done, the journal entry, the settings): a run that stops
half-way (Ctrl-C, a crash, the Stop button) continues with the same settings where it stopped, and adds to
the same undo entry. Images captioned before the stop are not captioned again, which matters for ``append``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from sdstudio.core.atomic import write_text_atomic
from sdstudio.core.captioning import Labeler
from sdstudio.core.data.caption_store import CaptionEntry, read_captions
from sdstudio.core.data.tags import is_tag_line, join_tags, split_tags
from sdstudio.core.data.undo_journal import JournalEntry, journal_root
from sdstudio.core.errors import UserError
from sdstudio.core.events import Progress

MODES = ("replace", "append", "skip")
JOB_FILE = Path(".sdstudio") / "caption-job.json"


@dataclass
class CaptionJobResult:
    written: int = 0  # captions written in this call
    skipped_existing: int = 0  # images with a caption left alone (mode skip)
    already_done: int = 0  # images captioned by the interrupted run this one continues
    failed: list[tuple[Path, str]] = field(default_factory=list)  # images that could not be opened
    journal: str | None = None  # the undo entry holding the old captions
    resumed: bool = False
    stopped: bool = False  # should_stop() ended it early; running it again continues


def with_trigger(text: str, trigger: str | None, tag_style: bool) -> str:
    """Put the trigger word first (once)."""
    if not trigger:
        return text
    if tag_style:
        return join_tags([trigger, *(t for t in split_tags(text) if t != trigger)])
    return text if text.startswith(trigger) else f"{trigger}, {text}" if text else trigger


def compose_caption(old: str | None, new: str, mode: str, trigger: str | None, tag_style: bool) -> str:
    """The caption to write. ``append`` merges new tags into a one-line tag caption (no duplicates);
    anything else gets the new caption as an extra line, i.e. an alternative caption."""
    if mode != "append" or not (old or "").strip():
        return with_trigger(new, trigger, tag_style)
    assert old is not None
    lines = [line for line in old.splitlines() if line.strip()]
    if tag_style and len(lines) == 1 and is_tag_line(lines[0]):
        merged = list(dict.fromkeys(split_tags(lines[0]) + split_tags(new)))
        return with_trigger(join_tags(merged), trigger, tag_style)
    return old.rstrip("\r\n") + "\n" + with_trigger(new, trigger, tag_style)


def _job_file(root: Path) -> Path:
    return root / JOB_FILE


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _load_job(root: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The interrupted job to continue: same settings, and its undo entry still there."""
    try:
        state = json.loads(_job_file(root).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict) or _canonical(state.get("settings")) != _canonical(settings):
        return None
    journal = state.get("journal")
    if journal and not (journal_root(root) / str(journal)).is_dir():
        return None  # that run was undone: start again
    return state


def _open_image(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        # As training sees it: EXIF rotation applied.
        return ImageOps.exif_transpose(im)


def run_caption_job(root: Path | str, labeler: Labeler, *, mode: str = "skip", trigger: str | None = None,
                    images: Iterable[Path] | None = None, restart: bool = False,
                    progress: Callable[[Progress], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> CaptionJobResult:
    """Caption the dataset at ``root`` (or only ``images`` of it) with ``labeler``."""
    if mode not in MODES:
        raise UserError(f"caption mode {mode!r} is not one of {', '.join(MODES)}.")
    trigger = (trigger or "").strip() or None
    captions = read_captions(root)
    root = captions.root
    settings = {"labeler": labeler.settings(), "mode": mode, "trigger": trigger}
    state = None if restart else _load_job(root, settings)
    result = CaptionJobResult(resumed=state is not None)
    if state is None:
        state = {"version": 1, "settings": settings, "journal": None, "done": []}
    done = set(state["done"])
    entry = JournalEntry.open(root, state["journal"]) if state["journal"] else None
    result.journal = state["journal"]

    wanted = {Path(p).absolute() for p in images} if images is not None else None
    todo: list[CaptionEntry] = []
    for item in captions.entries:
        if wanted is not None and item.image not in wanted:
            continue
        if captions.relative(item.image) in done:
            result.already_done += 1
        elif item.unreadable:
            result.failed.append((item.image, f"its caption {item.file.name} cannot be read"))
        elif mode == "skip" and (item.text or "").strip():
            result.skipped_existing += 1
        else:
            todo.append(item)

    total = len(todo)
    if progress:
        progress(Progress(0, total, "captioning"))
    for start in range(0, total, labeler.batch_size):
        if should_stop is not None and should_stop():
            result.stopped = True
            break
        batch, pictures = [], []
        for item in todo[start:start + labeler.batch_size]:
            try:
                pictures.append(_open_image(item.image))
                batch.append(item)
            except (OSError, ValueError) as exc:
                result.failed.append((item.image, str(exc)))
        new_texts: dict[Path, str] = {}
        if batch:
            texts = labeler.label(pictures)
            for item, text in zip(batch, texts, strict=True):
                if text.strip():
                    new_texts[item.image] = compose_caption(item.text, text, mode, trigger, labeler.tag_style)
                else:  # never replace a caption with nothing
                    result.failed.append((item.image, "the model gave no caption (no tag above the threshold?)"))
        if new_texts:
            if entry is None:
                entry = JournalEntry.create(root, f"caption ({mode})")
                state["journal"] = result.journal = entry.name
            entry.write(captions.stage(new_texts))
            result.written += len(new_texts)
        state["done"] += [captions.relative(item.image) for item in batch]
        write_text_atomic(_job_file(root), json.dumps(state, indent=1, ensure_ascii=False))
        if progress:
            progress(Progress(min(start + labeler.batch_size, total), total, "captioning"))
    if not result.stopped:
        try:
            os.remove(_job_file(root))  # finished: the next run is a new job
        except FileNotFoundError:
            pass
    return result
