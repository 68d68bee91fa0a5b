"""Masks from a text prompt with CLIPSeg (``CLIPSegForImageSegmentation`` through transformers): a local model
folder (e.g. a copy of CIDAS/clipseg-rd64-refined), never downloading (``local_files_only=True``); a hub name
instead of a folder is looked up in the Hugging Face cache only.

The model predicts a low-resolution (352 px) map of where the prompt's object is; the map is scaled to each
image's size and thresholded: pixels above ``threshold`` are white (trained), the rest black.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdstudio.core.captioning.model_folder import model_source, pick_device
from sdstudio.core.data.masks import MaskMaker
from sdstudio.core.errors import UserError


@dataclass
class SegmenterOptions:
    threshold: float = 0.4  # sigmoid probability above which a pixel belongs to the prompt's object
    batch_size: int = 8
    device: str | None = None  # None: the GPU when there is one


class ClipSegSegmenter:
    """``masks(images, prompt)``: one L mask per image, the image's size, 255 where the prompt's object is."""

    def __init__(self, folder: Path | str, options: SegmenterOptions | None = None) -> None:
        self.options = options or SegmenterOptions()
        if not 0.0 <= self.options.threshold <= 1.0:
            raise UserError(f"the mask threshold must be between 0 and 1, not {self.options.threshold}")
        self.source = model_source(folder, "segmenter")
        self.batch_size = max(1, self.options.batch_size)
        import torch
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        try:
            self.processor = CLIPSegProcessor.from_pretrained(self.source, local_files_only=True)
            model = CLIPSegForImageSegmentation.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.source} is not a CLIPSeg model folder transformers can load offline "
                            f"({str(exc).splitlines()[0]}).") from exc
        self.device = pick_device(self.options.device)
        self.model: Any = model.to(self.device).eval()
        self._torch = torch

    def probabilities(self, images: list[Image.Image], prompt: str) -> Any:
        """The model's (n, h, w) map of sigmoid probabilities at its own resolution."""
        torch = self._torch
        pictures = [im.convert("RGB") for im in images]
        inputs = self.processor(text=[prompt] * len(pictures), images=pictures, padding=True,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**inputs).logits
        if logits.ndim == 2:  # some versions squeeze a batch of one
            logits = logits[None]
        return torch.sigmoid(logits.float()).cpu()

    def masks(self, images: list[Image.Image], prompt: str) -> list[Image.Image]:
        if not prompt.strip():
            raise UserError("a mask prompt is needed: say what to keep, e.g. --prompt 'a dog'")
        torch = self._torch
        out: list[Image.Image] = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            probs = self.probabilities(batch, prompt)
            for image, prob in zip(batch, probs, strict=True):
                scaled = torch.nn.functional.interpolate(prob[None, None], size=(image.height, image.width),
                                                         mode="bilinear", align_corners=False)[0, 0]
                keep = (scaled > self.options.threshold).to(torch.uint8).mul(255).numpy()
                out.append(Image.fromarray(keep))  # uint8 HxW: an L image
        return out


def prompt_mask_maker(folder: Path | str, prompt: str, options: SegmenterOptions | None = None) -> MaskMaker:
    """A mask maker keeping what ``prompt`` names, with the CLIPSeg model of ``folder`` (loaded now:
    call it off the GUI thread)."""
    prompt = prompt.strip()
    if not prompt:
        raise UserError("a mask prompt is needed: say what to keep, e.g. 'a dog'")
    segmenter = ClipSegSegmenter(folder, options)

    def make(images: list[Image.Image]) -> list[Image.Image | str]:
        return list(segmenter.masks(images, prompt))

    return make
