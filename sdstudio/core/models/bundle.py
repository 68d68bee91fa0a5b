"""What the training loop needs from a model family, whatever the family is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class ModelBundle:
    """The modules of one model plus how to condition and save them.

    ``trainable`` is a single nn.Module whose ``forward(noisy, timesteps, cond)`` returns the prediction,
    so accelerate (DDP, mixed precision) wraps one thing. ``cond`` is whatever ``encode_batch`` made.
    """

    family: str
    trainable: nn.Module
    # Named modules whose weights a checkpoint stores (the trainable ones for a full fine-tune,
    # the adapters for LoRA); values are functions returning a state dict.
    save_modules: dict[str, nn.Module]
    prediction_type: str
    in_channels: int
    sample_size: int  # side of the model-space tensor (pixels for "pixel", latents otherwise)
    architecture: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    frozen: dict[str, nn.Module] = field(default_factory=dict)

    def encode_captions(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def save_extra(self, folder: Path) -> None:
        """Write files a checkpoint needs besides the weights (tokenizer, configs)."""
