"""`sdstudio sample --model` for Chroma: a diffusers Chroma folder (or a transformer file with its T5 and VAE in
a config folder's layout), with an optional LoRA (kohya or diffusers names) applied by diffusers' own
ChromaPipeline.load_lora_weights (Flux's loader: ``flux/sampling.apply_flux_lora``); real classifier-free
guidance with the negative prompt (``sampling/sampler.flow_pairs``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ...sampling.from_files import LoadedBaseModel
from ..family import ModelFamily
from ..flux.sampling import apply_flux_lora, ready_for_sampling, sampling_config
from .model import load_components, make_bundle


def load_chroma_for_sampling(family: ModelFamily, path: Path, device: torch.device, *, lora: Path | None,
                             config_folder: Path | None, files: Mapping[str, Path]) -> LoadedBaseModel:
    config = sampling_config(family, path, config_folder, files)
    bundle = make_bundle(load_components(config), config, torch.device("cpu"), lora=False)
    modules = apply_flux_lora(family, bundle, lora, path) if lora is not None else 0
    return ready_for_sampling(family, bundle, config, path, device, lora, modules)
