"""Captions from a vision-language (chat) model with an instruction: Qwen2-VL / Qwen2.5-VL class models,
JoyCaption-style, loaded with ``AutoModelForImageTextToText`` from a local folder, never downloading.

The instruction goes through the model's own chat template (``chat_template.jinja`` / ``chat_template.json``
in the folder): one user turn holding the image and the prompt, then the assistant's answer is generated and
only the new tokens are kept. ``open_captioner`` picks this class for folders with a chat template and the
BLIP-style ``ImageToTextCaptioner`` for the others.

transformers' Qwen2-VL processors also build a video processor, which needs torchvision; without it the
processor cannot be built at all. For those models the same steps run here from the folder's tokenizer and
image processor (each image placeholder expanded to the image's number of merged patches, as the processor
does), so captioning images never needs torchvision.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from sdstudio.core.captioning.image_to_text import CaptionerOptions, ImageToTextCaptioner
from sdstudio.core.captioning.model_folder import model_source, pick_device
from sdstudio.core.errors import UserError

DEFAULT_PROMPT = "Describe this image in one sentence."
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
IMAGE_TOKEN = "<|image_pad|>"  # Qwen2-VL's placeholder, repeated once per merged patch


def _cached(source: str, name: str) -> Path | None:
    """``name`` in the model folder (or in the hub cache for a hub name); None when absent."""
    folder = Path(source)
    if folder.is_dir():
        return folder / name if (folder / name).is_file() else None
    from transformers.utils import cached_file

    found = cached_file(source, name, local_files_only=True, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found) if found else None


def chat_template(source: str) -> str | None:
    """The model's chat template from its folder, or None (a BLIP-style captioner has none)."""
    for name in TEMPLATE_FILES:
        path = _cached(source, name)
        if path is None:
            continue
        text = path.read_text(encoding="utf-8")
        return str(json.loads(text).get("chat_template", "")) or None if name.endswith(".json") else text
    return None


class _QwenVLInputs:
    """What a Qwen2-VL processor does for images and text, built from the tokenizer and image processor."""

    def __init__(self, source: str, template: str) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        self.chat_template = template
        if IMAGE_TOKEN not in self.tokenizer.get_vocab():
            raise UserError(f"the tokenizer of {source} has no {IMAGE_TOKEN} token: only Qwen2-VL class models "
                            "run without transformers' processor (install torchvision for the others).")

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return str(self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs))

    def __call__(self, *, text: list[str], images: list[Image.Image], padding: bool = True,
                 return_tensors: str = "pt") -> Any:
        from transformers import BatchFeature

        vision = self.image_processor(images=images, return_tensors=return_tensors)
        merged = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        counts = iter([int(g.prod()) // merged for g in vision["image_grid_thw"]])
        expanded = []
        for prompt in text:
            parts = prompt.split(IMAGE_TOKEN)
            expanded.append(parts[0] + "".join(IMAGE_TOKEN * next(counts) + part for part in parts[1:]))
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**encoded, **vision})

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return list(self.tokenizer.batch_decode(ids, **kwargs))


class VisionLanguageCaptioner:
    """Prose captions from a chat vision-language model answering ``options.prompt`` for each image."""

    tag_style = False

    def __init__(self, source: Path | str, options: CaptionerOptions | None = None) -> None:
        self.options = options or CaptionerOptions()
        self.prompt = (self.options.prompt or "").strip() or DEFAULT_PROMPT
        self.batch_size = max(1, self.options.batch_size)
        self.source = model_source(source, "captioner")
        template = chat_template(self.source)
        if template is None:
            raise UserError(f"{self.source} has no chat template (chat_template.jinja): it is not a "
                            "vision-language chat model.")
        self.processor = self._load_processor(template)
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its end
        self.device = pick_device(self.options.device)
        self.model = self._load_model()

    def _load_processor(self, template: str) -> Any:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(self.source, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a video processor that needs torchvision
            try:
                return _QwenVLInputs(self.source, template)
            except (OSError, ValueError) as inner:
                raise UserError(f"the processor of {self.source} cannot be loaded offline ({exc}; {inner}).") \
                    from inner
        if not getattr(processor, "chat_template", None):
            processor.chat_template = template
        return processor

    def _load_model(self) -> Any:
        import torch
        from transformers import AutoModelForImageTextToText

        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.source, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.source} is not a vision-language model transformers can load offline "
                            f"({str(exc).splitlines()[0]}).") from exc
        return model.to(self.device).eval()

    def settings(self) -> dict[str, Any]:
        o = self.options
        return {"captioner": self.source, "chat": True, "prompt": self.prompt, "max_new_tokens": o.max_new_tokens,
                "num_beams": o.num_beams}

    def chat_text(self) -> str:
        """The prompt as the model reads it: one user turn with the image and the instruction."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def label(self, images: list[Image.Image]) -> list[str]:
        import torch

        pictures = [im.convert("RGB") for im in images]
        text = self.chat_text()
        inputs = self.processor(text=[text] * len(pictures), images=pictures, padding=True,
                                return_tensors="pt").to(self.device)
        if "pixel_values" in inputs and self.device.startswith("cuda"):
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.options.max_new_tokens,
                                      num_beams=self.options.num_beams, do_sample=False)
        answers = self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in answers]


def open_captioner(source: Path | str, options: CaptionerOptions | None = None) -> Any:
    """The captioner for a model folder: a vision-language chat model when it has a chat template, else a
    BLIP-style image-to-text model."""
    if chat_template(model_source(source, "captioner")) is not None:
        return VisionLanguageCaptioner(source, options)
    return ImageToTextCaptioner(source, options)
