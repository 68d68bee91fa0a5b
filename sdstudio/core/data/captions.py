"""Captions: reading caption files, templates, and the per-step choices (alternatives, tag shuffling,
dropout)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path


def read_caption_file(path: Path) -> tuple[tuple[str, ...] | None, str]:
    """The caption's non-empty lines, or (None, why not)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"is not UTF-8 text (byte {exc.start})"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    return tuple(line.strip() for line in text.splitlines() if line.strip()), ""


def apply_template(captions: tuple[str, ...], template: str | None) -> tuple[str, ...]:
    if not template:
        return captions
    return tuple(template.replace("{caption}", c) for c in captions)


def choose_caption(captions: Sequence[str], rng: random.Random) -> str:
    """One of an image's alternative captions, picked at random ("" when it has none)."""
    return captions[rng.randrange(len(captions))] if captions else ""


def process_caption(caption: str, rng: random.Random, *, shuffle_tags: bool, keep_tokens: int,
                    dropout: float, tag_dropout: float = 0.0) -> str:
    """Caption dropout, then the comma-separated tags after the first ``keep_tokens``: shuffled
    (``shuffle_tags``) and each dropped with probability ``tag_dropout`` (kohya's order: keep, shuffle,
    drop). The kept tags are never shuffled or dropped."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle_tags and not tag_dropout:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep = max(0, keep_tokens)
    rest = tags[keep:]
    if shuffle_tags:
        rng.shuffle(rest)
    if tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    return ", ".join(tags[:keep] + rest)


def decorate_caption(caption: str, *, prefix: str = "", suffix: str = "", folder_tag: str = "") -> str:
    """The caption with a folder's trigger word (``folder_tag``, as a first tag), then ``prefix`` in front
    and ``suffix`` after, joined with ", " (so they are tags that ``keep_tokens`` can hold in place)."""
    parts = [p for p in (folder_tag.strip(), prefix.strip(), caption.strip(), suffix.strip()) if p]
    return ", ".join(parts)


def folder_trigger(concept: str) -> str:
    """The trigger word of a kohya folder name: ``10_sks dog`` -> ``sks dog`` ("" for other names)."""
    head, sep, tail = concept.partition("_")
    return tail.strip() if sep and head.isdigit() else ""
