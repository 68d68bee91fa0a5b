"""Image-to-text captioners through transformers (BLIP / BLIP-2 / GIT style): a local model folder loaded
with AutoProcessor + the image-to-text auto class, never downloading (``local_files_only=True``). A name like
``Salesforce/blip-image-captioning-large`` instead of a folder is looked up in the Hugging Face cache only.

Models that need their own code from the hub (Florence-2's ``trust_remote_code``) are not loaded: running
code from a model folder is a decision this tool does not make for the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from sdstudio.core.captioning.model_folder import model_source, pick_device
from sdstudio.core.errors import UserError


@dataclass
class CaptionerOptions:
    prompt: str | None = None  # text the caption continues (BLIP: "a photography of")
    max_new_tokens: int = 40
    num_beams: int = 1
    batch_size: int = 8
    device: str | None = None  # None: the GPU when there is one


def _model_classes() -> list[Any]:
    import transformers

    names = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "BlipForConditionalGeneration")
    return [getattr(transformers, n) for n in names if hasattr(transformers, n)]


class ImageToTextCaptioner:
    """Prose captions from a transformers image-to-text model; ``label`` returns one caption per image."""

    tag_style = False

    def __init__(self, source: Path | str, options: CaptionerOptions | None = None) -> None:
        self.options = options or CaptionerOptions()
        self.batch_size = max(1, self.options.batch_size)
        self.source = model_source(source, "captioner")
        from transformers import AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(self.source, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"the processor of {self.source} cannot be loaded offline ({exc}).") from exc
        self.device = pick_device(self.options.device)
        self.model = self._load_model()

    def _load_model(self) -> Any:
        import torch

        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        errors = []
        for cls in _model_classes():
            try:
                model = cls.from_pretrained(self.source, local_files_only=True, dtype=dtype)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                errors.append(f"{cls.__name__}: {str(exc).splitlines()[0]}")
                continue
            return model.to(self.device).eval()
        raise UserError(f"{self.source} is not an image-to-text model transformers can load offline "
                        f"({'; '.join(errors)}).")

    def settings(self) -> dict[str, Any]:
        o = self.options
        return {"captioner": self.source, "prompt": o.prompt, "max_new_tokens": o.max_new_tokens,
                "num_beams": o.num_beams}

    def label(self, images: list[Image.Image]) -> list[str]:
        import torch

        pictures = [im.convert("RGB") for im in images]
        kwargs: dict[str, Any] = {"images": pictures, "return_tensors": "pt"}
        if self.options.prompt:
            kwargs["text"] = [self.options.prompt] * len(pictures)
        inputs = self.processor(**kwargs).to(self.device)
        if "pixel_values" in inputs and self.device.startswith("cuda"):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.options.max_new_tokens,
                                      num_beams=self.options.num_beams)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]
