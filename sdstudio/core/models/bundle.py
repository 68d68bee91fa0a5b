"""What the training loop needs from a model family, whatever the family is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .family import ModelFamily


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
    # train.blocks_to_swap, installed while the family built the model (core/train/blockswap.py): the swapped
    # blocks' frozen weights never reached the device
    block_swap: Any = None

    def encode_captions(self, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning for prompts (sampling)."""
        raise NotImplementedError

    def encode_batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        """Conditioning for a training batch (SDXL also reads each image's size and crop from it)."""
        return self.encode_captions(batch["captions"], device)

    def diffusion_for(self, diffusion: Any) -> Any:
        """The run's diffusion settings as this model needs them: a base model decides what it predicts
        (override: model.prediction_type) and whether its schedule has zero terminal SNR."""
        if not self.model_family.base_model_decides_prediction:
            return diffusion
        ztsnr = bool(diffusion.zero_terminal_snr or self.architecture.get("zero_terminal_snr"))
        return diffusion.model_copy(update={"prediction_type": self.prediction_type, "zero_terminal_snr": ztsnr})

    @property
    def model_family(self) -> ModelFamily:
        """The facts and hooks of this bundle's family."""
        from .registry import get_family

        return get_family(self.family)

    def encoder_identity(self) -> str:
        """Names the pixel -> model-space encoder (the latent cache's namespace)."""
        return f"{self.family}-identity"

    def to_model_space(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: ``<module>.<key>`` for every saved module."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.save_modules.items():
            for key, tensor in module.state_dict().items():
                out[f"{name}.{key}"] = tensor.detach().to("cpu").contiguous()
        return out

    def load_trainable_state(self, weights: dict[str, torch.Tensor], source: Path) -> None:
        from ..errors import CheckpointError

        for name, module in self.save_modules.items():
            prefix = f"{name}."
            sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            try:
                module.load_state_dict(sub, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{source}: weights do not fit this model's {name} "
                                      f"({str(exc).splitlines()[0]}); was the model configuration changed?") from None

    def save_extra(self, folder: Path) -> None:
        """Write files a checkpoint needs besides the weights (tokenizer, configs)."""
