"""What the transformer families (Flux, SD3, ...) do alike when a run's model is put together: the weight dtype
of the frozen parts, freezing the encoders, and the transformer's seeded peft LoRA (fp32 adapters on a frozen
base). Moved here from ``flux/model.py`` so every family shares one copy."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..config import RunConfig


def weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype: the mixed-precision dtype on a GPU, fp32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.train.mixed_precision, torch.float32)


def optional_path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def prepare_transformer(transformer: Any, frozen: Iterable[torch.nn.Module], config: RunConfig,
                        device: torch.device, dtype: torch.dtype, target_modules: Any, *, lora: bool,
                        full: bool = False, denoiser_device: torch.device | None = None) -> None:
    """Freeze the ``frozen`` encoders and the transformer in ``dtype`` on ``device``; with ``lora`` add the run's peft
    adapter (lora.type, seeded by train.seed) on ``target_modules``, its parameters fp32, and put the transformer in
    training mode; with ``full`` the whole transformer trains in fp32.
    The transformer goes to ``denoiser_device`` when given (the CPU while block swap places it)."""
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
        module.to(device, dtype=dtype)
    transformer.requires_grad_(False)
    transformer.to(denoiser_device or device, dtype=dtype)
    if lora:
        from .adapters import peft_adapter_config

        torch.manual_seed(config.train.seed)
        # lora.type: LoRA, or LoHa / LoKr / DoRA / OFT (peft), on the same target layers
        transformer.add_adapter(peft_adapter_config(config.lora.model_dump(), target_modules))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable parameters are always fp32
        transformer.train()
    elif full:  # full fine-tune: every transformer weight trains, in fp32 (mixed precision autocasts)
        transformer.to(dtype=torch.float32)
        transformer.requires_grad_(True)
        transformer.train()
    else:
        transformer.eval()
