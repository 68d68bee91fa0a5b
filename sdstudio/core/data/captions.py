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
                    dropout: float) -> str:
    """Caption dropout, then keep the first ``keep_tokens`` comma-separated tags and shuffle the rest."""
    if dropout > 0 and rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep = max(0, keep_tokens)
    rest = tags[keep:]
    rng.shuffle(rest)
    return ", ".join(tags[:keep] + rest)
