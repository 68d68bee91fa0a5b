"""`sdstudio sample --model` for SD3: a diffusers SD3 folder (or a transformer file with its text encoders and
VAE in a config folder's layout), with an optional LoRA applied by diffusers' own
StableDiffusion3Pipeline.load_lora_weights (the diffusers layout; diffusers reads no kohya SD3 LoRA)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ...sampling.from_files import LoadedBaseModel, LoraFileError
from ..family import ModelFamily
from ..flux.sampling import apply_flux_lora, ready_for_sampling, sampling_config
from .model import load_components, make_bundle


def load_sd3_for_sampling(family: ModelFamily, path: Path, device: torch.device, *, lora: Path | None,
                          config_folder: Path | None, files: Mapping[str, Path]) -> LoadedBaseModel:
    config = sampling_config(family, path, config_folder, files)
    bundle = make_bundle(load_components(config), config, torch.device("cpu"), lora=False)
    modules = 0
    if lora is not None:
        _refuse_kohya(lora)
        modules = apply_flux_lora(family, bundle, lora, path)  # the family's pipeline's load_lora_weights
    # the variant's preview defaults
    return ready_for_sampling(family, bundle, config, path, device, lora, modules,
                              bundle.model_family.sampling.as_dict())


def _refuse_kohya(lora: Path) -> None:
    """diffusers silently loads nothing of a kohya-named SD3 LoRA: say so instead of sampling the base model."""
    from safetensors import safe_open

    if not lora.is_file() or lora.suffix.lower() != ".safetensors":
        raise LoraFileError(f"lora {lora}: expected a .safetensors LoRA file")
    with safe_open(str(lora), framework="pt") as fh:
        keys = list(fh.keys())
    if keys and all(k.startswith("lora_") for k in keys):
        raise LoraFileError(f"lora {lora}: an SD3 LoRA in kohya names, which diffusers cannot read; export the run "
                            "as diffusers (sdstudio export --format diffusers) or load it in ComfyUI")
