"""Image embeddings from a CLIP vision model the user has on disk (``eval.memorisation_clip_model``): a
transformers folder of a CLIPModel or a CLIPVisionModelWithProjection (config.json + weights), read offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError

CONFIG_KEY = "eval.memorisation_clip_model"
# OpenAI CLIP's preprocessing, used when the folder has no preprocessor_config.json
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipFeatures:
    """``features(uint8 (N, H, W, 3)) -> (N, D)``: the projected image embedding (the pooled output when the
    model has no projection)."""

    def __init__(self, folder: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        from transformers import CLIPVisionModelWithProjection

        path = Path(folder)
        if not (path / "config.json").is_file():
            raise UserError(f"{CONFIG_KEY} = {str(folder)!r}: not a transformers model folder (no config.json); "
                            "give the folder of a CLIP model, e.g. openai/clip-vit-base-patch32 downloaded once")
        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"{CONFIG_KEY} = {str(folder)!r}: could not load a CLIP vision model: "
                            f"{str(exc).splitlines()[0]}") from None
        self.model.eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size
        self.size = int(self.model.config.image_size)
        mean, std = _MEAN, _STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            data: dict[str, Any] = json.loads(pre.read_text(encoding="utf-8"))
            mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        import torch.nn.functional as F

        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.as_tensor(np.ascontiguousarray(images[start:start + self.batch_size]))
            x = x.permute(0, 3, 1, 2).float() / 255.0
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
            x = ((x - self.mean) / self.std).to(self.device)
            result = self.model(pixel_values=x)
            emb = result.image_embeds if getattr(result, "image_embeds", None) is not None else result.pooler_output
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out, axis=0)
