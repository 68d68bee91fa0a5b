"""Automatic captions for a dataset: WD14-format taggers (onnxruntime) and image-to-text captioners
(transformers), run over a dataset by ``job.run_caption_job`` (batched, resumable, undoable)."""

from __future__ import annotations

from typing import Any, Protocol

from PIL import Image


class Labeler(Protocol):
    """Something that turns images into caption text."""

    batch_size: int

    @property
    def tag_style(self) -> bool:
        """True when the text is a comma-separated tag list (a tagger), False for prose."""

    def settings(self) -> dict[str, Any]:
        """What decides the output (model folder, thresholds, ...): a resumed job must match it."""

    def label(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order."""
